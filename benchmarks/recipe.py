"""Issue 14's ladder: what each change of the recipe adds, one at a time, on the same split and seed.

    python benchmarks/recipe.py [--dataset movielens-100k] [--seed 0] [--jobs 2] [--out benchmarks/results]

Rungs (each adds one change to the one above; the last is today's `onetrans-mini train` default):

1. ``before``: the first version's recipe: no statistic features, weight decay 0.01, no weight average;
2. ``+ statistics``: the schema's ``TrainingStat`` / ``HistoryStat`` features (``data/statistics.py``);
3. ``+ weight decay 0.1``;
4. ``+ weight average``: the exponential moving average of the weights (``TrainConfig.ema``): the default.

Every rung trains OneTrans ``small`` with ``train()`` in its own process (``--jobs`` at once, one thread
each) and reports test AUC / UAUC / logloss per task, the best epoch and the per-epoch train loss and
validation AUC (the learning curve). Writes ``recipe-<dataset>.json`` and ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RUNGS = {
    "before": dict(stats=False, weight_decay=0.01, ema=0.0),
    "+ statistics": dict(stats=True, weight_decay=0.01, ema=0.0),
    "+ weight decay 0.1": dict(stats=True, weight_decay=0.1, ema=0.0),
    "+ weight average (default)": dict(stats=True),
}


def worker(dataset: str, rung: str, seed: int) -> dict:
    import torch

    from onetrans_mini.config import TrainConfig, get_preset
    from onetrans_mini.data import load_dataset
    from onetrans_mini.data.movielens import MOVIELENS_SCHEMA, ML100K, fetch, read_ml100k
    from onetrans_mini.data.requests import build_requests
    from onetrans_mini.features import HistoryStat, TrainingStat
    from onetrans_mini.model import OneTrans
    from onetrans_mini.train import evaluate, train

    torch.set_num_threads(1)
    spec = dict(RUNGS[rung])
    stats = spec.pop("stats")
    data = load_dataset(dataset, progress=False)
    if not stats:
        if dataset != "movielens-100k":
            raise SystemExit("the rung without statistics is built for movielens-100k only")
        schema = dataclasses.replace(MOVIELENS_SCHEMA, ns_features=tuple(
            f for f in MOVIELENS_SCHEMA.ns_features if not isinstance(f, (TrainingStat, HistoryStat))))
        inter, users, items = read_ml100k(fetch(ML100K, None, progress=False))
        data = build_requests(inter, schema, data.config, users=users, items=items, name=dataset)
    cfg = TrainConfig(seed=seed, **spec)
    torch.manual_seed(seed)
    model = OneTrans(get_preset("small", max_len=min(128, data.config.max_len)), data.schema, data.vocab_sizes())
    t0 = time.perf_counter()
    hist = train(model, data, cfg, progress=False)
    test = evaluate(model, data, "test")
    task0 = data.schema.task_names[0]
    return {"rung": rung, "seed": seed, "train_config": dataclasses.asdict(cfg), "statistics": stats,
            "seconds": time.perf_counter() - t0, "best_epoch": hist["best_epoch"],
            "curve": [{"epoch": e["epoch"], "train_loss": e["train_loss"], f"val_{task0}_auc": e["val"][task0]["auc"]}
                      for e in hist["epochs"]],
            "test": {t: {k: m[k] for k in ("auc", "uauc", "logloss")} for t, m in test.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="movielens-100k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.dataset, args.worker, args.seed)))
        return 0

    def run(rung):
        cmd = [sys.executable, __file__, "--dataset", args.dataset, "--seed", str(args.seed), "--worker", rung]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"rung {rung!r} failed:\n{proc.stderr[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run, RUNGS))
    res = {"dataset": args.dataset, "seed": args.seed, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"recipe-{args.dataset}.json").write_text(json.dumps(res, indent=1) + "\n")
        (out / f"recipe-{args.dataset}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    tasks = list(res["rows"][0]["test"])
    head = " | ".join(f"{t} AUC | {t} UAUC" for t in tasks)
    lines = [f"# The recipe, one change at a time: OneTrans `small` on {res['dataset']}, seed {res['seed']}", "",
             f"| rung | {head} | best epoch | val AUC per epoch | train loss per epoch |",
             "|---|" + "---:|" * (2 * len(tasks)) + "---:|---|---|"]
    for r in res["rows"]:
        cells = " | ".join(f"{r['test'][t]['auc']:.4f} | {r['test'][t]['uauc']:.4f}" for t in tasks)
        key = [k for k in r["curve"][0] if k.startswith("val_")][0]
        val = " ".join(f"{e[key]:.4f}" for e in r["curve"])
        loss = " ".join(f"{e['train_loss']:.3f}" for e in r["curve"])
        lines.append(f"| {r['rung']} | {cells} | {r['best_epoch']} | {val} | {loss} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
