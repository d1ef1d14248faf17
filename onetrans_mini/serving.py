"""Serving: the feature store of users' events, a server that scores requests, and a replay of a test period.

Top to bottom:

1. ``Events``, ``Window``, ``EventLog``: each user's raw events (what a feature store holds) and the
   history window the model reads (at most ``max_len`` events; the oldest dropped ``drop_block`` at a time).
2. ``Server``: scores requests in one of the modes below.
3. ``replay``: a dataset's test period as a time-ordered stream of requests, scored in several modes.

Each request of the stream is ``(user, events since that user's previous request, candidates)``; the
first request of a user brings its whole history so far. A ``Server`` appends the events to its
``EventLog`` (the history window every mode reads, so all modes score the same inputs) and scores:

- ``none``: no cache, the full forward of every candidate (its own copy of the history);
- ``request``: the request cache, Stage I once per request, Stage II per candidate;
- ``both``: request cache + cross-request user cache (only the changes since the user's last request);
- ``approx``: ``both`` with append-only reuse everywhere (not exact; its drift is reported).

``replay`` times every request (latency p50/p99, requests/s), reads the user cache's stats, and
compares every mode's scores with ``none``. ``onetrans-mini replay`` is the command line (``cli.py``,
which also chooses the threads: nothing here changes process-wide settings).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import torch

from .data.batching import Batch, check_ns
from .user_cache import UserCacheStore, check_events

MODES = ("none", "request", "both", "approx")

# ----------------------------------------------------------------------------------------------
# 1. events and the history window


class OutOfOrderError(ValueError):
    """Events older than events already appended (histories are append-only, in time order)."""


class UnknownUserError(KeyError):
    """A user with no events at all: register a cold-start user with ``EventLog.append(user, Events.empty(...))``."""

    def __str__(self):  # KeyError would print the repr of the message
        return str(self.args[0])


@dataclass
class Events:
    """Behaviour events of one user, oldest first: ``fields`` event field -> (n,) long ids,
    ``seq_type`` (n,) long (1-based sequence), ``time`` (n,) float64 timestamps (non-decreasing)."""

    fields: dict[str, torch.Tensor]
    seq_type: torch.Tensor
    time: torch.Tensor

    def __post_init__(self):
        n = self.seq_type.shape[0]
        bad = [k for k, v in self.fields.items() if tuple(v.shape) != (n,)]
        if self.seq_type.dim() != 1 or tuple(self.time.shape) != (n,) or bad:
            raise ValueError(f"Events: seq_type, time and every field must be 1-D of one length n={n}; "
                             f"got time {tuple(self.time.shape)}, fields {[(k, tuple(self.fields[k].shape)) for k in bad]}")
        if n > 1 and bool((self.time[1:] < self.time[:-1]).any()):
            raise OutOfOrderError("Events: timestamps must be non-decreasing (oldest first)")

    def __len__(self) -> int:
        return self.seq_type.shape[0]

    def slice(self, a: int, b: int | None = None) -> "Events":
        out = object.__new__(Events)  # a slice of valid events is valid: no need to check it again (every append slices)
        out.fields, out.seq_type, out.time = {k: v[a:b] for k, v in self.fields.items()}, self.seq_type[a:b], self.time[a:b]
        return out

    def to(self, device) -> "Events":
        """The same events on ``device`` (a no-op where they already are)."""
        out = object.__new__(Events)
        out.fields = {k: v.to(device) for k, v in self.fields.items()}
        out.seq_type, out.time = self.seq_type.to(device), self.time.to(device)
        return out

    @staticmethod
    def cat(parts: list["Events"]) -> "Events":
        return Events({k: torch.cat([p.fields[k] for p in parts]) for k in parts[0].fields},
                      torch.cat([p.seq_type for p in parts]), torch.cat([p.time for p in parts]))

    @staticmethod
    def empty(field_names) -> "Events":
        z = torch.zeros(0, dtype=torch.long)
        return Events({k: z for k in field_names}, z, torch.zeros(0, dtype=torch.float64))


@dataclass
class Window:
    """The events the model reads for a request: absolute event indices ``[start, start + len(events))``
    of the user's history (index 0 = the user's first event ever)."""

    events: Events
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.events)


class EventLog:
    """Each user's events (what a feature store holds) and the window the model reads.

    The window holds at most ``max_len`` events (the model's ``ModelConfig.max_len``). When an append
    overflows it, the oldest events go ``drop_block`` at a time, so the window's front moves once every
    ``drop_block`` appended events (each move costs the user cache a recompute from layer 0's outputs
    up). ``drop_block=1`` is a sliding window, the training pipeline's "last max_len events"; a larger
    block keeps between ``max_len - drop_block + 1`` and ``max_len`` events once full (serving then reads
    a slightly shorter history than training did, the price of amortizing the recompute).
    """

    def __init__(self, max_len: int, drop_block: int = 1):
        if not 1 <= drop_block <= max_len:
            raise ValueError(f"EventLog: drop_block must be in [1, max_len={max_len}], got {drop_block}")
        self.max_len, self.drop_block = max_len, drop_block
        self._win: dict = {}  # user -> Window
        self.truncations = 0  # window front moves, all users

    def __contains__(self, user) -> bool:
        return user in self._win

    def append(self, user, events: Events) -> Window:
        """Append a user's new events (oldest first, none older than the user's newest); returns the window."""
        w = self._win.get(user)
        if w is None:
            w = Window(events, 0)
        else:
            if len(events) and len(w.events) and float(events.time[0]) < float(w.events.time[-1]):
                raise OutOfOrderError(
                    f"user {user!r}: new event at time {float(events.time[0])} is older than the last appended one "
                    f"({float(w.events.time[-1])}); histories are append-only (late events need a rebuild)")
            w = Window(Events.cat([w.events, events]) if len(events) else w.events, w.start)
        over = len(w.events) - self.max_len
        if over > 0:
            drop = self.drop_block * math.ceil(over / self.drop_block)
            w = Window(w.events.slice(drop), w.start + drop)
            self.truncations += 1
        self._win[user] = w
        return w

    def last_time(self, user) -> float | None:
        """The time of the user's newest logged event (None: no events yet)."""
        w = self._win.get(user)
        return float(w.events.time[-1]) if w is not None and len(w.events) else None

    def window(self, user) -> Window:
        if user not in self._win:
            raise UnknownUserError(f"user {user!r} has no history: nothing is known about it. Append its events first "
                                   f"(a cold-start user: EventLog.append(user, Events.empty(fields)) scores an empty history)")
        return self._win[user]


