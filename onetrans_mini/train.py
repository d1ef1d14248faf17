"""Training and evaluation: what ``onetrans-mini train`` / ``evaluate`` run.

Top to bottom:

1. ``TrainConfig``: every knob of a training run, saved with the run.
2. ``build_model``: the model registry (``onetrans`` here; the paper's baselines from ``baselines.py``).
3. Devices, seeds and ``torch.distributed`` (DDP under ``torchrun``).
4. Optimizers and the learning-rate schedule (AdamW, or the paper's Adagrad + RMSProp).
5. ``predict`` / ``evaluate``: per-task AUC, UAUC, GAUC and logloss of a split.
6. ``train``: request-level batches, early stopping on the first task's validation AUC, checkpoints
   (the run folder, ``load_run`` and the results table are in ``checkpoint.py``).
7. The CLI's ``train`` and ``evaluate`` sub-commands.

Batches are REQUEST-level (``RequestData.loader``): ``batch_requests`` requests with all their
candidates, so a model that computes the S-side once per request (the paper's training and serving
layout) does so in training too. ``batch_requests`` is per process, as the paper's "batch 2048 per GPU".

Distributed data parallel (``torchrun --nproc_per_node=N -m onetrans_mini train ...``): requests are
sharded with a ``DistributedSampler`` (drop_last, so every rank runs the same number of equal-sized
steps); each rank's loss is weighted by its share of the step's candidates, so the averaged gradient
is exactly that of the mean loss over the global batch, whatever the candidates per request.
Evaluation is sharded too (contiguous slices of the split), then predictions, labels and users are
gathered to every rank, so every rank computes the same metrics and takes the same early-stopping
decision without a broadcast. Only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import platform
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .config import PRESETS, DataConfig, ModelConfig, get_preset
from .data import DATASETS, RequestData, load_dataset
from .features import Schema
from .metrics import task_metrics

OPTIMIZERS = ("adamw", "paper")
SCHEDULES = ("cosine", "linear", "constant")
DEVICES = ("auto", "cpu", "cuda")


class TrainError(ValueError):
    """Bad training input (unknown model or device, a missing or corrupt run folder): one clear line."""


# ----------------------------------------------------------------------------------------------
# 1. the config


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained (saved in the run's ``config.json``, restored by ``--resume``).

    Defaults are tuned for ``onetrans-mini train`` (preset ``small`` on ML-100K, 2 CPU threads): about
    80-100 s on a quiet machine, test AUC (like) 0.786 to 0.791 over seeds 0-2 against the user+item floor's
    0.7703. What mattered: the embedding tables' own lr (``embedding_lr``, +0.04 AUC); not dropout, nor
    a 256-event history, nor more than 4 epochs (validation AUC peaks at epoch 3-4).
    """

    epochs: int = 4
    batch_requests: int = 32  # requests per step PER PROCESS (each brings all its candidates)
    lr: float | None = None  # None: 1e-3 for adamw; for "paper" 0.005 scaled by sqrt(candidates per step / 2048)
    weight_decay: float = 0.01  # AdamW, matrices only (not embeddings, norms, biases); "paper" uses none
    optimizer: str = "adamw"  # or "paper": Adagrad for the embedding tables + RMSProp for the dense part
    embedding_lr: float | None = None  # lr of the embedding tables; None: 30 x lr (adamw), 0.05 (paper's Adagrad)
    grad_clip: float | None = 1.0  # global grad-norm clip (adamw); dense part for "paper" (paper: 90)
    grad_clip_embedding: float | None = None  # "paper": embedding tables' clip (paper: 120); None = grad_clip
    warmup: float = 0.05  # fraction of all steps with a linear warm-up
    schedule: str = "cosine"  # after warm-up: "cosine" or "linear" decay to min_lr x lr, or "constant"
    min_lr: float = 0.1  # final lr as a fraction of the peak
    patience: int = 2  # stop after this many epochs without a better validation AUC (first task); 0 = never
    seed: int = 0
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda" or "cuda:N"
    bf16: bool = True  # bf16 autocast on CUDA; CPU always trains in fp32
    activation_checkpointing: bool = False  # passed to the model when it supports it
    compile: bool = False  # torch.compile the model's forward
    max_len: int | None = None  # history events per request; None: min(model max_len, data max_len)
    eval_batch_requests: int = 64
    steps_per_epoch: int | None = None  # cap (smoke runs, tests); None = the whole training split

    def __post_init__(self):
        def check(cond, msg):
            if not cond:
                raise TrainError(f"TrainConfig.{msg}")

        check(isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be an integer >= 1, got {self.epochs!r}")
        check(isinstance(self.batch_requests, int) and self.batch_requests >= 1,
              f"batch_requests must be an integer >= 1, got {self.batch_requests!r}")
        check(self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        check(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        check(0 <= self.warmup < 1, f"warmup is a fraction of all steps in [0, 1), got {self.warmup!r}")
        check(0 <= self.min_lr <= 1, f"min_lr is a fraction of the peak lr in [0, 1], got {self.min_lr!r}")
        check(self.patience >= 0, f"patience must be >= 0, got {self.patience!r}")
        check(self.max_len is None or self.max_len >= 1, f"max_len must be >= 1, got {self.max_len!r}")
        check(self.steps_per_epoch is None or self.steps_per_epoch >= 1,
              f"steps_per_epoch must be >= 1, got {self.steps_per_epoch!r}")
        dev = self.device
        check(dev in DEVICES or (dev.startswith("cuda:") and dev[5:].isdigit()),
              f"device must be one of {DEVICES} or 'cuda:N', got {dev!r}")

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainError(f"train config has unknown field(s) {unknown}; expected a subset of {sorted(names)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# 2. the model registry

# name -> (module, class): imported on first use, so a model that is not there yet fails with a clear
# line while every other model still works
MODELS: dict[str, tuple[str, str]] = {
    "onetrans": ("onetrans_mini.model", "OneTrans"),
    "din-dcnv2": ("onetrans_mini.baselines", "DinDcnV2"),
    "rankmixer-transformer": ("onetrans_mini.baselines", "RankMixerTransformer"),
}


def model_class(name: str) -> type[nn.Module]:
    if name not in MODELS:
        raise TrainError(f"unknown model {name!r}; expected one of {list(MODELS)}")
    module, cls = MODELS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise TrainError(f"model {name!r} needs module {module} ({e}); it is not available in this installation") from e
    if not hasattr(mod, cls):
        raise TrainError(f"model {name!r}: module {module} has no class {cls}")
    return getattr(mod, cls)


def build_model(name: str, model_cfg: ModelConfig, schema: Schema, vocab_sizes) -> nn.Module:
    """``MODELS[name](model_cfg, schema, vocab_sizes)``: every model has the same contract,
    ``logits, loss = model(batch, targets)`` with logits (B, n_tasks)."""
    return model_class(name)(model_cfg, schema, vocab_sizes)


def model_config_for(name: str, model_cfg: ModelConfig, schema: Schema, vocab_sizes) -> ModelConfig:
    """The config to build ``name`` with at the budget of OneTrans at ``model_cfg``.

    OneTrans takes ``model_cfg`` as is; a baseline gets the width that matches OneTrans's dense parameter
    count (``baselines.matched_config``), so that a comparison at one preset is at one budget.
    """
    if name == "onetrans":
        return model_cfg
    model_class(name)  # a clear error first if the module is missing
    from . import baselines

    return baselines.matched_config(name, model_cfg, schema, vocab_sizes).config


def count_params(model: nn.Module) -> dict[str, int]:
    """``model.num_params()`` when the model has it (dense / embedding / total), else the total."""
    if hasattr(model, "num_params"):
        return {k: int(v) for k, v in model.num_params().items()}
    return {"total": sum(p.numel() for p in model.parameters())}


# ----------------------------------------------------------------------------------------------
# 3. devices, seeds, distributed


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> the local rank's GPU when CUDA is available, else the CPU."""
    if name not in DEVICES and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise TrainError(f"unknown device {name!r}; expected one of {list(DEVICES)} or 'cuda:N'")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainError(f"device {name!r} asked for, but CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if name.startswith("cuda:"):
        return torch.device(name)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'s' if n != 1 else ''}, {platform.machine()})"


def seed_everything(seed: int) -> None:
    """Python, numpy and torch (all devices) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    st = {
        "torch": torch.get_rng_state(),
        "numpy": _np_state_to_plain(np.random.get_state()),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(_np_state_from_plain(st["numpy"]))
    random.setstate(_tuplify(st["python"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _np_state_to_plain(s):
    return (s[0], torch.from_numpy(np.asarray(s[1], dtype=np.int64)), int(s[2]), int(s[3]), float(s[4]))


def _np_state_from_plain(s):
    return (s[0], np.asarray(s[1].numpy(), dtype=np.uint32), int(s[2]), int(s[3]), float(s[4]))


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """Rank and world size of the initialized process group (1 process when there is none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialize ``torch.distributed`` from torchrun's environment when ``WORLD_SIZE > 1``:
    nccl on CUDA (one GPU per local rank), gloo on CPU. A no-op for a single process."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return dist_info()
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dist_info()


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _barrier() -> None:
    import torch.distributed as dist

    if dist_info().enabled:
        dist.barrier()


def load_data(name: str, config: DataConfig | None = None, seed: int = 0) -> RequestData:
    """``load_dataset`` that is safe under torchrun: rank 0 prepares (and caches) first, then the others
    read its cache instead of building the same files at the same time."""
    info = dist_info()
    if info.enabled and not info.is_main:
        _barrier()
    data = load_dataset(name, config=config, seed=seed)
    if info.enabled and info.is_main:
        _barrier()
    return data


# ----------------------------------------------------------------------------------------------
# 4. optimizers and schedule


class Optimizers:
    """One or more optimizers stepped together (the paper trains embeddings and dense weights with
    different optimizers), each with the same warm-up + decay multiplier on its own base lr."""

    def __init__(self, parts: list[tuple[str, torch.optim.Optimizer, float | None]]):
        self.parts = parts  # (name, optimizer, grad-norm clip of its parameters or None)
        self.schedulers: list[torch.optim.lr_scheduler.LRScheduler] = []

    def set_schedule(self, fn) -> None:
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, fn) for _, opt, _ in self.parts]

    def clip(self) -> float:
        """Clip each part's global grad norm; returns the largest norm seen (before clipping)."""
        worst = 0.0
        for _, opt, max_norm in self.parts:
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if max_norm and params:
                worst = max(worst, float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        return worst

    def step(self) -> None:
        for _, opt, _ in self.parts:
            opt.step()
        for s in self.schedulers:
            s.step()

    def zero_grad(self) -> None:
        for _, opt, _ in self.parts:
            opt.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        """The current lr of the first (dense) part."""
        return self.parts[0][1].param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for _, opt, _ in self.parts],
                "schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, st: dict) -> None:
        if len(st["optimizers"]) != len(self.parts) or len(st["schedulers"]) != len(self.schedulers):
            raise TrainError("train_state.pt: optimizer layout differs from the run's config (corrupt run folder?)")
        for (_, opt, _), s in zip(self.parts, st["optimizers"]):
            opt.load_state_dict(s)
        for sched, s in zip(self.schedulers, st["schedulers"]):
            sched.load_state_dict(s)


def _embedding_params(model: nn.Module) -> list[nn.Parameter]:
    if hasattr(model, "embedding_parameters"):
        return list(model.embedding_parameters())
    return [p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()]


def default_lr(cfg: TrainConfig, candidates_per_step: float) -> float:
    """``cfg.lr``, else 1e-3 (AdamW), or the paper's RMSProp lr 0.005 at 2048 samples per GPU step scaled
    by sqrt(candidates per step / 2048) (the usual square-root rule for adaptive optimizers)."""
    if cfg.lr is not None:
        return cfg.lr
    if cfg.optimizer == "paper":
        return 0.005 * math.sqrt(min(1.0, candidates_per_step / 2048))
    return 1e-3


def make_optimizers(model: nn.Module, cfg: TrainConfig, lr: float) -> Optimizers:
    emb_ids = {id(p) for p in _embedding_params(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    emb = [p for p in params if id(p) in emb_ids]
    dense = [p for p in params if id(p) not in emb_ids]
    if cfg.optimizer == "paper":
        # paper §7: Adagrad for the sparse embeddings, RMSProp for the dense part, no weight decay,
        # grad-norm clipping per part (90 dense, 120 sparse at the paper's scale)
        parts = [("dense", torch.optim.RMSprop(dense, lr=lr, alpha=0.99, eps=1e-8), cfg.grad_clip)]
        if emb:
            clip_e = cfg.grad_clip if cfg.grad_clip_embedding is None else cfg.grad_clip_embedding
            emb_lr = 0.05 if cfg.embedding_lr is None else cfg.embedding_lr
            parts.append(("embedding", torch.optim.Adagrad(emb, lr=emb_lr), clip_e))
        return Optimizers(parts)
    # AdamW: decay the dense matrices only; embeddings, norms and biases are not decayed. The embedding
    # tables get a 30x larger lr: a row moves only in the few steps whose batch holds its id, from an
    # N(0, 1) start, so at the dense lr the item and user tables stay near their random init (on ML-100K
    # that costs ~0.04 AUC and leaves UAUC far below the item-mean floor; 0.01 -> 0.03 -> 0.1 measured)
    decay = [p for p in dense if p.dim() >= 2]
    no_decay = [p for p in dense if p.dim() < 2]
    emb_lr = 30 * lr if cfg.embedding_lr is None else cfg.embedding_lr
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": emb, "weight_decay": 0.0, "lr": emb_lr}]
    return Optimizers([("all", torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.98)),
                        cfg.grad_clip)])


def lr_multiplier(cfg: TrainConfig, total_steps: int):
    """step -> factor on the peak lr: linear warm-up over ``warmup`` x total, then the decay."""
    warm = int(cfg.warmup * total_steps)

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        p = min(1.0, (step - warm) / max(1, total_steps - warm))
        if cfg.schedule == "cosine":
            return cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * p))
        if cfg.schedule == "linear":
            return 1 - (1 - cfg.min_lr) * p
        return 1.0

    return fn


