"""Issue 12's figures, before and after the refactor, from ONE run: ``python benchmarks/issue12_before_after.py``.

- append 8 events to a user's cached history, as a share of a fresh Stage I of the whole window, at preset
  ``small`` over 256 events and at preset ``S`` over 1,024 events (the 6-layer pyramid, and ``S`` with 3
  layers: in a deep pyramid every layer >= 2 has a key window that moves with each append, so exactness
  forces recomputing its tail; with 3 layers the only moving window is the top layer's, which has no S
  queries);
- two-stage scoring of 64 candidates over 256 events against the per-candidate forward (``small``).

"Before" is the tree before the refactor (``--before``, old API: ``cache.py``), "after" this one. The two
sides run INTERLEAVED in alternating subprocesses (order flipped every round), each with its tree first on
PYTHONPATH, one thread and ``OMP_WAIT_POLICY=PASSIVE``; inside a process the measured pair (fresh vs append,
full vs two-stage) is interleaved too. Reported: medians over rounds of each process's medians. Writes
``issue12_before_after.{json,md}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
POINTS = [  # name, preset, n_layers (None: the preset's), cached events
    ("small, 256 events", "small", None, 256),
    ("S (6 layers), 1,024 events", "S", None, 1024),
    ("S with 3 layers, 1,024 events", "S", 3, 1024),
]


# ----------------------------------------------------------------------------------------------
# the child: one side, one process


def child(side: str, reps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    import onetrans_mini
    from onetrans_mini.bench import BENCH_SCHEMA, BENCH_VOCAB, request_batch  # identical schema on both sides
    from onetrans_mini.config import get_preset
    from onetrans_mini.model import OneTrans

    if side == "before":  # the old API: cache.py, check_inputs switched off as its own benchmark did
        from onetrans_mini.cache import (Events, UserCache, Window, forward_per_candidate, forward_two_stage,
                                         fresh_stage_one)

        def build(cfg):
            m = OneTrans(cfg, BENCH_SCHEMA, BENCH_VOCAB).eval()
            m.check_inputs = False
            return m

        full, two_stage = forward_per_candidate, lambda m, b: forward_two_stage(m, b)[0]
        computed = lambda info, end: sum(info["computed"])  # noqa: E731
    else:
        from onetrans_mini.serving import Events, Window
        from onetrans_mini.user_cache import UserCache, fresh_stage_one

        def build(cfg):
            return OneTrans(cfg, BENCH_SCHEMA, BENCH_VOCAB).eval()

        full, two_stage = (lambda m, b: m.forward_full(b)[0]), (lambda m, b: m(b)[0])
        computed = lambda plan, end: sum(p.computed(end) for p in plan)  # noqa: E731

    def timed(fns: dict, reps: int, warmup: int = 2) -> dict:
        for _ in range(warmup):
            for f in fns.values():
                f()
        t = {k: [] for k in fns}
        for _ in range(reps):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                t[k].append(time.perf_counter() - t0)
        return {k: statistics.median(v) for k, v in t.items()}

    out = {"side": side, "module": onetrans_mini.__file__, "points": {}}
    new = 8
    for name, preset, n_layers, cached in POINTS:
        torch.manual_seed(0)
        cfg = get_preset(preset, max_len=cached + 64, **({"n_layers": n_layers} if n_layers else {}))
        model = build(cfg)
        b = request_batch(1, 1, cached + new, seed=3)
        ev = Events({k: v[0] for k, v in b.seq.items()}, b.seq_type[0], torch.arange(cached + new, dtype=torch.float64))
        after = Window(ev, 0)
        n_reps = reps if preset == "small" else max(3, reps // 2)
        with torch.inference_mode():
            base = UserCache()
            base.advance(model, Window(ev.slice(0, cached), 0))
            states, infos = [copy.deepcopy(base) for _ in range(n_reps + 2)], []
            t = timed({"fresh": lambda: fresh_stage_one(model, after),
                       "append": lambda: infos.append(states.pop().advance(model, after))}, n_reps)
        fresh_positions = sum(model.schedule(cached + new))
        out["points"][name] = {**t, "ratio": t["append"] / t["fresh"], "layer_queries": model.layer_queries,
                               "computed_share": computed(infos[-1], cached + new) / fresh_positions}
    torch.manual_seed(0)
    model = build(get_preset("small", max_len=256))
    batch = request_batch(1, 64, 256, seed=2)
    with torch.inference_mode():
        t = timed({"full": lambda: full(model, batch), "two_stage": lambda: two_stage(model, batch)}, reps)
        diff = float((full(model, batch) - two_stage(model, batch)).abs().max())
    out["two_stage"] = {**t, "speedup": t["full"] / t["two_stage"], "max_abs_diff": diff}
    return out


# ----------------------------------------------------------------------------------------------
# the parent: alternate the sides, summarize


def run_side(side: str, tree: Path, reps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(HERE), "--child", side, "--reps", str(reps)], env=env, cwd="/",
                       capture_output=True, text=True, check=True)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert Path(res["module"]).resolve().is_relative_to(tree.resolve()), (side, res["module"], tree)
    return res


def git_state(tree: Path) -> str:
    head = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    head = head.stdout.strip()
    return (head if len(head) < 70 else head[:67] + "...") + (" (+ uncommitted changes)" if dirty.stdout.strip() else "")


def summarize(runs: dict) -> dict:
    med = lambda xs: statistics.median(xs)  # noqa: E731
    out = {}
    for side, rs in runs.items():
        pts = {name: {k: med([r["points"][name][k] for r in rs]) for k in ("fresh", "append", "ratio", "computed_share")}
               for name, *_ in POINTS}
        ts = {k: med([r["two_stage"][k] for r in rs]) for k in ("full", "two_stage", "speedup", "max_abs_diff")}
        out[side] = {"append": pts, "two_stage": ts, "ratios_per_round": [
            {**{n: r["points"][n]["ratio"] for n, *_ in POINTS}, "speedup": r["two_stage"]["speedup"]} for r in rs]}
    return out


def to_markdown(res: dict) -> str:
    b, a = res["summary"]["before"], res["summary"]["after"]
    lines = ["# Issue 12: append cost and two-stage speed-up, before and after the refactor", "",
             f"- {res['rounds']} rounds, each one process per side (order alternating), one thread, OMP_WAIT_POLICY=PASSIVE;"
             f" each figure the median over rounds of a process's median of interleaved calls ({res['reps']} reps "
             "at `small`, half at `S`)",
             f"- before: `{res['before_tree']}` ({res['before_git']}); after: `{res['after_tree']}` ({res['after_git']})",
             f"- load average {res['load_start']:.2f} at start, {res['load_end']:.2f} at end; {res['date']}; "
             f"{res['elapsed_s']:.0f} s", "",
             "| append 8 events, vs a fresh Stage I | before: fresh ms | append ms | share | after: fresh ms | "
             "append ms | share | after / before | positions computed (after) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, *_ in POINTS:
        p, q = b["append"][name], a["append"][name]
        lines.append(f"| {name} | {1e3 * p['fresh']:.2f} | {1e3 * p['append']:.2f} | {100 * p['ratio']:.1f}% | "
                     f"{1e3 * q['fresh']:.2f} | {1e3 * q['append']:.2f} | {100 * q['ratio']:.1f}% | "
                     f"{q['ratio'] / p['ratio']:.2f}x | {100 * q['computed_share']:.1f}% |")
    tb, ta = b["two_stage"], a["two_stage"]
    lines += ["", "| 64 candidates over 256 events (`small`) | full ms | two-stage ms | speed-up | max abs diff |",
              "|---|---:|---:|---:|---:|",
              *(f"| {side} | {1e3 * t['full']:.1f} | {1e3 * t['two_stage']:.2f} | {t['speedup']:.1f}x | "
                f"{t['max_abs_diff']:.1e} |" for side, t in (("before", tb), ("after", ta))), "",
              "Why `S` with 6 layers and with 3 differ: layer l >= 1 reads the last q_(l-1) outputs of the layer below, so",
              "in a deep pyramid every layer >= 2 has a key window that moves with each append, and exactness forces",
              "recomputing its whole tail (the positions-computed column); with 3 layers the only moving window is the top",
              "layer's, which has no S queries, so an append computes only the new rows.", "",
              "Per-round shares and speed-ups (spread):", ""]
    for side in ("before", "after"):
        for k in (*[n for n, *_ in POINTS], "speedup"):
            xs = [r[k] for r in res["summary"][side]["ratios_per_round"]]
            fmt = (lambda x: f"{x:.1f}x") if k == "speedup" else (lambda x: f"{100 * x:.1f}%")
            lines.append(f"- {side}, {k}: " + ", ".join(fmt(x) for x in xs))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=("before", "after"), help=argparse.SUPPRESS)
    ap.add_argument("--before", type=Path, default=Path("/tmp/before"), help="the tree before the refactor")
    ap.add_argument("--after", type=Path, default=HERE.parents[1], help="the tree after it (default: this one)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", type=Path, default=HERE.parent / "results")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.reps)))
        return
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    runs = {"before": [], "after": []}
    for i in range(args.rounds):
        for side in (("before", "after") if i % 2 == 0 else ("after", "before")):
            runs[side].append(run_side(side, getattr(args, side), args.reps))
            r = runs[side][-1]
            print(f"round {i + 1} {side:6}: " + ", ".join(f"{n}: {100 * p['ratio']:.1f}%" for n, p in r["points"].items())
                  + f"; two-stage {r['two_stage']['speedup']:.1f}x (load {os.getloadavg()[0]:.2f})", flush=True)
    res = {"rounds": args.rounds, "reps": args.reps, "before_tree": str(args.before), "after_tree": str(args.after),
           "before_git": git_state(args.before), "after_git": git_state(args.after), "load_start": load0,
           "load_end": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "elapsed_s": time.perf_counter() - t0, "summary": summarize(runs), "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "issue12_before_after.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "issue12_before_after.md").write_text(to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
