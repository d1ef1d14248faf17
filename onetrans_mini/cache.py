"""KV caching (paper §5): the S-side once per request, and across requests of one user.

Three objects, each with a small life cycle (as nanochat's ``KVCache``: prefill, advance, reset):

1. ``RequestCache`` (Stage I / Stage II inside one request). ``stage_one`` runs a request's S-tokens
   through every layer once (``OneTransBlock.forward_s``) and keeps each layer's S keys/values;
   ``stage_two`` scores the request's candidates: their NS-tokens attend to the cached S keys/values
   and causally to the earlier NS-tokens of the SAME candidate. ``forward_two_stage`` is the whole
   model this way, for training (gradients flow back through Stage I) and serving. Its slow,
   obviously-correct twin is the model's full forward of every candidate, ``model(batch.expand_per_candidate())``.

2. ``EventLog``: the raw events of each user (the feature store) and the history WINDOW the model
   reads (at most ``max_len`` events; the oldest are dropped ``drop_block`` at a time).

3. ``UserCache`` / ``UserCacheStore``: one user's S-side state across requests, and a byte-bounded LRU
   store of them. The next request of a user computes only what changed and reuses what stays exact.
   Per layer it keeps the keys/values of the layer's key window and the layer INPUTS of its query
   positions, in pre-allocated buffers that an append only writes new rows into (``_Rows``).

Memory of Stage II (no per-candidate copy of the S keys/values)
----------------------------------------------------------------
The full forward gathers ``k_s[request_index]``: every candidate owns a copy of its request's history
keys, memory ``C * (L_S + L_NS)`` per request. Stage II instead PACKS a request's candidates into one
query block ``(R, H, C_max * L_NS, hd)`` and attends in two parts that share ONE softmax:

- against the request's S keys ``(R, H, L_S, hd)``: one batched matmul per request, no copy;
- against the candidate's own NS keys ``(R, H, C_max, L_NS, L_NS)`` (causal): tiny.

The two score blocks are laid side by side in one row of ``L_S + L_NS`` scores and normalized by one
fused softmax (``impl="split"``, the default): exactly the softmax over ``[S keys ; own NS keys]`` that
the full forward computes. Keys and values per
request are ``L_S + C * L_NS`` rows. The alternative ``impl="sdpa"`` uses one fused
``scaled_dot_product_attention`` per request with keys ``[S ; all C candidates' NS]`` and a
block-diagonal causal mask: same memory for K/V, but its (masked, wasted) NS x NS rectangle grows as
``(C * L_NS)^2``, i.e. quadratically in the candidate count (at C=64, L_NS=8, L_S=256 it is twice the
useful S part). ``bench_cache`` measures both. Requests with fewer candidates than ``C_max`` get empty
(zero) slots in the packed block; their outputs are dropped.

What is exact across requests, and why (the paper's "What exactness needs")
---------------------------------------------------------------------------
A cached value can be reused only if it would be computed identically now. With the timestamp-aware
merge an S-token depends on its own event only (no position index, no request time: see
``tokenizer.py``), so here is the complete rule, layer by layer (0-based; ``q_l`` = S-tokens that issue
queries at layer l, ``model.layer_queries``; layer l's input is the output of the last ``q_{l-1}``
positions, so its KEY WINDOW is the last ``W_l = q_{l-1}`` events, ``W_0`` = the whole history window):

- the input tokens and the keys/values of a position depend on that position's layer input only:
  they are reusable whenever that input is;
- the output of position j at layer l attends to the keys ``[window start, j]``: it is reusable iff
  the layer's window start did not move and every input up to j is reusable.

Consequences (what ``UserCache.advance`` does):

- appending events: layer 0 keys/values and outputs of old events are reused (``q_0 = L_S`` so layer 1's
  key window is the whole history too: layers 0 AND 1 are prefix-stable); at a pyramid layer l >= 2 the
  window start ``end - q_{l-1}`` moves with every append, so its outputs (the last ``q_l`` positions)
  are recomputed from the cached layer INPUTS, against keys/values that are themselves still reused
  where their inputs did not change. In a 3-layer pyramid the only moving window is the top layer's,
  which has no S queries: its keys/values of kept positions are reused, so appends are exact AND cheap.
- front truncation (the window is full): layer 0's window start moves, so every output is recomputed;
  only the tokens and layer-0 keys/values of the kept events are reused. ``EventLog`` drops the oldest
  events a BLOCK (``drop_block``) at a time, so this happens once every ``drop_block`` appended events
  instead of on every request once the window is full (``drop_block=1`` is the training pipeline's
  sliding window; counted as ``truncations`` in the stats).
- request-relative features: none live on S-tokens (the data pipeline puts them on NS-tokens). The
  timestamp-agnostic merge regroups events by sequence, so an appended event shifts later tokens: the
  store then falls back to a fresh Stage I on every request and says so (a warning and ``fallbacks``).
- ``causal=False`` (full-attention ablation): S-tokens see the candidate, no cache is possible: errors.

Cost of an append: the FLOPs are O(new events) (8 of 264 events: ~4% of a fresh Stage I's S query
positions), but at d=64 an append is bound by per-operation overhead: about 90 small tensor operations
(the tokenizer, two layers with queries, the top layer's keys/values), each costing a microsecond or more
whatever its size. The incremental path is written for that:

- few-row work runs on ONE intra-op thread with ATen's own kernels (``_few_threads``: a thread wake-up or
  a oneDNN primitive set-up costs more than the work);
- the layers run as functional ops on tensors prepared once per model (``_FastPath``): the tokenizer's
  sequence MLPs side by side, each RMSNorm's gain folded into the projection after it, the key/value and
  query projections in one matrix; rebuilt, and every cached state recomputed, when the weights change;
- attention is one ``baddbmm`` with a cached additive mask; events are checked only when a lookup fails.

``bench_cache`` (both sides on one thread, interleaved): appending 8 events to 256 costs about 0.3 ms,
13-14% of a fresh Stage I at ``small`` without pyramid, 14-16% with it (the pyramid's Stage I is cheaper,
the append the same), 13% at ``S`` (d=256) and 5% over 1,024 events; about the same against a miss's
prefill through this path, which is some 17% faster than the model's ``stage_one``. Run alone, back to
back, an append costs about 0.22 ms: after other work it finds its code out of the CPU's caches.

``mode="approx"`` reuses every previously computed state whatever moved (append-only reuse, as a plain
append-only key/value store would): cheaper after truncations and at pyramid layers, not exact; the
serving replay reports how far its scores drift.
"""

