"""``onetrans-mini`` (also ``python -m onetrans_mini``): one sub-command per job.

    onetrans-mini data NAME        prepare a dataset and print its summary and floors
    onetrans-mini train [...]      train a model (default: OneTrans small on ML-100K), print test results
    onetrans-mini evaluate RUN     re-score a saved run on its test split
    onetrans-mini replay [...]     replay a test period as a request stream: no cache / request cache / user cache
    onetrans-mini bench [...]      systems benchmark: the paper's Table 4 on our model (--quick: CPU, < 2 min)

Bad input gets one line on stderr and exit status 2 (flags included: no usage dump), and is refused
before any work. The CLI is the application, so process-wide settings live here and only here: the
number of torch threads (``--threads``, see ``auto_threads``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

from .config import (
    BF16,
    NS_TOKENIZERS,
    OPTIMIZERS,
    PRESETS,
    SCHEDULES,
    SEQ_MERGES,
    DataConfig,
    ModelConfig,
    TrainConfig,
    TrainError,
    get_preset,
)
from .data import DATASETS, DataError
from .data.requests import SPLITS


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in ONE line (no usage dump): ``error: PROG: MESSAGE (see PROG --help)``."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return v
    return parse


def threads_arg(text: str) -> str | int:
    if text == "auto":
        return text
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1, got {text!r}")
    return v


# ----------------------------------------------------------------------------------------------
# threads

THREADS_CAP = 4  # auto never picks more for train/evaluate (see auto_threads)

THREADS_HELP = {
    "batch": "torch intra-op threads: N, or auto (default) = the CPUs this process may use (affinity and "
             "container quota, shared among torchrun's local processes) less the machine's 1-minute load, "
             f"between 1 and {THREADS_CAP}. Why: torch's default (one per core) ignores other jobs, and threads that "
             "wait on busy cores can make a run many times slower on a shared machine; at most "
             f"{THREADS_CAP} since the small presets' matrices are narrow (a big idle machine may do better with "
             "--threads N). The first output line says which was used",
    "serving": "torch intra-op threads: N, or auto (default) = 1. Why: a request's tensors are tiny, so more "
               "threads only wait on each other (measured in README, 'CPU threads'). The first output line "
               "says which was used",
}


def _cpus_available() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def auto_threads(policy: str, cpus: int | None = None, load: float | None = None,
                 local_procs: int | None = None) -> tuple[int, str]:
    """The thread count ``--threads auto`` picks, and why (for the first output line).

    ``serving``: 1. ``batch`` (train, evaluate): ``OMP_NUM_THREADS`` if the user set it; else the CPUs
    available per local process (torchrun's ``LOCAL_WORLD_SIZE``) less the machine's 1-minute load
    average, between 1 and ``THREADS_CAP``. Slower than ideal by at most ~``THREADS_CAP``x on an idle
    many-core machine; never the collapse of oversubscribing a busy one."""
    if policy == "serving":
        return 1, "auto: one request at a time"
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) >= 1:
        return int(omp), f"auto: OMP_NUM_THREADS={omp}"
    cpus = _cpus_available() if cpus is None else cpus
    load = (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0) if load is None else load
    procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if local_procs is None else local_procs)
    idle = max(0.0, cpus - load)
    n = max(1, min(THREADS_CAP, cpus // procs, int(idle // procs)))
    why = f"auto: {cpus} CPU{'s' if cpus != 1 else ''}, load {load:.1f}" + (f", {procs} local processes" if procs > 1 else "")
    return n, why + (f", at most {THREADS_CAP}" if n == THREADS_CAP else "")


def set_threads(args) -> tuple[int, str]:
    """Apply ``--threads`` (auto: the command's policy); returns the count and why, e.g. ``(1, "--threads")``."""
    import torch

    n, why = auto_threads(args.threads_policy) if args.threads == "auto" else (int(args.threads), "--threads")
    torch.set_num_threads(n)
    return n, why


def add_threads_argument(p, policy: str) -> None:
    p.add_argument("--threads", type=threads_arg, default="auto", help=THREADS_HELP[policy])
    p.set_defaults(threads_policy=policy)


def _percent(fraction: float) -> str:
    """0.123 -> '12.3%'."""
    return f"{100 * fraction:.1f}%"


def cmd_data(args) -> int:
    from .data import load_dataset
    from .floors import floors

    t0 = time.perf_counter()
    data = load_dataset(args.name, seed=args.seed)
    prep_s = time.perf_counter() - t0
    s = data.summary()
    fl = floors(data)
    if args.json:
        print(json.dumps({"summary": s, "floors": fl, "prepare_seconds": prep_s}, indent=2, default=float))
        return 0
    tasks = data.schema.task_names
    print(f"dataset {s['name']}: {s['n_interactions']:,} interactions, {s['n_users']:,} users, "
          f"{s['n_items']:,} items, {s['n_history_events']:,} history events  (prepared in {prep_s:.1f} s)")
    print(f"sequences: {', '.join(q.name for q in data.schema.sequences)}; tasks: {', '.join(tasks)}")
    print()
    print(f"{'split':<6} {'requests':>9} {'candidates':>11} {'users':>6}  " + "  ".join(f"{'pos ' + t:>10}" for t in tasks))
    for name, x in s["splits"].items():
        print(f"{name:<6} {x['requests']:>9,} {x['candidates']:>11,} {x['users']:>6,}  "
              + "  ".join(f"{_percent(x['positive_rate'][t]):>10}" for t in tasks))
    print()
    for key, label in (("request_size", "candidates per request"), ("history_length", "history length (all)"),
                       ("history_length_kept", f"history length (kept, max_len={s['max_len']})")):
        x = s[key]
        print(f"{label:<36} mean {x['mean']:7.1f}  p50 {x['p50']:6.0f}  p90 {x['p90']:6.0f}  max {x['max']:5d}")
    print()
    print("test-split AUC / UAUC of the floors (fitted on train + val)" + (" and of the oracle" if data.has_prob else ""))
    for t in tasks:
        row = "  ".join(f"{name} {m['auc']:.4f} / {m['uauc']:.4f}" for name, m in fl[t].items())
        print(f"  {t:<10} {row}")
    return 0


# ----------------------------------------------------------------------------------------------
# train / evaluate


def _clip(text: str) -> float | None:
    """A grad-norm clip from the command line: 0 means no clipping (None)."""
    v = float(text)
    return None if v == 0 else v


# every TrainConfig field, as a flag (tests check that none is missing): field -> add_argument kwargs.
# Flags default to "not given" (SUPPRESS), so TrainConfig's own defaults apply and stay in one place.
TRAIN_FLAGS: dict[str, dict] = {
    "epochs": dict(type=int, help="epochs at most (default %(d)s; early stopping on validation AUC)"),
    "batch_requests": dict(type=int, help="requests per step and process, each with all its candidates (default %(d)s)"),
    "lr": dict(type=float, help="peak learning rate (default: 1e-3 for adamw; for paper 0.005 scaled by "
               "sqrt(candidates per step / 2048))"),
    "weight_decay": dict(type=float, help="AdamW weight decay of the dense matrices (default %(d)s; paper: none)"),
    "ema": dict(type=float, help="decay per step of the moving average of the weights that is validated, saved "
                "and returned; 0 = off (default %(d)s)"),
    "optimizer": dict(choices=OPTIMIZERS, help="adamw (default) or paper (Adagrad for the embedding tables + "
                      "RMSProp for the dense part)"),
    "embedding_lr": dict(type=float, help="learning rate of the embedding tables (default: 30 x lr for adamw, "
                         "0.05 for paper)"),
    "grad_clip": dict(type=_clip, help="global grad-norm clip (dense part for paper); 0 = off (default %(d)s)"),
    "grad_clip_embedding": dict(type=_clip, help="paper only: grad-norm clip of the embedding tables; 0 = off "
                                "(default: as --grad-clip)"),
    "warmup": dict(type=float, help="fraction of all steps with a linear lr warm-up (default %(d)s)"),
    "schedule": dict(choices=SCHEDULES, help="lr decay after the warm-up: cosine or linear to min-lr x lr, or "
                     "constant (default %(d)s)"),
    "min_lr": dict(type=float, help="final lr as a fraction of the peak (default %(d)s)"),
    "patience": dict(type=int, help="stop after this many epochs without a better validation AUC; 0 = never "
                     "(default %(d)s)"),
    "seed": dict(type=int, help="seed of the model, the batches and the synthetic world (default %(d)s)"),
    "device": dict(help="auto (the GPU when there is one, default), cpu, cuda or cuda:N"),
    "bf16": dict(choices=BF16, help="bf16 autocast: auto = on CUDA only (default: fast there, while most CPUs "
                 "run bf16 slower than fp32), on = also on the CPU, off = fp32 everywhere"),
    "compile": dict(action="store_true", help="torch.compile the model"),
    "eval_batch_requests": dict(type=int, help="requests per evaluation batch (default %(d)s)"),
    "steps_per_epoch": dict(type=int, help="cap the steps of an epoch and of the validation pass (smoke runs; "
                            "default: the whole split)"),
    "val_pass": dict(flag="--no-val-pass", action="store_false",
                     help="keep the best epoch's weights as they are; by default they are then trained once over "
                          "the validation requests, the labelled period closest to the test period"),
}

ABLATIONS = (  # (flag, ModelConfig field, value when the flag is given)
    ("--no-pyramid", "pyramid", False),
    ("--shared-params", "shared_params", True),
    ("--full-attention", "causal", False),
    ("--no-sep", "use_sep", False),
)


def add_train_arguments(p) -> None:
    from .registry import MODELS

    p.add_argument("--dataset", default="movielens-100k",
                   help=f"one of {', '.join(DATASETS)}, or a path to your interactions (default: movielens-100k)")
    p.add_argument("--model", default="onetrans", help=f"one of {', '.join(MODELS)} (default: onetrans)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<dataset>-<model>-<preset>-<timestamp>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a saved run from its last finished epoch with its saved configuration "
                        "(only --device may change)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(p, "batch")
    t = p.add_argument_group("training (TrainConfig)")
    d = TrainConfig()
    for name, kw in TRAIN_FLAGS.items():
        kw = dict(kw, help=kw["help"].replace("%(d)s", str(getattr(d, name))))
        flag = kw.pop("flag", "--" + name.replace("_", "-"))  # a switch that is on by default is named --no-...
        t.add_argument(flag, dest=name, default=argparse.SUPPRESS, **kw)
    t.add_argument("--no-bf16", dest="bf16", action="store_const", const="off", default=argparse.SUPPRESS,
                   help="same as --bf16 off")
    m = p.add_argument_group("model (ModelConfig)")
    m.add_argument("--preset", default="small", help=f"model size, one of {', '.join(PRESETS)} (default: small)")
    m.add_argument("--max-len", type=int_at_least(1), default=None,
                   help="history events the model reads (ModelConfig.max_len; default: the preset's, capped by "
                        "the dataset's)")
    m.add_argument("--dropout", type=float, default=None, help="dropout of the model (default: the preset's)")
    m.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in backward instead of storing them: less memory, "
                        "about one more forward of compute, the same gradients")
    g = p.add_argument_group("ablations of the model (paper §7)")
    for flag, name, _ in ABLATIONS:
        g.add_argument(flag, action="store_true", help=f"ModelConfig.{name} switched")
    g.add_argument("--ns-tokenizer", choices=NS_TOKENIZERS, default=None,
                   help="NS tokens from one MLP split in L_NS (auto_split, default) or one per schema group")
    g.add_argument("--seq-merge", choices=SEQ_MERGES, default=None,
                   help="merge the sequences by time (timestamp_aware, default) or one after the other")


def train_config_from_args(args) -> TrainConfig:
    """The TrainConfig of the flags given; TrainConfig's defaults for the others."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)})


def model_config_from_args(args, data_config: DataConfig) -> ModelConfig:
    """The preset with the model flags applied. Its ``max_len`` is the history the model is sized for
    (pyramid schedule): ``--max-len``, else the preset's capped by what the dataset's requests keep."""
    if args.preset not in PRESETS:
        raise TrainError(f"unknown preset {args.preset!r}; expected one of {list(PRESETS)}")
    over = {name: value for flag, name, value in ABLATIONS if getattr(args, flag[2:].replace("-", "_"))}
    for name in ("ns_tokenizer", "seq_merge", "dropout"):
        if getattr(args, name) is not None:
            over[name] = getattr(args, name)
    if args.activation_checkpointing:
        over["activation_checkpointing"] = True
    over["max_len"] = args.max_len if args.max_len is not None else min(PRESETS[args.preset].max_len, data_config.max_len)
    try:
        return get_preset(args.preset, **over)
    except ValueError as e:
        raise TrainError(str(e)) from e


def _default_out(args) -> Path:
    ds = Path(args.dataset).stem if Path(args.dataset).exists() else args.dataset
    return Path("runs") / f"{ds}-{args.model}-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def cli_train(args) -> int:
    from .distributed import destroy_distributed, init_distributed

    t_start = time.perf_counter()
    info = init_distributed(getattr(args, "device", "auto"))
    try:
        return _cli_train(args, info, t_start)
    finally:
        destroy_distributed(info)


def _cli_train(args, info, t_start: float) -> int:
    from .checkpoint import (check_run_dir, data_of, format_results, load_run, read_config, results_of, verify_weights,
                             write_config, write_results)
    from .distributed import barrier, broadcast_object, device_description, load_data, resolve_device
    from .registry import MODELS, build_model, count_params, model_config_for
    from .train import evaluate, seed_everything, train

    # every check that needs no data comes first: bad input costs no data preparation
    if args.resume:
        given = sorted(f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(TrainConfig)
                       if hasattr(args, f.name) and f.name != "device")
        if given:
            raise TrainError(f"--resume continues the run with its saved configuration; drop {', '.join(given)}")
        run_dir = Path(args.resume)
        conf = read_config(run_dir)
        cfg = TrainConfig.from_dict(conf["train_config"])
        if hasattr(args, "device"):
            cfg = cfg.replace(device=args.device)
        resolve_device(cfg.device)
        check_run_dir(run_dir, "--resume")
        with warnings.catch_warnings():  # (load_run warns about a file without a digest, once)
            warnings.simplefilter("ignore")
            for name in ("last.safetensors", "model.safetensors"):
                if name == "last.safetensors" or (run_dir / name).is_file():
                    verify_weights(run_dir / name)
        data = load_data(*data_of(conf, run_dir))
        run = load_run(run_dir, data=data, weights="last.safetensors")
        model, model_name, preset = run.model, run.model_name, conf.get("preset")
        resume = True
    else:
        if args.model not in MODELS:
            raise TrainError(f"unknown model {args.model!r}; expected one of {list(MODELS)}")
        if args.preset not in PRESETS:
            raise TrainError(f"unknown preset {args.preset!r}; expected one of {list(PRESETS)}")
        cfg = train_config_from_args(args)
        resolve_device(cfg.device)
        # every rank must write to the same folder: rank 0's timestamp
        run_dir = Path(broadcast_object(str(Path(args.out) if args.out else _default_out(args))))
        if (run_dir / "config.json").exists():  # checked on every rank, before any rank writes
            raise TrainError(f"run folder {run_dir} already holds a run; use --resume {run_dir} or another --out")
        check_run_dir(run_dir, "--out")
        data = load_data(args.dataset, None, cfg.seed)  # the dataset's own DataConfig (config.DATA_PRESETS)
        model_cfg = model_config_from_args(args, data.config)
        seed_everything(cfg.seed)
        model_cfg = model_config_for(args.model, model_cfg, data.schema, data.vocab_sizes())
        model = build_model(args.model, model_cfg, data.schema, data.vocab_sizes())
        model_name, preset = args.model, args.preset
        barrier()
        write_config(run_dir, model_name, model, data, args.dataset if not Path(args.dataset).exists()
                     else str(Path(args.dataset).resolve()), cfg.seed, cfg, preset=preset)
        resume = False
    device = resolve_device(cfg.device)
    if info.is_main:
        n = count_params(model)
        print(f"training {model_name} (preset {preset}) on {data.info.get('name')} with {device_description(device)}"
              f"{f' x {info.world_size} processes' if info.enabled else ''}, threads {args.threads_note}; "
              + ", ".join(f"{k} {v:,}" for k, v in n.items()) + f" parameters; run folder {run_dir}", file=sys.stderr)
    hist = train(model, data, cfg, run_dir=run_dir, progress=not args.no_progress, resume=resume, log=True)
    test = evaluate(model, data, "test", cfg.eval_batch_requests, cfg.bf16)
    if not info.is_main:
        return 0
    # wall time of THIS process (a resumed run reports the time since it resumed)
    res = results_of(model, data, test, model_name, device, time.perf_counter() - t_start, hist,
                     preset=preset, run_dir=str(run_dir), world_size=info.world_size, split="test",
                     threads=args.threads_note)
    write_results(run_dir, res)
    print(format_results(res))
    return 0


def add_evaluate_arguments(p) -> None:
    p.add_argument("run_dir", help="a run folder written by 'onetrans-mini train'")
    p.add_argument("--split", default="test", choices=SPLITS,
                   help="the split to score (default: test; the floors are shown for test only, where they are "
                        "fitted on train + val)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_threads_argument(p, "batch")


def cli_evaluate(args) -> int:
    from .checkpoint import format_results, json_default, load_run, results_of
    from .distributed import resolve_device
    from .train import evaluate

    t0 = time.perf_counter()
    device = resolve_device(args.device)
    run = load_run(args.run_dir)
    run.model.to(device)
    cfg = run.train_config
    test = evaluate(run.model, run.data, args.split, cfg.eval_batch_requests, cfg.bf16)
    saved = run.results() or {}
    res = results_of(run.model, run.data, test, run.model_name, device, time.perf_counter() - t0,
                     preset=run.config.get("preset"), run_dir=str(run.path), split=args.split,
                     threads=args.threads_note)
    for k in ("best_epoch", "epochs_run"):
        if k in saved:
            res[k] = saved[k]
    if args.json:
        print(json.dumps(res, indent=2, default=json_default))
    else:
        print(format_results(res))
    return 0


# ----------------------------------------------------------------------------------------------
# replay


def add_replay_arguments(p) -> None:
    from .serving import MODES

    p.add_argument("--dataset", default="movielens-100k", help="dataset name or path (ignored with --run)")
    p.add_argument("--preset", default="small", help="model preset of the untrained model (ignored with --run)")
    p.add_argument("--run", default=None, help="a run folder written by 'onetrans-mini train' (its model and data)")
    p.add_argument("--modes", default="none,request,both", help=f"comma-separated, from {','.join(MODES)}")
    p.add_argument("--max-requests", type=int_at_least(1), default=None, help="replay only the first N requests")
    p.add_argument("--split", default="test", choices=SPLITS,
                   help="the split whose requests are replayed, in time order (default: test)")
    p.add_argument("--drop-block", type=int_at_least(1), default=None, help="events dropped at once from a full "
                   "window (default max_len // 4; 1 = sliding window; at most max_len)")
    p.add_argument("--cache-mb", type=float, default=64.0, help="user cache bound in MiB (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the untrained model (and the synthetic data)")
    add_threads_argument(p, "serving")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def cli_replay(args) -> int:
    import torch

    from .model import OneTrans
    from .serving import MODES, format_replay, replay

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise TrainError(f"--modes: expected a comma-separated subset of {','.join(MODES)}, got {args.modes!r}")
    if not args.cache_mb >= 0:
        raise TrainError(f"--cache-mb: expected a number >= 0, got {args.cache_mb}")
    if args.run:
        from .checkpoint import load_run, read_config

        conf = read_config(args.run)  # what the run holds, checked before its data is prepared
        mc = conf["model_config"] or {}
        if conf["model"] != "onetrans":
            raise TrainError(f"--run {args.run}: the replay needs a OneTrans model, the run holds {conf['model']!r}")
        if not mc.get("causal", True):
            raise TrainError(f"--run {args.run}: the model uses full attention (causal=False), which rules out KV caching")
        if args.drop_block is not None and args.drop_block > mc.get("max_len", args.drop_block):
            raise TrainError(f"--drop-block: must be at most the model's max_len={mc['max_len']}, got {args.drop_block}")
        run = load_run(args.run)
        model, data = run.model, run.data
    else:
        from .data import load_dataset

        if args.preset not in PRESETS:
            raise TrainError(f"unknown preset {args.preset!r}; expected one of {list(PRESETS)}")
        data = load_dataset(args.dataset, seed=args.seed)
        torch.manual_seed(args.seed)
        model = OneTrans(get_preset(args.preset, max_len=data.config.max_len), data.schema, data.vocab_sizes())
    if args.drop_block is not None and args.drop_block > model.config.max_len:
        raise TrainError(f"--drop-block: must be at most the model's max_len={model.config.max_len}, got {args.drop_block}")
    if not len(data.request_ids(args.split)):
        raise TrainError(f"--split {args.split}: {data.info.get('name')} has no requests in it")
    model.eval()
    res = replay(model, data, modes, args.split, args.max_requests, args.drop_block, int(args.cache_mb * 2**20))
    res["_meta"]["threads_how"] = args.threads_why
    print(json.dumps(res, indent=2) if args.json else format_replay(res))
    return 0


# ----------------------------------------------------------------------------------------------
# the parser


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="onetrans-mini", description="OneTrans, small enough to read, complete enough to run.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="prepare a dataset and print its summary")
    d.add_argument("name", help=f"one of {', '.join(DATASETS)}, or a path to your interactions (CSV file or folder)")
    d.add_argument("--seed", type=int, default=0, help="seed of the synthetic world")
    d.add_argument("--json", action="store_true", help="print the summary as JSON")
    d.set_defaults(func=cmd_data)

    t = sub.add_parser("train", help="train a model and print its test metrics next to the floors "
                       "(torchrun --nproc_per_node=N -m onetrans_mini train ... for data parallel)")
    add_train_arguments(t)
    t.set_defaults(func=cli_train)
    e = sub.add_parser("evaluate", help="re-score a saved run on its test split (or --split)")
    add_evaluate_arguments(e)
    e.set_defaults(func=cli_evaluate)
    rp = sub.add_parser("replay", help="replay a dataset's test period as a time-ordered request stream and compare "
                        "scoring without cache, with the request cache and with the user cache (latency, hit rate, exactness)")
    add_replay_arguments(rp)
    rp.set_defaults(func=cli_replay)
    from .bench import add_bench_arguments, cli_bench

    bn = sub.add_parser("bench", help="systems benchmark (the paper's Table 4): each optimization alone on an unoptimized "
                        "OneTrans, training and inference; two-stage and append costs; JSON + markdown (--quick: CPU, < 2 min)")
    add_bench_arguments(bn)
    bn.set_defaults(func=cli_bench)
    return p


def main(argv=None) -> int:
    import torch

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a bad flag (2: one line already printed)
        return e.code if isinstance(e.code, int) else 2
    threads = torch.get_num_threads()  # put back afterwards, for callers in the same process (tests, notebooks)
    try:
        if getattr(args, "threads_policy", None):
            n, args.threads_why = set_threads(args)
            args.threads_note = f"{n} ({args.threads_why})"  # for the first output line
        return args.func(args)
    except (DataError, TrainError) as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
