"""Configs and named presets, shared by the tests, the notebooks and the CLI.

``DataConfig`` says how interactions become requests; ``ModelConfig`` sizes the OneTrans stack; a
preset (``nano``, ``small``, ``S``, ``L``) names one ``ModelConfig`` so that ``onetrans-mini train
--preset small``, ``get_preset("small")`` in a notebook and the test suite all mean the same model;
``TrainConfig`` says how a model is trained.

The history length has one owner: ``ModelConfig.max_len`` (the model is sized for it). Training and
evaluation batch ``min(ModelConfig.max_len, DataConfig.max_len)`` events, the data's ``max_len`` being
only the most its requests keep.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class DataConfig:
    """How a user's interactions become requests (see ``data/requests.py``).

    - A request groups consecutive interactions of one user that lie at most ``session_gap`` seconds
      apart, at most ``max_candidates`` of them; they are the request's candidates.
    - Its history is the user's history events (behaviours named by the schema's sequences) strictly
      before the request's first candidate in (timestamp, row) order; the most recent ``max_len`` are
      kept when a batch is built, left-padded so the newest event is always the last S-token.
    - ``split="user"``: per user, the last ``test_frac`` of the interactions (by time) are test, the
      ``val_frac`` before them validation, the rest training. ``split="time"``: global time quantiles
      with the same fractions. Requests never straddle two splits.
    """

    max_len: int = 128
    max_candidates: int = 16
    session_gap: float = 3600.0  # seconds
    split: str = "user"
    val_frac: float = 0.1
    test_frac: float = 0.2
    min_count: int = 1  # vocabulary floor for categorical features with the default min_count

    def __post_init__(self):
        if self.max_len < 1:
            raise ValueError(f"DataConfig.max_len must be >= 1, got {self.max_len}")
        if self.max_candidates < 1:
            raise ValueError(f"DataConfig.max_candidates must be >= 1, got {self.max_candidates}")
        if self.split not in ("user", "time"):
            raise ValueError(f"DataConfig.split must be 'user' or 'time', got {self.split!r}")
        if not (0 <= self.val_frac < 1 and 0 < self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ValueError(
                f"DataConfig: need 0 <= val_frac, 0 < test_frac, val_frac + test_frac < 1; "
                f"got val_frac={self.val_frac}, test_frac={self.test_frac}"
            )

    def preprocessing_key(self) -> dict:
        """Fields that change the prepared requests (``max_len`` only changes batching)."""
        d = dataclasses.asdict(self)
        d.pop("max_len")
        return d


@dataclass(frozen=True)
class ModelConfig:
    """Size and switches of a OneTrans model (paper §2-§4).

    ``max_len`` is L_S before [SEP] tokens; ``ns_tokens`` is L_NS for the auto-split tokenizer (the
    group-wise tokenizer makes one token per schema group instead).
    """

    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    ffn_mult: int = 4
    ns_tokens: int = 8
    max_len: int = 128
    dropout: float = 0.0
    # pyramid stacking (§4): S query tokens shrink linearly to the NS-token count across layers
    pyramid: bool = True
    pyramid_granularity: int = 8
    # tokenizers (§2)
    ns_tokenizer: str = "auto_split"  # or "group_wise"
    seq_merge: str = "timestamp_aware"  # or "timestamp_agnostic"
    use_sep: bool = True  # [SEP] between sequences in the timestamp-agnostic merge
    # block (§3)
    shared_params: bool = False  # ablation: NS tokens use the shared S weights too
    causal: bool = True  # ablation: full attention (rules out the KV cache)
    # token-specific W_O for NS tokens as well (the paper leaves W_O open). Default True: then EVERY linear
    # map of the block follows the mixed rule, each NS token reads its attention output with its own W_O
    # (as its own FFN does); it costs L_NS * d^2 parameters per layer and no FLOPs. False: NS share W_O_S.
    mixed_out_proj: bool = True
    emb_dim: int = 16  # embedding width of each raw feature before the tokenizers' MLPs
    head_hidden: int = 64  # hidden width of each task tower
    # explicit pyramid: S query tokens per layer (bottom to top, last one 0); empty = the linear schedule
    pyramid_schedule: tuple[int, ...] = ()
    # training memory for compute: keep only each block's inputs for backward and recompute the rest there
    # (the paper's "activation recomputation"); changes no result, only what backward stores
    activation_checkpointing: bool = False

    def __post_init__(self):
        # Config-only checks; what needs the schema (L_NS of the group-wise tokenizer, [SEP] count,
        # vocabularies) is checked when the model is built (``model.OneTrans``).
        positive = ("d_model", "n_heads", "n_layers", "ffn_mult", "ns_tokens", "max_len",
                    "pyramid_granularity", "emb_dim", "head_hidden")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ModelConfig.{name} must be an integer >= 1, got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads} "
                f"(each head gets d_model // n_heads channels)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.ns_tokenizer not in NS_TOKENIZERS:
            raise ValueError(f"ModelConfig.ns_tokenizer must be one of {NS_TOKENIZERS}, got {self.ns_tokenizer!r}")
        if self.seq_merge not in SEQ_MERGES:
            raise ValueError(f"ModelConfig.seq_merge must be one of {SEQ_MERGES}, got {self.seq_merge!r}")
        if self.pyramid_schedule:
            sched = tuple(self.pyramid_schedule)
            if not self.pyramid:
                raise ValueError("ModelConfig.pyramid_schedule is set but pyramid=False; drop one of them")
            if len(sched) != self.n_layers:
                raise ValueError(
                    f"ModelConfig.pyramid_schedule needs one S-query count per layer (n_layers={self.n_layers}), "
                    f"got {len(sched)}: {sched}"
                )
            if any((not isinstance(q, int)) or q < 0 for q in sched):
                raise ValueError(f"ModelConfig.pyramid_schedule entries must be integers >= 0, got {sched}")
            if any(b > a for a, b in zip(sched, sched[1:])):
                raise ValueError(
                    f"ModelConfig.pyramid_schedule must be non-increasing (a layer cannot query tokens its input "
                    f"no longer has), got {sched}"
                )
            if sched[-1] != 0:
                raise ValueError(
                    f"ModelConfig.pyramid_schedule must end with 0: the top layer's S-token outputs feed nothing "
                    f"(the task towers read the NS tokens), so it keeps only the NS tokens; got {sched}"
                )
            # the upper bound (L_S = max_len plus the [SEP] tokens of the merge) needs the schema: see OneTrans

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


NS_TOKENIZERS = ("auto_split", "group_wise")
SEQ_MERGES = ("timestamp_aware", "timestamp_agnostic")


PRESETS: dict[str, ModelConfig] = {
    # tests: runs a forward in milliseconds
    "nano": ModelConfig(d_model=16, n_heads=2, n_layers=2, ffn_mult=2, ns_tokens=4, max_len=16,
                        pyramid_granularity=4, emb_dim=8, head_hidden=16),
    # trains on ML-100K on 2 CPU cores in minutes
    "small": ModelConfig(d_model=64, n_heads=4, n_layers=3, ffn_mult=4, ns_tokens=8, max_len=128,
                         pyramid_granularity=8, emb_dim=16, head_hidden=64),
    # the paper's OneTrans_S and OneTrans_L shapes (§7): 6 x 256 x 4 heads, 8 x 384 x 4 heads
    "S": ModelConfig(d_model=256, n_heads=4, n_layers=6, ffn_mult=4, ns_tokens=12, max_len=1024,
                     pyramid_granularity=32, emb_dim=32, head_hidden=256),
    "L": ModelConfig(d_model=384, n_heads=4, n_layers=8, ffn_mult=4, ns_tokens=16, max_len=1536,
                     pyramid_granularity=32, emb_dim=32, head_hidden=384),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A named preset, optionally with fields replaced: ``get_preset("small", pyramid=False)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


# default data configs per dataset name (``onetrans-mini data NAME``)
DATA_PRESETS: dict[str, DataConfig] = {
    "movielens-100k": DataConfig(max_len=128, max_candidates=16, session_gap=3600.0),
    "movielens-1m": DataConfig(max_len=256, max_candidates=16, session_gap=3600.0),
    "movielens-20m": DataConfig(max_len=256, max_candidates=16, session_gap=3600.0),
    "movielens-32m": DataConfig(max_len=256, max_candidates=16, session_gap=3600.0),
    "synthetic": DataConfig(max_len=64, max_candidates=16, session_gap=60.0),
    "synthetic-tiny": DataConfig(max_len=32, max_candidates=8, session_gap=60.0),
}


# ----------------------------------------------------------------------------------------------
# training


class TrainError(ValueError):
    """Bad training input (unknown model or device, a missing or corrupt run folder): one clear line."""


OPTIMIZERS = ("adamw", "paper")
SCHEDULES = ("cosine", "linear", "constant")
DEVICES = ("auto", "cpu", "cuda")
BF16 = ("auto", "on", "off")


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained (saved in the run's ``config.json``, restored by ``--resume``).

    The defaults are what ``onetrans-mini train`` uses for preset ``small`` on ML-100K (its time and
    AUCs: see the README's results; what each step of the recipe adds: ``benchmarks/recipe.py``). The
    embedding tables get their own, larger learning rate (``embedding_lr``); the model memorises after a
    few epochs, hence ``epochs=4`` with early stopping, weight decay 0.1 on the dense matrices and a
    moving average of the weights (``ema``) as the model that is validated and kept; then one pass over the
    validation requests (``val_pass``), so that the kept model has also learned the period just before the
    test period. The model's history length is ``ModelConfig.max_len``, not a training knob.
    """

    epochs: int = 4
    batch_requests: int = 32  # requests per step PER PROCESS (each brings all its candidates)
    lr: float | None = None  # None: 1e-3 for adamw; for "paper" 0.005 scaled by sqrt(candidates per step / 2048)
    weight_decay: float = 0.1  # AdamW, matrices only (not embeddings, norms, biases); "paper" uses none
    # exponential moving average of the weights (decay per step; 0 = off): what is validated, saved and returned
    ema: float = 0.995
    optimizer: str = "adamw"  # or "paper": Adagrad for the embedding tables + RMSProp for the dense part
    embedding_lr: float | None = None  # lr of the embedding tables; None: 30 x lr (adamw), 0.05 (paper's Adagrad)
    grad_clip: float | None = 1.0  # global grad-norm clip (adamw); dense part for "paper" (paper: 90); None: off
    grad_clip_embedding: float | None = None  # "paper": embedding tables' clip (paper: 120); None = grad_clip
    warmup: float = 0.05  # fraction of all steps with a linear warm-up
    schedule: str = "cosine"  # after warm-up: "cosine" or "linear" decay to min_lr x lr, or "constant"
    min_lr: float = 0.1  # final lr as a fraction of the peak
    patience: int = 2  # stop after this many epochs without a better validation AUC (first task); 0 = never
    seed: int = 0
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda" or "cuda:N"
    # bf16 autocast: "auto" = on CUDA only (fast there; on most CPUs slower than fp32), "on" = on any
    # device (CPU included), "off" = fp32 everywhere
    bf16: str = "auto"
    compile: bool = False  # torch.compile the model
    eval_batch_requests: int = 64
    steps_per_epoch: int | None = None  # cap of an epoch and of the validation pass (smoke runs, tests); None = all
    # after the epochs: train the kept weights once over the validation requests (the lr where the best epoch
    # ended; validation has chosen the epoch by then), as a production ranker trains on every day it has
    val_pass: bool = True

    def __post_init__(self):
        def check(cond, msg):
            if not cond:
                raise TrainError(f"TrainConfig.{msg}")

        def count(name, lo):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= lo,
                  f"{name} must be an integer >= {lo}, got {v!r}")

        count("epochs", 1)
        count("batch_requests", 1)
        count("eval_batch_requests", 1)
        count("patience", 0)
        check(self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        check(self.embedding_lr is None or self.embedding_lr > 0, f"embedding_lr must be > 0, got {self.embedding_lr!r}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        check(0 <= self.ema < 1, f"ema is a decay per step in [0, 1) (0 = no weight average), got {self.ema!r}")
        for name in ("grad_clip", "grad_clip_embedding"):
            v = getattr(self, name)
            check(v is None or v > 0, f"{name} must be > 0 or None (no clipping), got {v!r}")
        check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        check(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        check(0 <= self.warmup < 1, f"warmup is a fraction of all steps in [0, 1), got {self.warmup!r}")
        check(0 <= self.min_lr <= 1, f"min_lr is a fraction of the peak lr in [0, 1], got {self.min_lr!r}")
        check(self.bf16 in BF16, f"bf16 must be one of {BF16}, got {self.bf16!r}")
        check(self.steps_per_epoch is None or self.steps_per_epoch >= 1,
              f"steps_per_epoch must be >= 1, got {self.steps_per_epoch!r}")
        dev = self.device
        check(dev in DEVICES or (dev.startswith("cuda:") and dev[5:].isdigit()),
              f"device must be one of {DEVICES} or 'cuda:N', got {dev!r}")

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """From a run's ``config.json``. Run folders written before the history length moved to
        ``ModelConfig`` (and activation checkpointing to the model) still load: those fields are dropped,
        and their boolean ``bf16`` (on CUDA only) becomes ``"auto"`` / ``"off"``; a run from before the weight
        average (no ``ema`` field) kept none, so it resumes with ``ema=0``, and one from before the validation
        pass (no ``val_pass`` field) made none."""
        d = {k: v for k, v in d.items() if k not in ("max_len", "activation_checkpointing")}
        d.setdefault("ema", 0.0)
        d.setdefault("val_pass", False)  # runs from before the validation pass made none
        if isinstance(d.get("bf16"), bool):
            d["bf16"] = "auto" if d["bf16"] else "off"
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainError(f"train config has unknown field(s) {unknown}; expected a subset of {sorted(names)}")
        return cls(**d)