# ----------------------------------------------------------------------------------------------
# 5. prediction and metrics


def _autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _model_max_len(model: nn.Module, data: RequestData, max_len: int | None) -> int:
    if max_len is not None:
        return max_len
    cfg = getattr(model, "config", None)
    return min(getattr(cfg, "max_len", data.config.max_len), data.config.max_len)


@torch.no_grad()
def predict(model: nn.Module, data: RequestData, split: str = "test", batch_requests: int = 64,
            max_len: int | None = None, bf16: bool = True, shard: bool = True) -> dict[str, np.ndarray]:
    """Probabilities of every candidate of ``split``, in ``data.candidate_rows(split)`` order.

    Returns ``{"prob": (N, n_tasks), "labels": (N, n_tasks), "user": (N,)}``. Under DDP (``shard``) each
    rank scores a contiguous slice of the requests and the slices are gathered in rank order, so every
    rank returns the full split.
    """
    info = dist_info() if shard else DistInfo()
    device = model_device(model)
    max_len = _model_max_len(model, data, max_len)
    n_req = len(data.request_ids(split))
    positions = np.array_split(np.arange(n_req), info.world_size)[info.rank].tolist()
    was_training = model.training
    model.eval()
    scorer = request_level(model)
    probs, labels, users = [], [], []
    try:
        for batch in data.loader(split, batch_requests, max_len=max_len, sampler=positions):
            batch = batch.to(device, non_blocking=True)
            with _autocast(device, bf16):
                logits, _ = scorer(batch)
            probs.append(torch.sigmoid(logits.float()).cpu().numpy())
            labels.append(batch.labels.cpu().numpy())
            users.append(batch.user.cpu().numpy())
    finally:
        model.train(was_training)
    n_tasks = len(data.schema.tasks)
    out = {
        "prob": np.concatenate(probs) if probs else np.zeros((0, n_tasks), np.float32),
        "labels": np.concatenate(labels) if labels else np.zeros((0, n_tasks), np.float32),
        "user": np.concatenate(users) if users else np.zeros((0,), np.int64),
    }
    if info.enabled:
        import torch.distributed as dist

        parts: list = [None] * info.world_size
        dist.all_gather_object(parts, out)
        out = {k: np.concatenate([p[k] for p in parts]) for k in out}
    return out