from __future__ import annotations

import itertools
import math
import operator
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.modules.module import (register_module_module_registration_hook,
                                     register_module_parameter_registration_hook)
from torch.nn.utils import parametrize

from .attention import attend
from .layers import RMSNorm
from .model import OneTrans, task_loss

# ----------------------------------------------------------------------------------------------
# 1. the request cache: Stage I once per request, Stage II per candidate


@dataclass
class LayerKV:
    """One layer's cached S keys/values of R requests: k, v (R, H, Ls_l, hd), s_real (R, Ls_l) bool."""

    k: torch.Tensor
    v: torch.Tensor
    s_real: torch.Tensor


@dataclass
class RequestCache:
    """Stage I of R requests: the S keys/values of every layer (``layers[l]`` of length Ls_l, which
    shrinks up the pyramid). Built by ``stage_one`` (a batch) or ``UserCache.request_cache`` (a user)."""

    layers: list[LayerKV]

    @property
    def n_requests(self) -> int:
        return self.layers[0].k.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for lay in self.layers for t in (lay.k, lay.v))

    @staticmethod
    def stack(caches: list["RequestCache"]) -> "RequestCache":
        """Several requests' caches as one (R = sum), each layer left-padded to the longest (masked)."""
        if not caches:
            raise ValueError("RequestCache.stack needs at least one cache")
        out = []
        for lays in zip(*(c.layers for c in caches)):
            n = max(1, max(lay.k.shape[2] for lay in lays))  # >= 1 key: an empty history is all padding
            ks, vs, rs = [], [], []
            for lay in lays:
                pad = n - lay.k.shape[2]
                ks.append(F.pad(lay.k, (0, 0, pad, 0)))  # (r, H, n, hd), zeros on the left
                vs.append(F.pad(lay.v, (0, 0, pad, 0)))
                rs.append(F.pad(lay.s_real, (pad, 0), value=False))  # (r, n)
            out.append(LayerKV(torch.cat(ks), torch.cat(vs), torch.cat(rs)))
        return RequestCache(out)


def require_cacheable(model) -> None:
    """Stage I runs the S-tokens alone: only valid when an S-token never sees an NS-token (causal)."""
    if not model.config.causal:
        raise ValueError("KV caching needs causal attention: with ModelConfig.causal=False every S-token attends "
                         "to the candidate's NS-tokens, so the S side cannot be computed once per request")


def stage_one(model, x_s: torch.Tensor, s_real: torch.Tensor) -> RequestCache:
    """Stage I: the S-tokens (R, L_S, d) of R requests through every layer, once. Keeps each layer's
    S keys/values (the S outputs feed the next layer only). Differentiable (training)."""
    require_cacheable(model)
    layers = []
    for block, n_q in zip(model.blocks, model.schedule(x_s.shape[1])):
        x_next, (k, v) = block.forward_s(x_s, s_real, n_q)  # (R, n_q, d) or None, 2 x (R, H, Ls, hd)
        layers.append(LayerKV(k, v, s_real))
        s_real = s_real[:, s_real.shape[1] - n_q:]  # (R, n_q): the kept tail
        x_s = x_next if x_next is not None else x_s[:, x_s.shape[1]:]
    return RequestCache(layers)


