"""How much of the synthetic oracle's lift can ANY learner reach from the training split? A probe.

    python benchmarks/ceiling.py [--size small] [--seeds 0 1 2] [--out benchmarks/results]

The synthetic world's click logit is a sum of five terms (``CLICK_TERMS``: item, age x category, latent
user-item match, recent-sequence match, current intent). This script fits models of exactly that form, each
on the training split (full-batch Adam, the L2 strength picked on validation), and scores the test split:

1. ``the true terms``: the five terms themselves as inputs. The form is right and every variable is
   given, so this must recover the oracle: the function is learnable from this many rows.
2. ``latent match learned``: the true terms, except that the latent match is learned from the ids (a
   vector per user and per item, and a user x category table), as any ranker must.
3. ``intent from the list``: the true terms, except that the hidden intent is read from the candidate list
   (``RequestStat``: the share of the request's candidates in the candidate's category).
4. ``all learned``: the whole form learned from what a ranker sees: item bias, an age x category table,
   the latent match as in 2, the sequence term from the ``category_recent`` statistic, the intent as in 3.
   The best a learner that KNOWS the generator's form reaches on this much data.
5. ``all learned, no list``: 4 without the candidate list (the schema before ``RequestStat``).

Each rung is reported as test AUC and as its share of the oracle's AUC lift over the user+item floor, the
share the issue's goal is stated in. Writes ``ceiling-synthetic-<size>.json`` and ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

RUNGS = {  # name -> (true terms kept as inputs, learned parts)
    "the true terms": (("item", "age_x_category", "latent_match", "sequence", "intent"), ()),
    "latent match learned": (("item", "age_x_category", "sequence", "intent"), ("latent",)),
    "intent from the list": (("item", "age_x_category", "latent_match", "sequence"), ("list",)),
    "all learned": ((), ("item", "age_x_category", "latent", "sequence", "list")),
    "all learned, no list": ((), ("item", "age_x_category", "latent", "sequence")),
}
L2 = (1.0, 3.0, 6.0, 12.0, 25.0)


def world(size: str, seed: int):
    """(prepared data, the (N, 5) true terms aligned with its candidate rows)."""
    import numpy as np

    from onetrans_mini.data.synthetic import CLICK_TERMS, SYNTHETIC_SCHEMA, data_config, generate
    from onetrans_mini.data import build_requests

    inter, users, items = generate(size, seed, with_terms=True)
    data = build_requests(inter, SYNTHETIC_SCHEMA, data_config(size), users=users, items=items, name=f"synthetic-{size}")
    terms = inter[[f"term_{n}" for n in CLICK_TERMS]].to_numpy(np.float32)
    # generate() already lists candidates by user and time, the prepared order: check it, row for row
    if not np.allclose(inter["prob_click"].to_numpy(np.float32), data.candidates["prob:click"]):
        raise SystemExit("the prepared candidates are not in the generator's row order")
    return data, terms


def fit_rung(data, terms, keep: tuple, learn: tuple, l2: float, steps: int, seed: int):
    """A logistic model of the generator's form, fitted on the training split: (val AUC, test logits)."""
    import numpy as np
    import torch

    from onetrans_mini.data.synthetic import CLICK_TERMS
    from onetrans_mini.metrics import auc

    C, sizes = data.candidates, data.vocab_sizes()
    ids = {n: torch.from_numpy(C[n].astype("int64")) for n in
           ("user_id", "item_id", "age_group", "category", "category_recent", "request_category_share")}
    given = torch.as_tensor(terms[:, [CLICK_TERMS.index(n) for n in keep]])  # (N, len(keep))
    y = torch.from_numpy(np.array(C["label:click"]))  # a writable copy (the table may be memory-mapped)
    g = torch.Generator().manual_seed(seed)

    def table(*shape, scale=0.0):
        return torch.nn.Parameter(torch.randn(*shape, generator=g) * scale)

    p = {"w": table(len(keep)), "b": table(1),
         "item": table(sizes["item_id"]), "age_x_category": table(sizes["age_group"], sizes["category"]),
         "user_vec": table(sizes["user_id"], 8, scale=0.3), "item_vec": table(sizes["item_id"], 8, scale=0.3),
         "user_x_category": table(sizes["user_id"], sizes["category"]),
         "sequence": table(sizes["category_recent"]), "list": table(sizes["request_category_share"])}

    def logits(rows):
        z = p["b"] + given[rows] @ p["w"]  # (n,)
        if "item" in learn:
            z = z + p["item"][ids["item_id"][rows]]
        if "age_x_category" in learn:
            z = z + p["age_x_category"][ids["age_group"][rows], ids["category"][rows]]
        if "latent" in learn:  # a vector per user and per item, the generator's u . v
            u, i = ids["user_id"][rows], ids["item_id"][rows]
            z = z + (p["user_vec"][u] * p["item_vec"][i]).sum(-1) + p["user_x_category"][u, ids["category"][rows]]
        if "sequence" in learn:
            z = z + p["sequence"][ids["category_recent"][rows]]
        if "list" in learn:
            z = z + p["list"][ids["request_category_share"][rows]]
        return z

    rows = {s: torch.as_tensor(data.candidate_rows(s)) for s in ("train", "val", "test")}
    opt = torch.optim.Adam(list(p.values()), lr=0.05)
    penalised = [p[k] for k in ("item", "age_x_category", "user_vec", "item_vec", "user_x_category")]
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(rows["train"]), y[rows["train"]])
        loss = loss + l2 * sum((t * t).sum() for t in penalised) / len(rows["train"])
        loss.backward()
        opt.step()
    with torch.no_grad():
        return auc(y[rows["val"]].numpy(), logits(rows["val"]).numpy()), logits(rows["test"]).numpy()