# ----------------------------------------------------------------------------------------------
# 2. the server



@dataclass
class Request:
    """One request: a user, the events since its previous request, the candidates to score.

    The one-request call is ``server.score(Request(user, new_events=events, ns=candidates))``.

    - ``request_id``: a label that error messages name (optional).
    - ``time``: when the request was made (optional). Given, the server checks it against the user's
      events: every event comes before the request that sends it, and a request is not older than the
      user's newest logged event (a stream replayed out of order would otherwise score one user's later
      history into an earlier request).
    - ``new_events``: the user's events since its previous request, oldest first (None: none).
    - ``ns``: the candidates' NS features, as ``Batch.ns`` (required).
    - ``n_candidates``: derived from ``ns``; given, it must agree.
    """

    user: Hashable
    request_id: int | None = None
    time: float | None = None
    new_events: Events | None = None
    ns: dict | None = None
    n_candidates: int | None = None

    def __post_init__(self):
        if self.ns is None:
            raise ValueError(f"{self.where}: ns (the candidates' NS features) is required")
        rows = next(iter(self.ns.values())).shape[0] if self.ns else 0
        if self.n_candidates is None:
            self.n_candidates = rows
        elif self.n_candidates != rows:
            raise ValueError(f"{self.where}: n_candidates={self.n_candidates}, but its candidate features have "
                             f"{rows} rows (request.ns[{next(iter(self.ns))!r}])")

    @property
    def where(self) -> str:
        """How error messages name this request."""
        return f"request {self.request_id} (user {self.user!r})" if self.request_id is not None else f"user {self.user!r}"


