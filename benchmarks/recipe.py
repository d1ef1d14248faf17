"""Issue 14's ladder: what each change of the recipe adds, one at a time, on the same split and seed;
and (``--sweep``) what one knob changes around today's default.

    python benchmarks/recipe.py [--dataset movielens-100k] [--seed 0] [--jobs 2] [--out benchmarks/results]
    python benchmarks/recipe.py --sweep [--dataset movielens-100k] ...

Rungs (each adds one change to the one above; the last is today's `onetrans-mini train` default):

1. ``before``: the first version's recipe: no statistic features, weight decay 0.01, no weight average;
2. ``+ statistics``: the schema's ``TrainingStat`` / ``HistoryStat`` features (``data/statistics.py``);
3. ``+ weight decay 0.1``;
4. ``+ weight average``: the exponential moving average of the weights (``TrainConfig.ema``);
5. ``+ validation pass``: after early stopping, one pass over the validation requests (``TrainConfig.val_pass``):
   the default.

The sweep (``SWEEP``) changes one thing of rung 4 at a time (it was measured before the validation pass
joined the default): the history length, the width, the depth, the number of epochs, and the request grouping (``DataConfig.session_gap`` / ``max_candidates``:
how a user's ratings become requests; these change the requests, so the test candidates differ a little).

Every rung or point trains OneTrans ``small`` with ``train()`` in its own process (``--jobs`` at once, one thread
each) and reports test AUC / UAUC / logloss per task, the best epoch and the per-epoch train loss and
validation AUC (the learning curve), and how far training moved the id embedding tables (relative
Frobenius change, and the median row change of the most and least frequent quarter of the ids). Writes
``recipe-<dataset>.json`` / ``sweep-<dataset>.json`` and ``.md`` to ``--out``.
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

# each rung or point: train (TrainConfig fields), model (ModelConfig), data (DataConfig); stats=False drops the
# schema's statistic features
NO_PASS = dict(val_pass=False)
RUNGS = {
    "before": dict(stats=False, train=dict(weight_decay=0.01, ema=0.0, **NO_PASS)),
    "+ statistics": dict(train=dict(weight_decay=0.01, ema=0.0, **NO_PASS)),
    "+ weight decay 0.1": dict(train=dict(weight_decay=0.1, ema=0.0, **NO_PASS)),
    "+ weight average": dict(train=NO_PASS),
    "+ validation pass (default)": {},
}

# one knob at a time around rung 4 (the default before the validation pass)
SWEEP = {
    "default": dict(train=NO_PASS),
    "history 32": dict(model=dict(max_len=32), train=NO_PASS),
    "history 64": dict(model=dict(max_len=64), train=NO_PASS),
    "history 256": dict(model=dict(max_len=256), data=dict(max_len=256), train=NO_PASS),
    "width 32": dict(model=dict(d_model=32), train=NO_PASS),
    "width 128": dict(model=dict(d_model=128), train=NO_PASS),
    "depth 2": dict(model=dict(n_layers=2), train=NO_PASS),
    "depth 4": dict(model=dict(n_layers=4), train=NO_PASS),
    "epochs 8": dict(train=dict(epochs=8, patience=8, **NO_PASS)),
    # (one rating per request, max_candidates=1, is the other end, but it takes ~13x the steps of an epoch: hours here)
    "requests: a day, up to 64": dict(data=dict(session_gap=86400.0, max_candidates=64), train=NO_PASS),
}


def embedding_movement(model, before: dict, data, task_rows: str = "train") -> dict:
    """How far training moved each id table: ||E - E0|| / ||E0|| over the ids seen in training, and the
    median per-row relative change of the most and least frequent quarter of those ids."""
    import torch

    out = {}
    for name, e0 in before.items():
        counts = torch.zeros(len(e0))
        for batch in data.loader(task_rows, 256, shuffle=False):
            counts += torch.bincount(batch.ns[name].flatten(), minlength=len(e0))[: len(e0)].float()
        seen = torch.nonzero(counts > 0).flatten()
        e1 = model.tokenizer.embeddings.tables[name].weight.detach()
        rel = ((e1 - e0).norm(dim=1) / e0.norm(dim=1))[seen]
        order = seen[torch.argsort(counts[seen])]
        q = max(1, len(order) // 4)
        row = dict(zip(seen.tolist(), rel.tolist()))
        out[name] = {"relative_change": float((e1 - e0)[seen].norm() / e0[seen].norm()),
                     "rare_quarter_median": float(torch.tensor([row[i] for i in order[:q].tolist()]).median()),
                     "frequent_quarter_median": float(torch.tensor([row[i] for i in order[-q:].tolist()]).median()),
                     "ids_seen": len(seen)}
    return out


def worker(dataset: str, rung: str, seed: int, sweep: bool = False) -> dict:
    import torch

    from onetrans_mini.config import TrainConfig, get_preset
    from onetrans_mini.data import load_dataset
    from onetrans_mini.data.movielens import MOVIELENS_SCHEMA, ML100K, fetch, read_ml100k
    from onetrans_mini.data.requests import build_requests
    from onetrans_mini.model import OneTrans
    from onetrans_mini.train import evaluate, train

    torch.set_num_threads(1)
    point = (SWEEP if sweep else RUNGS)[rung]
    stats = point.get("stats", True)
    data = load_dataset(dataset, progress=False)
    if point.get("data"):
        data = load_dataset(dataset, config=dataclasses.replace(data.config, **point["data"]), progress=False)
    if not stats:
        if dataset != "movielens-100k":
            raise SystemExit("the rung without statistics is built for movielens-100k only")
        inter, users, items = read_ml100k(fetch(ML100K, None, progress=False))
        data = build_requests(inter, MOVIELENS_SCHEMA.without_statistics(), data.config, users=users, items=items,
                              name=dataset)
    cfg = TrainConfig(seed=seed, **point.get("train", {}))
    torch.manual_seed(seed)
    model_spec = {"max_len": min(128, data.config.max_len), **point.get("model", {})}
    model = OneTrans(get_preset("small", **model_spec), data.schema, data.vocab_sizes())
    ids = [f.name for f in data.schema.ns_features if f.name in ("user_id", "item_id")]
    before = {n: model.tokenizer.embeddings.tables[n].weight.detach().clone() for n in ids}
    t0 = time.perf_counter()
    hist = train(model, data, cfg, progress=False)
    test = evaluate(model, data, "test")
    task0 = data.schema.task_names[0]
    return {"rung": rung, "seed": seed, "train_config": dataclasses.asdict(cfg), "statistics": stats,
            "seconds": time.perf_counter() - t0, "best_epoch": hist["best_epoch"],
            "curve": [{"epoch": e["epoch"], "train_loss": e["train_loss"], f"val_{task0}_auc": e["val"][task0]["auc"]}
                      for e in hist["epochs"]],
            "test": {t: {k: m[k] for k in ("auc", "uauc", "logloss")} for t, m in test.items()},
            "model": model_spec, "data": point.get("data", {}), "params": model.num_params(),
            "test_candidates": len(data.candidate_rows("test")),
            "embedding_movement": embedding_movement(model, before, data)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="movielens-100k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--sweep", action="store_true", help="one knob at a time around the default (SWEEP) instead of the ladder")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.dataset, args.worker, args.seed, args.sweep)))
        return 0

    def run(rung):
        cmd = [sys.executable, __file__, "--dataset", args.dataset, "--seed", str(args.seed), "--worker", rung,
               *(["--sweep"] if args.sweep else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"rung {rung!r} failed:\n{proc.stderr[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run, SWEEP if args.sweep else RUNGS))
    kind = "sweep" if args.sweep else "recipe"
    res = {"dataset": args.dataset, "seed": args.seed, "date": time.strftime("%Y-%m-%d"), "kind": kind, "rows": rows}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{kind}-{args.dataset}.json").write_text(json.dumps(res, indent=1) + "\n")
        (out / f"{kind}-{args.dataset}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    tasks = list(res["rows"][0]["test"])
    head = " | ".join(f"{t} AUC | {t} UAUC" for t in tasks)
    sweep = res.get("kind") == "sweep"
    title = ("One knob at a time around the default" if sweep else "The recipe, one change at a time")
    move = " | item_id moved (rare / frequent quarter) |" if sweep else " |"
    lines = [f"# {title}: OneTrans `small` on {res['dataset']}, seed {res['seed']}", "",
             f"| {'point' if sweep else 'rung'} | {head} | best epoch | val AUC per epoch | train loss per epoch{move}",
             "|---|" + "---:|" * (2 * len(tasks)) + "---:|---|---|" + ("---|" if sweep else "")]
    for r in res["rows"]:
        cells = " | ".join(f"{r['test'][t]['auc']:.4f} | {r['test'][t]['uauc']:.4f}" for t in tasks)
        key = [k for k in r["curve"][0] if k.startswith("val_")][0]
        val = " ".join(f"{e[key]:.4f}" for e in r["curve"])
        loss = " ".join(f"{e['train_loss']:.3f}" for e in r["curve"])
        row = f"| {r['rung']} | {cells} | {r['best_epoch']} | {val} | {loss} |"
        if sweep:
            m = r["embedding_movement"]["item_id"]
            row += f" {m['relative_change']:.2f} ({m['rare_quarter_median']:.2f} / {m['frequent_quarter_median']:.2f}) |"
        lines.append(row)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