def probe(size: str, seed: int, steps: int = 400) -> dict:
    from onetrans_mini.floors import floors
    from onetrans_mini.metrics import auc

    data, terms = world(size, seed)
    y = data.candidates["label:click"][data.candidate_rows("test")]
    ref = floors(data)["click"]
    floor, oracle = ref["user_item_mean"]["auc"], ref["oracle"]["auc"]
    out = {"world": seed, "floor": floor, "oracle": oracle, "rungs": {}}
    for name, (keep, learn) in RUNGS.items():
        t0 = time.perf_counter()
        fits = [(l2, *fit_rung(data, terms, keep, learn, l2, steps, seed)) for l2 in (L2 if learn else (0.0,))]
        l2, val, z = max(fits, key=lambda f: f[1])  # the strength with the best validation AUC
        test = auc(y, z)
        out["rungs"][name] = {"l2": l2, "val_auc": val, "test_auc": test,
                              "oracle_lift_share": (test - floor) / (oracle - floor),
                              "seconds": time.perf_counter() - t0}
        print(f"world {seed} | {name:22} test AUC {test:.4f} = {100 * out['rungs'][name]['oracle_lift_share']:.0f}% "
              f"of the oracle's lift (val {val:.4f}, L2 {l2:g})", flush=True)
    return out


def markdown(res: dict) -> str:
    seeds = [w["world"] for w in res["worlds"]]
    lines = [f"# How much of the oracle's lift a learner can reach: synthetic-{res['size']}", "",
             f"`python benchmarks/ceiling.py --size {res['size']} --seeds {' '.join(map(str, seeds))}` ({res['date']}, "
             f"{res['machine']}). Logistic models of the generator's own form, fitted on the training split "
             f"({res['steps']} full-batch Adam steps, L2 picked on validation), scored on the test split. "
             "Share = (AUC - user+item floor) / (oracle - floor); the issue's goal is 90%.", "",
             "| rung | " + " | ".join(f"world {s}: test AUC (share)" for s in seeds) + " | mean share |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for name in RUNGS:
        cells = [f"{w['rungs'][name]['test_auc']:.4f} ({100 * w['rungs'][name]['oracle_lift_share']:.0f}%)" for w in res["worlds"]]
        mean = sum(w["rungs"][name]["oracle_lift_share"] for w in res["worlds"]) / len(res["worlds"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * mean:.0f}% |")
    lines.append("| (user+item floor -> oracle) | " + " | ".join(f"{w['floor']:.4f} -> {w['oracle']:.4f}" for w in res["worlds"]) + " | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="small", help="synthetic world size (default: small, the issue's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="world seeds (default: 0 1 2)")
    ap.add_argument("--steps", type=int, default=400, help="full-batch Adam steps per fit (default: 400)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for the json and md files")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    res = {"size": args.size, "steps": args.steps, "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()} CPU, {args.threads} thread(s)",
           "worlds": [probe(args.size, s, args.steps) for s in args.seeds]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ceiling-synthetic-{args.size}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"ceiling-synthetic-{args.size}.md").write_text(markdown(res))
    print(f"wrote {out / f'ceiling-synthetic-{args.size}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
