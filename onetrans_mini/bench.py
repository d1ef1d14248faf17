"""The systems benchmark (paper §6, Table 4) on our model: ``onetrans-mini bench``.

Sections, each ``f(suite, device) -> dict`` (JSON-ready; ``--out`` writes JSON and markdown):

- ``train`` / ``inference``: step time (forward + backward) and peak memory, and the p50 / p99 latency of one
  request, of an UNOPTIMIZED OneTrans (no pyramid, the per-candidate ``forward_full``, the explicit softmax,
  fp32) and of each of the paper's optimizations ALONE on top of it, with the model's own switches:
  ``ModelConfig.pyramid``, the request-level ``model(batch)`` (the paper's KV cache), SDPA (the default
  attention; ``explicit_attention`` turns it off), ``torch.autocast(device, torch.bfloat16)`` and
  ``ModelConfig.activation_checkpointing``. The paper's percentages are printed beside ours.
- ``two_stage``: one request of C candidates, ``forward_full`` against ``forward``, measured and analytic.
- ``append``: ``UserCache.advance`` appending n events to a cached history, against ``fresh_stage_one``.

Every figure is a median (latency: p50 / p99) after warm-up, the variants of one measurement INTERLEAVED
(A, B, C, A, B, C, ...) so that load from other processes hits them alike; ratios are taken within one run.
Peak memory: tensor bytes allocated during a call above those before it (CUDA ``max_memory_allocated``;
CPU: the profiler's allocation events). FLOPs: ``OneTrans.estimate_flops``.

Threads and OpenMP are the caller's (nothing here changes them): ``cli_bench`` sets ``--threads``, and ONE
thread for ``append`` (a few events cannot use more; cost per core sets a server's throughput). On a busy
machine set ``OMP_WAIT_POLICY=PASSIVE`` before starting Python: spinning OpenMP threads whose peer is
descheduled turn milliseconds into hundreds. Figures live in ``benchmarks/results/``, not here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import explicit_attention
from .checkpoint import check_run_dir
from .config import TrainError, get_preset
from .data.batching import Batch
from .features import Bucketized, Categorical, MultiCategorical, Schema, SequenceSpec, Task
from .model import OneTrans
from .notebook import hardware
from .serving import Events, Window, percentile
from .user_cache import UserCache, fresh_stage_one

SCHEMA_VERSION = "onetrans-mini-bench/2"
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"  # in a source checkout

# a mid-sized recommender schema with random ids: 8 NS features, 3 event fields, 2 behaviour sequences
BENCH_SCHEMA = Schema(
    ns_features=(Categorical("user_id", "user"), Categorical("age", "user"), Categorical("gender", "user"),
                 Categorical("item_id", "item"), Categorical("category", "item"),
                 MultiCategorical("genres", "item", max_len=4),
                 Bucketized("price", "item", boundaries=(5.0, 10.0, 20.0, 40.0)), Categorical("hour", "context")),
    event_fields=(Categorical("hist_item", "event", vocab_of="item_id"),
                  Categorical("hist_category", "event", vocab_of="category"),
                  Bucketized("hist_gap", "event", boundaries=(1.0, 10.0, 100.0, 1000.0), log=True)),
    sequences=(SequenceSpec("click", ("click",)), SequenceSpec("purchase", ("purchase",))),
    tasks=(Task("click", "click"), Task("purchase", "purchase")),
)
BENCH_VOCAB = {"user_id": 5000, "age": 9, "gender": 4, "item_id": 20000, "category": 50, "genres": 22, "price": 7,
               "hour": 26, "hist_item": 20000, "hist_category": 50, "hist_gap": 7}


def bench_model(preset: str, max_len: int, device="cpu", seed: int = 0, **overrides) -> OneTrans:
    """A OneTrans of ``preset`` on ``BENCH_SCHEMA``; the same ``seed`` gives the same weights whatever the
    switches (none of them changes a parameter's shape)."""
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's global RNG
        torch.manual_seed(seed)
        model = OneTrans(get_preset(preset, max_len=max_len, **overrides), BENCH_SCHEMA, BENCH_VOCAB)
    return model.to(device)


def request_batch(n_requests: int, n_candidates: int, seq_len: int, seed: int = 0) -> Batch:
    """``n_requests`` requests of ``n_candidates`` candidates each, full histories of ``seq_len`` events."""
    g = torch.Generator().manual_seed(seed)
    R, B = n_requests, n_requests * n_candidates
    ids = lambda name, *shape: torch.randint(2, BENCH_VOCAB[name], shape, generator=g)  # noqa: E731
    ns = {f.name: ids(f.name, B, *((f.max_len,) if isinstance(f, MultiCategorical) else ())) for f in BENCH_SCHEMA.ns_features}
    r = torch.arange(R).repeat_interleave(n_candidates)  # (B,) grouped by request, as the data pipeline makes them
    return Batch(seq={f.name: ids(f.name, R, seq_len) for f in BENCH_SCHEMA.event_fields},
                 seq_type=torch.randint(1, 3, (R, seq_len), generator=g), seq_mask=torch.ones(R, seq_len, dtype=torch.bool),
                 ns=ns, request_index=r, labels=torch.randint(0, 2, (B, 2), generator=g).float(), user=r,
                 request_id=torch.arange(R))


# ----------------------------------------------------------------------------------------------
# timing and memory


def interleaved_samples(fns: dict, reps: int, warmup: int = 1, device=None) -> dict[str, list[float]]:
    """Seconds of every call, ``{name: [reps floats]}``: the functions run in turn in every repetition, after
    ``warmup`` untimed rounds; on CUDA each call is synchronized."""
    sync = torch.cuda.synchronize if device is not None and torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for f in fns.values():
            f()
    sync()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t0)
    return times


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silence file descriptor 2 (the profiler's C++ logging) inside the block."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory(fn, device) -> int | None:
    """Peak tensor bytes allocated while ``fn()`` runs, above what was allocated before it (None when this
    PyTorch cannot tell). CPU: the running sum of the profiler's allocation (+) and free (-) events."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr_fd():
        with prof:
            fn()
    try:  # the raw event stream: one "[memory]" event per allocation (+bytes) and free (-bytes)
        mem = sorted((e.start_ns(), i, e.nbytes()) for i, e in enumerate(prof.profiler.kineto_results.events())
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    except AttributeError:  # a PyTorch without this semi-private API: "n/a" rather than a guess
        return None
    level = peak = 0
    for _, _, nbytes in mem:
        level += nbytes
        peak = max(peak, level)
    return peak


# ----------------------------------------------------------------------------------------------
# the rows and the sizes


@dataclass(frozen=True)
class Variant:
    """One row: which optimizations are on. ``paper``: its row of the paper's Table 4."""

    name: str
    label: str
    pyramid: bool = False
    request_level: bool = False  # model(batch): Stage I once per request; off: forward_full
    fused: bool = False  # SDPA; off: the explicit softmax
    bf16: bool = False  # torch.autocast(device, torch.bfloat16)
    recompute: bool = False  # ModelConfig.activation_checkpointing
    paper: str | None = None


BASELINE = Variant("baseline", "unoptimized (no pyramid, per-candidate forward, explicit softmax, fp32)")
_ROWS = (BASELINE, Variant("pyramid", "pyramid stack", pyramid=True, paper="pyramid"),
         Variant("kv_cache", "request-level KV cache", request_level=True, paper="kv_cache"),
         Variant("fused_attention", "fused attention (SDPA)", fused=True, paper="flash"))
TRAIN_VARIANTS = (*_ROWS, Variant("mixed_precision_recompute", "bf16 autocast + activation recomputation", bf16=True,
                                  recompute=True, paper="mixed_precision"),
                  Variant("bf16_only", "(extra) bf16 autocast only", bf16=True),
                  Variant("recompute_only", "(extra) activation recomputation only", recompute=True),
                  Variant("all", "(extra) all together", True, True, True, True, True))
INFER_VARIANTS = (*_ROWS, Variant("mixed_precision", "bf16 autocast (nothing to recompute)", bf16=True,
                                  paper="mixed_precision"),
                  Variant("all", "(extra) all together", True, True, True, True))

# the paper's Table 4 (OneTrans_S, H100, relative to its unoptimized model: 407 ms, 53.13 GB; p99 54 ms, 1.70 GB)
PAPER_TABLE4 = {
    "pyramid": {"train_time": -0.287, "train_memory": -0.426, "p99": -0.084, "inference_memory": -0.069},
    "kv_cache": {"train_time": -0.302, "train_memory": -0.584, "p99": -0.296, "inference_memory": -0.529},
    "flash": {"train_time": -0.501, "train_memory": -0.589, "p99": -0.123, "inference_memory": -0.116},
    "mixed_precision": {"train_time": -0.329, "train_memory": -0.490, "p99": -0.691, "inference_memory": -0.300},
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, no sparsity


@dataclass(frozen=True)
class SuiteConfig:
    """Sizes of one run. ``SUITES`` names the ones we use; every field is a CLI flag."""

    preset: str = "small"
    seq_len: int = 256  # L_S: full histories
    ns_tokens: int = 8
    requests: int = 4  # training batch: R requests of C candidates
    candidates: int = 32
    micro_requests: int = 0  # > 0: micro-batches of this many requests (gradient accumulation)
    infer_candidates: int = 64  # one inference request
    sweep_candidates: tuple[int, ...] = (1, 4, 16, 64, 256)
    append_cached: int = 256
    append_new: tuple[int, ...] = (1, 8, 64)
    reps: int = 7
    latency_reps: int = 60
    warmup: int = 2
    threads: int = 2  # CPU threads (the CLI sets them)
    peak_tflops: float = 0.0  # for MFU; 0: the known GPUs only

    def replace(self, **kw) -> SuiteConfig:
        return dataclasses.replace(self, **kw)


SUITES = {
    "nano": SuiteConfig("nano", 16, 4, 2, 4, 1, 4, (1, 4), 12, (1, 4), 2, 4, 1, 1),  # tests, notebook smoke: seconds
    "quick": SuiteConfig(seq_len=128, requests=2, candidates=16, infer_candidates=32, sweep_candidates=(1, 8, 32, 128),
                         append_cached=128, append_new=(1, 8, 32), reps=3, latency_reps=20, warmup=1),
    "cpu": SuiteConfig(),  # benchmarks/results/cpu.*
    # one H100/H200 (benchmarks/gpu_bench.sh): OneTrans_S, L_S=1024, batch 2048 as 8 micro-batches of 256
    "gpu": SuiteConfig("S", 1024, 12, 128, 16, 16, 100, (1, 10, 100, 1000), 1024, (1, 8, 64, 256), 5, 100, 2),
}


# ----------------------------------------------------------------------------------------------
# the sections


def _run(model: OneTrans, v: Variant, batch: Batch, device, backward_scale: float | None = None):
    """Logits of ``batch`` as variant ``v`` runs it; with ``backward_scale``, also loss * scale backward
    (inside the attention switch: recomputation in backward must take the forward's attention path)."""
    with explicit_attention(model, not v.fused):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=v.bf16):
            fwd = model if v.request_level else model.forward_full
            logits, loss = fwd(batch, batch.labels if backward_scale else None)
        if backward_scale:
            (loss * backward_scale).backward()
    return logits


def _flops(model: OneTrans, v: Variant, n_requests: int, n_cand: int, seq_len: int) -> int:
    """Analytic FLOPs of one forward as ``v`` runs it (the S side per request or per candidate)."""
    return model.estimate_flops(n_requests * n_cand, n_requests, seq_len=seq_len, two_stage=v.request_level)["total"]


def _deltas(rows: list[dict], **keys) -> None:
    """``row["delta"][k]``: the relative change of ``row[key]`` against the first (unoptimized) row, same run."""
    for r in rows:
        r["delta"] = {k: None if r[key] is None or not rows[0][key] else r[key] / rows[0][key] - 1
                      for k, key in keys.items()}


def _peak_flops(suite: SuiteConfig, device) -> float | None:
    """Peak dense bf16 FLOP/s for MFU: ``--peak-tflops``, else the known GPUs', else None (CPU)."""
    if suite.peak_tflops:
        return suite.peak_tflops * 1e12
    if torch.device(device).type != "cuda":
        return None
    return next((tf * 1e12 for k, tf in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None)


def _models(suite: SuiteConfig, device, variants) -> dict:
    """One model per (pyramid, recompute) the variants use, all with the same weights."""
    keys = {(v.pyramid, v.recompute) for v in variants}
    return {k: bench_model(suite.preset, suite.seq_len, device, ns_tokens=suite.ns_tokens, pyramid=k[0],
                           activation_checkpointing=k[1]) for k in sorted(keys)}


def bench_train(suite: SuiteConfig, device, variants=TRAIN_VARIANTS) -> dict:
    """Training step (forward + backward, gradients set to None before it) of every variant, interleaved."""
    models = {k: m.train() for k, m in _models(suite, device, variants).items()}
    per_mb = suite.micro_requests or suite.requests
    if suite.requests % per_mb:
        raise ValueError(f"requests={suite.requests} is not a multiple of micro_requests={per_mb}")
    batches = [request_batch(per_mb, suite.candidates, suite.seq_len, seed=i).to(device)
               for i in range(suite.requests // per_mb)]

    def step_fn(v):
        model = models[v.pyramid, v.recompute]

        def step():
            model.zero_grad(set_to_none=True)
            for b in batches:
                _run(model, v, b, device, backward_scale=1 / len(batches))
        return step

    fns = {v.name: step_fn(v) for v in variants}
    times = interleaved_samples(fns, suite.reps, suite.warmup, device)
    peak = _peak_flops(suite, device)
    rows = []
    for v in variants:
        model = models[v.pyramid, v.recompute]
        fwd = _flops(model, v, suite.requests, suite.candidates, suite.seq_len)
        t = statistics.median(times[v.name])
        rows.append({"name": v.name, "label": v.label, "paper": v.paper, "switches": dataclasses.asdict(v),
                     "time_s": t, "times_s": times[v.name], "peak_bytes": peak_memory(fns[v.name], device),
                     "model_flops": 3 * fwd,  # forward + backward (MFU's definition: no recomputation)
                     "hardware_flops": (4 if v.recompute else 3) * fwd,  # recomputation runs the forward twice
                     "achieved_flops_per_s": 3 * fwd / t, "mfu": None if peak is None else 3 * fwd / t / peak})
        model.zero_grad(set_to_none=True)
    _deltas(rows, time="time_s", memory="peak_bytes", flops="hardware_flops")
    return {"requests": suite.requests, "candidates_per_request": suite.candidates, "micro_batches": len(batches),
            "schedule": {f"pyramid={k[0]}": m.schedule() for k, m in models.items()}, "peak_flops_per_s": peak,
            "rows": rows}


def bench_inference(suite: SuiteConfig, device, variants=INFER_VARIANTS) -> dict:
    """One request of ``infer_candidates`` candidates: latency (p50, p99 of interleaved calls), peak memory, and
    each variant's largest logit difference from the unoptimized model's."""
    models = {k: m.eval() for k, m in _models(suite, device, variants).items()}
    batch = request_batch(1, suite.infer_candidates, suite.seq_len, seed=1).to(device)
    fns = {v.name: (lambda v=v: _run(models[v.pyramid, v.recompute], v, batch, device)) for v in variants}
    with torch.inference_mode():
        times = interleaved_samples(fns, suite.latency_reps, suite.warmup, device)
        ref = fns[variants[0].name]().float()
        rows = [{"name": v.name, "label": v.label, "paper": v.paper, "switches": dataclasses.asdict(v),
                 "p50_s": statistics.median(times[v.name]), "p99_s": percentile(times[v.name], 99),
                 "times_s": times[v.name], "peak_bytes": peak_memory(fns[v.name], device),
                 "flops": _flops(models[v.pyramid, v.recompute], v, 1, suite.infer_candidates, suite.seq_len),
                 "max_abs_diff": float((fns[v.name]().float() - ref).abs().max())} for v in variants]
    _deltas(rows, p50="p50_s", p99="p99_s", memory="peak_bytes", flops="flops")
    return {"candidates_per_request": suite.infer_candidates, "rows": rows}


def bench_two_stage(suite: SuiteConfig, device) -> dict:
    """One request of C candidates with the library's defaults (pyramid, SDPA, fp32): ``forward_full`` (the
    history once per candidate) against ``forward`` (once per request), for every C of the sweep."""
    model = bench_model(suite.preset, suite.seq_len, device, ns_tokens=suite.ns_tokens).eval()
    points = []
    for c in suite.sweep_candidates:
        batch = request_batch(1, c, suite.seq_len, seed=2).to(device)
        with torch.inference_mode():
            fns = {"full": lambda: model.forward_full(batch)[0], "two_stage": lambda: model(batch)[0]}
            t = {k: statistics.median(s) for k, s in interleaved_samples(fns, suite.latency_reps, suite.warmup,
                                                                         device).items()}
            diff = float((fns["full"]() - fns["two_stage"]()).abs().max())
        f_full, f_two = (model.estimate_flops(c, 1, seq_len=suite.seq_len, two_stage=s)["total"] for s in (False, True))
        points.append({"candidates": c, "full_s": t["full"], "two_stage_s": t["two_stage"],
                       "speedup": t["full"] / t["two_stage"], "flops_ratio": f_full / f_two, "max_abs_diff": diff})
    return {"seq_len": suite.seq_len, "schedule": model.schedule(), "points": points}


def append_point(model: OneTrans, cached: int, new: int, reps: int, warmup: int = 1, device="cpu") -> dict:
    """``new`` events appended to a user's cached history of ``cached`` (exact mode), interleaved with a fresh
    Stage I of all ``cached + new`` (the window must have room: no front truncation)."""
    b = request_batch(1, 1, cached + new, seed=3).to(device)  # one user's events, times 0, 1, 2, ...
    ev = Events({k: v[0] for k, v in b.seq.items()}, b.seq_type[0], torch.arange(cached + new, dtype=torch.float64,
                                                                                   device=device))
    after = Window(ev, 0)
    with torch.inference_mode():
        base = UserCache()
        base.advance(model, Window(ev.slice(0, cached), 0))
        states = [dataclasses.replace(base, layers=list(base.layers)) for _ in range(reps + warmup)]  # advance rebinds
        plans = []
        fns = {"fresh": lambda: fresh_stage_one(model, after), "append": lambda: plans.append(states.pop().advance(model, after))}
        t = {k: statistics.median(s) for k, s in interleaved_samples(fns, reps, warmup, device).items()}
    end = cached + new
    computed = [p.computed(end) for p in plans[-1]]
    return {"cached": cached, "new": new, "fresh_s": t["fresh"], "append_s": t["append"], "ratio": t["append"] / t["fresh"],
            "computed": computed, "window_moved": [p.window_moved for p in plans[-1]],
            "computed_share": sum(computed) / sum(model.schedule(end))}


def bench_append(suite: SuiteConfig, device) -> dict:
    """Appends of each ``append_new`` to a cached history of ``append_cached`` events (runs on the caller's
    threads: the CLI gives it one)."""
    model = bench_model(suite.preset, suite.append_cached + max(suite.append_new), device,
                        ns_tokens=suite.ns_tokens).eval()
    return {"cached": suite.append_cached, "schedule": model.layer_queries, "threads": torch.get_num_threads(),
            "points": [append_point(model, suite.append_cached, n, suite.latency_reps, suite.warmup, device)
                       for n in suite.append_new]}


SECTIONS = {"train": bench_train, "inference": bench_inference, "two_stage": bench_two_stage, "append": bench_append}


def run_suite(suite: SuiteConfig | str, device="cpu", sections=tuple(SECTIONS), name: str | None = None,
              before_section=None) -> dict:
    """Run the sections; a failing section is recorded as ``{"error": ...}`` and the others still run.
    ``before_section(name)`` is the caller's hook (the CLI prints progress and sets threads there)."""
    name = name or (suite if isinstance(suite, str) else "custom")
    suite = SUITES[suite] if isinstance(suite, str) else suite
    device = torch.device(device)
    t_start = time.perf_counter()
    out = {"schema": SCHEMA_VERSION, "suite_name": name, "suite": dataclasses.asdict(suite),
           "hardware": {"device": device.type, "description": hardware(device), "threads": torch.get_num_threads(),
                        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2: no bf16 arithmetic
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), "torch": torch.__version__,
                        "load_average_start": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M:%S")},
           "model": dataclasses.asdict(get_preset(suite.preset, max_len=suite.seq_len, ns_tokens=suite.ns_tokens))}
    for sec in sections:
        if before_section is not None:
            before_section(sec)
        t0 = time.perf_counter()
        try:
            out[sec] = SECTIONS[sec](suite, device)
        except Exception as e:  # noqa: BLE001 (recorded and reported; a GPU run should not lose all to one OOM)
            out[sec] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        out[sec]["seconds"] = time.perf_counter() - t0
    out["hardware"]["load_average_end"] = os.getloadavg()[0]
    out["elapsed_s"] = time.perf_counter() - t_start
    return out


# ----------------------------------------------------------------------------------------------
# the report


def signed_percent(x) -> str:
    """A relative change as ``-12.3%``."""
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def _ms(s) -> str:
    return f"{1e3 * s:.1f}" if s >= 0.01 else f"{1e3 * s:.2f}"


def _mb(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1),
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows), ""]


def _paper(r: dict, key: str) -> str:
    return signed_percent(PAPER_TABLE4[r["paper"]][key]) if r["paper"] else ""


# per section: title(section result), header, cells(row or point)
_REPORT = {
    "train": (lambda x: f"Training step (forward + backward): {x['requests']} requests x {x['candidates_per_request']} "
              f"candidates, {x['micro_batches']} micro-batch(es)",
              ["optimization", "step ms", "Δ time", "paper", "peak MB", "Δ memory", "paper", "Δ FLOPs", "GFLOP/s", "MFU"],
              lambda r: [r["label"], _ms(r["time_s"]), signed_percent(r["delta"]["time"]), _paper(r, "train_time"),
                         _mb(r["peak_bytes"]), signed_percent(r["delta"]["memory"]), _paper(r, "train_memory"),
                         signed_percent(r["delta"]["flops"]), f"{r['achieved_flops_per_s'] / 1e9:.1f}",
                         "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"]),
    "inference": (lambda x: f"Inference: one request of {x['candidates_per_request']} candidates",
                  ["optimization", "p50 ms", "p99 ms", "Δ p99", "paper", "peak MB", "Δ memory", "paper", "Δ FLOPs",
                   "max abs diff"],
                  lambda r: [r["label"], _ms(r["p50_s"]), _ms(r["p99_s"]), signed_percent(r["delta"]["p99"]),
                             _paper(r, "p99"), _mb(r["peak_bytes"]), signed_percent(r["delta"]["memory"]),
                             _paper(r, "inference_memory"), signed_percent(r["delta"]["flops"]),
                             f"{r['max_abs_diff']:.1e}"]),
    "two_stage": (lambda x: f"Two-stage `forward` vs per-candidate `forward_full`: one request, L_S={x['seq_len']}, "
                  f"S queries per layer {x['schedule']}",
                  ["C", "full ms", "two-stage ms", "speed-up", "FLOPs ratio", "max abs diff"],
                  lambda p: [p["candidates"], _ms(p["full_s"]), _ms(p["two_stage_s"]), f"{p['speedup']:.1f}x",
                             f"{p['flops_ratio']:.1f}x", f"{p['max_abs_diff']:.1e}"]),
    "append": (lambda x: f"User cache: n events appended to {x['cached']} cached ones vs a fresh Stage I "
               f"({x['threads']} thread(s); S queries per layer {x['schedule']})",
               ["new events", "fresh Stage I ms", "append ms", "append / fresh", "positions computed (share)",
                "layers whose key window moved"],
               lambda p: [p["new"], _ms(p["fresh_s"]), _ms(p["append_s"]), f"{100 * p['ratio']:.1f}%",
                          f"{sum(p['computed'])} ({100 * p['computed_share']:.1f}%)",
                          [i for i, mv in enumerate(p["window_moved"]) if mv] or "none"]),
}


def to_markdown(res: dict) -> str:
    """The report: one table per section, the paper's percentages beside ours."""
    hw, s, m = res["hardware"], res["suite"], res["model"]
    out = [f"# onetrans-mini systems benchmark (suite `{res['suite_name']}`)", "",
           f"- {hw['description']}, CPU capability {hw.get('cpu_capability', 'n/a')}; OMP_WAIT_POLICY="
           f"{hw['omp_wait_policy']}; load average "
           f"{hw['load_average_start']:.2f} at start, {hw['load_average_end']:.2f} at end; {hw['date']}",
           f"- preset `{s['preset']}` (d={m['d_model']}, {m['n_layers']} layers, {m['n_heads']} heads), L_S={s['seq_len']}"
           f" events, L_NS={s['ns_tokens']}; medians of {s['reps']} interleaved repetitions (latency: "
           f"{s['latency_reps']} calls) after {s['warmup']} warm-up rounds; ratios within this run; {res['elapsed_s']:.0f} s",
           ""]
    for sec, (title, header, cells) in _REPORT.items():
        x = res.get(sec)
        if x is not None and "error" in x:
            out += [f"## {sec}: failed", "", x["error"], ""]
        elif x is not None:
            out += [f"## {title(x)}", "", *_table(header, [cells(r) for r in x.get("rows", x.get("points"))])]
    return "\n".join(out).rstrip() + "\n"


def readme_table(res: dict) -> str:
    """The README's systems table, generated from a results file (a test keeps the README equal to it)."""
    rows = {sec: {r["paper"]: r for r in res[sec]["rows"] if r["paper"]} for sec in ("train", "inference")}
    label = {"pyramid": "pyramid stack", "kv_cache": "request-level KV cache", "flash": "fused attention (SDPA)",
             "mixed_precision": "bf16 + recomputation (inference: bf16)"}

    def both(p, sec, ours, theirs):
        return f"{signed_percent(rows[sec][p]['delta'][ours])} ({signed_percent(PAPER_TABLE4[p][theirs])})"

    s, hw = res["suite"], res["hardware"]
    out = _table([f"each alone vs unoptimized, `{s['preset']}`, L_S={s['seq_len']}, CPU ({hw.get('cpu_capability')})",
                  "train time", "train memory", "p99 latency", "inference memory"],
                 [[label[p], both(p, "train", "time", "train_time"), both(p, "train", "memory", "train_memory"),
                   both(p, "inference", "p99", "p99"), both(p, "inference", "memory", "inference_memory")]
                  for p in PAPER_TABLE4 if p in rows["train"] and p in rows["inference"]])
    ts = max((p for p in res["two_stage"]["points"] if p["candidates"] <= 64), key=lambda p: p["candidates"])
    ap = min(res["append"]["points"], key=lambda p: abs(p["new"] - 8))
    out += [f"Two-stage scoring of {ts['candidates']} candidates over {res['two_stage']['seq_len']} events: "
            f"{ts['speedup']:.1f}x faster than the per-candidate forward (FLOPs ratio {ts['flops_ratio']:.1f}x). "
            f"Appending {ap['new']} events to a cached {ap['cached']}-event history: {100 * ap['ratio']:.1f}% of a "
            f"fresh Stage I ({res['append']['threads']} thread). Measured {hw['date'][:10]}, "
            f"OMP_WAIT_POLICY={hw['omp_wait_policy']}, load average {hw['load_average_start']:.2f}."]
    return "\n".join(out) + "\n"


def write_results(res: dict, out_dir, name: str | None = None) -> tuple[Path, Path]:
    """``out_dir/NAME.json`` and ``NAME.md`` (NAME: the suite's name)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name or res["suite_name"]
    (out / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"{name}.md").write_text(to_markdown(res))
    return out / f"{name}.json", out / f"{name}.md"


# ----------------------------------------------------------------------------------------------
# the CLI: ``onetrans-mini bench`` (or ``python -m onetrans_mini.bench``)


def add_bench_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="the quick suite (CPU, about a minute)")
    p.add_argument("--suite", choices=sorted(SUITES), default=None, help="named sizes (default: cpu, or gpu on cuda)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    for f in dataclasses.fields(SuiteConfig):  # every size a flag, overriding the suite's
        kind = "comma-separated ints" if f.type.startswith("tuple") else f.type
        p.add_argument("--" + f.name.replace("_", "-"), default=None, help=f"{kind} (overrides the suite's)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--out", default=None, metavar="DIR", help="also write DIR/NAME.json and DIR/NAME.md (checked "
                   "before the suite runs); without it the tables are only printed")
    p.add_argument("--name", default=None, help="file name stem (default: the suite's name)")
    p.add_argument("--readme-table", nargs="?", const=str(RESULTS / "cpu.json"), default=None, metavar="RESULTS_JSON",
                   help="print the README's systems table from a results file (default: the committed cpu.json)")


def suite_from_args(args) -> tuple[str, SuiteConfig]:
    name = "quick" if args.quick else args.suite or ("gpu" if args.device.startswith("cuda") else "cpu")
    over = {}
    for f in dataclasses.fields(SuiteConfig):
        v = getattr(args, f.name)
        if v is not None:
            flag, kind = "--" + f.name.replace("_", "-"), type(getattr(SUITES[name], f.name))
            try:
                over[f.name] = tuple(int(x) for x in v.split(",")) if f.type.startswith("tuple") else kind(v)
            except ValueError:
                want = "comma-separated integers" if f.type.startswith("tuple") else {int: "an integer", float: "a number"}.get(kind, "a string")
                raise ValueError(f"{flag} must be {want}, got {v!r}") from None
    return name, SUITES[name].replace(**over)


def cli_bench(args) -> int:
    if args.readme_table:
        path = Path(args.readme_table)
        try:
            table = readme_table(json.loads(path.read_text()))
        except OSError as e:
            print(f"error: --readme-table {path}: cannot read it ({e.strerror or e})", file=sys.stderr)
            return 2
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or not a suite's results
            print(f"error: --readme-table {path}: expected the results JSON that 'bench --out DIR' writes "
                  f"({type(e).__name__}: {e})", file=sys.stderr)
            return 2
        print(table, end="")
        return 0
    cuda = args.device == "cuda" or (args.device.startswith("cuda:") and args.device[5:].isdigit())
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    error = (f"--device must be cpu, cuda or cuda:N, got {args.device!r}" if not (cuda or args.device == "cpu") else
             f"--device {args.device}: CUDA is not available here (torch {torch.__version__})"
             if cuda and not torch.cuda.is_available() else
             f"unknown section(s) {set(sections) - set(SECTIONS)}; choose from {list(SECTIONS)}"
             if set(sections) - set(SECTIONS) else None)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        name, suite = suite_from_args(args)
        if args.out:
            check_run_dir(args.out, "--out", what="results")
    except (ValueError, TrainError) as e:  # a size that is not a number, an unwritable --out: one line, no work
        print(f"error: {e}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()

    def before_section(sec):  # the suite's threads; one for the append (see the module docstring)
        print(f"[bench] {sec} ...", file=sys.stderr, flush=True)
        if not cuda:
            torch.set_num_threads(1 if sec == "append" else suite.threads)

    try:
        if not cuda:
            torch.set_num_threads(suite.threads)
        res = run_suite(suite, args.device, sections, name, before_section)
    finally:
        torch.set_num_threads(threads)
    print(to_markdown(res))
    if args.out:
        print("wrote {} and {}".format(*write_results(res, args.out, args.name)), file=sys.stderr)
    failed = [s for s in sections if "error" in res[s]]
    if failed:
        print(f"error: section(s) failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m onetrans_mini.bench", description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    sys.exit(cli_bench(parser.parse_args()))