def request_level(model: nn.Module) -> nn.Module:
    """The module to call in training and scoring: for a causal OneTrans, ``cache.RequestLevel`` (the
    S side once per request, back-propagated once; tested equal to the full forward per candidate),
    so a request of C candidates costs one history encoding, not C. Other models as they are (the
    baselines share their sequence side per request themselves)."""
    from .cache import RequestLevel, supports_request_level

    return RequestLevel(model) if supports_request_level(model) else model


def evaluate(model: nn.Module, data: RequestData, split: str = "test", batch_requests: int = 64,
             max_len: int | None = None, bf16: bool = True) -> dict[str, dict]:
    """Per-task metrics of ``split``: ``{task: {"auc", "uauc", "gauc", "logloss", "n", "users_counted"}}``.

    UAUC / GAUC group by the data's users (``metrics.py``). Runs on the model's device; under DDP the
    split is sharded and gathered (every rank gets the same numbers).
    """
    p = predict(model, data, split, batch_requests, max_len, bf16)
    return {t: task_metrics(p["labels"][:, i], p["prob"][:, i], p["user"]) for i, t in enumerate(data.schema.task_names)}


def _score(val: dict, task: str) -> float:
    """Early-stopping score: validation AUC of the first task (minus logloss if the AUC is undefined)."""
    m = val.get(task, {})
    a = m.get("auc", float("nan"))
    return a if a == a else -m.get("logloss", float("inf"))


