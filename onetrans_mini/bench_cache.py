"""What the KV caches buy on CPU (not a test): ``python -m onetrans_mini.bench_cache``.

fp32, 2 threads, medians of several repetitions after warm-up; the variants of one measurement run
INTERLEAVED (A, B, A, B, ...) so that load from other processes hits them alike, and their ratio is
printed side by side with the analytic FLOPs ratio.

1. Request cache, preset ``small`` at L_S=256, L_NS=8: one request of 64 candidates, Stage I once +
   Stage II (``forward_two_stage``) against the full forward of every candidate, with and without
   the pyramid; Stage II's two attention implementations ("split": one softmax over two key blocks,
   "sdpa": one fused call with a block-diagonal mask).
2. The reference shape of the best public implementation: 64 and 256 candidates over 128 events.
3. User cache: append 8 events to a cached 256-event history, against a fresh Stage I of the
   264 events, both on ONE thread, like for like (an append always runs on one, and cost per core sets a
   server's throughput; a second core speeds this Stage I up by about 1.4x on a quiet machine). Two fresh
   Stage Is: the model's (``stage_one``, what the request cache runs) and the user cache's own (a miss:
   ``UserCache.advance`` from nothing, on the append's prepared tensors: about 15% faster, and an append
   timed next to it finds the same code warm, so it is cheaper there too). Exact AND cheap in the
   3-layer ``small`` preset with or without pyramid (the only moving key window is the top layer's, which
   has no S queries); a 6-layer pyramid must recompute the tails of layers 2..4 (their key windows moved),
   shown next to it.

On a shared machine, OpenMP threads that spin at every barrier while a peer thread is descheduled turn
milliseconds into hundreds of them (a 10x spread between repetitions). The script therefore re-runs
itself with ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep) unless ``--spin`` is given; the
setting changes no result, only the time. Use it for the replay on a busy machine too.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

from .bench import interleaved  # the shared timing helper: functions in turn, median seconds of each
from .bench_model import BENCH_SCHEMA, BENCH_VOCAB, random_batch
from .cache import (
    Events,
    UserCache,
    Window,
    estimate_two_stage_flops,
    forward_per_candidate,
    forward_two_stage,
    stage_one,
)
from .config import get_preset
from .model import OneTrans


def one_request(n_cand: int, seq_len: int, seed: int = 0):
    """One request (R=1) with ``n_cand`` candidates and a full history of ``seq_len`` events."""
    b = random_batch(BENCH_SCHEMA, BENCH_VOCAB, n_cand, seq_len, seed)
    return type(b)(seq={k: v[:1] for k, v in b.seq.items()}, seq_type=b.seq_type[:1], seq_mask=b.seq_mask[:1],
                   ns=b.ns, request_index=torch.zeros(n_cand, dtype=torch.long), labels=b.labels, user=b.user,
                   request_id=b.request_id[:1])


def model_for(seq_len: int, preset: str = "small", **kw) -> OneTrans:
    torch.manual_seed(0)
    m = OneTrans(get_preset(preset, max_len=seq_len, **kw), BENCH_SCHEMA, BENCH_VOCAB).eval()
    m.check_inputs = False
    return m


def bench_request(n_cand: int, seq_len: int, pyramid: bool, reps: int, impls=("split",)) -> dict:
    model = model_for(seq_len, pyramid=pyramid)
    batch = one_request(n_cand, seq_len)
    fns = {"full": lambda: forward_per_candidate(model, batch)}
    for impl in impls:
        fns[impl] = lambda impl=impl: forward_two_stage(model, batch, impl=impl)
    with torch.inference_mode():
        t = interleaved(fns, reps)
        diff = float((forward_two_stage(model, batch)[0] - forward_per_candidate(model, batch)).abs().max())
    f_full = model.estimate_flops(n_cand, n_cand, seq_len=seq_len)["total"]
    f_two = estimate_two_stage_flops(model, n_cand, seq_len)["total"]
    return {"t": t, "flops_ratio": f_full / f_two, "diff": diff, "schedule": model.layer_queries}


def random_events(n: int, seed: int = 0) -> Events:
    b = random_batch(BENCH_SCHEMA, BENCH_VOCAB, 1, n, seed)
    return Events({k: v[0] for k, v in b.seq.items()}, b.seq_type[0], torch.arange(n, dtype=torch.float64))


def bench_append(n_layers: int, pyramid: bool, reps: int, cached: int = 256, new: int = 8, preset: str = "small",
                 threads: int = 1) -> dict:
    """Append ``new`` events to a cached history of ``cached`` events, vs a fresh Stage I of both (the window,
    ``max_len = cached + 64``, is not full: no truncation). Both on ``threads`` intra-op threads: one by
    default, like for like, since an append of a few events always runs on one (``cache._few_threads``)."""
    before_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _bench_append(n_layers, pyramid, reps, cached, new, preset)
    finally:
        torch.set_num_threads(before_threads)


def _bench_append(n_layers: int, pyramid: bool, reps: int, cached: int, new: int, preset: str) -> dict:
    model = model_for(cached + 64, preset, pyramid=pyramid, n_layers=n_layers)
    ev = random_events(cached + new)
    before, after = Window(ev.slice(0, cached), 0), Window(ev, 0)
    seq = model.tokenizer.seq
    with torch.inference_mode():
        base = UserCache()
        base.advance(model, before)
        copies = [copy.deepcopy(base) for _ in range(reps + 3)]
        mask = torch.ones(1, cached + new, dtype=torch.bool)
        fields = {f: ev.fields[f][None] for f in seq.fields}

        def fresh():
            x, real = seq(model.tokenizer.embeddings, fields, ev.seq_type[None], mask)
            stage_one(model, x, real)

        infos = []

        def append():
            infos.append(copies.pop().advance(model, after))

        t = interleaved({"fresh": fresh, "append": append}, reps, warmup=1)
        # the user cache's own Stage I (a miss: UserCache.advance from nothing), the same code paths as an append
        copies = [copy.deepcopy(base) for _ in range(reps + 3)]
        t_p = interleaved({"prefill": lambda: UserCache().advance(model, after), "append": append}, reps, warmup=1)
    info = infos[-1]
    return {"t": t, "t_prefill": t_p, "computed": info["computed"], "reused": info["reused"], "moved": info["window_moved"],
            "schedule": model.layer_queries, "flops_frac": sum(info["computed"]) / max(1, sum(info["computed"]) + sum(info["reused"]))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--spin", action="store_true", help="keep OpenMP's default (spinning) wait policy")
    args = ap.parse_args(argv)
    if not args.spin and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        # OpenMP reads the variable once, when it starts: start again with it set
        argv = sys.argv[1:] if argv is None else list(argv)
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        os.execve(sys.executable, [sys.executable, "-m", "onetrans_mini.bench_cache", *argv], env)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'default')}, load average {os.getloadavg()[0]:.2f}; "
          f"medians of {args.reps} interleaved repetitions")

    print("\n1) request cache, preset 'small' (3 layers, d=64), L_S=256, L_NS=8: one request of 64 candidates")
    print(f"  {'':14} {'full fwd ms':>11} {'two-stage ms':>12} {'(sdpa) ms':>10} {'speed-up':>9} {'(sdpa)':>7} "
          f"{'FLOPs ratio':>11} {'max|diff|':>9}")
    for pyr in (True, False):
        r = bench_request(64, 256, pyr, args.reps, impls=("split", "sdpa"))
        t = r["t"]
        print(f"  pyramid={pyr!s:5}  {1e3 * t['full']:11.1f} {1e3 * t['split']:12.2f} {1e3 * t['sdpa']:10.2f} "
              f"{t['full'] / t['split']:8.1f}x {t['full'] / t['sdpa']:6.1f}x {r['flops_ratio']:10.1f}x {r['diff']:9.1e}")

    print("\n2) reference shape: L_S=128, L_NS=8, preset 'small' (public reference: 4.7x / 5.4x at 64, 7x / 8.2x at 256)")
    for n in (64, 256):
        for pyr in (True, False):
            r = bench_request(n, 128, pyr, args.reps)
            t = r["t"]
            print(f"  {n:3d} candidates, pyramid={pyr!s:5}: full {1e3 * t['full']:7.1f} ms, two-stage "
                  f"{1e3 * t['split']:6.2f} ms: {t['full'] / t['split']:5.1f}x (FLOPs {r['flops_ratio']:.1f}x)")

    print("\n3) user cache: append 8 events to a cached history (window max_len = history + 64: no truncation);"
          " both on one thread, like for like")
    for preset, n_layers, pyr, hist in (("small", 3, False, 256), ("small", 3, True, 256), ("small", 6, False, 256),
                                        ("small", 6, True, 256), ("small", 3, True, 1024), ("S", 3, True, 256)):
        r = bench_append(n_layers, pyr, args.reps, cached=hist, preset=preset)
        t, tp = r["t"], r["t_prefill"]
        moved = [i for i, m in enumerate(r["moved"]) if m]
        print(f"  {preset:5} {n_layers} layers, pyramid={pyr!s:5}, {hist:4d} events: fresh Stage I {1e3 * t['fresh']:6.2f} ms, "
              f"append {1e3 * t['append']:5.2f} ms = {100 * t['append'] / t['fresh']:4.1f}%; user-cache prefill "
              f"{1e3 * tp['prefill']:6.2f} ms, append {1e3 * tp['append']:5.2f} ms = {100 * tp['append'] / tp['prefill']:4.1f}%")
        print(f"  {'':37}S queries computed {r['computed']} (reused {sum(r['reused'])}); key windows moved at layers "
              f"{moved or 'none'}")


if __name__ == "__main__":
    main()
