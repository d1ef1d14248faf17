"""Throughput of the OneTrans model on CPU (not a test): ``python -m onetrans_mini.bench_model``.

Two measurements, each the median of several repetitions after warm-up, fp32, 2 threads:

1. d=64, 4 heads, 2 layers, L_S=128, L_NS=8, FFN 4d, batch 256: training (forward + backward) and
   inference (forward under ``torch.inference_mode``) samples/s, with and without the pyramid.
2. The ``small`` preset at L_S=256: forward + backward time with and without the pyramid, next to the
   analytic FLOPs ratio (``OneTrans.estimate_flops``).

Every candidate has its own request (R = B) and a full-length history, so the numbers are those of
the plain full forward; sharing a request's S-tokens across candidates is the KV cache's job.

``--thp`` re-runs the benchmark with ``THP_MEM_ALLOC_ENABLE=1``: PyTorch then backs large CPU tensors
with transparent huge pages. The activations here are tens of MB each and freshly allocated on every
step, and with 4 KB pages most of a step can go to page faults (a VM makes each fault dearer); the
setting changes no result, only the time. Use it for CPU training too.

On a shared machine, other processes make OpenMP threads wait at every barrier: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from .config import ModelConfig, get_preset
from .data.batching import Batch
from .features import Bucketized, Categorical, MultiCategorical, Schema, SequenceSpec, Task
from .model import OneTrans

BENCH_SCHEMA = Schema(
    ns_features=(
        Categorical("user_id", "user"),
        Categorical("age", "user"),
        Categorical("gender", "user"),
        Categorical("item_id", "item"),
        Categorical("category", "item"),
        MultiCategorical("genres", "item", max_len=4),
        Bucketized("price", "item", boundaries=(5.0, 10.0, 20.0, 40.0)),
        Categorical("hour", "context"),
    ),
    event_fields=(
        Categorical("hist_item", "event", vocab_of="item_id"),
        Categorical("hist_category", "event", vocab_of="category"),
        Bucketized("hist_gap", "event", boundaries=(1.0, 10.0, 100.0, 1000.0), log=True),
    ),
    sequences=(SequenceSpec("click", ("click",)), SequenceSpec("purchase", ("purchase",))),
    tasks=(Task("click", "click"), Task("purchase", "purchase")),
)
BENCH_VOCAB = {"user_id": 5000, "age": 9, "gender": 4, "item_id": 20000, "category": 50, "genres": 22, "price": 7,
               "hour": 26, "hist_gap": 7}


def random_batch(schema: Schema, vocab: dict, n: int, seq_len: int, seed: int = 0) -> Batch:
    """``n`` candidates, one request each, full histories of ``seq_len`` events."""
    g = torch.Generator().manual_seed(seed)

    def size(name):
        f = next(x for x in (*schema.ns_features, *schema.event_fields) if x.name == name)
        return vocab[getattr(f, "vocab_of", "") or name]

    seq = {f.name: torch.randint(2, size(f.name), (n, seq_len), generator=g) for f in schema.event_fields}
    ns = {}
    for f in schema.ns_features:
        shape = (n, f.max_len) if isinstance(f, MultiCategorical) else (n,)
        ns[f.name] = torch.randint(2, size(f.name), shape, generator=g)
    return Batch(
        seq=seq,
        seq_type=torch.randint(1, len(schema.sequences) + 1, (n, seq_len), generator=g),
        seq_mask=torch.ones(n, seq_len, dtype=torch.bool),
        ns=ns,
        request_index=torch.arange(n),
        labels=torch.randint(0, 2, (n, len(schema.tasks)), generator=g).float(),
        user=torch.arange(n),
        request_id=torch.arange(n),
    )


def _median_seconds(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(config: ModelConfig, batch_size: int, seq_len: int, warmup: int = 2, reps: int = 7, attempts: int = 1,
            schema: Schema = BENCH_SCHEMA, vocab: dict = BENCH_VOCAB) -> dict:
    """Median seconds of a training step (forward + backward) and of an inference forward.

    ``attempts > 1`` repeats the whole median measurement and keeps the best one: on a shared machine
    the best median is the closest to what the model costs on a quiet one.
    """
    torch.manual_seed(0)
    model = OneTrans(config, schema, vocab)
    model.check_inputs = False  # measure the model, not the input checks
    batch = random_batch(schema, vocab, batch_size, seq_len)

    def train_step():
        model.zero_grad(set_to_none=True)
        _, loss = model(batch, batch.labels)
        loss.backward()

    def infer():
        with torch.inference_mode():
            model(batch)

    t_train = t_infer = float("inf")
    for _ in range(attempts):
        model.train()
        t_train = min(t_train, _median_seconds(train_step, warmup, reps))
        model.eval()
        t_infer = min(t_infer, _median_seconds(infer, warmup, reps))
    return {
        "train_s": t_train,
        "infer_s": t_infer,
        "train_sps": batch_size / t_train,
        "infer_sps": batch_size / t_infer,
        "flops": model.estimate_flops(batch_size, seq_len=seq_len)["total"],
        "schedule": model.schedule(model.n_s - config.max_len + seq_len),
        "params": model.num_params(),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--attempts", type=int, default=1, help="repeat each median measurement, keep the best")
    ap.add_argument("--thp", action="store_true", help="back large tensors with transparent huge pages")
    args = ap.parse_args(argv)
    if args.thp and os.environ.get("THP_MEM_ALLOC_ENABLE") != "1":
        # PyTorch reads the variable once, at its first allocation: start again with it set
        argv = sys.argv[1:] if argv is None else list(argv)
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1"}
        os.execve(sys.executable, [sys.executable, "-m", "onetrans_mini.bench_model", *argv], env)
    torch.set_num_threads(args.threads)
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch {args.batch}, "
          f"huge pages {'on' if thp else 'off'}, load average {os.getloadavg()[0]:.2f}, best of {args.attempts} medians")

    print("\n1) d=64, 4 heads, 2 layers, L_S=128, L_NS=8, FFN 4d")
    base = ModelConfig(d_model=64, n_heads=4, n_layers=2, ffn_mult=4, ns_tokens=8, max_len=128)
    for pyr in (True, False):
        r = measure(base.replace(pyramid=pyr), args.batch, 128, reps=args.reps, attempts=args.attempts)
        print(f"  pyramid={pyr!s:5}  schedule {r['schedule']}  train {r['train_sps']:7.0f} samples/s   "
              f"inference {r['infer_sps']:7.0f} samples/s")

    print("\n2) preset 'small' (3 layers, d=64) at L_S=256: forward + backward per batch")
    small = get_preset("small", max_len=256)
    res = {pyr: measure(small.replace(pyramid=pyr), args.batch, 256, reps=args.reps, attempts=args.attempts)
           for pyr in (True, False)}
    for pyr, r in res.items():
        print(f"  pyramid={pyr!s:5}  schedule {r['schedule']}  {1000 * r['train_s']:7.1f} ms   "
              f"forward {r['flops'] / 1e9:6.2f} GFLOPs")
    t_ratio = res[True]["train_s"] / res[False]["train_s"]
    f_ratio = res[True]["flops"] / res[False]["flops"]
    print(f"  pyramid / no pyramid: time {t_ratio:.2f}, analytic FLOPs {f_ratio:.2f}")


if __name__ == "__main__":
    main()
