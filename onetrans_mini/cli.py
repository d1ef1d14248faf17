"""``onetrans-mini`` (also ``python -m onetrans_mini``): one sub-command per job.

    onetrans-mini data NAME        prepare a dataset and print its summary and floors
    onetrans-mini train [...]      train a model (default: OneTrans small on ML-100K), print test results
    onetrans-mini evaluate RUN     re-score a saved run on its test split
    onetrans-mini replay [...]     replay a test period as a request stream: no cache / request cache / user cache
    onetrans-mini bench [...]      systems benchmark: the paper's Table 4 on our model (--quick: CPU, < 2 min)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .data import DATASETS, DataError


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


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
              + "  ".join(f"{_pct(x['positive_rate'][t]):>10}" for t in tasks))
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onetrans-mini", description="OneTrans, small enough to read, complete enough to run.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="prepare a dataset and print its summary")
    d.add_argument("name", help=f"one of {', '.join(DATASETS)}, or a path to your interactions (CSV file or folder)")
    d.add_argument("--seed", type=int, default=0, help="seed of the synthetic world")
    d.add_argument("--json", action="store_true", help="print the summary as JSON")
    d.set_defaults(func=cmd_data)

    from .train import add_evaluate_arguments, add_train_arguments, cli_evaluate, cli_train

    t = sub.add_parser("train", help="train a model and print its test metrics next to the floors "
                       "(torchrun --nproc_per_node=N -m onetrans_mini train ... for data parallel)")
    add_train_arguments(t)
    t.set_defaults(func=cli_train)
    e = sub.add_parser("evaluate", help="re-score a saved run on its test split")
    add_evaluate_arguments(e)
    e.set_defaults(func=cli_evaluate)
    from .serving import add_replay_arguments, cli_replay

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
    args = build_parser().parse_args(argv)
    from .train import TrainError

    try:
        return args.func(args)
    except (DataError, TrainError) as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
