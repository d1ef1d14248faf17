"""The cross-request user cache (paper §5): the next request of a user computes only what changed.

Behaviour sequences are append-only, so a user's next request sees the same history plus a few new
events. ``UserCache`` keeps that user's S side between requests and ``advance`` brings it to the new
history window through the block's own Stage I (``OneTransBlock.forward_s`` with the cached keys/values
as ``past``), on the rows that changed only. ``UserCacheStore`` holds many users, least recently used evicted first, under a byte bound.

What is exact, and why (the paper leaves it open)
-------------------------------------------------
A cached value can be reused only if it would be computed identically now. With the timestamp-aware
merge an S-token depends on its own event only (``tokenizer.py``: no position index, no request time).
Layer ``l`` (0-based) has ``q_l`` S queries (``model.layer_queries``) and reads the outputs of the layer
below, so its KEY WINDOW is the last ``q_{l-1}`` events (layer 0: the whole history window). Then:

- a position's keys/values at layer l depend on its layer-l input only: reusable whenever that is;
- a position's output at layer l attends to the keys ``[window start, itself]``: reusable iff the
  layer's window start did not move and every input up to it is reusable.

Consequences, which ``plan`` encodes (one ``LayerPlan`` per layer, integers only):

- appending events: layers 0 and 1 keep their window start (``q_0 = L_S``), so old outputs stay and only
  the new rows are computed. At a pyramid layer l >= 2 the window start moves with every append, so
  that layer's outputs (its last ``q_l`` positions) are recomputed from its cached INPUTS; the keys/values
  of the positions before them come from the cache. The top layer has no S queries: keys/values only.
- front truncation (the window is full and drops old events): layer 0's window start moves, so every
  output is recomputed from the cached S-tokens (only the new events are tokenized). ``serving.EventLog``
  drops old events a block at a time so that this happens rarely.
- the timestamp-agnostic merge regroups events by sequence, so an appended event shifts later tokens:
  nothing is reusable, and the store runs a fresh Stage I on every request (with a warning).
- ``approx=True`` reuses every output computed before, moved window or not (a plain append-only store
  would): cheaper, not exact; ``onetrans-mini replay`` reports how far its scores drift.

Weights: a cached state is only valid for the weights it was computed with. After changing the model's
weights (an optimizer step, ``load_state_dict``), call ``UserCacheStore.clear()``; ``serving.Server``'s
``load_state_dict`` does both.

The slow twin is ``fresh_stage_one`` (Stage I of the whole window from scratch), and behind it the
model's full forward; ``tests/test_kv_cache.py`` compares both after appends, truncations and approx.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .data.batching import check_id_range, require_integer
from .kv_cache import LayerKV, RequestCache

# ----------------------------------------------------------------------------------------------
# the events a model can read


def check_events(model, events) -> None:
    """Clear errors for events the tokenizer cannot read: a missing field, ids that are not integers, a
    ``seq_type`` outside the schema's sequences, an id outside its field's vocabulary."""
    seq, emb = model.tokenizer.seq, model.tokenizer.embeddings
    missing = [f for f in seq.fields if f not in events.fields]
    if missing:
        raise ValueError(f"events lack event field(s) {missing}; expected {list(seq.fields)}")
    for name, ids in (("seq_type", events.seq_type), *((f, events.fields[f]) for f in seq.fields)):
        require_integer(f"events: {name}", ids)
    if not len(events):
        return
    lo, hi = (int(t) for t in torch.aminmax(events.seq_type))
    if lo < 1 or hi > seq.n_sequences:
        raise ValueError(f"events: seq_type must be in 1..{seq.n_sequences} (the schema's sequences), got range [{lo}, {hi}]")
    for name in seq.fields:
        check_id_range(f"events: field {name!r}", events.fields[name], emb.size(name))


def tokenize_events(model, events) -> tuple[torch.Tensor, torch.Tensor]:
    """S-tokens (1, L_S, d) and flags (1, L_S) of one user's events (checked by ``check_events`` first),
    through the model's own tokenizer. An empty history is one padding position (the model needs L_S >= 1)."""
    seq_type, fields = events.seq_type[None], {f: events.fields[f][None] for f in model.tokenizer.seq.fields}  # (1, n)
    if not len(events):
        seq_type, fields = F.pad(seq_type, (1, 0)), {f: F.pad(v, (1, 0)) for f, v in fields.items()}  # (1, 1) padding
    mask = torch.full(seq_type.shape, len(events) > 0, dtype=torch.bool, device=seq_type.device)
    return model.tokenizer.seq(model.tokenizer.embeddings, fields, seq_type, mask)