# ----------------------------------------------------------------------------------------------
# 6. training


def train(model: nn.Module, data: RequestData, cfg: TrainConfig | None = None, run_dir=None, progress: bool = True,
          resume: bool = False, stop_after: int | None = None, log: bool | None = None) -> dict:
    """Train ``model`` on ``data``'s training split; early-stop on the first task's validation AUC.

    Args:
        model: any registered model (``logits, loss = model(batch, targets)``), on any device: it is
            moved to ``cfg.device``.
        run_dir: where to write metrics.jsonl and checkpoints (``config.json`` is the caller's:
            ``write_config``); None keeps everything in memory.
        resume: continue the run saved in ``run_dir`` from its last finished epoch (weights, optimizer,
            schedule, RNG and early-stopping state): the result equals an uninterrupted run.
        stop_after: stop after this many epochs in total, as if interrupted (``resume`` continues).
        progress: a tqdm bar per epoch (loss, samples/s, lr); ``log``: one line per epoch on stderr
            (default: as ``progress``). Both on rank 0 only.

    Returns the history ``{"epochs": [per-epoch records], "best_epoch", "best_score", "stopped_early",
    "train_seconds", "max_len", "lr", "device"}``. On return the model holds the BEST weights.
    """
    from .checkpoint import append_metrics, load_train_state, save_train_state, write_metrics

    cfg = cfg or TrainConfig()
    info = dist_info()
    device = resolve_device(cfg.device)
    run_dir = Path(run_dir) if run_dir is not None else None
    if resume and (run_dir is None or not (run_dir / "train_state.pt").is_file()):
        raise TrainError(f"cannot resume: {run_dir} has no train_state.pt (expected a run folder written by train)")
    if len(data.request_ids("train")) < info.world_size:
        raise TrainError(f"the training split has {len(data.request_ids('train'))} requests, fewer than the "
                         f"{info.world_size} processes")
    max_len = _model_max_len(model, data, cfg.max_len)
    task0 = data.schema.task_names[0]

    seed_everything(cfg.seed + info.rank)  # dropout masks differ across ranks; weights are rank 0's (DDP)
    model.to(device)
    if device.type == "cuda" and hasattr(model, "check_inputs"):
        model.check_inputs = False  # id-range checks synchronize the GPU on every batch
    if cfg.activation_checkpointing:
        if hasattr(model, "activation_checkpointing"):
            model.activation_checkpointing = True
        else:
            warnings.warn(f"{type(model).__name__} does not support activation checkpointing "
                          f"(no 'activation_checkpointing' attribute); training without it")

    # request-level batches: DistributedSampler also for 1 process, so that the request order at an epoch
    # depends on (seed, epoch) only: N processes x batch_requests == 1 process x N * batch_requests
    from torch.utils.data.distributed import DistributedSampler

    n_train = len(data.request_ids("train"))
    sampler = DistributedSampler(range(n_train), num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    loader = data.loader("train", cfg.batch_requests, max_len=max_len, sampler=sampler)
    steps = len(loader) if cfg.steps_per_epoch is None else min(len(loader), cfg.steps_per_epoch)
    total_steps = steps * cfg.epochs
    cands_per_req = len(data.candidate_rows("train")) / max(1, n_train)
    lr = default_lr(cfg, cfg.batch_requests * cands_per_req)
    opts = make_optimizers(model, cfg, lr)
    opts.set_schedule(lr_multiplier(cfg, total_steps))

    fwd: nn.Module = request_level(model)  # the S side once per request (equal to the full forward)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        fwd = torch.compile(fwd)

    hist = {"epochs": [], "best_epoch": 0, "best_score": -float("inf"), "stopped_early": False,
            "train_seconds": 0.0, "max_len": max_len, "lr": lr, "device": str(device), "world_size": info.world_size}
    best_state = None
    bad_epochs = 0
    start_epoch = 0
    if resume:
        start_epoch, bad_epochs, best_state, hist = load_train_state(run_dir, model, opts, info)
        if info.is_main:  # metrics.jsonl = the epochs the state knows, nothing after
            write_metrics(run_dir, hist["epochs"])
    elif run_dir is not None and info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text("")

    last = stop_after if stop_after is not None else cfg.epochs
    for epoch in range(start_epoch, min(cfg.epochs, last)):
        if hist["stopped_early"]:
            break
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        model.train()
        loss_sum, n_seen, step = 0.0, 0, 0
        bar = _bar(progress and info.is_main, steps, f"epoch {epoch + 1}/{cfg.epochs}")
        for batch in loader:
            if step >= steps:
                break
            batch = batch.to(device, non_blocking=True)
            n_local = batch.n_candidates
            with _autocast(device, cfg.bf16):
                _, loss = fwd(batch, batch.labels)
            # each rank's loss is the mean over ITS candidates; weight it by its share of the global batch
            # so that DDP's gradient average equals the gradient of the global mean
            if info.enabled:
                n_global = _all_reduce_sum([float(n_local)], device)[0]
                weight = n_local * info.world_size / n_global
            else:
                weight = 1.0
            if not torch.isfinite(loss):
                raise TrainError(f"the loss became {float(loss)} at epoch {epoch + 1}, step {step + 1}; "
                                 f"try a lower learning rate (--lr) or gradient clipping")
            (loss * weight).backward()
            opts.clip()
            opts.step()
            opts.zero_grad()
            loss_sum += float(loss.detach()) * n_local
            n_seen += n_local
            step += 1
            if bar is not None:
                el = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_sum / n_seen:.4f}", samples_s=f"{n_seen * info.world_size / el:,.0f}",
                                lr=f"{opts.lr:.2e}", refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()
        if info.enabled:
            loss_sum, n_seen = _all_reduce_sum([loss_sum, float(n_seen)], device)
        train_s = time.perf_counter() - t0
        val = evaluate(model, data, "val", cfg.eval_batch_requests, max_len, cfg.bf16) if len(data.request_ids("val")) else {}
        score = _score(val, task0) if val else -(loss_sum / max(1, n_seen))
        improved = score > hist["best_score"]
        if improved:
            hist["best_score"], hist["best_epoch"], bad_epochs = score, epoch + 1, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
        if cfg.patience and bad_epochs >= cfg.patience:
            hist["stopped_early"] = True
        rec = {
            "epoch": epoch + 1,
            "steps": step,
            "train_loss": loss_sum / max(1, n_seen),
            "train_samples": int(n_seen),
            "samples_per_s": n_seen / train_s,
            "epoch_seconds": time.perf_counter() - t0,
            "lr": opts.lr,
            "val": val,
            "best": improved,
        }
        hist["epochs"].append(rec)
        hist["train_seconds"] += rec["epoch_seconds"]
        if info.is_main and (progress if log is None else log):
            v = val.get(task0, {})
            print(f"epoch {epoch + 1}: train loss {rec['train_loss']:.4f}, val {task0} AUC {v.get('auc', float('nan')):.4f} "
                  f"UAUC {v.get('uauc', float('nan')):.4f} logloss {v.get('logloss', float('nan')):.4f}"
                  f"{'  (best)' if improved else ''}  [{rec['epoch_seconds']:.0f} s, {rec['samples_per_s']:,.0f} samples/s]",
                  file=sys.stderr, flush=True)
        if run_dir is not None:
            save_train_state(run_dir, model, opts, hist, epoch + 1, bad_epochs, improved, info)
            if info.is_main:
                append_metrics(run_dir, rec)
    if best_state is not None:
        model.load_state_dict(best_state)
    return hist


