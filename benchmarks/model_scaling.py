"""The paper's central claim at our scale: quality against model size, where data is not the limit.

    python benchmarks/model_scaling.py [--dataset synthetic-1m] [--candidates 400000] [--out benchmarks/results]
    python benchmarks/model_scaling.py --no-statistics ...   # the same world without the statistic features

Four (or more) OneTrans sizes, from ``nano``-like to ``small``-like (``SIZES`` below), each trained on the
same stream of training requests for the same number of candidates (less than one epoch of
``synthetic-1m``'s 717K training candidates, so no model sees a candidate twice: the data is not the
limit), with the library's default recipe (``TrainConfig``: AdamW, warm-up then cosine) less its validation pass. Each is scored on
the test split; the synthetic world's oracle (its true click probabilities) is the ceiling and the
user+item floor the baseline. Reports dense parameters, forward FLOPs per candidate (request-level, 16
candidates per request), test AUC and logloss per task, and the share of the oracle's lift over the floor.

``--no-statistics`` drops the schema's ``TrainingStat`` / ``HistoryStat`` features (the model must then learn
from ids and histories what the statistics summarise) and names its files ``model_scaling-no-statistics.*``.

Writes ``model_scaling.json``, ``model_scaling.md`` and ``model_scaling.png`` (AUC against dense
parameters and against FLOPs, the oracle as a line) to ``--out``. One thread by default (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

# name -> ModelConfig overrides on preset "small" (history length: what the data keeps)
SIZES = {
    "d16-L2": dict(d_model=16, n_heads=2, n_layers=2, ffn_mult=2, ns_tokens=4, emb_dim=8, head_hidden=16),
    "d32-L2": dict(d_model=32, n_heads=2, n_layers=2, ffn_mult=4, ns_tokens=8, emb_dim=8, head_hidden=32),
    "d64-L3": dict(d_model=64, n_heads=4, n_layers=3, ffn_mult=4, ns_tokens=8, emb_dim=16, head_hidden=64),
    "d96-L4": dict(d_model=96, n_heads=4, n_layers=4, ffn_mult=4, ns_tokens=8, emb_dim=16, head_hidden=96),
}


def run_size(name: str, data, candidates: int, seed: int) -> dict:
    import numpy as np
    import torch

    from onetrans_mini.config import TrainConfig, get_preset
    from onetrans_mini.model import OneTrans
    from onetrans_mini.train import evaluate, train

    cfg = get_preset("small", max_len=data.config.max_len, pyramid_granularity=4, **SIZES[name])
    torch.manual_seed(seed)
    model = OneTrans(cfg, data.schema, data.vocab_sizes())
    n_train = len(data.request_ids("train"))
    per_request = len(data.candidate_rows("train")) / n_train
    # no validation pass: every size learns from exactly the same training candidates, once
    tc = TrainConfig(seed=seed, epochs=1, patience=0, device="cpu", val_pass=False)
    steps = max(1, round(candidates / (tc.batch_requests * per_request)))
    if steps * tc.batch_requests > n_train:
        raise SystemExit(f"--candidates {candidates} is more than one epoch of {data.info['name']}: data would repeat")
    t0 = time.perf_counter()
    hist = train(model, data, tc.replace(steps_per_epoch=steps), progress=False)
    seconds = time.perf_counter() - t0
    test = evaluate(model, data, "test")
    flops = model.estimate_flops(n_candidates=16, n_requests=1, seq_len=data.config.max_len, two_stage=True)["total"] / 16
    return {"size": name, "config": SIZES[name], "dense_params": model.num_params()["dense"],
            "embedding_params": model.num_params()["embedding"], "flops_per_candidate": int(flops),
            "steps": steps, "train_candidates": int(hist["epochs"][0]["train_samples"]), "train_seconds": seconds,
            "test": {t: {k: m[k] for k in ("auc", "uauc", "logloss")} for t, m in test.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="synthetic-1m")
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from {', '.join(SIZES)}")
    p.add_argument("--candidates", type=int, default=400_000, help="training candidates per size (< one epoch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-statistics", action="store_true", help="drop the statistic features from the schema")
    p.add_argument("--out", default=None, help="write model_scaling.json, .md and .png there")
    args = p.parse_args(argv)

    import torch

    from onetrans_mini.data import load_dataset
    from onetrans_mini.floors import floors

    torch.set_num_threads(args.threads)  # this script's own setting (the library never sets threads)
    data = load_dataset(args.dataset)
    if args.no_statistics:
        data = without_statistics(data, args.dataset)
    fl = floors(data)
    rows = []
    for name in args.sizes.split(","):
        r = run_size(name, data, args.candidates, args.seed)
        rows.append(r)
        print(json.dumps(r), flush=True)
    tasks = list(data.schema.task_names)
    ref = {t: {"oracle": fl[t]["oracle"]["auc"], "floor": fl[t]["user_item_mean"]["auc"],
               "oracle_logloss": fl[t]["oracle"]["logloss"]} for t in tasks}
    for r in rows:
        for t in tasks:
            lift = ref[t]["oracle"] - ref[t]["floor"]
            r["test"][t]["oracle_lift_share"] = (r["test"][t]["auc"] - ref[t]["floor"]) / lift
    result = {"dataset": args.dataset, "statistics": not args.no_statistics, "interactions": data.info["n_interactions"], "candidates": args.candidates,
              "seed": args.seed, "threads": args.threads, "machine": platform.processor() or platform.machine(),
              "reference": ref, "rows": rows, "date": time.strftime("%Y-%m-%d")}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "model_scaling-no-statistics" if args.no_statistics else "model_scaling"
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / f"{stem}.md").write_text(markdown(result))
        figure(result, out / f"{stem}.png")
    print(markdown(result))
    return 0


def without_statistics(data, dataset: str):
    """The same synthetic world, prepared with a schema that has no statistic features."""
    from onetrans_mini.data.requests import build_requests
    from onetrans_mini.data.synthetic import generate

    if not dataset.startswith("synthetic-"):
        raise SystemExit("--no-statistics is built for the synthetic worlds")
    inter, users, items = generate(dataset.split("-", 1)[1], 0)  # the world load_dataset built (seed 0)
    return build_requests(inter, data.schema.without_statistics(), data.config, users=users, items=items,
                          name=f"{dataset} (no statistics)")


def markdown(res: dict) -> str:
    t = list(res["reference"])[0]
    ref = res["reference"][t]
    stats = "" if res.get("statistics", True) else ", without the statistic features"
    lines = [f"# Model scaling on {res['dataset']} ({res['interactions']:,} interactions){stats}", "",
             f"Each size trained once on the same {res['candidates']:,} training candidates (less than one epoch), "
             f"seed {res['seed']}, {res['threads']} thread(s), default recipe without the validation pass; test split. `{t}` oracle AUC "
             f"{ref['oracle']:.4f}, user+item floor {ref['floor']:.4f}.", "",
             f"| size | dense params | FLOPs / candidate | {t} AUC | {t} logloss | share of the oracle's lift | train s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        m = r["test"][t]
        lines.append(f"| {r['size']} | {r['dense_params']:,} | {r['flops_per_candidate'] / 1e6:.2f} M | {m['auc']:.4f} | "
                     f"{m['logloss']:.4f} | {100 * m['oracle_lift_share']:.0f}% | {r['train_seconds']:.0f} |")
    lines.append(f"| oracle | | | {ref['oracle']:.4f} | {ref['oracle_logloss']:.4f} | 100% | |")
    return "\n".join(lines) + "\n"


def figure(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = list(res["reference"])[0]
    ref = res["reference"][t]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, key, label in ((axes[0], "dense_params", "dense parameters"),
                           (axes[1], "flops_per_candidate", "forward FLOPs per candidate")):
        x = [r[key] for r in res["rows"]]
        y = [r["test"][t]["auc"] for r in res["rows"]]
        ax.plot(x, y, "o-", label="OneTrans")
        for r, xi, yi in zip(res["rows"], x, y):
            ax.annotate(r["size"], (xi, yi), textcoords="offset points", xytext=(4, -12), fontsize=8)
        ax.axhline(ref["oracle"], color="k", ls="--", lw=1, label="oracle (true probabilities)")
        ax.axhline(ref["floor"], color="gray", ls=":", lw=1, label="user+item floor")
        ax.set_xscale("log")
        ax.set_xlabel(label)
    axes[0].set_ylabel(f"test {t} AUC")
    axes[0].legend(fontsize=8, loc="lower right")
    stats = "" if res.get("statistics", True) else " (no statistic features)"
    fig.suptitle(f"{res['dataset']}{stats}: quality against size, same {res['candidates']:,} training candidates")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