def fresh_stage_one(model, window) -> RequestCache:
    """Stage I of one user's history window from scratch (any merge): the slow twin of ``UserCache``."""
    check_events(model, window.events)
    x, real = tokenize_events(model, window.events)
    return model.stage_one(x, real)


# ----------------------------------------------------------------------------------------------
# the plan: what to reuse and what to compute, per layer


@dataclass(frozen=True)
class LayerPlan:
    """One layer of an ``advance``, in absolute event positions of the new window ``[start, end)``.

    - ``inputs_from``: the first position whose layer INPUT is new or changed; cached inputs before it
      are exact.
    - ``key_start``: the layer's key window is ``[key_start, end)``.
    - ``query_start``: its S query positions are ``[query_start, end)`` (``end`` at the top layer: none).
    - ``outputs_from``: outputs of ``[outputs_from, end)`` are computed, the ones before are reused; they
      are the next layer's changed inputs.
    - ``window_moved``: the key window starts later than in the cached state.
    """

    inputs_from: int
    key_start: int
    query_start: int
    outputs_from: int
    window_moved: bool

    def computed(self, end: int) -> int:
        return end - self.outputs_from

    def reused(self) -> int:
        return self.outputs_from - self.query_start


def plan(layer_queries: list[int], start: int, end: int, cached_end: int, cached_key_starts: list[int] | None,
         approx: bool = False) -> list[LayerPlan]:
    """The reuse plan of a window ``[start, end)`` over a cached state whose inputs are exact up to
    ``cached_end`` (``cached_key_starts``: each layer's cached key window start; None for a fresh state,
    with ``cached_end == start``). Pure: integers in, integers out (see the module docstring)."""
    out, inputs_from = [], cached_end
    for layer, q in enumerate(layer_queries):
        width = end - start if layer == 0 else layer_queries[layer - 1]
        key_start, query_start = max(start, end - width), max(start, end - q)
        moved = cached_key_starts is not None and key_start != cached_key_starts[layer]
        outputs_from = query_start if (moved and not approx) else max(query_start, inputs_from)
        out.append(LayerPlan(inputs_from, key_start, query_start, outputs_from, moved))
        inputs_from = outputs_from
    return out


# ----------------------------------------------------------------------------------------------
# one user's state


@dataclass
class LayerState:
    """One layer of one user, no padding: keys/values ``k``, ``v`` (1, H, n, hd) of the key window
    ``[key_start, end)``, and the layer inputs ``x`` (1, m, d) of the query positions ``[query_start, end)``
    (kept to recompute outputs whose key window moved; empty at the top layer)."""

    k: torch.Tensor
    v: torch.Tensor
    key_start: int
    x: torch.Tensor
    query_start: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.x))


