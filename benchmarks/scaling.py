"""How data preparation and training grow with the dataset: 100K -> 1M -> 10M interactions.

    python benchmarks/scaling.py [--sizes small,1m,10m] [--steps 40] [--out benchmarks/results]

For each synthetic size (and ``movielens-1m`` when its full files are in the data dir), each
measurement runs in a fresh process, so its peak memory is its own:

- ``prepare``: generate + build the requests into an empty cache dir (time, peak RSS);
- ``cached``: load the prepared copy again (memory-mapped Arrow);
- ``train``: ``small`` on the training split for ``--steps`` steps of 32 requests (one thread set by
  ``--threads``); time per step, candidates/s, the epoch time that gives, and peak memory: the
  process's peak RSS (which also counts mapped data pages the OS may drop) and its peak anonymous
  memory (what it cannot drop: model, optimizer, batches, allocator).

The exponent of each quantity from the second-largest to the largest size is fitted as
``log(y2 / y1) / log(n2 / n1)`` (1 = linear). Writes ``scaling.json`` and ``scaling.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mem() -> dict:
    """This process's memory so far (MiB): peak RSS, current anonymous RSS."""
    status = Path("/proc/self/status").read_text()
    get = lambda key: int(status.split(key + ":")[1].split()[0]) / 1024  # noqa: E731
    return {"peak_rss_mb": get("VmHWM"), "anon_mb": get("RssAnon")}


def worker(what: str, dataset: str, steps: int) -> dict:
    """One measurement in this process; returns its figures."""
    import numpy as np
    import torch

    from onetrans_mini.config import get_preset
    from onetrans_mini.data import load_dataset
    from onetrans_mini.model import OneTrans

    t0 = time.perf_counter()
    data = load_dataset(dataset, progress=False) if dataset.startswith("movielens") else load_dataset(dataset)
    out = {"seconds": time.perf_counter() - t0, "interactions": int(data.info["n_interactions"]), **_mem()}
    if what != "train":
        return out
    torch.manual_seed(0)
    model = OneTrans(get_preset("small", max_len=data.config.max_len), data.schema, data.vocab_sizes())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = data.loader("train", batch_requests=32, shuffle=True, seed=0)
    n_train_requests = len(data.request_ids("train"))
    peak_anon, times, cands = 0.0, [], 0
    for i, batch in zip(range(steps + 3), loader):
        t = time.perf_counter()
        _, loss = model(batch, batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 3:  # the first steps warm the allocator and the kernels
            times.append(time.perf_counter() - t)
            cands += len(batch.request_index)
        peak_anon = max(peak_anon, _mem()["anon_mb"])
    step = float(np.median(times))
    out.update(step_seconds=step, candidates_per_second=cands / sum(times),
               epoch_seconds_estimate=step * math.ceil(n_train_requests / 32), train_requests=n_train_requests,
               peak_anon_mb=peak_anon, **_mem())
    return out


def run(what: str, dataset: str, cache: Path, steps: int, threads: int) -> dict:
    env = {**os.environ, "ONETRANS_CACHE_DIR": str(cache), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", what, "--dataset", dataset, "--steps", str(steps)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"scaling: {what} {dataset} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def exponent(y1: float, y2: float, n1: int, n2: int) -> float:
    return math.log(y2 / y1) / math.log(n2 / n1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="small,1m,10m", help="synthetic sizes, smallest first")
    p.add_argument("--steps", type=int, default=40, help="timed training steps per size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write scaling.json and scaling.md there")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dataset", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(worker(args.worker, args.dataset, args.steps)))
        return 0

    from onetrans_mini.data.download import data_dir

    datasets = ["synthetic-" + s for s in args.sizes.split(",")]
    full_1m = data_dir() / "ml-1m" / "ratings.dat"
    if full_1m.is_file() and full_1m.stat().st_size > 20_000_000:
        datasets.append("movielens-1m")
    rows = []
    for name in datasets:
        with tempfile.TemporaryDirectory() as cache:
            row = {"dataset": name}
            for what in ("prepare", "cached", "train"):
                r = run(what, name, Path(cache), args.steps, args.threads)
                row["interactions"] = r.pop("interactions")
                row[what] = r
                print(f"{name:<20} {what:<8} " + ", ".join(f"{k} {v:,.2f}" for k, v in r.items()), flush=True)
            rows.append(row)
    synth = [r for r in rows if r["dataset"].startswith("synthetic")]
    fits = {}
    if len(synth) >= 2:
        a, b = synth[-2], synth[-1]
        n1, n2 = a["interactions"], b["interactions"]
        for key, (what, field) in {
            "prepare time": ("prepare", "seconds"), "prepare peak RSS": ("prepare", "peak_rss_mb"),
            "cached load time": ("cached", "seconds"), "training step time": ("train", "step_seconds"),
            "training peak anonymous memory": ("train", "peak_anon_mb"), "training peak RSS": ("train", "peak_rss_mb"),
        }.items():
            fits[key] = exponent(a[what][field], b[what][field], n1, n2)
    result = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", "threads": args.threads, "steps": args.steps,
              "rows": rows, "exponents": {"from": synth[-2]["dataset"] if len(synth) >= 2 else None,
                                          "to": synth[-1]["dataset"] if synth else None, **fits}}
    md = [f"# Scaling with the dataset ({result['when']}, {result['machine']}, {args.threads} thread(s))", "",
          "| dataset | interactions | prepare s | prepare peak RSS MiB | cached load s | train step ms | "
          "candidates/s | epoch s (est.) | train peak anon MiB | train peak RSS MiB |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        pr, ca, tr = r["prepare"], r["cached"], r["train"]
        md.append(f"| {r['dataset']} | {r['interactions']:,} | {pr['seconds']:.1f} | {pr['peak_rss_mb']:,.0f} | "
                  f"{ca['seconds']:.2f} | {1000 * tr['step_seconds']:.0f} | {tr['candidates_per_second']:,.0f} | "
                  f"{tr['epoch_seconds_estimate']:,.0f} | {tr['peak_anon_mb']:,.0f} | {tr['peak_rss_mb']:,.0f} |")
    if fits:
        md += ["", f"Exponents from {result['exponents']['from']} to {result['exponents']['to']} (1 = linear): "
               + "; ".join(f"{k} {v:.2f}" for k, v in fits.items())]
    print("\n".join(md))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scaling.json").write_text(json.dumps(result, indent=2))
        (out / "scaling.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
