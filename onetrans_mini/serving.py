"""Serving replay: a dataset's test period as a time-ordered stream of requests, scored three ways.

Each request of the stream is ``(user, events since that user's previous request, candidates)``; the
first request of a user brings its whole history so far. A ``Server`` appends the events to its
``EventLog`` (the history window every mode reads, so all modes score the same inputs) and scores:

- ``none``: no cache, the full forward of every candidate (its own copy of the history);
- ``request``: the request cache, Stage I once per request, Stage II per candidate;
- ``both``: request cache + cross-request user cache (only the changes since the user's last request);
- ``approx``: ``both`` with append-only reuse everywhere (not exact; its drift is reported).

``replay`` times every request (latency p50/p99, requests/s), reads the user cache's stats, and
compares every mode's scores with ``none``. ``onetrans-mini replay`` is the command line.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from .cache import EventLog, Events, UserCacheStore, Window, forward_per_candidate, forward_two_stage, score
from .data.batching import Batch

MODES = ("none", "request", "both", "approx")


@dataclass
class Request:
    """One request of the stream: NS features of its candidates (``ns``, as ``Batch.ns``)."""

    user: int
    request_id: int
    time: float
    new_events: Events
    ns: dict
    n_candidates: int


def replay_stream(data, split: str = "test", max_requests: int | None = None):
    """The ``split``'s requests of a ``RequestData`` in time order (ties by request id), each with the
    user's events since its previous request in the stream (for its first one: its whole history)."""
    R, H, C = data.requests, data.history, data.candidates
    rid = data.request_ids(split)
    rid = rid[np.lexsort((rid, R["time"][rid]))]
    if max_requests is not None:
        rid = rid[:max_requests]
    fields = [f.name for f in data.schema.event_fields]
    seen: dict[int, int] = {}  # user -> history row up to which its events were sent
    for r in rid:
        user = int(R["user"][r])
        a, b = seen.get(user, int(R["hist_start"][r])), int(R["hist_end"][r])
        seen[user] = b
        ev = Events({f: torch.as_tensor(np.array(H[f][a:b], dtype=np.int64)) for f in fields},
                    torch.as_tensor(np.array(H["seq_type"][a:b], dtype=np.int64)),
                    torch.as_tensor(np.array(H["timestamp"][a:b], dtype=np.float64)))
        c0, c1 = int(R["cand_start"][r]), int(R["cand_end"][r])
        ns = {f.name: torch.as_tensor(np.array(C[f.name][c0:c1])) for f in data.schema.ns_features}
        yield Request(user, int(r), float(R["time"][r]), ev, ns, c1 - c0)


def window_batch(window: Window, ns: dict, n_tasks: int) -> Batch:
    """A one-request ``Batch`` of a history window and candidates (an empty history: one padding event)."""
    ev = window.events
    n = len(ev)
    pad = 1 if n == 0 else 0
    seq = {k: torch.nn.functional.pad(v, (pad, 0))[None] for k, v in ev.fields.items()}  # (1, L)
    b = next(iter(ns.values())).shape[0]
    return Batch(seq=seq, seq_type=torch.nn.functional.pad(ev.seq_type, (pad, 0))[None],
                 seq_mask=torch.arange(n + pad)[None] >= pad, ns=ns,
                 request_index=torch.zeros(b, dtype=torch.long), labels=torch.zeros(b, n_tasks),
                 user=torch.zeros(b, dtype=torch.long), request_id=torch.zeros(1, dtype=torch.long))


class Server:
    """Scores requests in one ``mode`` (see the module docstring).

    Args:
        model: a causal ``OneTrans`` (eval mode).
        mode: one of ``MODES``.
        drop_block: the ``EventLog``'s truncation block (events dropped at once when a window is full).
        cache_bytes: the user cache's bound (modes ``both`` and ``approx``).
    """

    def __init__(self, model, mode: str = "both", drop_block: int = 1, cache_bytes: int = 64 << 20):
        if mode not in MODES:
            raise ValueError(f"Server: mode must be one of {MODES}, got {mode!r}")
        self.model, self.mode = model, mode
        self.log = EventLog(model.config.max_len, drop_block)
        self.store = None
        if mode in ("both", "approx"):
            self.store = UserCacheStore(model, cache_bytes, mode="approx" if mode == "approx" else "exact")

    @torch.inference_mode()
    def score(self, req: Request) -> torch.Tensor:
        """Logits (C, n_tasks) of the request's candidates. Its events are appended first; a request with
        no candidates returns an empty (0, n_tasks) tensor (its events are kept; the user cache catches up
        at the user's next scored request)."""
        window = self.log.append(req.user, req.new_events)
        model = self.model
        if req.n_candidates == 0:
            return torch.zeros(0, model.n_tasks)
        if self.store is not None:
            rc = self.store.request_cache(req.user, window)
            return score(model, rc, req.ns, torch.zeros(req.n_candidates, dtype=torch.long))
        batch = window_batch(window, req.ns, model.n_tasks)
        if self.mode == "none":
            return forward_per_candidate(model, batch)
        return forward_two_stage(model, batch)[0]


def _pct(x, q):
    return float(np.percentile(np.asarray(x), q)) if len(x) else float("nan")


