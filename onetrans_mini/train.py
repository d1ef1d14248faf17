"""Training and evaluation: the loop behind ``onetrans-mini train`` / ``evaluate`` (whose argument
parsing is in ``cli.py``), top to bottom:

1. Seeds; optimizers and the learning-rate schedule (AdamW, or the paper's Adagrad + RMSProp).
2. ``predict`` / ``evaluate``: per-task AUC, UAUC, GAUC and logloss of a split.
3. ``train``: request-level batches, early stopping on the first task's validation AUC, checkpoints
   (the run folder, ``load_run`` and the results table are in ``checkpoint.py``; devices and
   ``torch.distributed`` in ``distributed.py``; the model registry in ``registry.py``).

Batches are REQUEST-level (``RequestData.loader``): ``batch_requests`` requests with all their
candidates. ``model(batch, targets)`` is the model's own request-level forward (OneTrans encodes each
request's history once, paper §5), so training, evaluation and serving run one code path, and DDP wraps
the model itself. ``batch_requests`` is per process, as the paper's "batch 2048 per GPU". Each batch
holds ``min(ModelConfig.max_len, DataConfig.max_len)`` history events: the model's config is the one
owner of the history length.

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
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import append_metrics, load_train_state, save_train_state, save_weights, write_metrics
from .config import OPTIMIZERS, SCHEDULES, TrainConfig, TrainError
from .data import RequestData
from .distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    device_description,
    dist_info,
    model_device,
    resolve_device,
)
from .metrics import task_metrics
from .registry import MODELS, build_model, count_params, model_config_for

# what a notebook needs to train a model, importable from this one module
__all__ = [
    "MODELS", "OPTIMIZERS", "SCHEDULES", "Optimizers", "TrainConfig", "TrainError", "batch_max_len", "build_model",
    "count_params", "default_lr", "device_description", "evaluate", "lr_multiplier", "make_optimizers",
    "model_config_for", "predict", "resolve_device", "seed_everything", "train", "uses_bf16",
]


def seed_everything(seed: int) -> None:
    """Python, numpy and torch (all devices) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# 1. optimizers and schedule


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
    # N(0, 1) start, so at the dense lr the item and user tables stay near their random init and the
    # model struggles to learn even what the per-item mean floor knows
    decay = [p for p in dense if p.dim() >= 2]
    no_decay = [p for p in dense if p.dim() < 2]
    emb_lr = 30 * lr if cfg.embedding_lr is None else cfg.embedding_lr
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": emb, "weight_decay": 0.0, "lr": emb_lr}]
    return Optimizers([("all", torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.98)),
                        cfg.grad_clip)])


class WeightAverage:
    """An exponential moving average of a model's weights, updated after every optimizer step:
    ``avg = d * avg + (1 - d) * weights``. It smooths the noise of the last few hundred steps out of the
    weights that are validated, saved and returned. ``d`` warms up as ``min(decay, (1 + n) / (10 + n))``
    after n updates, so that a short run is not averaged with its random initialization; non-float
    buffers are copied as they are."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.weights[k].lerp_(v, 1 - d)
            else:
                self.weights[k].copy_(v)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """The model holds the average inside the block and its own weights again after it."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.weights)
        try:
            yield model
        finally:
            model.load_state_dict(own)

    def state_dict(self) -> dict:
        return {"weights": self.weights, "updates": self.updates}

    def load_state_dict(self, st: dict, device) -> None:
        self.weights = {k: v.to(device) for k, v in st["weights"].items()}
        self.updates = int(st["updates"])


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
# 2. prediction and metrics


def uses_bf16(device: torch.device, bf16: str = "auto") -> bool:
    """``TrainConfig.bf16`` on ``device``: ``"auto"`` on CUDA only, ``"on"`` on any device (CPU
    included), ``"off"`` never."""
    return bf16 == "on" or (bf16 == "auto" and device.type == "cuda")


def autocast(device: torch.device, bf16: str = "auto"):
    """bf16 autocast on ``device`` where ``uses_bf16`` says so, else nothing."""
    if uses_bf16(device, bf16):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_max_len(model: nn.Module, data: RequestData) -> int:
    """History events per batch: the model's ``max_len`` (what it is sized for), capped by what the
    data's requests keep."""
    return min(model.config.max_len, data.config.max_len)