def check_candidates(model, ns: dict, n: int, where: str = "request.ns") -> None:
    """Clear errors for candidates a model cannot score: every NS feature of its schema, integer ids in
    each feature's vocabulary, ``n`` rows (the same check as a training batch's, ``data.batching.check_ns``)."""
    check_ns(ns, model.schema, model.tokenizer.embeddings.size, n, check_ids=True, where=where)


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
        model: a causal ``OneTrans`` (eval mode), on any device: requests may hold CPU tensors, the server
            moves them to the model's device (its event log and user cache live there).
        mode: one of ``MODES``.
        drop_block: the ``EventLog``'s truncation block (events dropped at once when a window is full).
        cache_bytes: the user cache's bound (modes ``both`` and ``approx``).
    """

    def __init__(self, model, mode: str = "both", drop_block: int = 1, cache_bytes: int = 64 << 20):
        if mode not in MODES:
            raise ValueError(f"Server: mode must be one of {MODES}, got {mode!r}")
        self.model, self.mode = model, mode
        self.log = EventLog(model.config.max_len, drop_block)
        self._event_fields = [f.name for f in model.schema.event_fields]
        self.store = None
        if mode in ("both", "approx"):
            self.store = UserCacheStore(model, cache_bytes, mode="approx" if mode == "approx" else "exact")

    def load_state_dict(self, state_dict) -> None:
        """New weights for the model: cached user states were computed with the old ones, so they go too."""
        self.model.load_state_dict(state_dict)
        if self.store is not None:
            self.store.clear()

    def check(self, req: Request) -> Events:
        """Every check a request must pass before anything is stored (events, candidates, time order);
        returns its new events. Errors name the request and the field."""
        model = self.model
        events = req.new_events if req.new_events is not None else Events.empty(self._event_fields)
        try:
            check_events(model, events)
            check_candidates(model, req.ns, req.n_candidates)
        except ValueError as e:
            raise type(e)(f"{req.where}: {e}") from None
        last = self.log.last_time(req.user)
        if last is not None and len(events) and float(events.time[0]) < last:
            raise OutOfOrderError(f"{req.where}: new event at time {float(events.time[0])} is older than the user's "
                                  f"newest logged event ({last}); histories are append-only (late events need a rebuild)")
        if req.time is not None:
            if len(events) and float(events.time[-1]) > req.time:
                raise OutOfOrderError(f"{req.where}: its event at time {float(events.time[-1])} is after the request's "
                                      f"time {req.time} (events come before the request that sends them)")
            if last is not None and last > req.time:
                raise OutOfOrderError(f"{req.where}: time {req.time} is before the user's newest logged event ({last}): "
                                      "requests of a user must come in time order")
        return events

    @torch.inference_mode()
    def score(self, req: Request) -> torch.Tensor:
        """Logits (C, n_tasks) of the request's candidates. The request is checked first (``check``): a
        rejected request changes nothing. Then its events are appended and the candidates scored; a request
        with no candidates returns an empty (0, n_tasks) tensor (its events are kept; the user cache catches
        up at the user's next scored request)."""
        model = self.model
        device = next(model.parameters()).device  # requests arrive on the CPU; the log and the cache live here
        events = self.check(req).to(device)
        window = self.log.append(req.user, events)
        if req.n_candidates == 0:
            return torch.zeros(0, model.n_tasks, device=device)
        if self.store is not None:
            rc = self.store.request_cache(req.user, window)
            return model.score(rc, req.ns)  # one cached request: no request_index needed
        batch = window_batch(window, req.ns, model.n_tasks).to(device)
        if self.mode == "none":
            return model.forward_full(batch)[0]  # every candidate with its own copy of the history
        return model(batch)[0]  # Stage I once, Stage II per candidate


def percentile(x, q: float) -> float:
    return float(np.percentile(np.asarray(x), q)) if len(x) else float("nan")


def replay(model, data, modes=("none", "request", "both"), split: str = "test", max_requests: int | None = None,
           drop_block: int | None = None, cache_bytes: int = 64 << 20, warmup: int = 5) -> dict:
    """Replay the stream in every mode; returns ``{mode: summary}`` (times in ms).

    ``drop_block`` defaults to a quarter of the model's ``max_len``. Each mode starts with an empty server
    after ``warmup`` untimed requests on a throwaway one. Scores are compared with mode ``none`` (or the
    first mode) as ``max_abs_diff``.
    """
    model.eval()
    on_gpu = model.norm_f.weight.device.type == "cuda"
    drop_block = drop_block or max(1, model.config.max_len // 4)
    stream = list(replay_stream(data, split, max_requests))
    if not stream:
        raise ValueError(f"replay: the {split!r} split has no requests")
    out, scores = {}, {}
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
            if on_gpu:  # a request's time includes its GPU work, not only the launches
                torch.cuda.synchronize()
            lat.append(time.perf_counter() - t0)
        total = time.perf_counter() - t_all
        scores[mode] = torch.cat(got)
        s = {
            "requests": len(stream),
            "candidates": int(sum(r.n_candidates for r in stream)),
            "p50_ms": 1000 * percentile(lat, 50),
            "p99_ms": 1000 * percentile(lat, 99),
            "mean_ms": 1000 * statistics.fmean(lat),
            "requests_per_s": len(stream) / total,
            "window_truncations": server.log.truncations,
        }
        if server.store is not None:
            s["cache"] = server.store.stats.as_dict()
            s["cache"]["users_held"] = len(server.store)
        out[mode] = s
    ref = "none" if "none" in scores else next(iter(scores))
    for mode, sc in scores.items():
        out[mode]["max_abs_diff"] = float((sc - scores[ref]).abs().max()) if len(sc) else 0.0
        out[mode]["diff_vs"] = ref
    out["_meta"] = {"requests": len(stream), "drop_block": drop_block, "cache_bytes": cache_bytes,
                    "max_len": model.config.max_len, "threads": torch.get_num_threads()}
    return out


def format_replay(res: dict) -> str:
    meta = res["_meta"]
    n = meta["threads"]
    threads = f"{n} thread{'s' if n != 1 else ''}" + (f" ({meta['threads_how']})" if meta.get("threads_how") else "")
    lines = [f"replay of {meta['requests']} requests with {threads}, window max_len={meta['max_len']} "
             f"(drop_block={meta['drop_block']}), user cache bound {meta['cache_bytes'] / 2**20:.0f} MiB",
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