def replay(model, data, modes=("none", "request", "both"), split: str = "test", max_requests: int | None = None,
           drop_block: int | None = None, cache_bytes: int = 64 << 20, warmup: int = 5) -> dict:
    """Replay the stream in every mode; returns ``{mode: summary}`` (times in ms).

    ``drop_block`` defaults to a quarter of the model's ``max_len``. Each mode starts with an empty server
    after ``warmup`` untimed requests on a throwaway one. Scores are compared with mode ``none`` (or the
    first mode) as ``max_abs_diff``.
    """
    model.eval()
    drop_block = drop_block or max(1, model.config.max_len // 4)
    stream = list(replay_stream(data, split, max_requests))
    if not stream:
        raise ValueError(f"replay: the {split!r} split has no requests")
    check, model.check_inputs = model.check_inputs, False  # ids come from the prepared data: measure the model
    out, scores = {}, {}
    try:
        for mode in modes:
            warm = Server(model, mode, drop_block, cache_bytes)
            for req in stream[:warmup]:
                warm.score(req)
            server = Server(model, mode, drop_block, cache_bytes)
            lat, got = [], []
            t_all = time.perf_counter()
            for req in stream:
                t0 = time.perf_counter()
                got.append(server.score(req))
                lat.append(time.perf_counter() - t0)
            total = time.perf_counter() - t_all
            scores[mode] = torch.cat(got)
            s = {
                "requests": len(stream),
                "candidates": int(sum(r.n_candidates for r in stream)),
                "p50_ms": 1000 * _pct(lat, 50),
                "p99_ms": 1000 * _pct(lat, 99),
                "mean_ms": 1000 * statistics.fmean(lat),
                "requests_per_s": len(stream) / total,
                "window_truncations": server.log.truncations,
            }
            if server.store is not None:
                s["cache"] = server.store.stats.as_dict()
                s["cache"]["users_held"] = len(server.store)
            out[mode] = s
    finally:
        model.check_inputs = check
    ref = "none" if "none" in scores else next(iter(scores))
    for mode, sc in scores.items():
        out[mode]["max_abs_diff"] = float((sc - scores[ref]).abs().max()) if len(sc) else 0.0
        out[mode]["diff_vs"] = ref
    out["_meta"] = {"requests": len(stream), "drop_block": drop_block, "cache_bytes": cache_bytes,
                    "max_len": model.config.max_len, "threads": torch.get_num_threads()}
    return out


def format_replay(res: dict) -> str:
    meta = res["_meta"]
    lines = [f"replay of {meta['requests']} requests, window max_len={meta['max_len']} (drop_block={meta['drop_block']}), "
             f"user cache bound {meta['cache_bytes'] / 2**20:.0f} MiB, {meta['threads']} threads",
             f"{'mode':<8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'hit rate':>9} {'MiB held':>9} {'evictions':>9} "
             f"{'trunc.':>7} {'max |diff|':>11}"]
    for mode, s in res.items():
        if mode == "_meta":
            continue
        c = s.get("cache")
        hit = f"{100 * c['hit_rate']:.1f}%" if c else "-"
        held = f"{c['bytes_held'] / 2**20:.2f}" if c else "-"
        ev = f"{c['evictions']}" if c else "-"
        tr = f"{c['truncations']}" if c else "-"
        lines.append(f"{mode:<8} {s['p50_ms']:8.2f} {s['p99_ms']:8.2f} {s['requests_per_s']:8.1f} {hit:>9} {held:>9} "
                     f"{ev:>9} {tr:>7} {s['max_abs_diff']:11.2e}")
    lines.append(f"(max |diff|: largest score difference against mode '{res[next(k for k in res if k != '_meta')]['diff_vs']}'; "
                 "trunc.: cache hits whose window front moved)")
    return "\n".join(lines)


def add_replay_arguments(p) -> None:
    p.add_argument("--dataset", default="movielens-100k", help="dataset name or path (ignored with --run)")
    p.add_argument("--preset", default="small", help="model preset of the untrained model (ignored with --run)")
    p.add_argument("--run", default=None, help="a run folder written by 'onetrans-mini train' (its model and data)")
    p.add_argument("--modes", default="none,request,both", help=f"comma-separated, from {','.join(MODES)}")
    p.add_argument("--max-requests", type=int, default=None, help="replay only the first N requests")
    p.add_argument("--split", default="test")
    p.add_argument("--drop-block", type=int, default=None, help="events dropped at once from a full window "
                   "(default max_len // 4; 1 = sliding window)")
    p.add_argument("--cache-mb", type=float, default=64.0, help="user cache bound in MiB")
    p.add_argument("--seed", type=int, default=0, help="seed of the untrained model (and the synthetic data)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _fail(msg: str) -> int:
    import sys

    print(f"error: {msg}", file=sys.stderr)
    return 2


def cli_replay(args) -> int:
    import json

    from .config import get_preset
    from .model import OneTrans

    if args.threads:
        torch.set_num_threads(args.threads)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        return _fail(f"--modes: expected a comma-separated subset of {','.join(MODES)}, got {args.modes!r}")
    if args.run:
        try:
            from .train import load_run
        except ImportError as e:
            return _fail(f"--run needs onetrans_mini.train.load_run, which this installation lacks ({e})")
        run = load_run(args.run)
        model, data = run.model, run.data
        if not isinstance(model, OneTrans):
            return _fail(f"--run {args.run}: the replay needs a OneTrans model, the run holds {type(model).__name__}")
        if not model.config.causal:
            return _fail(f"--run {args.run}: the model uses full attention (causal=False), which rules out KV caching")
    else:
        from .data import load_dataset

        data = load_dataset(args.dataset, seed=args.seed)
        torch.manual_seed(args.seed)
        model = OneTrans(get_preset(args.preset, max_len=data.config.max_len), data.schema, data.vocab_sizes())
    model.eval()
    res = replay(model, data, modes, args.split, args.max_requests, args.drop_block, int(args.cache_mb * 2**20))
    print(json.dumps(res, indent=2) if args.json else format_replay(res))
    return 0
