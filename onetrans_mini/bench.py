"""The systems benchmark suite (paper §6, Table 4): ``onetrans-mini bench [--quick] [--device cpu|cuda]``.

Five measurements, written as JSON and as a markdown table (``--out DIR``):

(a) TRAINING step time and peak memory of an UNOPTIMIZED OneTrans (no pyramid, every candidate through
    the full forward, explicit-softmax attention, fp32, no activation recomputation) and, each ALONE on
    top of it, the paper's four optimizations: pyramid stacking, the request-level KV cache (the S side
    once per request, ``cache.forward_two_stage``), fused attention (``scaled_dot_product_attention``
    instead of the explicit softmax: FlashAttention on a GPU), and mixed precision + activation
    recomputation (bf16 autocast + one checkpoint per block). Three extra rows split the last one in
    its halves and run all four together. The paper's percentages are printed beside ours.
(b) INFERENCE latency of one request (its C candidates scored together), p50 and p99, and peak memory,
    for the same switches (recomputation has no meaning without a backward pass: that row is bf16 only).
(c) The two-stage speed-up against the number of candidates C, measured and analytic (FLOPs ratio); like
    (b) and (d), a latency: the median of ``latency_reps`` interleaved calls.
(d) The cross-request cache: the cost of appending n new events to a cached history, against a fresh
    Stage I of the whole history (``cache.UserCache``). On CPU both run on ONE thread, like for like: an
    append of a few events always does (``cache._few_threads``), and a server runs one request per core, so
    cost per core is what sets its throughput. (A fresh Stage I of 264 events at d=64 does gain from a
    second core on a quiet machine: about 1.4x with spinning OpenMP threads; with passive waits it lost 2x.)
(e) On CUDA, the MFU of each training row: model FLOPs (``OneTrans.estimate_flops``, forward x 3 for
    forward + backward; recomputation is not counted, as MFU is defined) / step time / peak dense bf16
    FLOP/s of the GPU (H100 / H200: 989 TFLOP/s; ``--peak-tflops`` for others). On CPU: achieved FLOP/s.

How it measures (the rules of ``bench_cache``):

- every figure is the median (latencies: p50 and p99) of several repetitions after warm-up;
- the variants of one measurement run INTERLEAVED (A, B, C, A, B, C, ...), so load from other processes
  hits them alike, and every ratio is taken between figures of the SAME run;
- a training step is forward + backward (no optimizer update: it is the same for every variant), the
  gradients set to None before it;
- on CPU, ``OMP_WAIT_POLICY=PASSIVE`` (the CLI re-runs itself with it): on a shared machine spinning
  OpenMP threads turn milliseconds into hundreds of them.

Peak memory is TENSOR memory allocated while the step runs, above what was allocated before it
(parameters, inputs): activations, temporaries and gradients. On CUDA that is ``max_memory_allocated``
minus ``memory_allocated`` before the step. On CPU, PyTorch's profiler records every allocation and free
of its CPU allocator, in order (``profile_memory=True``); the peak of their running sum is the same
quantity. (A process's max RSS would also count the allocator's cached pages, the interpreter and the
libraries, and can only grow: it cannot compare variants within one run.) The memory pass runs once per
variant, after the timed repetitions, never inside them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from .attention import explicit_attention
from .bench_model import BENCH_SCHEMA, BENCH_VOCAB, random_batch
from .cache import Events, UserCache, Window, estimate_two_stage_flops, forward_two_stage, fresh_stage_one
from .config import get_preset
from .data.batching import Batch
from .model import OneTrans

SCHEMA_VERSION = "onetrans-mini-bench/1"

# ----------------------------------------------------------------------------------------------
# 1. timing and memory


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_samples(fns: dict, reps: int, warmup: int = 2, device: torch.device | None = None) -> dict:
    """Seconds of every call: ``{name: [reps floats]}``. The functions run in turn in every repetition
    (A, B, A, B, ...), after ``warmup`` untimed rounds; on CUDA each call is synchronized."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    _sync(device)
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def interleaved(fns: dict, reps: int, warmup: int = 2) -> dict:
    """Median seconds of each function, the functions run in turn in every repetition."""
    return {k: statistics.median(v) for k, v in interleaved_samples(fns, reps, warmup).items()}


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between order statistics (numpy's default)."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@contextlib.contextmanager
def _quiet_fd2():
    """Silence file descriptor 2 (C++ logging) inside the block; Python exceptions still propagate."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (some embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory(fn, device: torch.device) -> int | None:
    """Peak tensor bytes allocated while ``fn()`` runs, above what was allocated before it (None when
    this PyTorch cannot tell). See the module docstring for what is and is not counted."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_fd2():  # the profiler's C++ side logs every start and stop to the process's stderr
        prof.start()
    try:
        fn()
    finally:
        with _quiet_fd2():
            prof.stop()
    try:  # the raw event stream: one "[memory]" event per allocation (+bytes) and free (-bytes)
        events = prof.profiler.kineto_results.events()
        mem = sorted((e.start_ns(), i, e.nbytes()) for i, e in enumerate(events)
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    except AttributeError:  # a PyTorch without this (semi-private) API: say "n/a" rather than guess
        return None
    level = peak = 0
    for _, _, nbytes in mem:
        level += nbytes
        peak = max(peak, level)
    return peak


# ----------------------------------------------------------------------------------------------
# 2. the switches


@contextlib.contextmanager
def recompute_activations(model: OneTrans, on: bool = True):
    """Activation recomputation without touching the model's code: inside the block, every
    ``OneTransBlock.forward`` and ``forward_s`` (Stage I) keeps only its inputs for backward and runs
    again there (``torch.utils.checkpoint``, non-reentrant). Stage II's NS path (``cache.stage_two``)
    calls the block's parts directly, so it is not recomputed. Run backward INSIDE the block too: the
    recomputation must take the same attention path as the forward did."""
    if not on:
        yield model
        return
    for block in model.blocks:
        for name in ("forward", "forward_s"):
            original = getattr(type(block), name).__get__(block)  # the class's method, bound
            block.__dict__[name] = functools.partial(checkpoint, original, use_reentrant=False)
    try:
        yield model
    finally:
        for block in model.blocks:
            for name in ("forward", "forward_s"):
                block.__dict__.pop(name, None)


@contextlib.contextmanager
def autocast(model: OneTrans, device: torch.device, bf16: bool = True):
    """bf16 autocast on ``device`` (CUDA or CPU) for the model's blocks and heads, or nothing.

    The sequence tokenizer runs in fp32 inside it: under autocast its per-sequence MLPs return bf16 rows
    that ``index_put`` cannot write into its fp32 output (a RuntimeError). It is a sliver of the FLOPs
    (one small MLP per event), so keeping it in fp32 changes nothing measurable here."""
    if not bf16:
        yield model
        return
    seq = model.tokenizer.seq
    original = type(seq).forward.__get__(seq)

    def fp32_forward(*args, **kw):
        with torch.autocast(device.type, enabled=False):
            return original(*args, **kw)

    seq.__dict__["forward"] = fp32_forward
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield model
    finally:
        seq.__dict__.pop("forward", None)


@dataclass(frozen=True)
class Variant:
    """One row: which optimizations are on. ``paper`` names its row of the paper's Table 4."""

    name: str
    label: str
    pyramid: bool = False
    two_stage: bool = False
    fused: bool = False
    bf16: bool = False
    recompute: bool = False
    paper: str | None = None
    extra: bool = False  # not a row of the paper's table


BASELINE = Variant("baseline", "unoptimized: no pyramid, full forward per candidate, explicit softmax, fp32")
TRAIN_VARIANTS = (
    BASELINE,
    Variant("pyramid", "pyramid stack", pyramid=True, paper="pyramid"),
    Variant("kv_cache", "request-level KV cache (S once per request)", two_stage=True, paper="kv_cache"),
    Variant("fused_attention", "fused attention (SDPA)", fused=True, paper="flash"),
    Variant("mixed_precision_recompute", "bf16 autocast + activation recomputation", bf16=True, recompute=True,
            paper="mixed_precision"),
    Variant("bf16_only", "(extra) bf16 autocast only", bf16=True, extra=True),
    Variant("recompute_only", "(extra) activation recomputation only", recompute=True, extra=True),
    Variant("all", "(extra) all four together", pyramid=True, two_stage=True, fused=True, bf16=True, recompute=True,
            extra=True),
)
INFER_VARIANTS = (
    BASELINE,
    Variant("pyramid", "pyramid stack", pyramid=True, paper="pyramid"),
    Variant("kv_cache", "request-level KV cache (S once per request)", two_stage=True, paper="kv_cache"),
    Variant("fused_attention", "fused attention (SDPA)", fused=True, paper="flash"),
    Variant("mixed_precision", "bf16 autocast (no backward: nothing to recompute)", bf16=True, paper="mixed_precision"),
    Variant("all", "(extra) all together", pyramid=True, two_stage=True, fused=True, bf16=True, extra=True),
)

# the paper's Table 4 (OneTrans_S, relative to its unoptimized model): train runtime, train memory,
# p99 latency, inference memory
PAPER_BASELINE = {"train_ms": 407.0, "train_memory_gb": 53.13, "p99_ms": 54.0, "inference_memory_gb": 1.70}
PAPER_TABLE4 = {
    "pyramid": {"label": "pyramid stack", "train_time": -0.287, "train_memory": -0.426, "p99": -0.084,
                "inference_memory": -0.069},
    "kv_cache": {"label": "cross-request KV cache", "train_time": -0.302, "train_memory": -0.584, "p99": -0.296,
                 "inference_memory": -0.529},
    "flash": {"label": "FlashAttention (v2)", "train_time": -0.501, "train_memory": -0.589, "p99": -0.123,
              "inference_memory": -0.116},
    "mixed_precision": {"label": "mixed precision + activation recomputation", "train_time": -0.329,
                        "train_memory": -0.490, "p99": -0.691, "inference_memory": -0.300},
}

# dense (no sparsity) bf16 peak of the GPUs we know, TFLOP/s
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


# ----------------------------------------------------------------------------------------------
# 3. what to run


@dataclass(frozen=True)
class SuiteConfig:
    """Sizes of one run of the suite. ``SUITES`` names the ones we use; any field can be overridden."""

    preset: str = "small"
    seq_len: int = 256  # L_S: full histories, no padding
    ns_tokens: int = 8  # L_NS
    requests: int = 4  # training batch: R requests ...
    candidates: int = 32  # ... of C candidates each (B = R * C)
    micro_requests: int = 0  # > 0: micro-batches of this many requests (gradient accumulation)
    infer_candidates: int = 64  # candidates of one inference request
    sweep_candidates: tuple[int, ...] = (1, 4, 16, 64, 256)
    append_cached: int = 256
    append_new: tuple[int, ...] = (1, 4, 16, 64)
    reps: int = 7
    latency_reps: int = 60
    warmup: int = 2
    threads: int = 2  # CPU intra-op threads (ignored on CUDA)
    peak_tflops: float = 0.0  # peak dense bf16 TFLOP/s for MFU; 0 = known GPUs only

    def replace(self, **kw) -> "SuiteConfig":
        return dataclasses.replace(self, **kw)


SUITES: dict[str, SuiteConfig] = {
    # the tests' and the notebook's smoke run: seconds
    "nano": SuiteConfig(preset="nano", seq_len=16, ns_tokens=4, requests=2, candidates=4, micro_requests=1,
                        infer_candidates=4,
                        sweep_candidates=(1, 4), append_cached=12, append_new=(1, 4), reps=2, latency_reps=4,
                        warmup=1, threads=1),
    # --quick: the whole machinery on CPU in well under two minutes
    "quick": SuiteConfig(seq_len=128, requests=2, candidates=16, infer_candidates=32, sweep_candidates=(1, 8, 32, 128),
                         append_cached=128, append_new=(1, 8, 32), reps=3, latency_reps=20, warmup=1),
    # the committed CPU results (benchmarks/results/cpu.*)
    "cpu": SuiteConfig(),
    # paper-like size on one H100 / H200 (benchmarks/gpu_bench.sh): OneTrans_S shape, L_S=1024, 12 NS tokens,
    # a training batch of 2048 candidates (128 requests x 16) run as 8 micro-batches of 256 (the unoptimized model
    # keeps ~190 MB of fp32 activations per candidate: 2048 at once would need ~400 GB), 100 candidates per request
    "gpu": SuiteConfig(preset="S", seq_len=1024, ns_tokens=12, requests=128, candidates=16, micro_requests=16,
                       infer_candidates=100, sweep_candidates=(1, 10, 100, 1000), append_cached=1024,
                       append_new=(1, 8, 64, 256), reps=5, latency_reps=100, warmup=2),
}


def suite_name(suite: SuiteConfig) -> str:
    """The named suite ``suite`` is closest to, with what differs: ``"quick (threads=1)"``; ``"custom"`` when no
    named suite is within three fields of it."""
    def diff(base):
        return {f.name: getattr(suite, f.name) for f in dataclasses.fields(suite)
                if getattr(suite, f.name) != getattr(base, f.name)}

    name, changed = min(((n, diff(b)) for n, b in SUITES.items()), key=lambda x: len(x[1]))
    if len(changed) > 3:
        return "custom"
    return name + (f" ({', '.join(f'{k}={v}' for k, v in changed.items())})" if changed else "")


def request_batch(n_requests: int, n_candidates: int, seq_len: int, seed: int = 0) -> Batch:
    """``n_requests`` requests of ``n_candidates`` candidates each (grouped by request, as the data pipeline
    makes them), full histories of ``seq_len`` events, random ids of ``bench_model.BENCH_SCHEMA``."""
    b = random_batch(BENCH_SCHEMA, BENCH_VOCAB, n_requests * n_candidates, seq_len, seed)
    r = torch.arange(n_requests).repeat_interleave(n_candidates)  # (B,)
    return Batch(seq={k: v[:n_requests] for k, v in b.seq.items()}, seq_type=b.seq_type[:n_requests],
                 seq_mask=b.seq_mask[:n_requests], ns=b.ns, request_index=r, labels=b.labels, user=r,
                 request_id=torch.arange(n_requests))


def build_model(suite: SuiteConfig, device: torch.device, seq_len: int | None = None, **overrides) -> OneTrans:
    """The suite's model (preset, L_NS, max_len = L_S), seed 0, input checks off (they synchronize a GPU)."""
    torch.manual_seed(0)
    cfg = get_preset(suite.preset, max_len=seq_len or suite.seq_len, ns_tokens=suite.ns_tokens, **overrides)
    model = OneTrans(cfg, BENCH_SCHEMA, BENCH_VOCAB).to(device)
    model.check_inputs = False
    return model


def _forward_flops(model: OneTrans, v: Variant, n_requests: int, n_cand: int, seq_len: int) -> int:
    """Analytic FLOPs of one forward over ``n_requests`` x ``n_cand`` candidates as variant ``v`` runs it."""
    if v.two_stage:
        return n_requests * estimate_two_stage_flops(model, n_cand, seq_len)["total"]
    return model.estimate_flops(n_requests * n_cand, n_requests, seq_len=seq_len)["total"]


def _peak_flops(suite: SuiteConfig, device: torch.device) -> tuple[float | None, str]:
    if suite.peak_tflops > 0:
        return suite.peak_tflops * 1e12, f"{suite.peak_tflops:g} TFLOP/s (given)"
    if device.type != "cuda":
        return None, "n/a on CPU (no agreed peak): achieved FLOP/s only"
    name = torch.cuda.get_device_name(device)
    for key, tf in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tf * 1e12, f"{tf:g} TFLOP/s, dense bf16 peak of the {key} (no sparsity)"
    return None, f"unknown peak for {name!r}: pass --peak-tflops for MFU"


# ----------------------------------------------------------------------------------------------
# 4. the measurements


def _rel(x, base):
    return None if x is None or base in (None, 0) else x / base - 1


def bench_train(suite: SuiteConfig, device: torch.device, variants=TRAIN_VARIANTS) -> dict:
    """(a) + (e): training step time, peak memory, FLOPs and MFU of every variant, interleaved."""
    models = {False: build_model(suite, device, pyramid=False), True: build_model(suite, device, pyramid=True)}
    for m in models.values():
        m.train()
    per_mb = suite.micro_requests or suite.requests
    if suite.requests % per_mb:
        raise ValueError(f"requests={suite.requests} is not a multiple of micro_requests={per_mb}")
    n_mb = suite.requests // per_mb
    batches = [request_batch(per_mb, suite.candidates, suite.seq_len, seed=i).to(device) for i in range(n_mb)]

    def step_fn(v: Variant):
        model = models[v.pyramid]

        def step():
            model.zero_grad(set_to_none=True)
            with explicit_attention(model, not v.fused), recompute_activations(model, v.recompute):
                for b in batches:
                    with autocast(model, device, v.bf16):
                        _, loss = forward_two_stage(model, b, b.labels) if v.two_stage else model(b, b.labels)
                    (loss / n_mb).backward()

        return step

    fns = {v.name: step_fn(v) for v in variants}
    times = interleaved_samples(fns, suite.reps, suite.warmup, device)
    peak, peak_src = _peak_flops(suite, device)
    rows = []
    for v in variants:
        models[v.pyramid].zero_grad(set_to_none=True)
        mem = peak_memory(fns[v.name], device)
        models[v.pyramid].zero_grad(set_to_none=True)
        fwd = _forward_flops(models[v.pyramid], v, suite.requests, suite.candidates, suite.seq_len)
        t = statistics.median(times[v.name])
        rows.append({
            "name": v.name, "label": v.label, "paper": v.paper, "extra": v.extra, "switches": _switches(v),
            "time_s": t, "times_s": times[v.name], "peak_bytes": mem,
            "model_flops": 3 * fwd,  # forward + backward
            "hardware_flops": (4 if v.recompute else 3) * fwd,  # recomputation runs the forward twice
            "achieved_flops_per_s": 3 * fwd / t,
            "mfu": None if peak is None else 3 * fwd / t / peak,
        })
    _deltas(rows, {"time": "time_s", "memory": "peak_bytes", "flops": "hardware_flops"},
            {"time": "train_time", "memory": "train_memory"})
    return {
        "batch": {"requests": suite.requests, "candidates_per_request": suite.candidates,
                  "candidates": suite.requests * suite.candidates, "micro_batches": n_mb},
        "schedule": {"pyramid": models[True].schedule(), "no_pyramid": models[False].schedule()},
        "params": models[True].num_params(),
        "peak_flops_per_s": peak, "peak_flops_source": peak_src,
        "rows": rows,
    }


def bench_inference(suite: SuiteConfig, device: torch.device, variants=INFER_VARIANTS) -> dict:
    """(b): latency of one request (p50, p99 over ``latency_reps`` interleaved calls) and peak memory."""
    models = {False: build_model(suite, device, pyramid=False), True: build_model(suite, device, pyramid=True)}
    for m in models.values():
        m.eval()
    batch = request_batch(1, suite.infer_candidates, suite.seq_len, seed=1).to(device)

    def infer_fn(v: Variant):
        model = models[v.pyramid]

        def infer():
            with torch.inference_mode(), explicit_attention(model, not v.fused), autocast(model, device, v.bf16):
                return forward_two_stage(model, batch)[0] if v.two_stage else model(batch)[0]

        return infer

    fns = {v.name: infer_fn(v) for v in variants}
    times = interleaved_samples(fns, suite.latency_reps, suite.warmup + 1, device)
    with torch.inference_mode():  # exactness of the fast paths, fp32: each against the baseline's logits
        ref = fns[BASELINE.name]().float()
        diff = {v.name: float((fns[v.name]().float() - ref).abs().max()) for v in variants}
    rows = []
    for v in variants:
        ts = times[v.name]
        fwd = _forward_flops(models[v.pyramid], v, 1, suite.infer_candidates, suite.seq_len)
        rows.append({
            "name": v.name, "label": v.label, "paper": v.paper, "extra": v.extra, "switches": _switches(v),
            "p50_s": statistics.median(ts), "p99_s": percentile(ts, 99), "times_s": ts,
            "peak_bytes": peak_memory(fns[v.name], device), "flops": fwd,
            "max_abs_diff_vs_baseline": diff[v.name],
        })
    _deltas(rows, {"p50": "p50_s", "p99": "p99_s", "memory": "peak_bytes", "flops": "flops"},
            {"p99": "p99", "memory": "inference_memory"})
    return {"candidates_per_request": suite.infer_candidates, "samples": suite.latency_reps, "rows": rows}


def _switches(v: Variant) -> dict:
    return {k: getattr(v, k) for k in ("pyramid", "two_stage", "fused", "bf16", "recompute")}


def _deltas(rows: list[dict], ours: dict, paper: dict) -> None:
    """Relative changes against the baseline row of the SAME run, and the paper's beside them."""
    base = rows[0]
    assert base["name"] == BASELINE.name
    for r in rows:
        r["delta"] = {k: _rel(r[key], base[key]) for k, key in ours.items()}
        ref = PAPER_TABLE4.get(r["paper"] or "")
        r["paper_delta"] = None if ref is None else {k: ref[key] for k, key in paper.items()}


def bench_two_stage(suite: SuiteConfig, device: torch.device) -> dict:
    """(c): one request of C candidates, full forward (S side per candidate) vs two-stage (S side once),
    the library's defaults (pyramid, SDPA, fp32); measured speed-up next to the analytic FLOPs ratio."""
    model = build_model(suite, device).eval()
    points = []
    for c in suite.sweep_candidates:
        batch = request_batch(1, c, suite.seq_len, seed=2).to(device)
        with torch.inference_mode():
            fns = {"full": lambda: model(batch), "two_stage": lambda: forward_two_stage(model, batch)}
            samples = interleaved_samples(fns, suite.latency_reps, suite.warmup, device)
            t = {k: statistics.median(v) for k, v in samples.items()}
            diff = float((forward_two_stage(model, batch)[0] - model(batch)[0]).abs().max())
        f_full = model.estimate_flops(c, 1, seq_len=suite.seq_len)["total"]
        f_two = estimate_two_stage_flops(model, c, suite.seq_len)["total"]
        points.append({"candidates": c, "full_s": t["full"], "two_stage_s": t["two_stage"],
                       "speedup": t["full"] / t["two_stage"], "flops_full": f_full, "flops_two_stage": f_two,
                       "flops_ratio": f_full / f_two, "max_abs_diff": diff})
    return {"seq_len": suite.seq_len, "schedule": model.schedule(), "points": points}


def _events(n: int, seed: int, device: torch.device) -> Events:
    b = random_batch(BENCH_SCHEMA, BENCH_VOCAB, 1, n, seed)
    return Events({k: v[0].to(device) for k, v in b.seq.items()}, b.seq_type[0].to(device),
                  torch.arange(n, dtype=torch.float64, device=device))


def bench_append(suite: SuiteConfig, device: torch.device) -> dict:
    """(d): append n new events to a user's cached history of ``append_cached`` events (exact mode), against
    a fresh Stage I of all ``append_cached + n`` events. The window (``max_len``) has room for every append:
    no front truncation. With a pyramid of more than 3 layers some layers' key windows move with every
    append and their outputs are recomputed (``window_moved``): exactness has a price there."""
    cached = suite.append_cached
    model = build_model(suite, device, seq_len=cached + max(suite.append_new)).eval()
    points = []
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # like for like (see the module docstring, (d)); restored below
    try:
        for n in suite.append_new:
            points.append(_append_point(model, cached, n, suite, device))
    finally:
        torch.set_num_threads(threads)
    return {"cached": cached, "schedule": model.layer_queries, "points": points,
            "threads": 1 if device.type == "cpu" else None}


def _append_point(model, cached: int, n: int, suite: SuiteConfig, device: torch.device) -> dict:
    """One row of (d): ``n`` events appended to a cached history of ``cached``, interleaved with a fresh Stage I."""
    ev = _events(cached + n, seed=3, device=device)
    before, after = Window(ev.slice(0, cached), 0), Window(ev, 0)
    base = UserCache()
    base.advance(model, before)
    copies = [copy.deepcopy(base) for _ in range(suite.latency_reps + suite.warmup)]
    infos = []
    with torch.inference_mode():
        fns = {"fresh": lambda: fresh_stage_one(model, after),
               "append": lambda: infos.append(copies.pop().advance(model, after))}  # a cached state per call
        t = {k: statistics.median(v) for k, v in interleaved_samples(fns, suite.latency_reps, suite.warmup,
                                                                     device).items()}
    info = infos[-1]
    fresh_positions = sum(model.schedule(cached + n))  # S query positions a fresh Stage I computes
    return {"new": n, "fresh_s": t["fresh"], "append_s": t["append"], "ratio": t["append"] / t["fresh"],
            "computed": info["computed"], "reused": info["reused"], "window_moved": info["window_moved"],
            "computed_share": sum(info["computed"]) / fresh_positions}


# ----------------------------------------------------------------------------------------------
# 5. the whole suite and its report


def hardware(device: torch.device) -> str:
    """One line naming what the figures were measured on."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"CPU: {cpu}, {n} thread{'s' if n != 1 else ''} of {os.cpu_count()} cores (torch {torch.__version__})"


SECTIONS = {"train": bench_train, "inference": bench_inference, "two_stage": bench_two_stage, "append": bench_append}


def run_suite(suite: SuiteConfig | str = "quick", device: str | torch.device = "cpu", sections=tuple(SECTIONS),
              progress=print) -> dict:
    """Run the suite; returns the JSON-ready result. A section that fails is recorded as
    ``{"error": ...}`` and the others still run (a GPU run should not lose everything to one OOM)."""
    name = suite if isinstance(suite, str) else suite_name(suite)
    suite = SUITES[suite] if isinstance(suite, str) else suite
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} asked for, but CUDA is not available (torch {torch.__version__})")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(suite.threads)
    progress = progress or (lambda *a, **k: None)
    t_start = time.perf_counter()
    cfg = get_preset(suite.preset, max_len=suite.seq_len, ns_tokens=suite.ns_tokens)
    out = {
        "schema": SCHEMA_VERSION,
        "suite_name": name,
        "suite": dataclasses.asdict(suite),
        "hardware": {
            "device": device.type, "description": hardware(device),
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),  # "highest": true fp32, no TF32
            "load_average_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "model": {"preset": suite.preset, **{k: getattr(cfg, k) for k in ("d_model", "n_heads", "n_layers", "ffn_mult",
                                                                            "max_len", "ns_tokens")}},
        "memory_method": ("CUDA max_memory_allocated - memory_allocated before the call" if device.type == "cuda" else
                          "PyTorch profiler memory events (CPU allocator): peak of the running sum of allocations and "
                          "frees during the call, i.e. tensor bytes above what was allocated before it"),
        "paper": {"baseline": PAPER_BASELINE, "table4": PAPER_TABLE4},
    }
    try:
        for sec in sections:
            progress(f"[bench] {sec} ...", flush=True)
            t0 = time.perf_counter()
            try:
                out[sec] = SECTIONS[sec](suite, device)
            except Exception as e:  # noqa: BLE001 (recorded, reported, and the run goes on)
                out[sec] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            out[sec]["seconds"] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    out["hardware"]["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    out["elapsed_s"] = time.perf_counter() - t_start
    return out


def _load(x):
    return "n/a" if x is None else f"{x:.2f}"


def _ms(s):
    return "n/a" if s is None else f"{1e3 * s:.1f}" if s >= 0.01 else f"{1e3 * s:.2f}"


def _mb(b):
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def _pct(x):
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def _paper(r, key):
    return "" if r.get("paper_delta") is None else _pct(r["paper_delta"][key])


def to_markdown(res: dict) -> str:
    """The report: one table per section, the paper's percentages beside ours."""
    hw, s, m = res["hardware"], res["suite"], res["model"]
    lines = [
        f"# onetrans-mini systems benchmark (suite `{res['suite_name']}`)",
        "",
        f"- hardware: {hw['description']}; OMP_WAIT_POLICY={hw['omp_wait_policy']}; load average "
        f"{_load(hw['load_average_start'])} at start, {_load(hw['load_average_end'])} at end; {hw['date']}",
        f"- model: preset `{m['preset']}` (d={m['d_model']}, {m['n_layers']} layers, {m['n_heads']} heads, FFN "
        f"{m['ffn_mult']}d), L_S={s['seq_len']} events (full histories), L_NS={s['ns_tokens']}",
        f"- each figure: median of {s['reps']} interleaved repetitions after {s['warmup']} warm-up rounds "
        f"(latencies (b), (c), (d): p50 / p99 or median of {s['latency_reps']}); every ratio is between figures of this "
        "run",
        f"- memory: {res['memory_method']}",
        f"- whole run: {res['elapsed_s']:.0f} s",
        "",
    ]
    tr = res.get("train")
    if tr is not None:
        lines += ["## (a) Training step (forward + backward), each optimization alone", ""]
        if "error" in tr:
            lines += [f"failed: {tr['error']}", ""]
        else:
            b = tr["batch"]
            unit, scale = ("T", 1e12) if hw["device"] == "cuda" else ("G", 1e9)
            lines += [f"Batch: {b['requests']} requests x {b['candidates_per_request']} candidates = {b['candidates']}"
                      + (f", as {b['micro_batches']} micro-batches" if b["micro_batches"] > 1 else "")
                      + f". S queries per layer: no pyramid {tr['schedule']['no_pyramid']}, pyramid "
                      f"{tr['schedule']['pyramid']}. Peak for MFU: {tr['peak_flops_source']}.", "",
                      "| optimization | step ms | Δ time | paper | peak MB | Δ memory | paper | Δ FLOPs (analytic) "
                      f"| {unit}FLOP/s | MFU |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in tr["rows"]:
                d = r["delta"]
                mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
                lines.append(f"| {r['label']} | {_ms(r['time_s'])} | {_pct(d['time'])} | {_paper(r, 'time')} | "
                             f"{_mb(r['peak_bytes'])} | {_pct(d['memory'])} | {_paper(r, 'memory')} | "
                             f"{_pct(d['flops'])} | "
                             f"{r['achieved_flops_per_s'] / scale:.1f} | {mfu} |")
            lines += ["", f"Paper's unoptimized OneTrans_S: {PAPER_BASELINE['train_ms']:g} ms per step, "
                      f"{PAPER_BASELINE['train_memory_gb']:g} GB (batch 2048, H100). Δ FLOPs counts the recomputed "
                      "forward; MFU counts model FLOPs only.", ""]
    inf = res.get("inference")
    if inf is not None:
        lines += ["## (b) Inference: one request, its candidates scored together", ""]
        if "error" in inf:
            lines += [f"failed: {inf['error']}", ""]
        else:
            lines += [f"{inf['candidates_per_request']} candidates per request; {inf['samples']} interleaved calls per "
                      "variant.", "",
                      "| optimization | p50 ms | p99 ms | Δ p99 | paper | Δ p50 | peak MB | Δ memory | paper "
                      "| Δ FLOPs | max abs diff |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in inf["rows"]:
                d = r["delta"]
                lines.append(f"| {r['label']} | {_ms(r['p50_s'])} | {_ms(r['p99_s'])} | {_pct(d['p99'])} | "
                             f"{_paper(r, 'p99')} | {_pct(d['p50'])} | {_mb(r['peak_bytes'])} | {_pct(d['memory'])} | "
                             f"{_paper(r, 'memory')} | {_pct(d['flops'])} | {r['max_abs_diff_vs_baseline']:.1e} |")
            lines += ["", f"Paper's unoptimized OneTrans_S: p99 {PAPER_BASELINE['p99_ms']:g} ms, "
                      f"{PAPER_BASELINE['inference_memory_gb']:g} GB. Max abs diff: logits against the unoptimized "
                      "model's: the KV cache and SDPA are exact (fp32 rounding), bf16 rows differ by bf16 rounding, "
                      "and the pyramid is a different function (fewer queries), not an approximation of it.", ""]
    ts = res.get("two_stage")
    if ts is not None:
        lines += ["## (c) Two-stage speed-up against the number of candidates C", ""]
        if "error" in ts:
            lines += [f"failed: {ts['error']}", ""]
        else:
            lines += [f"One request, L_S={ts['seq_len']}, pyramid {ts['schedule']}, SDPA, fp32: full forward (the S "
                      "side per candidate) against Stage I once + Stage II.", "",
                      "| C | full ms | two-stage ms | speed-up | analytic (FLOPs ratio) | max abs diff |",
                      "|---:|---:|---:|---:|---:|---:|"]
            for p in ts["points"]:
                lines.append(f"| {p['candidates']} | {_ms(p['full_s'])} | {_ms(p['two_stage_s'])} | "
                             f"{p['speedup']:.1f}x | "
                             f"{p['flops_ratio']:.1f}x | {p['max_abs_diff']:.1e} |")
            lines.append("")
    ap = res.get("append")
    if ap is not None:
        lines += ["## (d) Cross-request cache: appending n new events to a cached history", ""]
        if "error" in ap:
            lines += [f"failed: {ap['error']}", ""]
        else:
            lines += [f"Cached history {ap['cached']} events; S queries per layer {ap['schedule']} (window max_len "
                      f"{ap['schedule'][0]}); exact mode, no front truncation. A pyramid layer above the second whose "
                      "key window moved recomputes its S outputs from cached inputs (the top layer has none)."
                      + (" Both on one CPU thread, like for like: an append of a few events always runs on one, and"
                         " cost per core sets a server's throughput."
                         if ap.get("threads") == 1 else ""), "",
                      "| new events | fresh Stage I ms | append ms | append / fresh | S query positions computed "
                      "(share of fresh) | layers recomputed (key window moved) |",
                      "|---:|---:|---:|---:|---:|---|"]
            for p in ap["points"]:
                moved = [i for i, (mv, q) in enumerate(zip(p["window_moved"], ap["schedule"])) if mv and q]
                lines.append(f"| {p['new']} | {_ms(p['fresh_s'])} | {_ms(p['append_s'])} | {100 * p['ratio']:.1f}% | "
                             f"{sum(p['computed'])} ({100 * p['computed_share']:.1f}%) | {moved or 'none'} |")
            lines.append("")
    return "\n".join(lines)


def write_results(res: dict, out_dir, name: str | None = None) -> tuple[Path, Path]:
    """``out_dir/NAME.json`` and ``NAME.md`` (NAME: the suite's name)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name or res["suite_name"]
    pj, pm = out / f"{name}.json", out / f"{name}.md"
    pj.write_text(json.dumps(res, indent=1) + "\n")
    pm.write_text(to_markdown(res) + "\n")
    return pj, pm


# ----------------------------------------------------------------------------------------------
# 6. the CLI: ``onetrans-mini bench``


def add_bench_arguments(p) -> None:
    p.add_argument("--quick", action="store_true",
                   help="the quick suite (CPU, under two minutes); same as --suite quick")
    p.add_argument("--suite", choices=sorted(SUITES), default=None,
                   help="named sizes (default: cpu on --device cpu, gpu on --device cuda)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--preset", default=None, help="model preset (overrides the suite's)")
    for flag, typ, hlp in (("--seq-len", int, "L_S events"), ("--ns-tokens", int, "L_NS"),
                           ("--requests", int, "training requests per step"),
                           ("--candidates", int, "training candidates per request"),
                           ("--micro-requests", int, "requests per micro-batch (0: one pass)"),
                           ("--infer-candidates", int, "candidates of one inference request"),
                           ("--reps", int, "timed repetitions"), ("--latency-reps", int, "latency samples"),
                           ("--warmup", int, "warm-up rounds"), ("--threads", int, "CPU threads"),
                           ("--peak-tflops", float, "peak dense bf16 TFLOP/s for MFU")):
        p.add_argument(flag, type=typ, default=None, help=f"{hlp} (overrides the suite's)")
    p.add_argument("--sweep-candidates", default=None, help="(c): comma-separated candidate counts, e.g. 1,10,100")
    p.add_argument("--append-cached", type=int, default=None, help="(d): cached history length")
    p.add_argument("--append-new", default=None, help="(d): comma-separated numbers of new events, e.g. 1,8,64")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--out", default=None, help="write NAME.json and NAME.md into this folder")
    p.add_argument("--name", default=None, help="file name stem (default: the suite's name)")
    p.add_argument("--spin", action="store_true", help="keep OpenMP's default (spinning) wait policy on CPU")


def suite_from_args(args) -> tuple[str, SuiteConfig]:
    name = "quick" if args.quick else args.suite or ("gpu" if args.device.startswith("cuda") else "cpu")
    suite = SUITES[name]
    keys = ("preset", "seq_len", "ns_tokens", "requests", "candidates", "micro_requests", "infer_candidates", "reps",
            "latency_reps", "warmup", "threads", "peak_tflops")
    over = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    for k in ("sweep_candidates", "append_new"):
        if getattr(args, k):
            over[k] = tuple(int(x) for x in getattr(args, k).split(","))
    if args.append_cached is not None:
        over["append_cached"] = args.append_cached
    return name, suite.replace(**over) if over else suite


def cli_bench(args) -> int:
    if not (args.device in ("cpu", "cuda") or (args.device.startswith("cuda:") and args.device[5:].isdigit())):
        print(f"error: --device must be cpu, cuda or cuda:N, got {args.device!r}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device} asked for, but CUDA is not available here (torch {torch.__version__}); "
              "use --device cpu", file=sys.stderr)
        return 2
    if (args.device == "cpu" and not args.spin and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"
            and sys.argv[1:2] == ["bench"]):
        # OpenMP reads the variable once, when it starts: start again with it set (as bench_cache does)
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        os.execve(sys.executable, [sys.executable, "-m", "onetrans_mini", *sys.argv[1:]], env)
    name, suite = suite_from_args(args)
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        print(f"error: unknown section(s) {bad}; choose from {list(SECTIONS)}", file=sys.stderr)
        return 2
    res = run_suite(suite, args.device, sections, progress=lambda *a, **k: print(*a, file=sys.stderr, **k))
    res["suite_name"] = name
    print(to_markdown(res))
    if args.out:
        pj, pm = write_results(res, args.out, args.name)
        print(f"\nwrote {pj} and {pm}", file=sys.stderr)
    failed = [s for s in sections if "error" in res.get(s, {})]
    if failed:
        print(f"error: section(s) failed: {failed}", file=sys.stderr)
        return 1
    return 0