def _bar(on: bool, total: int, desc: str):
    if not on:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0)


# ----------------------------------------------------------------------------------------------
# the CLI's train / evaluate (cli.py registers them)

ABLATIONS = (  # (flag, ModelConfig field, value when the flag is given)
    ("--no-pyramid", "pyramid", False),
    ("--shared-params", "shared_params", True),
    ("--full-attention", "causal", False),
    ("--no-sep", "use_sep", False),
)


def add_train_arguments(p) -> None:
    d = TrainConfig()
    p.add_argument("--dataset", default="movielens-100k",
                   help=f"one of {', '.join(DATASETS)}, or a path to your interactions (default: movielens-100k)")
    p.add_argument("--model", default="onetrans", help=f"one of {', '.join(MODELS)} (default: onetrans)")
    p.add_argument("--preset", default="small", help=f"model size, one of {', '.join(PRESETS)} (default: small)")
    p.add_argument("--device", default="auto", help="auto (GPU when available), cpu, cuda or cuda:N")
    p.add_argument("--epochs", type=int, default=None, help=f"default {d.epochs} (early stopping on validation AUC)")
    p.add_argument("--batch-requests", type=int, default=None, help=f"requests per step and process (default {d.batch_requests})")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 for adamw)")
    p.add_argument("--embedding-lr", type=float, default=None,
                   help="learning rate of the embedding tables (default: 30 x lr for adamw, 0.05 for paper)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="adamw (default) or paper (Adagrad + RMSProp)")
    p.add_argument("--max-len", type=int, default=None, help="history events per request (default: the dataset's)")
    p.add_argument("--dropout", type=float, default=None, help="dropout of the model (default: the preset's)")
    p.add_argument("--seed", type=int, default=None, help="seed of the model, the batches and the synthetic world")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="cap the steps of an epoch (smoke runs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--out", default=None, help="run folder (default: runs/<dataset>-<model>-<preset>-<timestamp>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a saved run from its last finished epoch (its saved configuration is used)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("ablations of the model (paper §7)")
    for flag, name, _ in ABLATIONS:
        g.add_argument(flag, action="store_true", help=f"ModelConfig.{name} switched")
    g.add_argument("--ns-tokenizer", choices=("auto_split", "group_wise"), default=None)
    g.add_argument("--seq-merge", choices=("timestamp_aware", "timestamp_agnostic"), default=None)


def _train_config_from_args(args) -> TrainConfig:
    kw = {k: v for k, v in {
        "epochs": args.epochs, "batch_requests": args.batch_requests, "lr": args.lr, "optimizer": args.optimizer,
        "embedding_lr": args.embedding_lr,
        "seed": args.seed, "steps_per_epoch": args.steps_per_epoch,
    }.items() if v is not None}
    return TrainConfig(device=args.device, compile=args.compile, activation_checkpointing=args.activation_checkpointing,
                       **kw)


def _model_config_from_args(args, data: RequestData) -> ModelConfig:
    if args.preset not in PRESETS:
        raise TrainError(f"unknown preset {args.preset!r}; expected one of {list(PRESETS)}")
    over = {name: value for flag, name, value in ABLATIONS if getattr(args, flag[2:].replace("-", "_"))}
    if args.ns_tokenizer:
        over["ns_tokenizer"] = args.ns_tokenizer
    if args.seq_merge:
        over["seq_merge"] = args.seq_merge
    if args.dropout is not None:
        over["dropout"] = args.dropout
    base = PRESETS[args.preset]
    # the model is sized (pyramid schedule) for the history length the batches really have
    over["max_len"] = args.max_len or min(base.max_len, data.config.max_len)
    try:
        return get_preset(args.preset, **over)
    except ValueError as e:
        raise TrainError(str(e)) from e


def _default_out(args) -> Path:
    ds = Path(args.dataset).stem if Path(args.dataset).exists() else args.dataset
    return Path("runs") / f"{ds}-{args.model}-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def cli_train(args) -> int:
    t_start = time.perf_counter()
    info = init_distributed(args.device)
    try:
        return _cli_train(args, info, t_start)
    finally:
        import torch.distributed as dist

        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _cli_train(args, info: DistInfo, t_start: float) -> int:
    from .checkpoint import data_of, format_results, load_run, read_config, results_of, write_config, write_results

    progress = not args.no_progress
    if args.resume:
        run_dir = Path(args.resume)
        conf = read_config(run_dir)
        cfg = TrainConfig.from_dict(conf["train_config"])
        if args.device != "auto":
            cfg = cfg.replace(device=args.device)
        device = resolve_device(cfg.device)
        data = load_data(*data_of(conf, run_dir))
        run = load_run(run_dir, data=data, weights="last.safetensors")
        model, model_name, preset = run.model, run.model_name, conf.get("preset")
        resume = True
    else:
        if args.model not in MODELS:
            raise TrainError(f"unknown model {args.model!r}; expected one of {list(MODELS)}")
        cfg = _train_config_from_args(args)
        device = resolve_device(cfg.device)
        data_seed = args.seed if args.seed is not None else 0
        data = load_data(args.dataset, None, data_seed)  # the dataset's own DataConfig (config.DATA_PRESETS)
        model_cfg = _model_config_from_args(args, data)
        seed_everything(cfg.seed)
        model_cfg = model_config_for(args.model, model_cfg, data.schema, data.vocab_sizes())
        model = build_model(args.model, model_cfg, data.schema, data.vocab_sizes())
        model_name, preset = args.model, args.preset
        run_dir = Path(args.out) if args.out else _default_out(args)
        if info.enabled:  # every rank must write to the same folder: take rank 0's timestamp
            import torch.distributed as dist

            box = [str(run_dir)]
            dist.broadcast_object_list(box, src=0)
            run_dir = Path(box[0])
        if (run_dir / "config.json").exists():  # checked on every rank, before any rank writes
            raise TrainError(f"run folder {run_dir} already holds a run; use --resume {run_dir} or another --out")
        _barrier()
        cfg = cfg.replace(max_len=model_cfg.max_len)
        write_config(run_dir, model_name, model, data, args.dataset if not Path(args.dataset).exists()
                     else str(Path(args.dataset).resolve()), data_seed, cfg, preset=preset)
        resume = False
    if info.is_main:
        n = count_params(model)
        print(f"training {model_name} (preset {preset}) on {data.info.get('name')} with {device_description(device)}"
              f"{f' x {info.world_size} processes' if info.enabled else ''}: "
              + ", ".join(f"{k} {v:,}" for k, v in n.items()) + f" parameters; run folder {run_dir}", file=sys.stderr)
    hist = train(model, data, cfg, run_dir=run_dir, progress=progress, resume=resume, log=True)
    test = evaluate(model, data, "test", cfg.eval_batch_requests, cfg.max_len, cfg.bf16)
    if not info.is_main:
        return 0
    # wall time of THIS process (a resumed run reports the time since it resumed)
    res = results_of(model, data, test, model_name, device, time.perf_counter() - t_start, hist,
                     preset=preset, run_dir=str(run_dir), world_size=info.world_size, split="test")
    write_results(run_dir, res)
    print(format_results(res))
    return 0


def cli_evaluate(args) -> int:
    from .checkpoint import format_results, json_default, load_run, results_of

    t0 = time.perf_counter()
    run = load_run(args.run_dir)
    device = resolve_device(args.device)
    run.model.to(device)
    cfg = run.train_config
    test = evaluate(run.model, run.data, args.split, cfg.eval_batch_requests, cfg.max_len, cfg.bf16)
    saved = run.results() or {}
    res = results_of(run.model, run.data, test, run.model_name, device, time.perf_counter() - t0,
                     preset=run.config.get("preset"), run_dir=str(run.path), split=args.split)
    for k in ("best_epoch", "epochs_run"):
        if k in saved:
            res[k] = saved[k]
    if args.json:
        print(json.dumps(res, indent=2, default=json_default))
    else:
        print(format_results(res))
    return 0


def add_evaluate_arguments(p) -> None:
    p.add_argument("run_dir", help="a run folder written by 'onetrans-mini train'")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