@torch.no_grad()
def predict(model: nn.Module, data: RequestData, split: str = "test", batch_requests: int = 64,
            bf16: str = "auto", shard: bool = True) -> dict[str, np.ndarray]:
    """Probabilities of every candidate of ``split``, in ``data.candidate_rows(split)`` order.

    Returns ``{"prob": (N, n_tasks), "labels": (N, n_tasks), "user": (N,)}``. Under DDP (``shard``) each
    rank scores a contiguous slice of the requests and the slices are gathered in rank order, so every
    rank returns the full split.
    """
    info = dist_info() if shard else DistInfo()
    device = model_device(model)
    n_req = len(data.request_ids(split))
    positions = np.array_split(np.arange(n_req), info.world_size)[info.rank].tolist()
    was_training = model.training
    model.eval()
    probs, labels, users = [], [], []
    try:
        for batch in data.loader(split, batch_requests, max_len=batch_max_len(model, data), sampler=positions):
            batch = batch.to(device, non_blocking=True)
            with autocast(device, bf16):
                logits, _ = model(batch)
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
        parts = all_gather_object(out)
        out = {k: np.concatenate([p[k] for p in parts]) for k in out}
    return out


def evaluate(model: nn.Module, data: RequestData, split: str = "test", batch_requests: int = 64,
             bf16: str = "auto") -> dict[str, dict]:
    """Per-task metrics of ``split``: ``{task: {"auc", "uauc", "gauc", "logloss", "n", "users_counted"}}``.

    UAUC / GAUC group by the data's users (``metrics.py``). Runs on the model's device; under DDP the
    split is sharded and gathered (every rank gets the same numbers).
    """
    p = predict(model, data, split, batch_requests, bf16)
    return {t: task_metrics(p["labels"][:, i], p["prob"][:, i], p["user"]) for i, t in enumerate(data.schema.task_names)}


def _score(val: dict, task: str) -> float:
    """Early-stopping score: validation AUC of the first task (minus logloss if the AUC is undefined)."""
    m = val.get(task, {})
    a = m.get("auc", float("nan"))
    return a if a == a else -m.get("logloss", float("inf"))


# ----------------------------------------------------------------------------------------------
# 3. training


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
    "train_seconds", "max_len", "lr", "device"}`` (and ``"val_pass"``: its steps, loss and lr, when
    ``cfg.val_pass`` ran). On return the model holds the BEST weights, then trained once over the validation
    requests when ``cfg.val_pass`` (the default); the per-epoch validation metrics are from before that pass.
    """
    cfg = cfg or TrainConfig()
    info = dist_info()
    device = resolve_device(cfg.device)
    run_dir = Path(run_dir) if run_dir is not None else None
    if resume and (run_dir is None or not (run_dir / "train_state.pt").is_file()):
        raise TrainError(f"cannot resume: {run_dir} has no train_state.pt (expected a run folder written by train)")
    if len(data.request_ids("train")) < info.world_size:
        raise TrainError(f"the training split has {len(data.request_ids('train'))} requests, fewer than the "
                         f"{info.world_size} processes")
    max_len = batch_max_len(model, data)
    task0 = data.schema.task_names[0]

    seed_everything(cfg.seed + info.rank)  # dropout masks differ across ranks; weights are rank 0's (DDP)
    model.to(device)

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

    fwd: nn.Module = model  # its forward is the request-level one; DDP must wrap exactly that
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        fwd = torch.compile(fwd)

    average = WeightAverage(model, cfg.ema) if cfg.ema else None
    hist = {"epochs": [], "best_epoch": 0, "best_score": -float("inf"), "stopped_early": False,
            "train_seconds": 0.0, "max_len": max_len, "lr": lr, "device": str(device), "world_size": info.world_size}
    best_state = None
    bad_epochs = 0
    start_epoch = 0
    if resume:
        start_epoch, bad_epochs, best_state, hist, avg_state = load_train_state(run_dir, model, opts, info)
        if (average is None) != (avg_state is None):
            raise TrainError(f"{run_dir / 'train_state.pt'}: the run {'kept no' if avg_state is None else 'kept a'} "
                             f"weight average, the config says ema={cfg.ema}; resume with the run's own config")
        if average is not None:
            average.load_state_dict(avg_state, device)
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
            loss = _step(fwd, batch, opts, cfg, info, device, f"epoch {epoch + 1}, step {step + 1}")
            if average is not None:
                average.update(model)
            loss_sum += loss * batch.n_candidates
            n_seen += batch.n_candidates
            step += 1
            if bar is not None:
                el = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_sum / n_seen:.4f}", samples_s=f"{n_seen * info.world_size / el:,.0f}",
                                lr=f"{opts.lr:.2e}", refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()
        if info.enabled:
            loss_sum, n_seen = all_reduce_sum([loss_sum, float(n_seen)], device)
        train_s = time.perf_counter() - t0
        # validated, kept as the best and saved: the weight average when training keeps one
        with average.applied(model) if average is not None else contextlib.nullcontext():
            val = evaluate(model, data, "val", cfg.eval_batch_requests, cfg.bf16) if len(data.request_ids("val")) else {}
            score = _score(val, task0) if val else -(loss_sum / max(1, n_seen))
            improved = score > hist["best_score"]
            if improved:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if run_dir is not None and info.is_main:
                    save_weights(model, run_dir / "model.safetensors")
        if improved:
            hist["best_score"], hist["best_epoch"], bad_epochs = score, epoch + 1, 0
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
            save_train_state(run_dir, model, opts, hist, epoch + 1, bad_epochs, info,
                             average.state_dict() if average is not None else None)
            if info.is_main:
                append_metrics(run_dir, rec)
    if best_state is not None:
        model.load_state_dict(best_state)
    finished = hist["stopped_early"] or len(hist["epochs"]) >= cfg.epochs
    if cfg.val_pass and finished and "val_pass" not in hist and len(data.request_ids("val")):
        t0 = time.perf_counter()
        # the lr where the best epoch ended: the schedule, picked up where the kept weights left it
        mult = lr_multiplier(cfg, total_steps)(hist["best_epoch"] * steps)
        hist["val_pass"] = _val_pass(model, fwd, data, cfg, info, device, max_len, lr, mult)
        hist["val_pass"]["seconds"] = time.perf_counter() - t0
        hist["train_seconds"] += hist["val_pass"]["seconds"]
        if info.is_main and (progress if log is None else log):
            vp = hist["val_pass"]
            print(f"validation pass: {vp['steps']} steps over the validation requests at lr {vp['lr']:.2e}, "
                  f"train loss {vp['train_loss']:.4f}  [{vp['seconds']:.0f} s]", file=sys.stderr, flush=True)
        if run_dir is not None:  # the kept model is now the one after the pass; the history says so
            if info.is_main:
                save_weights(model, run_dir / "model.safetensors")
            save_train_state(run_dir, model, opts, hist, len(hist["epochs"]), bad_epochs, info,
                             average.state_dict() if average is not None else None)
    return hist


def _step(fwd: nn.Module, batch, opts: Optimizers, cfg: TrainConfig, info, device, where: str) -> float:
    """One optimizer step on one batch (already on ``device``); returns the batch's mean loss."""
    with autocast(device, cfg.bf16):
        _, loss = fwd(batch, batch.labels)
    # each rank's loss is the mean over ITS candidates; weight it by its share of the global batch
    # so that DDP's gradient average equals the gradient of the global mean
    if info.enabled:
        n_global = all_reduce_sum([float(batch.n_candidates)], device)[0]
        weight = batch.n_candidates * info.world_size / n_global
    else:
        weight = 1.0
    if not torch.isfinite(loss):
        raise TrainError(f"the loss became {float(loss)} at {where}; try a lower learning rate (--lr) or "
                         f"gradient clipping")
    (loss * weight).backward()
    opts.clip()
    opts.step()
    opts.zero_grad()
    return float(loss.detach())


