"""What the default `onetrans-mini train` reaches, seeds and baselines side by side, with paired bootstraps.

    python benchmarks/quality.py [--dataset movielens-100k] [--models onetrans,din-dcnv2,rankmixer-transformer]
                                 [--seeds 0,1,2] [--jobs 2] [--threads 1] [--out benchmarks/results]

Each (model, seed) is the user's own command, ``onetrans-mini train --dataset D --model M --seed S`` with
every other setting at its default, run as a subprocess (``--jobs`` at once, ``--threads`` each) into a
run folder under ``--runs``. Each run is then loaded back and scored on the test split. Reported per
task: AUC, UAUC and logloss per run and their mean, the floors (item mean, user+item mean), a logistic
regression on the same NS features (``floors.logistic_regression``), the synthetic oracle where there is
one, and the paired user bootstrap (``metrics.paired_user_bootstrap``, users resampled with their rows) of
each OneTrans run against the user+item floor, the logistic regression and each baseline run of the same
seed. A run folder that already holds a trained model is scored again, not retrained. Writes ``quality-<dataset>.json`` and ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def train_run(dataset: str, model: str, seed: int, threads: int, runs: Path) -> dict:
    out = runs / f"{dataset}-{model}-seed{seed}"
    if (out / "results.json").is_file() and (out / "model.safetensors").is_file():  # trained already: score it again
        return {"model": model, "seed": seed, "run": str(out), "wall_seconds": None, "reused": True,
                "command": f"onetrans-mini train --dataset {dataset} --model {model} --seed {seed} --threads {threads}"}
    cmd = [sys.executable, "-m", "onetrans_mini", "train", "--dataset", dataset, "--model", model, "--seed", str(seed),
           "--threads", str(threads), "--out", str(out), "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return {"model": model, "seed": seed, "run": str(out), "wall_seconds": time.perf_counter() - t0,
            "command": " ".join(["onetrans-mini", *cmd[3:]])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="movielens-100k")
    p.add_argument("--models", default="onetrans,din-dcnv2,rankmixer-transformer")
    p.add_argument("--seeds", default="0,1,2", help="seeds of OneTrans")
    p.add_argument("--baseline-seeds", default="0", help="seeds of the other models")
    p.add_argument("--jobs", type=int, default=2, help="training runs at once")
    p.add_argument("--threads", type=int, default=1, help="threads of each run")
    p.add_argument("--runs", default="runs/quality", help="where the run folders go")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--out", default=None, help="write quality-<dataset>.json and .md there")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from onetrans_mini.checkpoint import load_run
    from onetrans_mini.floors import fit_floors, logistic_regression, predict_floors
    from onetrans_mini.metrics import paired_user_bootstrap, task_metrics
    from onetrans_mini.train import predict

    torch.set_num_threads(args.threads)
    models = args.models.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    base_seeds = [int(s) for s in args.baseline_seeds.split(",")]
    jobs = [(m, s) for s in sorted(set(seeds + base_seeds)) for m in models
            if s in (seeds if m == "onetrans" else base_seeds)]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda ms: train_run(args.dataset, ms[0], ms[1], args.threads, Path(args.runs)), jobs))

    # each run is scored on ITS data: the synthetic world depends on the seed (MovieLens does not)
    worlds: dict = {}  # world key -> (data, labels, users, floors)
    preds, world_of = {}, {}
    for r in runs:
        run = load_run(r["run"])
        data = run.data
        key = (data.info["name"], run.config["data"].get("seed") if data.has_prob else None)
        if key not in worlds:
            worlds[key] = score_world(data, fit_floors, predict_floors, logistic_regression)
        res = json.loads((Path(r["run"]) / "results.json").read_text())
        r["train_seconds"] = res.get("wall_seconds")  # the command's own clock: preparation, training, test
        r["world"] = key[1]
        preds[(r["model"], r["seed"])] = predict(run.model, data, "test")["prob"]
        world_of[(r["model"], r["seed"])] = key
    tasks = list(data.schema.task_names)

    out = {"dataset": args.dataset, "threads": args.threads, "jobs": args.jobs, "date": time.strftime("%Y-%m-%d"),
           "runs": [], "floors": {}, "bootstrap": []}
    for key, (_, labels, users, floor) in worlds.items():
        name = "all seeds" if key[1] is None else f"world of seed {key[1]}"
        out["floors"][name] = {t: {k: task_metrics(labels[t], v, users) for k, v in floor[t].items()} for t in tasks}
    for r in runs:
        _, labels, users, floor = worlds[world_of[(r["model"], r["seed"])]]
        p_ = preds[(r["model"], r["seed"])]
        r["test"] = {t: task_metrics(labels[t], p_[:, i], users) for i, t in enumerate(tasks)}
        if "oracle" in floor[tasks[0]]:  # the share of the oracle's lift over the user+item floor
            for t in tasks:
                o = out["floors"][f"world of seed {r['world']}"][t]
                lift = o["oracle"]["auc"] - o["user_item_mean"]["auc"]
                r["test"][t]["oracle_lift_share"] = (r["test"][t]["auc"] - o["user_item_mean"]["auc"]) / lift
        out["runs"].append(r)
    for s in seeds:
        if ("onetrans", s) not in preds:
            continue
        mine = preds[("onetrans", s)]
        _, labels, users, floor = worlds[world_of[("onetrans", s)]]
        for i, t in enumerate(tasks):
            against = [("user+item floor", floor[t]["user_item_mean"]),
                       ("logistic regression, same features", floor[t]["logistic_regression"])]
            against += [(f"{m} seed {s}", preds[(m, s)][:, i]) for m in models if m != "onetrans" and (m, s) in preds]
            for name, other in against:
                b = paired_user_bootstrap(labels[t], mine[:, i], other, users, n_boot=args.boot, seed=s)
                out["bootstrap"].append({"seed": s, "task": t, "against": name, **b})
    if args.out:
        dest = Path(args.out)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / f"quality-{args.dataset}.json").write_text(json.dumps(out, indent=1, default=float) + "\n")
        (dest / f"quality-{args.dataset}.md").write_text(markdown(out, models, seeds, tasks))
    print(markdown(out, models, seeds, tasks))
    return 0


def score_world(data, fit_floors, predict_floors, logistic_regression):
    """(data, labels, users, floors) of one prepared dataset's test split: the floors fitted on train + validation,
    the logistic regression on the same NS features, and the oracle where the data has one."""
    import numpy as np

    C = data.candidates
    rows = data.candidate_rows("test")
    fit = np.concatenate([data.candidate_rows("train"), data.candidate_rows("val")])
    labels, floor = {}, {}
    for t in data.schema.task_names:
        y = C[f"label:{t}"]
        labels[t] = y[rows]
        floor[t] = predict_floors(fit_floors(C["user"][fit], C["item"][fit], y[fit]), C["user"][rows], C["item"][rows])
        floor[t]["logistic_regression"] = logistic_regression(data, t)["prob"]
        if data.has_prob:
            floor[t]["oracle"] = C[f"prob:{t}"][rows]
    return data, labels, C["user"][rows], floor


def markdown(out: dict, models: list, seeds: list, tasks: list) -> str:
    lines = [f"# `onetrans-mini train` on {out['dataset']}: the defaults, several seeds", "",
             f"Test split. Each run: the default command with `--model M --seed S --threads {out['threads']}` "
             f"({out['jobs']} runs at once on this machine). Floors fitted on train + validation. The synthetic "
             f"world is drawn from the seed, so each synthetic run has its own world, floors and oracle.", ""]
    for t in tasks:
        lines += [f"## {t}", "", "| predictor | AUC | UAUC | logloss (mean) | wall s (mean) |", "|---|---|---|---|---:|"]
        for m in models:
            rs = [r for r in out["runs"] if r["model"] == m]
            if not rs:
                continue
            auc = [r["test"][t]["auc"] for r in rs]
            uauc = [r["test"][t]["uauc"] for r in rs]
            ll = [r["test"][t]["logloss"] for r in rs]
            secs = [r["train_seconds"] or r["wall_seconds"] for r in rs]
            lines.append(f"| {m} (seeds {', '.join(str(r['seed']) for r in rs)}) | {' / '.join(f'{a:.4f}' for a in auc)} (mean {sum(auc) / len(auc):.4f}) | "
                         f"{' / '.join(f'{a:.4f}' for a in uauc)} (mean {sum(uauc) / len(uauc):.4f}) | "
                         f"{sum(ll) / len(ll):.4f} | {sum(secs) / len(secs):.0f} |")
        for world, fl in out["floors"].items():
            for name, m in fl[t].items():
                label = name.replace("_", " ") + ("" if world == "all seeds" else f" ({world})")
                lines.append(f"| {label} | {m['auc']:.4f} | {m['uauc']:.4f} | {m['logloss']:.4f} | |")
        shares = [(r["model"], r["seed"], r["test"][t]["oracle_lift_share"]) for r in out["runs"]
                  if "oracle_lift_share" in r["test"][t]]
        if shares:
            lines += ["", "Share of the oracle's AUC lift over the user+item floor, each run in its own world: " +
                      ", ".join(f"{m} seed {s_} {100 * x:.0f}%" for m, s_, x in shares)]
        lines += ["", "Paired user bootstrap, OneTrans minus the other (95% interval):", ""]
        for b in out["bootstrap"]:
            if b["task"] == t:
                lines.append(f"- seed {b['seed']} vs {b['against']}: {b['diff']:+.4f} [{b['lo']:+.4f}, {b['hi']:+.4f}]")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