class _Packing:
    """Where each candidate goes in the packed query block: request r, slot c (0..C_max-1)."""

    def __init__(self, request_index: torch.Tensor, n_requests: int):
        ri = request_index
        b = ri.shape[0]
        counts = torch.bincount(ri, minlength=n_requests)  # (R,)
        self.r, self.c_max = n_requests, max(1, int(counts.max())) if b else 1
        order = torch.argsort(ri, stable=True)  # candidates grouped by request, their order kept
        first = torch.cumsum(counts, 0) - counts  # (R,) first position of each request in `order`
        slot = torch.empty_like(ri)
        slot[order] = torch.arange(b, device=ri.device) - first[ri[order]]
        self.index = ri * self.c_max + slot  # (B,) row of each candidate in the (R * C_max) packed rows
        # the common case (candidates grouped and sorted, equal counts): packing is a reshape
        self.identity = b == n_requests * self.c_max and bool((self.index == torch.arange(b, device=ri.device)).all())

    def pack(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        """(B, L_NS, d) -> (R, H, C_max * L_NS, hd), empty slots zero."""
        if not self.identity:
            x = x.new_zeros(self.r * self.c_max, *x.shape[1:]).index_copy(0, self.index, x)
        return rearrange(x, "(r c) n (h e) -> r h (c n) e", r=self.r, h=n_heads)

    def unpack(self, y: torch.Tensor, n_ns: int) -> torch.Tensor:
        """(R, H, C_max * L_NS, hd) -> (B, L_NS, d)."""
        y = rearrange(y, "r h (c n) e -> (r c) n (h e)", n=n_ns)
        return y if self.identity else y[self.index]


def _attend_split(q, k_n, v_n, k_s, v_s, s_real, n_ns: int, dropout_p: float):
    """One softmax over [S keys of the request ; own causal NS keys], packed per request.

    q, k_n, v_n (R, H, C*L_NS, hd); k_s, v_s (R, H, Ls, hd); s_real (R, Ls). Returns (R, H, C*L_NS, hd).
    The S scores are one matmul per request against its S keys (no copy of them per candidate); the NS
    scores are per candidate (L_NS x L_NS). Both go side by side into one row of length Ls + L_NS, so one
    fused softmax normalizes over the same keys as the full forward's attention.
    """
    r, h, cl, hd = q.shape
    c, ls = cl // n_ns, k_s.shape[2]
    scale = hd**-0.5
    neg = torch.finfo(q.dtype).min
    bias_s = torch.zeros(r, 1, 1, ls, dtype=q.dtype, device=q.device).masked_fill(~s_real[:, None, None, :], neg)
    s_s = torch.baddbmm(bias_s.expand(r, h, 1, ls).reshape(r * h, 1, ls), q.reshape(r * h, cl, hd),
                        k_s.reshape(r * h, ls, hd).transpose(1, 2), alpha=scale)  # (R*H, C*L_NS, Ls): scale*qk + mask
    qc = q.view(r, h, c, n_ns, hd)
    s_n = (qc @ k_n.view(r, h, c, n_ns, hd).transpose(-2, -1)) * scale  # (R, H, C, L_NS, L_NS)
    causal = torch.ones(n_ns, n_ns, dtype=torch.bool, device=q.device).tril()
    s_n = s_n.masked_fill(~causal, float("-inf"))  # the diagonal is always allowed: never an empty row
    p = torch.cat([s_s.view(r, h, c, n_ns, ls), s_n], dim=-1).softmax(-1)  # (R, H, C, L_NS, Ls + L_NS)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    out = p[..., ls:] @ v_n.view(r, h, c, n_ns, hd)  # (R, H, C, L_NS, hd)
    if ls:
        out = out.view(r, h, cl, hd) + p[..., :ls].reshape(r, h, cl, ls) @ v_s  # (R, H, C*L_NS, hd)
    return out.view(r, h, cl, hd)


def _attend_sdpa(q, k_n, v_n, k_s, v_s, s_real, n_ns: int, dropout_p: float):
    """One fused SDPA per request: keys [S ; every candidate's NS], block-diagonal causal NS mask."""
    r, _, cl, _ = q.shape
    c = cl // n_ns
    blocks = torch.block_diag(*[torch.ones(n_ns, n_ns, dtype=torch.bool, device=q.device).tril()] * c)
    mask = torch.cat([s_real[:, None, None, :].expand(r, 1, cl, s_real.shape[1]),
                      blocks[None, None].expand(r, 1, cl, cl)], dim=-1)  # (R, 1, C*L_NS, Ls + C*L_NS)
    k = torch.cat([k_s, k_n], dim=2)  # (R, H, Ls + C*L_NS, hd): the request's S keys once
    v = torch.cat([v_s, v_n], dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


IMPLS = {"split": _attend_split, "sdpa": _attend_sdpa}


def _ns_layer(block, x_ns: torch.Tensor, layer: LayerKV, pack: _Packing, impl: str) -> torch.Tensor:
    """Stage II of one block: the NS path of ``OneTransBlock._update`` with packed attention."""
    attn = block.attn
    h = block.norm1(x_ns)  # (B, L_NS, d)
    q = attn.q.forward_ns(h)  # (B, L_NS, d)
    k_n, v_n = attn.kv.forward_ns(h).chunk(2, dim=-1)  # 2 x (B, L_NS, d): the same split as kv_s
    heads, n_ns = attn.n_heads, attn.n_ns
    p = attn.dropout if attn.training else 0.0
    o = IMPLS[impl](pack.pack(q, heads), pack.pack(k_n, heads), pack.pack(v_n, heads),
                    layer.k, layer.v, layer.s_real, n_ns, p)  # (R, H, C*L_NS, hd)
    return block.residual_ffn(x_ns, attn.o.forward_ns(pack.unpack(o, n_ns)), ns=True)  # (B, L_NS, d)


def stage_two(model, cache: RequestCache, x_ns: torch.Tensor, request_index: torch.Tensor,
              impl: str = "split") -> torch.Tensor:
    """Stage II: NS-tokens (B, L_NS, d) of candidates of the cached requests -> final states (B, L_NS, d)."""
    if impl not in IMPLS:
        raise ValueError(f"stage_two: impl must be one of {sorted(IMPLS)}, got {impl!r}")
    if len(cache.layers) != len(model.blocks):
        raise ValueError(f"cache has {len(cache.layers)} layers, the model {len(model.blocks)}")
    pack = _Packing(request_index, cache.n_requests)
    for block, layer in zip(model.blocks, cache.layers):
        x_ns = _ns_layer(block, x_ns, layer, pack, impl)
    return model.norm_f(x_ns)


def score(model, cache: RequestCache, ns: dict, request_index: torch.Tensor, impl: str = "split") -> torch.Tensor:
    """Logits (B, n_tasks) of candidates (``ns``: NS feature ids, as in ``Batch.ns``) of cached requests.
    An empty candidate list gives an empty (0, n_tasks) tensor."""
    if request_index.numel() == 0:
        return torch.zeros(0, model.n_tasks, device=request_index.device)
    if int(request_index.max()) >= cache.n_requests or int(request_index.min()) < 0:
        raise ValueError(f"request_index must be in [0, {cache.n_requests}) (the cached requests)")
    x_ns = model.tokenizer.ns(model.tokenizer.embeddings, ns)  # (B, L_NS, d)
    return model.head(stage_two(model, cache, x_ns, request_index, impl))


def forward_two_stage(model, batch, targets: torch.Tensor | None = None, impl: str = "split"):
    """The model with the S side once per REQUEST: ``(logits (B, n_tasks), loss or None)``, equal to
    ``model(batch, targets)`` (which runs the S side once per candidate). Use it to train: the loss
    back-propagates through Stage I once per request."""
    require_cacheable(model)
    if batch.n_candidates == 0:
        raise ValueError("batch has no candidates: nothing to score (and the mean loss of zero samples is undefined)")
    model.check_batch(batch)
    x_s, s_real, x_ns = model.tokenizer(batch)  # (R, L_S, d), (R, L_S), (B, L_NS, d)
    cache = stage_one(model, x_s, s_real)
    logits = model.head(stage_two(model, cache, x_ns, batch.request_index, impl))  # (B, n_tasks)
    return logits, task_loss(logits, targets)


class RequestLevel(nn.Module):
    """``model`` with its forward replaced by ``forward_two_stage``: the S side once per request.

    The same parameters (``wrapper.model``); a module of its own so that DistributedDataParallel and
    ``torch.compile`` can wrap it like any model (DDP only syncs gradients of a forward that runs
    through its own ``forward``). The trainer uses it for every causal OneTrans.
    """

    def __init__(self, model):
        super().__init__()
        require_cacheable(model)
        self.model = model

    def forward(self, batch, targets: torch.Tensor | None = None):
        return forward_two_stage(self.model, batch, targets)


def supports_request_level(model) -> bool:
    """True for models that ``RequestLevel`` can wrap: a causal OneTrans."""
    return isinstance(model, OneTrans) and model.config.causal


def forward_per_candidate(model, batch) -> torch.Tensor:
    """The slow, obviously-correct twin: the full forward of every candidate with its own copy of the
    request's history (R = B). Logits (B, n_tasks)."""
    return model(batch.expand_per_candidate())[0]


def estimate_two_stage_flops(model, n_candidates: int, seq_len: int | None = None) -> dict[str, int]:
    """Analytic FLOPs (2 per multiply-add, matmuls only) of ONE request scored in two stages, next to
    ``model.estimate_flops`` (the full forward). Stage I: the S side once; Stage II: per candidate, the
    NS-tokens against (L_S + own L_NS) keys."""
    cfg = model.config
    d, f, n_ns = cfg.d_model, cfg.ffn_mult * cfg.d_model, model.n_ns
    length = cfg.max_len if seq_len is None else seq_len
    one = model.estimate_flops(1, 1, seq_len=length)  # reuse its tokenizer / heads counts
    s_side = ns_side = 0
    ls = length + (model.n_s - cfg.max_len)
    for n_q in model.schedule(ls):
        s_side += 2 * ls * d * 2 * d + 2 * n_q * d * d * 2  # K, V of every S-token; Q, W_O of S queries
        s_side += 2 * 2 * n_q * ls * d + 2 * n_q * 2 * d * f  # S attention (dense rectangle), S FFN
        ns_side += 2 * n_ns * d * d * 4 + 2 * 2 * n_ns * (ls + n_ns) * d + 2 * n_ns * 2 * d * f
        ls = n_q
    tok_s = length * 2 * sum(m.in_features * m.out_features for m in model.tokenizer.seq.mlps[0] if hasattr(m, "in_features"))
    tok_ns = one["tokenizer"] - tok_s
    out = {"stage_one": tok_s + s_side, "stage_two": n_candidates * (tok_ns + ns_side + one["heads"])}
    out["total"] = out["stage_one"] + out["stage_two"]
    return out


# ----------------------------------------------------------------------------------------------
# 2. events and the history window


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

    def window(self, user) -> Window:
        if user not in self._win:
            raise UnknownUserError(f"user {user!r} has no history: nothing is known about it. Append its events first "
                                   f"(a cold-start user: EventLog.append(user, Events.empty(fields)) scores an empty history)")
        return self._win[user]


# ----------------------------------------------------------------------------------------------
# 3. the cross-request user cache


class _Rows:
    """Rows ``[start, end)`` (absolute event positions) of a pre-allocated buffer, along dimension ``dim``.

    ``update(start, keep_end, rows)`` keeps the cached rows ``[start, keep_end)`` where they are and writes
    ``rows`` after them: an append copies only the new rows (no O(L) ``cat`` of the whole cache per
    request). When the buffer is full it moves the kept rows into a new one with room for half as many
    again (at least 16), so copying is amortized O(1) per appended row; a window whose front moves just
    leaves dead rows in front until then. Views returned by ``view()`` stay valid until the next update.
    """

    def __init__(self, dim: int):
        self.dim, self.buf, self.base, self.start, self.end = dim, None, 0, 0, 0

    def view(self, start: int | None = None, end: int | None = None) -> torch.Tensor:
        start, end = self.start if start is None else start, self.end if end is None else end
        return self.buf.narrow(self.dim, start - self.base, end - start)

    def update(self, start: int, keep_end: int, rows: torch.Tensor) -> None:
        end = keep_end + rows.shape[self.dim]
        if self.buf is None or start < self.base or end - self.base > self.buf.shape[self.dim]:
            n = end - start
            shape = list(rows.shape)
            shape[self.dim] = n + max(16, n // 2)
            new = rows.new_empty(shape)
            if keep_end > start:
                new.narrow(self.dim, 0, keep_end - start).copy_(self.view(start, keep_end))
            self.buf, self.base = new, start
        self.buf.narrow(self.dim, keep_end - self.base, rows.shape[self.dim]).copy_(rows)
        self.start, self.end = start, end

    @property
    def nbytes(self) -> int:
        return 0 if self.buf is None else self.buf.untyped_storage().nbytes()


class _LayerState:
    """One layer's cached S-side of one user (absolute event positions, no padding): ``kv`` keys and values
    (2, H, n, hd) over the key window ``[kv.start, end)``; ``x`` (m, d) layer inputs of the query positions
    ``[x.start, end)`` (kept to recompute outputs whose key window moved; none at the top layer)."""

    def __init__(self):
        self.kv, self.x = _Rows(2), _Rows(0)


@dataclass
class UserCache:
    """One user's S-side state across requests. Life cycle: ``advance`` (prefill when empty, then append
    and truncate: computes only what changed), ``request_cache`` (view for Stage II), dropped on eviction."""

    start: int = 0  # absolute window [start, end)
    end: int = 0
    last_time: float = float("-inf")
    weights_id: int = -1  # the model weights the states were computed with (``_FastPath.weights_id``)
    layers: list[_LayerState] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes held: the full capacity of every pre-allocated buffer (see ``_Rows``)."""
        return sum(lay.kv.nbytes + lay.x.nbytes for lay in self.layers)

    def request_cache(self) -> RequestCache:
        """This user as a one-request ``RequestCache``: views of the buffers, no copy, valid until the next
        ``advance`` (which writes into them); an empty history is one padding key."""
        out = []
        for lay in self.layers:
            kv = lay.kv.view()
            k, v = kv[0, None], kv[1, None]  # (1, H, n, hd)
            real = torch.ones(1, k.shape[2], dtype=torch.bool, device=k.device)
            if k.shape[2] == 0:
                k, v = F.pad(k, (0, 0, 1, 0)), F.pad(v, (0, 0, 1, 0))
                real = torch.zeros(1, 1, dtype=torch.bool, device=k.device)
            out.append(LayerKV(k, v, real))
        return RequestCache(out)

    @torch.no_grad()
    def advance(self, model, window: Window, approx: bool = False) -> dict:
        """Bring the cache to ``window`` (which must extend the cached one: same or later start, same or later
        end). Recomputes exactly what changed (see the module docstring); ``approx`` reuses every state
        computed before. Returns counts: positions computed / reused per layer, and whether a window moved."""
        if model.config.seq_merge != "timestamp_aware":
            raise ValueError("UserCache needs prefix-stable S-tokens (seq_merge='timestamp_aware'); use fresh_stage_one")
        if model.training and model.config.dropout > 0:
            raise ValueError("UserCache computes the model in eval mode (no dropout), for serving: call model.eval() "
                             f"first (the model is in training mode with dropout={model.config.dropout})")
        if self.layers and (window.start < self.start or window.end < self.end):
            raise ValueError(f"window [{window.start}, {window.end}) does not extend the cached one [{self.start}, "
                             f"{self.end}): histories are append-only and their front only moves forward")
        fp = _fast_path(model)
        stale = bool(self.layers) and self.weights_id != fp.weights_id  # computed with other weights: recompute
        fresh = not self.layers or window.start >= self.end or stale  # (or nothing cached is in the window)
        start, end = window.start, window.end
        c_end = start if fresh else self.end  # cached positions: [start, c_end)
        # times of the last cached event and of the new ones, in one read (a fresh state: the last event's only)
        times = window.events.time[-1:].tolist() if fresh else window.events.time[c_end - 1 - start:].tolist()
        if not fresh and times[0] != self.last_time:
            raise ValueError(f"window's event {self.end - 1} has time {times[0]}, the cached one {self.last_time}: "
                             "this window is not the cached history plus new events")
        # (new events older than the cached ones cannot get here: ``Events`` are in time order)
        # plan (integers only): per layer, the key window, the query positions and where recomputing starts
        plan, u = [], c_end  # u: first position whose layer input is new or changed (inputs before u are as cached)
        info = {"computed": [], "reused": [], "window_moved": [], "fresh": fresh, "stale": stale}
        rows = end - c_end  # the most rows any step computes
        for layer, q in enumerate(model.layer_queries):
            w = end - start if layer == 0 else model.layer_queries[layer - 1]
            k_start, x_start = max(start, end - w), max(start, end - q)  # key window, query positions
            # outputs of the query positions [x_start, end) are exact as cached only up to u, and only if the
            # layer's key window start did not move (approx: reuse whatever was computed before)
            moved = not fresh and k_start != self.layers[layer].kv.start
            r = x_start if (moved and not approx) else max(x_start, u)  # recompute the outputs of [r, end)
            plan.append((u, r, k_start, x_start, q))
            info["computed"].append(end - r if q else 0)
            info["reused"].append(r - x_start if q else 0)
            info["window_moved"].append(moved)
            rows = max(rows, end - max(k_start, u), end - r)
            u = r if q else end  # the next layer's inputs changed from r on (nothing above the top)
        with _few_threads(rows):  # the largest computation decides (an append: a handful of rows throughout)
            x_new = _tokenize(model, fp, window.events, c_end - start)  # (end - c_end, d); bad events raise here
            if fresh:  # (only now: a failed tokenization leaves the cached state as it was)
                self.layers, self.weights_id = [_LayerState() for _ in model.blocks], fp.weights_id
            for bp, st, (u, r, k_start, x_start, q) in zip(fp.blocks, self.layers, plan):
                x_new = _advance_layer(bp, st, x_new, u, r, end, k_start, x_start, q)
        self.start, self.end = start, end
        if times:
            self.last_time = times[-1]
        return info


class _BlockPath:
    """The S side of one ``OneTransBlock`` as plain tensors (eval: no dropout), for ``UserCache.advance``.

    Each RMSNorm gain is folded into the projection that follows it, so that a norm costs three small ops
    (``_rms_scale``: 2.7 us on 8 x 64 rows here, where ``F.rms_norm`` takes 7.5 us)::

        RMSNorm(x) @ W = (x * rsqrt(mean(x^2) + eps) * g) @ W = (x @ (g * sqrt(d) * W)) * rsqrt(|x|^2 + d eps)

    and the key/value and query projections, which read the same normalized rows, are one matrix
    ``[W_kv | W_q]`` (d, 3d). The top layer (no S queries) keeps only the key/value part."""

    __slots__ = ("n_heads", "d", "d_eps1", "wqkv", "wkv", "wq", "d_eps2", "wo", "w1", "w2")

    def __init__(self, block):
        attn, d = block.attn, block.norm1.weight.shape[0]
        self.n_heads, self.d = attn.n_heads, d
        g1 = block.norm1.weight[:, None] * d**0.5  # (d, 1): norm1's gain, and sqrt(d) from the scale's form
        self.d_eps1 = torch.tensor(d * block.norm1.eps, device=g1.device)  # fp32: see _rms_scale
        if block.has_s_queries:  # the top layer has no S-side query, output or FFN weights
            self.wqkv = torch.cat([attn.kv.weight, attn.q.weight], 1) * g1  # (d, 3d): [k v | q]
            self.wkv, self.wq = self.wqkv[:, : 2 * d], self.wqkv[:, 2 * d:]
            self.d_eps2 = torch.tensor(d * block.norm2.eps, device=g1.device)
            self.w1 = block.ffn.w1.weight * (block.norm2.weight[:, None] * d**0.5)  # (d, ffn): norm2 folded in
            self.wo, self.w2 = attn.o.weight, block.ffn.w2.weight
        else:
            self.wqkv = self.wkv = attn.kv.weight * g1  # (d, 2d)


def _rms_scale(x: torch.Tensor, d_eps: torch.Tensor) -> torch.Tensor:
    """rsqrt(|x|^2 + d eps) (n, 1) of rows x (n, d): RMSNorm's 1 / rms(x), over sqrt(d), in three ops; in fp32
    at least (``layers.rms_norm`` normalizes half types in fp32 too)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    return torch.addcmul(d_eps, norm, norm).rsqrt_()


class _FastPath:
    """A model's S side prepared for ``UserCache.advance``: the tokenizer's event fields' tables and fused
    MLPs (``SequenceTokenizer.fused_event_weights``) and one ``_BlockPath`` per block. The same maths as
    the model (tested against fresh Stage I and the full forward).

    An append computes a handful of rows, where every module call, parameter lookup and small op costs a
    microsecond or more, as much as the maths: these tensors are built once and reused while the weights
    stay the same (a second copy of the S-side projections per model, which a store's ``max_bytes`` does
    not count). ``_fast_path(model)`` checks on every call, and rebuilds when anything differs, that

    - every parameter an append reads (``params``) has the same version counter (bumped by any in-place
      change: optimizer steps, ``load_state_dict``) and storage (``.to()``, ``.half()`` move it);
    - the model still holds these parameters, in these modules: after any module anywhere registered a
      submodule or a parameter (``load_state_dict(assign=True)``, ``model.blocks[0].attn = ...``; counted by
      global hooks, ``_REGISTRATIONS``), it walks the model once more to compare;
    - the norms' ``eps`` are the same.

    Each build has a new ``weights_id``, which tells a ``UserCache`` that its states were computed with
    other weights. Not seen: in-place writes through ``.data`` (``p.data.mul_(2)``), which bypass version
    counters; call ``forget_weights(model)`` after them. Inference tensors (a model created under
    ``torch.inference_mode``) and parametrized weights (``torch.nn.utils.parametrize``) keep no usable
    version: such a model is prepared again on every call, with a warning."""

    _ids = itertools.count()

    def __init__(self, model):
        tok = model.tokenizer
        self.registrations = _REGISTRATIONS[0]
        sources = list(_s_side_params(model))
        self.params = [getattr(mod, name) for mod, name in sources]  # getattr: parametrized weights too
        self.norms = [mod for mod, name in sources if isinstance(mod, RMSNorm)]
        self.eps = [m.eps for m in self.norms]
        parametrized = any(parametrize.is_parametrized(mod, name) for mod, name in sources)
        self.versions = None if parametrized else _versions(self.params)
        if self.versions is None:
            warnings.warn("the model's S-side weights are inference tensors (created under torch.inference_mode) or "
                          "parametrized (torch.nn.utils.parametrize): the user cache cannot tell whether they changed, "
                          "so it recomputes every user's state on every request. Create or load the model outside "
                          "inference_mode, and remove parametrizations (parametrize.remove_parametrizations) to serve.",
                          stacklevel=4)
        self.weights_id = next(_FastPath._ids)
        with torch.no_grad():
            self.event_mlp = tok.seq.fused_event_weights(tok.embeddings)
            self.blocks = [_BlockPath(b) for b in model.blocks]

    def current(self, model) -> bool:
        """Whether the model holds the same parameters, with the same values, as when this was built."""
        if self.versions is None or _versions(self.params) != self.versions or [m.eps for m in self.norms] != self.eps:
            return False
        if self.registrations != _REGISTRATIONS[0]:  # a parameter or submodule was registered somewhere: ours?
            sources = list(_s_side_params(model))
            now = [getattr(mod, name) for mod, name in sources]
            if len(now) != len(self.params) or not all(map(operator.is_, now, self.params)):
                return False
            self.norms = [mod for mod, _ in sources if isinstance(mod, RMSNorm)]  # (a norm module may be new)
            if [m.eps for m in self.norms] != self.eps:
                return False
            self.registrations = _REGISTRATIONS[0]
        return True


# Every registration of a parameter or submodule in any module (setattr, load_state_dict(assign=True),
# ModuleList/ModuleDict items) bumps this: a fast path then checks that its model still holds its parameters.
_REGISTRATIONS = [0]


def _count_registration(*_):
    _REGISTRATIONS[0] += 1  # returns None: the hooks change nothing


register_module_parameter_registration_hook(_count_registration)
register_module_module_registration_hook(_count_registration)


def _s_side_params(model):
    """(module, parameter name) of every weight an append reads: the tokenizer's S side and each block's
    S-side weights (not the NS-tokens' token-specific ones, which live in the same modules)."""
    tok = model.tokenizer
    for f in tok.seq.fields:
        yield tok.embeddings.tables[tok.embeddings.owner[f]], "weight"
    for lin1, _, lin2 in tok.seq.mlps:
        yield from ((lin1, "weight"), (lin1, "bias"), (lin2, "weight"), (lin2, "bias"))
    yield tok.seq.type_emb, "weight"
    for b in model.blocks:
        yield from ((b.norm1, "weight"), (b.attn.kv, "weight"))
        if b.has_s_queries:
            yield from ((b.attn.q, "weight"), (b.attn.o, "weight"), (b.norm2, "weight"), (b.ffn.w1, "weight"),
                        (b.ffn.w2, "weight"))


_version_of = operator.attrgetter("_version")


def _versions(params):
    """The version counters and the storage addresses of the parameters; None for inference tensors (created
    under ``torch.inference_mode``), which keep no version counter."""
    try:
        return list(map(_version_of, params)), list(map(torch.Tensor.data_ptr, params))
    except RuntimeError:
        return None


_FAST_PATHS: "weakref.WeakKeyDictionary[nn.Module, _FastPath]" = weakref.WeakKeyDictionary()


def _fast_path(model) -> _FastPath:
    """``_FastPath(model)``, rebuilt only when its weights changed (at ``small``: 4 us to check, 160 us to
    build)."""
    fp = _FAST_PATHS.get(model)
    if fp is None or not fp.current(model):
        fp = _FAST_PATHS[model] = _FastPath(model)
    return fp


def forget_weights(model) -> None:
    """Drop what the user cache prepared from ``model``'s weights: the next append rebuilds it and recomputes
    every cached user state. Needed only after in-place writes through ``.data`` (which no version counter
    sees); training steps, ``load_state_dict`` (also with ``assign=True``), ``.to()`` and replaced modules
    are noticed."""
    _FAST_PATHS.pop(model, None)


def _advance_layer(bp: _BlockPath, st: _LayerState, x_new, u: int, r: int, end: int, k_start: int, x_start: int, q: int):
    """One layer of ``UserCache.advance``. ``x_new``: this layer's inputs of ``[u, end)`` (new or changed);
    the cached inputs before u are exact. Updates the layer's keys/values (window ``[k_start, end)``) and
    query inputs (``[x_start, end)``), and returns its outputs of ``[r, end)`` (the next layer's new inputs)."""
    d = bp.d
    # keys/values: cached rows [k_start, u) stay exact (their inputs did not change), new rows from x_new
    a = max(k_start, u)
    x_add = x_new if a == u else x_new[a - u:]  # (n_add, d)
    if q and r == a:  # the pure append: the new rows are exactly the queries; one matmul for K, V and Q
        y = torch.mm(x_add, bp.wqkv).mul_(_rms_scale(x_add, bp.d_eps1))  # (n_add, 3d) = norm1(x) @ [W_kv | W_q]
        kv_add, xq, q_rows = y[:, : 2 * d], x_add, y[:, 2 * d:]
    else:
        kv_add = torch.mm(x_add, bp.wkv).mul_(_rms_scale(x_add, bp.d_eps1))  # (n_add, 2d)
        if q:  # recompute from the cached inputs of [r, u) too (r < u), or fewer queries than new rows (r > u)
            xq = torch.cat([st.x.view(r, u), x_new]) if r < u else x_new[r - u:]
            q_rows = torch.mm(xq, bp.wq).mul_(_rms_scale(xq, bp.d_eps1))  # (end - r, d)
    st.kv.update(k_start, a, _heads(kv_add, 2, bp.n_heads))  # (2, H, end - k_start, hd)
    if not q:  # the top layer: keys/values only (and any layer above it, in a schedule ending in several 0s)
        return x_new[:0]
    st.x.update(x_start, r, xq)  # (end - x_start, d)
    if not len(xq):
        return xq
    k, v = st.kv.view().unbind(0)  # (H, end - k_start, hd) each
    q_heads = q_rows.view(len(xq), bp.n_heads, -1).transpose(0, 1)  # (H, end - r, hd)
    return _s_queries(bp, xq, q_heads, k, v)  # (end - r, d)


SMALL_WORK_ROWS = 32  # at most this many rows: one intra-op thread and ATen's own kernels (see _few_threads)


class _few_threads:
    """``with _few_threads(rows):`` runs a few-row computation on one intra-op thread, with oneDNN off. An
    append touches a handful of rows, and two fixed costs dwarf such work: with more threads every parallel
    region pays a wake-up (tens of microseconds, far more on a busy machine), and oneDNN (which PyTorch's CPU
    build uses for GELU, among others) sets up a primitive per call (GELU of 8 x 256 values: about 6 us
    through oneDNN, 1.5 us without). Both settings are global and restored on exit. (A class, not a
    generator-based context manager: that costs a microsecond more per append.)"""

    __slots__ = ("few", "saved")

    def __init__(self, rows: int):
        self.few = rows <= SMALL_WORK_ROWS

    def __enter__(self):
        if self.few:
            self.saved = torch.get_num_threads(), torch.backends.mkldnn.enabled
            torch.set_num_threads(1)
            torch.backends.mkldnn.enabled = False

    def __exit__(self, *exc):
        if self.few:
            torch.set_num_threads(self.saved[0])
            torch.backends.mkldnn.enabled = self.saved[1]


SDPA_MIN_QUERIES = 64  # fewer S queries than this: the explicit softmax (the fused CPU kernel's set-up dominates)


def _heads(y: torch.Tensor, n: int, n_heads: int) -> torch.Tensor:
    """(L, n * d) projections -> (n, H, L, hd): the ``(two h e)`` channel layout of ``MixedAttention``."""
    length, width = y.shape
    return y.view(length, n, n_heads, width // (n * n_heads)).permute(1, 2, 0, 3)


def _s_queries(bp: _BlockPath, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The S path of ``OneTransBlock`` (eval: no dropout) for the LAST m positions of a key window of one
    user, all keys real: inputs x (m, d), their queries q (H, m, hd); keys, values (H, Ls, hd) -> layer
    outputs (m, d).

    The same maths as ``OneTransBlock._update`` on S queries (tested against the model's forward), with the
    mask built directly: queries are the window's last m positions, so query i sees keys ``<= Ls - m + i``
    (a shifted lower triangle)."""
    m, ls = x.shape[0], k.shape[1]
    if m < SDPA_MIN_QUERIES:
        # attend()'s explicit softmax in three ops: the mask as an additive bias (0 / -inf), added in the matmul
        bias = _tail_bias(m, ls, x.dtype, x.device)  # (m, Ls), broadcast over heads
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=q.shape[-1] ** -0.5)  # (H, m, Ls)
        o = torch.bmm(scores.softmax(-1), v)  # (H, m, hd)
    else:
        mask = torch.ones(m, ls, dtype=torch.bool, device=x.device).tril(ls - m)  # (m, Ls)
        o = attend(q[None], k[None], v[None], mask[None, None])[0][0]  # (H, m, hd)
    z = torch.addmm(x, o.transpose(0, 1).reshape(m, -1), bp.wo)  # Z = MixedMHA(RMSNorm(X)) + X
    hidden = F.gelu(torch.mm(z, bp.w1).mul_(_rms_scale(z, bp.d_eps2)))  # (m, ffn) = GELU(RMSNorm(Z) @ W1)
    return torch.addmm(z, hidden, bp.w2)  # X' = MixedFFN(RMSNorm(Z)) + Z


@lru_cache(maxsize=16)
def _tail_bias(m: int, ls: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(m, Ls) additive mask of the last m queries of a causal window of Ls keys: 0 where query i may see
    key j (j <= Ls - m + i), -inf above that shifted diagonal. Cached (16 shapes, at most 4 MB at Ls = 1024):
    once a user's window is full, Ls stays at max_len and appends of a few events repeat the same shapes."""
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable in any mode
        return torch.full((m, ls), float("-inf"), dtype=dtype, device=device).triu(ls - m + 1)


@torch.no_grad()
def fresh_stage_one(model, window: Window) -> RequestCache:
    """Stage I of one user's window from scratch (any merge; the slow twin of ``UserCache``)."""
    ev, seq = window.events, model.tokenizer.seq
    n = len(ev)
    dev = ev.seq_type.device
    if n == 0:  # one padding position: the model needs L >= 1
        z = torch.zeros(1, dtype=torch.long, device=dev)
        ev = Events({f: z for f in seq.fields}, z, torch.zeros(1, dtype=torch.float64, device=dev))
    mask = torch.full((1, len(ev)), n > 0, dtype=torch.bool, device=dev)
    _check_events(model, window.events)
    x, real = seq(model.tokenizer.embeddings, {f: ev.fields[f][None] for f in seq.fields}, ev.seq_type[None], mask)
    return stage_one(model, x, real)


def _check_events(model, events: Events) -> None:
    """Clear errors for events the tokenizer cannot read: a missing field, ids that are not integers, a
    seq_type outside the schema's sequences, an id outside its field's vocabulary."""
    seq, emb = model.tokenizer.seq, model.tokenizer.embeddings
    missing = [f for f in seq.fields if f not in events.fields]
    if missing:
        raise ValueError(f"events lack event field(s) {missing}; expected {list(seq.fields)}")
    for name, ids in (("seq_type", events.seq_type), *((f, events.fields[f]) for f in seq.fields)):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"events: {name} must hold integer ids, got dtype {ids.dtype}")
    if not len(events):
        return
    lo, hi = (int(t) for t in torch.aminmax(events.seq_type))
    if lo < 1 or hi > seq.n_sequences:
        raise ValueError(f"events: seq_type must be in 1..{seq.n_sequences} (the schema's sequences), got range [{lo}, {hi}]")
    for name in seq.fields:
        n = emb.tables[emb.owner[name]].num_embeddings
        lo, hi = (int(t) for t in torch.aminmax(events.fields[name]))
        if lo < 0 or hi >= n:
            raise ValueError(f"events: field {name!r}: ids must be in [0, {n}) (its vocabulary size), got range [{lo}, {hi}]")


def _tokenize(model, fp: _FastPath, events: Events, first: int) -> torch.Tensor:
    """S-tokens (n, d) of ``events[first:]``, each depending on its own event only (timestamp-aware merge). On
    CPU, bad events fail the tokenizer's lookups, and only then are they checked, so that the error says what is
    wrong (a check up front would cost every append a few microseconds); on other devices they are checked
    first (an out-of-range index there is a device-side assert that spoils the device context)."""
    if events.seq_type.device.type != "cpu":  # elsewhere a bad index is a device-side assert, not an IndexError
        _check_events(model, events.slice(first))
    fields = {name: ids[first:] for name, ids in events.fields.items()}
    try:
        return model.tokenizer.seq.event_tokens(None, fields, events.seq_type[first:], fp.event_mlp)  # (n, d)
    except (KeyError, IndexError, RuntimeError):  # RuntimeError: ids of a non-integer dtype
        _check_events(model, events.slice(first))  # raises the clear error (or finds nothing wrong: re-raise)
        raise


@dataclass
class CacheStats:
    hits: int = 0  # requests served from a cached user state (only the changes computed)
    misses: int = 0  # requests that ran a fresh Stage I (user never seen, evicted, or fallback)
    evictions: int = 0
    stale: int = 0  # misses of cached users whose state was computed with other model weights (recomputed)
    truncations: int = 0  # hits whose window front moved (layer 0 recomputed from cached tokens/keys)
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
        d = dict(self.__dict__)
        d["hit_rate"] = self.hit_rate
        return d


class UserCacheStore:
    """Users' ``UserCache`` states, least recently used evicted first, at most ``max_bytes`` held.

    ``request_cache(user, window) -> RequestCache`` brings the user's state to ``window`` (an
    ``EventLog`` window) and returns it for Stage II. A user not in the store (new or evicted) gets a
    fresh Stage I over the window: the store never needs anything but the window. ``mode="approx"``
    reuses every earlier state (not exact; see the module docstring).
    """

    def __init__(self, model, max_bytes: int, mode: str = "exact"):
        require_cacheable(model)
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

    @property
    def nbytes(self) -> int:
        return self.stats.bytes_held

    def evict(self, user) -> None:
        uc = self._users.pop(user, None)
        if uc is not None:
            self.stats.bytes_held -= uc.nbytes
            self.stats.evictions += 1

    def clear(self) -> None:
        self._users.clear()
        self.stats.bytes_held = 0

    def request_cache(self, user, window: Window) -> RequestCache:
        model, st = self.model, self.stats
        if self.fallback_reason is not None:  # not prefix-stable: a fresh Stage I, nothing kept
            st.fallbacks += 1
            st.misses += 1
            return fresh_stage_one(model, window)
        uc = self._users.pop(user, None)
        if uc is not None:
            st.bytes_held -= uc.nbytes
        else:
            uc = UserCache()
        info = uc.advance(model, window, approx=self.mode == "approx")
        if info["fresh"]:
            st.misses += 1
            st.stale += info["stale"]
        else:
            st.hits += 1
            st.truncations += bool(info["window_moved"][0])
            st.pyramid_recomputes += any(m and c for m, c in zip(info["window_moved"][2:], info["computed"][2:]))
        st.positions_computed += sum(info["computed"])
        st.positions_reused += sum(info["reused"])
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