def _val_pass(model: nn.Module, fwd: nn.Module, data: RequestData, cfg: TrainConfig, info, device, max_len: int,
              lr: float, mult: float) -> dict:
    """``TrainConfig.val_pass``: one pass over the validation requests, from the kept (best) weights, with
    fresh optimizers of the same groups at the constant lr ``mult`` x ``lr``. Validation chose the epoch; the
    model then also learns the labelled period closest to the one it will score (a ranker in production
    trains on every day before the one it serves). No weight average: the pass is short. Under DDP an odd
    request out is dropped, as in the epochs, so that every rank takes the same number of steps."""
    from torch.utils.data.distributed import DistributedSampler

    n_val = len(data.request_ids("val"))
    sampler = DistributedSampler(range(n_val), num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=n_val >= info.world_size)
    sampler.set_epoch(cfg.epochs)  # another order than any epoch's
    opts = make_optimizers(model, cfg, lr)
    opts.set_schedule(lambda step: mult)
    model.train()
    loss_sum, n_seen, steps = 0.0, 0, 0
    for batch in data.loader("val", cfg.batch_requests, max_len=max_len, sampler=sampler):
        if cfg.steps_per_epoch is not None and steps >= cfg.steps_per_epoch:
            break  # a capped (smoke) run caps its pass like its epochs
        batch = batch.to(device, non_blocking=True)
        loss = _step(fwd, batch, opts, cfg, info, device, f"the validation pass, step {steps + 1}")
        loss_sum += loss * batch.n_candidates
        n_seen += batch.n_candidates
        steps += 1
    model.eval()
    if info.enabled:
        loss_sum, n_seen = all_reduce_sum([loss_sum, float(n_seen)], device)
    return {"steps": steps, "train_loss": loss_sum / max(1, n_seen), "candidates": int(n_seen), "lr": lr * mult}


def _bar(on: bool, total: int, desc: str):
    if not on:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0)