@dataclass
class UserCache:
    """One user's S side across requests. Life cycle: ``advance`` (a prefill when empty, then appends and
    truncations: computes only what changed), ``request_cache`` (for Stage II), dropped on eviction."""

    start: int = 0  # the cached window [start, end), absolute event positions
    end: int = 0
    last_time: float = float("-inf")
    layers: list[LayerState] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(lay.nbytes for lay in self.layers)

    def request_cache(self) -> RequestCache:
        """This user as a one-request ``RequestCache`` (views, no copy); an empty history is one padding key."""
        out = []
        for lay in self.layers:
            k, v = lay.k, lay.v
            real = torch.ones(1, k.shape[2], dtype=torch.bool, device=k.device)
            if k.shape[2] == 0:
                k, v = F.pad(k, (0, 0, 1, 0)), F.pad(v, (0, 0, 1, 0))  # (1, H, 1, hd)
                real = torch.zeros(1, 1, dtype=torch.bool, device=k.device)
            out.append(LayerKV(k, v, real))
        return RequestCache(out)

    @torch.no_grad()
    def advance(self, model, window, approx: bool = False) -> list[LayerPlan]:
        """Bring the cache to ``window`` (a ``serving.Window``: the same or a later start and end than the
        cached one). Computes what the plan says; returns the plan. On an error nothing changes."""
        if model.config.seq_merge != "timestamp_aware":
            raise ValueError("UserCache needs prefix-stable S-tokens (seq_merge='timestamp_aware'); use fresh_stage_one")
        if model.training and model.config.dropout > 0:
            raise ValueError("UserCache computes the model in eval mode (no dropout), for serving: call model.eval() "
                             f"first (the model is in training mode with dropout={model.config.dropout})")
        start, end, events = window.start, window.start + len(window.events), window.events
        fresh = not self.layers or start >= self.end  # (or nothing cached is in the window)
        if not fresh:
            if start < self.start or end < self.end:
                raise ValueError(f"window [{start}, {end}) does not extend the cached one [{self.start}, {self.end}): "
                                 "histories are append-only and their front only moves forward")
            if float(events.time[self.end - 1 - start]) != self.last_time:
                raise ValueError(f"the window's event {self.end - 1} has time {float(events.time[self.end - 1 - start])}, "
                                 f"the cached one {self.last_time}: this window is not the cached history plus new events")
        cached_end = start if fresh else self.end
        steps = plan(model.layer_queries, start, end, cached_end,
                     None if fresh else [lay.key_start for lay in self.layers], approx)
        new = events.slice(cached_end - start)
        check_events(model, new)  # before anything changes
        x_new = tokenize_events(model, new)[0] if len(new) else None  # (1, end - cached_end, d): layer 0's new inputs
        layers = []
        for block, step, old in zip(model.blocks, steps, [None] * len(steps) if fresh else self.layers):
            state, x_new = _advance_layer(block, step, old, x_new, end)
            layers.append(state)
        self.layers, self.start, self.end = layers, start, end
        if len(events):
            self.last_time = float(events.time[-1])
        return steps


