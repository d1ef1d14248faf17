"""Mixed causal multi-head attention over ``[S-tokens ; NS-tokens]`` (paper §3-§4).

One lower-triangular mask over the whole sequence, S-tokens first and NS-tokens last:

- an S-token sees the S-tokens before it (and itself): its state depends on its prefix only, which
  is what makes S-side keys/values cacheable per request and across requests;
- an NS-token sees ALL S-tokens (a target attention over the history) and the NS-tokens before it.

Three more rules:

- Left padding: padding S keys are masked for every query. A padding S *query* may see nothing
  else, which would make a row of -inf and a NaN softmax, so every query always sees its own key
  ("the diagonal"). A padding token therefore attends to itself only; since it is masked as a key,
  its (meaningless) state never reaches a real token.
- Query pruning (pyramid, §4): only the last ``n_q`` S-tokens (plus every NS-token) issue queries;
  keys and values still cover every token of the layer's input. The query at S position
  ``Ls - n_q + i`` keeps its absolute position for the causal mask.
- ``causal=False`` is the paper's full-attention ablation: every query sees every real key (padding
  keys stay masked). It rules out the KV cache, because S-tokens then depend on the candidate.

The fast path is ``F.scaled_dot_product_attention`` (fused kernels: FlashAttention on GPUs, a
blocked kernel on CPU). The explicit path (``q k^T / sqrt(hd) -> mask -> softmax -> @ v``) is its slow
twin for the tests, and the only path that can hand back the probabilities for plots
(``capture_attention``, which records the full forward, ``OneTrans.forward_full``).

Stage II of the request cache (``OneTrans.stage_two``) attends differently, not differently in maths:
the candidates of a request are PACKED into one query block, so that the request's S keys are read
once instead of being copied per candidate (``attend_packed``): one softmax over
``[S keys of the request ; the candidate's own NS keys (causal)]``, exactly the row the full forward
computes for that candidate.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .kv_cache import LayerKV
from .layers import MixedLinear

# ----------------------------------------------------------------------------------------------
# the mask


def attention_mask(s_real: torch.Tensor, n_s_queries: int, n_ns: int, causal: bool = True) -> torch.Tensor:
    """Boolean mask (True = may attend) for queries ``[last n_s_queries S ; n_ns NS]`` against keys
    ``[all Ls S ; n_ns NS]``.

    Args:
        s_real: (N, Ls) bool, True on real S-tokens (False on left padding) of this layer's input.
        n_s_queries: how many of the last S-tokens issue queries (0 for Stage II / the top layer).
        n_ns: NS-tokens (0 for Stage I, which runs the S-tokens alone).
        causal: False for the full-attention ablation.

    Returns: (N, 1, n_s_queries + n_ns, Ls + n_ns) bool, broadcast over heads.
    """
    n, ls = s_real.shape
    if not 0 <= n_s_queries <= ls:
        raise ValueError(f"attention_mask: n_s_queries must be in [0, Ls={ls}], got {n_s_queries}")
    dev = s_real.device
    k_pos = torch.arange(ls + n_ns, device=dev)  # absolute positions of the keys
    q_pos = torch.cat([torch.arange(ls - n_s_queries, ls, device=dev), torch.arange(ls, ls + n_ns, device=dev)])
    diag = q_pos[:, None] == k_pos[None, :]  # (Q, K): every query sees itself -> never an empty row
    key_real = torch.cat([s_real, s_real.new_ones(n, n_ns)], dim=1)  # (N, K): NS-tokens are always real
    allowed = key_real[:, None, :] | diag[None]  # (N, Q, K)
    if causal:
        allowed = allowed & (k_pos[None, :] <= q_pos[:, None])[None]  # (N, Q, K) lower-triangular
    return allowed[:, None]  # (N, 1, Q, K)


# ----------------------------------------------------------------------------------------------
# the attention itself, two twins


def attend(q, k, v, mask, dropout_p: float = 0.0, explicit: bool = False):
    """Masked multi-head attention. q (N, H, Q, hd), k and v (N, H, K, hd), mask (N, 1, Q, K) bool.

    Returns ``(out (N, H, Q, hd), probs (N, H, Q, K) or None)``; probs only on the explicit path.
    """
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p), None
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (N, H, Q, K)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)  # no NaN: the diagonal is always allowed
    p = F.dropout(probs, dropout_p) if dropout_p > 0 else probs
    return p @ v, probs  # (N, H, Q, hd)


# ----------------------------------------------------------------------------------------------
# Stage II: a request's candidates packed against its S keys


class Packing:
    """Where each candidate goes in the packed query block: request r, slot c (0..C_max-1).

    ``request_index`` (B,) maps candidates to requests; requests with fewer than ``C_max`` candidates
    get empty (zero) slots, whose outputs are dropped by ``unpack``.
    """

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


def attend_packed(q, k_n, v_n, k_s, v_s, s_real, n_ns: int, dropout_p: float = 0.0):
    """One softmax over ``[S keys of the request ; own causal NS keys]``, candidates packed per request.

    q, k_n, v_n (R, H, C*L_NS, hd); k_s, v_s (R, H, Ls, hd); s_real (R, Ls). Returns (R, H, C*L_NS, hd).

    The S scores are one matmul per request against its S keys (no per-candidate copy of them); the
    NS scores are per candidate (L_NS x L_NS, causal). Both go side by side into one row of length
    Ls + L_NS, so one softmax normalizes over the same keys as the full forward's attention. A fused
    kernel with keys ``[S ; all C candidates' NS]`` and a block-diagonal mask would instead compute a
    (C * L_NS)^2 rectangle that is almost all masked: quadratic in the number of candidates.
    """
    r, h, cl, hd = q.shape
    c, ls = cl // n_ns, k_s.shape[2]
    # a cache built under autocast (bf16) may be scored outside it, or the reverse: use the queries' dtype
    k_s, v_s = k_s.to(q.dtype), v_s.to(q.dtype)
    scale = hd**-0.5
    # (R, H, C*L_NS, Ls): every candidate against its request's keys, scaled and masked in one pass (the
    # padding keys' -inf enters as an additive bias: scale * q k^T + bias)
    bias = torch.zeros(r, h, 1, ls, dtype=q.dtype, device=q.device).masked_fill(~s_real[:, None, None, :], float("-inf"))
    s_s = torch.baddbmm(bias.view(r * h, 1, ls), q.reshape(r * h, cl, hd), k_s.reshape(r * h, ls, hd).transpose(1, 2),
                        alpha=scale).view(r, h, cl, ls)
    qc = q.view(r, h, c, n_ns, hd)
    s_n = (qc @ k_n.view(r, h, c, n_ns, hd).transpose(-2, -1)) * scale  # (R, H, C, L_NS, L_NS)
    causal = torch.ones(n_ns, n_ns, dtype=torch.bool, device=q.device).tril()
    s_n = s_n.masked_fill(~causal, float("-inf"))  # the diagonal is always allowed: never an empty row
    p = torch.cat([s_s.view(r, h, c, n_ns, ls), s_n], dim=-1).softmax(-1)  # (R, H, C, L_NS, Ls + L_NS)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    p = p.to(v_s.dtype)  # softmax may run in fp32 under autocast; the values' dtype for the products
    out = p[..., ls:] @ v_n.view(r, h, c, n_ns, hd)  # (R, H, C, L_NS, hd): own NS values
    out = out.view(r, h, cl, hd) + p[..., :ls].reshape(r, h, cl, ls) @ v_s  # + S values, one matmul per request
    return out  # (R, H, C*L_NS, hd)


@dataclass
class AttentionMap:
    """One layer's attention probabilities, as recorded by ``capture_attention``.

    ``probs`` (N, H, Q, K): queries are the last ``n_s_queries`` S-tokens then the ``n_ns`` NS-tokens;
    keys are the ``n_s_keys`` S-tokens of the layer's input then the NS-tokens.
    """

    layer: int
    probs: torch.Tensor
    n_s_queries: int
    n_s_keys: int
    n_ns: int


class MixedAttention(nn.Module):
    """Multi-head attention with mixed Q/K/V (and optionally output) projections.

    The S side and the NS side are projected separately (shared weight vs one einsum over the
    token-specific weights), then concatenated for ONE attention call. The split is also what a two-stage
    KV cache needs: Stage I computes ``kv_s`` once per request, Stage II projects only the NS-tokens
    and attends to the cached S keys/values (see ``OneTransBlock``).

    Args:
        d, n_heads: width and heads (d % n_heads == 0).
        n_ns: L_NS.
        has_s_queries: False for the top layer, where no S-token issues a query (the S-side query and
            output weights are then not allocated).
        shared_params: NS-tokens use the S weights (ablation).
        mixed_out_proj: token-specific W_O for NS-tokens. The paper leaves W_O open; we default to
            mixed (True) so that EVERY linear map of the block follows the same rule (the NS-token's
            attention output is read by its own W_O and its own FFN, as in RankMixer's per-token
            heads), at a cost of L_NS * d^2 parameters per layer and no extra FLOPs.
        causal: False for the full-attention ablation.
        layer_idx: used to label captured attention maps.
    """

    def __init__(self, d: int, n_heads: int, n_ns: int, *, has_s_queries: bool = True, shared_params: bool = False,
                 mixed_out_proj: bool = True, causal: bool = True, dropout: float = 0.0, resid_scale: float = 1.0,
                 layer_idx: int = 0):
        super().__init__()
        if d % n_heads:
            raise ValueError(f"MixedAttention: d={d} must be divisible by n_heads={n_heads}")
        self.d, self.n_heads, self.n_ns = d, n_heads, n_ns
        self.has_s_queries, self.causal, self.dropout, self.layer_idx = has_s_queries, causal, dropout, layer_idx
        self.q = MixedLinear(d, d, n_ns, shared_params=shared_params, has_s=has_s_queries)
        self.kv = MixedLinear(d, 2 * d, n_ns, shared_params=shared_params, has_s=True)  # S-tokens are always keys
        o_std = d**-0.5 * resid_scale
        # mixed_out_proj=False: NS-tokens share the S-token W_O (which must then exist even at the top layer)
        self.o = MixedLinear(d, d, n_ns, shared_params=shared_params or not mixed_out_proj,
                             has_s=has_s_queries, init_std=o_std)
        self.explicit = False  # True: explicit softmax path (tests); capture_attention also forces it
        self._record: list | None = None  # set by capture_attention; None costs nothing

    # -- projections -------------------------------------------------------------------------------
    def kv_s(self, h_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the (normalized) S-tokens: (N, Ls, d) -> 2 x (N, H, Ls, hd).

        Row j depends on token j only: with causal attention, the cacheable part of a layer.
        """
        kv = self.kv.forward_s(h_s)  # (N, Ls, 2d)
        k, v = rearrange(kv, "n l (two h e) -> two n h l e", two=2, h=self.n_heads)  # (N, H, Ls, hd) each
        return k, v

    # -- attention ---------------------------------------------------------------------------------
    def forward(self, h_s_q: torch.Tensor | None, h_ns: torch.Tensor | None,
                kv_s: tuple[torch.Tensor, torch.Tensor], s_real: torch.Tensor):
        """Attention outputs of the S query tokens and the NS-tokens.

        Args:
            h_s_q: (N, n_q, d) normalized S-tokens that issue queries: the LAST n_q S-tokens of the layer
                input (n_q may be 0), or None (Stage II: NS only).
            h_ns: (N, L_NS, d) normalized NS-tokens, or None (Stage I: S only; causal mode only).
            kv_s: keys and values of ALL S-tokens of the layer input, (N, H, Ls, hd) each (from ``kv_s``).
            s_real: (N, Ls) bool, False on padding.

        Returns: ``(o_s (N, n_q, d) or None, o_ns (N, L_NS, d) or None)``, before the residual add.
        """
        k_s, v_s = kv_s
        ls = k_s.shape[2]
        n_q = 0 if h_s_q is None else h_s_q.shape[1]
        n_ns = 0 if h_ns is None else self.n_ns
        if h_ns is None and not self.causal:
            raise RuntimeError("S-tokens alone (Stage I) need causal attention: with causal=False they see the NS-tokens")
        if h_s_q is not None and not self.has_s_queries:
            raise RuntimeError(f"layer {self.layer_idx} has no S-token queries (top layer); pass h_s_q=None")
        qs, ks, vs = [], [k_s], [v_s]
        if h_s_q is not None:  # even when n_q == 0: the empty matmul still gives the weights a (zero) gradient
            qs.append(self.q.forward_s(h_s_q))  # (N, n_q, d)
        if h_ns is not None:
            q_ns = self.q.forward_ns(h_ns)  # (N, L_NS, d)
            k_ns, v_ns = rearrange(self.kv.forward_ns(h_ns), "n l (two h e) -> two n h l e", two=2, h=self.n_heads)
            qs.append(q_ns)
            ks.append(k_ns)
            vs.append(v_ns)
        q = rearrange(_cat(qs, dim=1), "n q (h e) -> n h q e", h=self.n_heads)  # (N, H, n_q + L_NS, hd)
        k = _cat(ks, dim=2)  # (N, H, Ls + L_NS, hd)
        v = _cat(vs, dim=2)
        mask = attention_mask(s_real, n_q, n_ns, causal=self.causal)  # (N, 1, Q, K)
        p = self.dropout if self.training else 0.0
        out, probs = attend(q, k, v, mask, p, explicit=self.explicit or self._record is not None)
        if self._record is not None:
            self._record.append(AttentionMap(self.layer_idx, probs.detach(), n_q, ls, n_ns))
        out = rearrange(out, "n h q e -> n q (h e)")  # (N, n_q + L_NS, d)
        o_s = self.o.forward_s(out[:, :n_q]) if h_s_q is not None else None  # (N, n_q, d)
        o_ns = self.o.forward_ns(out[:, n_q:]) if h_ns is not None else None  # (N, L_NS, d)
        return o_s, o_ns

    def forward_packed(self, h_ns: torch.Tensor, layer: LayerKV, packing: Packing) -> torch.Tensor:
        """Stage II: the attention output (after W_O) of the normalized NS-tokens ``h_ns`` (B, L_NS, d) of
        candidates against their request's cached S keys/values ``layer`` (R requests) -> (B, L_NS, d).

        The NS half of ``forward`` with the same projections; only the attention call is packed."""
        if self._record is not None:
            raise RuntimeError("capture_attention records the full forward (per candidate, whole maps): call "
                               "model.forward_full(batch) inside `with capture_attention(model)`, not model(batch)")
        q_ns = self.q.forward_ns(h_ns)  # (B, L_NS, d)
        k_ns, v_ns = self.kv.forward_ns(h_ns).chunk(2, dim=-1)  # 2 x (B, L_NS, d): the (two h e) split of kv_s
        p = self.dropout if self.training else 0.0
        out = attend_packed(packing.pack(q_ns, self.n_heads), packing.pack(k_ns, self.n_heads),
                            packing.pack(v_ns, self.n_heads), layer.k, layer.v, layer.s_real,
                            self.n_ns, p)  # (R, H, C_max * L_NS, hd)
        return self.o.forward_ns(packing.unpack(out, self.n_ns))  # (B, L_NS, d)


def _cat(ts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim=dim)  # one part (Stage I): no copy of the keys


# ----------------------------------------------------------------------------------------------
# switches for a whole model


def _attention_modules(model: nn.Module) -> list[MixedAttention]:
    mods = [m for m in model.modules() if isinstance(m, MixedAttention)]
    if not mods:
        raise ValueError(f"{type(model).__name__} has no MixedAttention module")
    return mods


@contextmanager
def capture_attention(model: nn.Module):
    """Record every layer's attention probabilities while the full forward runs::

        with capture_attention(model) as maps:
            model.forward_full(batch)
        maps[0].probs  # (N, H, Q, K) of the bottom layer

    Inside, attention takes the explicit path (SDPA cannot return probabilities); outside, nothing
    is recorded and the fast path is back. Yields a list of ``AttentionMap``, one per layer and call.
    """
    mods = _attention_modules(model)
    maps: list[AttentionMap] = []
    for m in mods:
        m._record = maps
    try:
        yield maps
    finally:
        for m in mods:
            m._record = None


@contextmanager
def explicit_attention(model: nn.Module, on: bool = True):
    """Run the model's attention through the explicit softmax path (the slow twin) inside the block."""
    mods = _attention_modules(model)
    before = [m.explicit for m in mods]
    for m in mods:
        m.explicit = on
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.explicit = b