def _advance_layer(block, step: LayerPlan, old: LayerState | None, x_new: torch.Tensor | None, end: int):
    """One layer: ``x_new`` (1, end - inputs_from, d) are its new or changed inputs (None: none). Runs the block's
    Stage I on the rows that need it, against the cached keys/values before them; returns the layer's new
    state and its outputs of ``[outputs_from, end)`` (the next layer's changed inputs, or None)."""
    u = step.inputs_from
    # rows [a, end) go through the block: the new inputs, and before them any cached inputs whose outputs
    # must be recomputed (a moved key window); keys/values of [key_start, a) come from the cache
    a = min(step.outputs_from, max(step.key_start, u))
    past = None  # the cached keys/values of [key_start, a)
    if old is not None and a > step.key_start:
        i, n = step.key_start - old.key_start, a - step.key_start
        past = LayerKV(old.k.narrow(2, i, n), old.v.narrow(2, i, n), torch.ones(1, n, dtype=torch.bool, device=old.k.device))
    parts = [] if old is None or a >= u else [old.x.narrow(1, a - old.query_start, u - a)]  # cached inputs of [a, u)
    if x_new is not None:
        parts.append(x_new[:, max(a, u) - u:])  # new inputs of [max(a, u), end)
    if not parts:  # nothing new reaches this layer: its cached rows, trimmed to the (maybe moved) windows
        if old is None:  # an empty history
            h, d = block.attn.n_heads, block.attn.d
            w = block.norm1.weight
            return LayerState(w.new_zeros(1, h, 0, d // h), w.new_zeros(1, h, 0, d // h), end, w.new_zeros(1, 0, d), end), None
        k, v = (past.k, past.v) if past is not None else (old.k[:, :, :0], old.v[:, :, :0])
        x = old.x[:, old.x.shape[1] - (end - step.query_start):]  # (cached up to end: nothing below changed)
        return LayerState(k, v, step.key_start, x, step.query_start), None
    x = torch.cat(parts, 1) if len(parts) > 1 else parts[0]  # (1, end - a, d)
    n_q = end - step.outputs_from if block.has_s_queries else 0
    real = torch.ones(1, x.shape[1], dtype=torch.bool, device=x.device)  # a user's window has no padding
    out, keys = block.forward_s(x, real, n_q, past)
    # layer inputs of the query positions [query_start, end), kept to recompute outputs later
    if step.query_start >= a:
        x_q = x[:, step.query_start - a:]
    else:
        x_q = torch.cat([old.x.narrow(1, step.query_start - old.query_start, a - step.query_start), x], 1)
    return LayerState(keys.k, keys.v, step.key_start, x_q, step.query_start), out


# ----------------------------------------------------------------------------------------------
# many users


@dataclass
class CacheStats:
    hits: int = 0  # requests served from a cached user state (only the changes computed)
    misses: int = 0  # requests that ran a fresh Stage I (user never seen, evicted, or fallback)
    evictions: int = 0
    truncations: int = 0  # hits whose window front moved (every layer recomputed from the cached S-tokens)
    pyramid_recomputes: int = 0  # hits where a layer >= 2 recomputed outputs because its key window moved
    fallbacks: int = 0  # requests where exact reuse is impossible (timestamp-agnostic merge)
    not_stored: int = 0  # states larger than the whole store
    positions_computed: int = 0  # S query positions computed (all layers), hits and misses
    positions_reused: int = 0
    bytes_held: int = 0
    peak_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def as_dict(self) -> dict:
        return {**self.__dict__, "hit_rate": self.hit_rate}


class UserCacheStore:
    """Users' ``UserCache`` states, least recently used evicted first, at most ``max_bytes`` held.

    ``request_cache(user, window) -> RequestCache`` brings the user's state to ``window`` and returns it
    for Stage II. A user not in the store (new or evicted) gets a fresh Stage I over the window: the
    store never needs anything but the window. ``mode="approx"`` reuses every earlier state (not exact).
    After the model's weights change, ``clear()`` the store (see the module docstring).
    """

    def __init__(self, model, max_bytes: int, mode: str = "exact"):
        if not model.config.causal:
            raise ValueError("KV caching needs causal attention: with ModelConfig.causal=False every S-token attends "
                             "to the candidate's NS-tokens, so the S side cannot be cached")
        if mode not in ("exact", "approx"):
            raise ValueError(f"UserCacheStore: mode must be 'exact' or 'approx', got {mode!r}")
        if max_bytes < 0:
            raise ValueError(f"UserCacheStore: max_bytes must be >= 0, got {max_bytes}")
        self.model, self.max_bytes, self.mode = model, int(max_bytes), mode
        self.fallback_reason = None
        if model.config.seq_merge != "timestamp_aware":
            self.fallback_reason = (f"seq_merge={model.config.seq_merge!r} regroups events by sequence: an appended "
                                    "event shifts later S-tokens, so cached states are never reusable; every request "
                                    "runs a fresh Stage I")
            warnings.warn(f"UserCacheStore: {self.fallback_reason}", stacklevel=2)
        self._users: OrderedDict = OrderedDict()
        self.stats = CacheStats()

    def __contains__(self, user) -> bool:
        return user in self._users

    def __len__(self) -> int:
        return len(self._users)

    def evict(self, user) -> None:
        uc = self._users.pop(user, None)
        if uc is not None:
            self.stats.bytes_held -= uc.nbytes
            self.stats.evictions += 1

    def clear(self) -> None:
        """Forget every user (needed after the model's weights change)."""
        self._users.clear()
        self.stats.bytes_held = 0

    def request_cache(self, user, window) -> RequestCache:
        model, st = self.model, self.stats
        if self.fallback_reason is not None:  # not prefix-stable: a fresh Stage I, nothing kept
            st.fallbacks += 1
            st.misses += 1
            return fresh_stage_one(model, window)
        uc = self._users.get(user)
        uc = UserCache() if uc is None else uc
        size_before = uc.nbytes
        hit = bool(uc.layers) and window.start < uc.end
        steps = uc.advance(model, window, approx=self.mode == "approx")  # raises before changing anything
        end = window.start + len(window.events)
        st.hits += hit
        st.misses += not hit
        if hit:
            st.truncations += steps[0].window_moved
            st.pyramid_recomputes += any(s.window_moved and s.computed(end) for s in steps[2:])
        st.positions_computed += sum(s.computed(end) for s in steps)  # (the top layer: 0 and 0)
        st.positions_reused += sum(s.reused() for s in steps)
        if self._users.pop(user, None) is not None:  # its size may have changed: account it again
            st.bytes_held -= size_before
        size = uc.nbytes
        if size > self.max_bytes:
            st.not_stored += 1
        else:
            while self._users and st.bytes_held + size > self.max_bytes:
                self.evict(next(iter(self._users)))  # least recently used first
            self._users[user] = uc
            st.bytes_held += size
            st.peak_bytes = max(st.peak_bytes, st.bytes_held)
        return uc.request_cache()
