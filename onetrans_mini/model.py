"""OneTrans: one causal Transformer over ``[S-tokens ; NS-tokens]`` (paper §3-§5), top to bottom:

1. ``pyramid_schedule``: how many S-tokens issue queries at each layer.
2. ``OneTransBlock``: the pre-norm block with mixed parameters. Its maths lives in ``_update`` alone;
   the entry points only choose which tokens go in: all of them (``forward``), the S-tokens alone
   (``forward_s``, Stage I), or the NS-tokens of candidates against cached S keys/values
   (``forward_ns``, Stage II).
3. ``OneTrans``: tokenizer -> blocks -> one tower per task over the final NS-token states. Its
   ``forward`` is the request-level one that training, evaluation and serving all run: Stage I once
   per request, Stage II per candidate (paper §5). ``forward_full`` runs every candidate with its own
   copy of the history: the slow, obviously-correct twin that the tests compare against.

Shapes: ``R`` requests, ``B`` candidates (``request_index`` (B,) maps each to its request), ``L_S``
S-tokens, ``L_NS`` NS-tokens, ``d`` width, ``H`` heads, ``hd = d / H``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from .attention import MixedAttention, Packing
from .config import ModelConfig
from .data.batching import check_batch, check_ns, require_integer
from .features import Schema
from .kv_cache import LayerKV, RequestCache
from .layers import MixedFFN, RMSNorm, residual_scale
from .tokenizer import Tokenizer, mlp, n_ns_tokens, n_s_tokens

# ----------------------------------------------------------------------------------------------
# 1. the pyramid


def pyramid_schedule(n_s: int, n_ns: int, n_layers: int, granularity: int, pyramid: bool = True) -> list[int]:
    """S-tokens that issue queries at each layer, bottom to top (paper §4).

    - Layer 0 queries all ``n_s`` S-tokens.
    - Layers in between shrink LINEARLY from ``n_s`` towards ``n_ns`` (the paper: "1190 -> 12" for
      OneTrans_S), each rounded to the nearest multiple of ``granularity``, at least one granule, never
      more than the layer below kept (a layer can only query tokens its input still has).
    - The top layer keeps ONLY the NS-tokens (0 S queries): its query count matches the number of
      NS-tokens, as in the paper. Any S-token state it produced would feed nothing (the towers read the
      NS-tokens), so computing it would be pure waste, and its weights would get no gradient
      (DistributedDataParallel fails on such parameters).

    ``pyramid=False`` (the ablation) keeps every S-token up to the top layer, which still keeps only the
    NS-tokens for the same reason: the outputs are identical to computing all queries there.

    Kept tokens are always the TAIL: with left padding these are the most recent real events, and a
    padding token is kept only when the history is shorter than that layer's count.

    >>> pyramid_schedule(1024, 12, 6, 32)
    [1024, 832, 608, 416, 224, 0]
    """
    if n_layers < 1:
        raise ValueError(f"pyramid_schedule: n_layers must be >= 1, got {n_layers}")
    if granularity < 1:
        raise ValueError(f"pyramid_schedule: granularity must be >= 1, got {granularity}")
    if n_layers == 1:
        return [0]
    if not pyramid:
        return [n_s] * (n_layers - 1) + [0]
    out = [n_s]
    for layer in range(1, n_layers - 1):
        target = n_s + (n_ns - n_s) * layer / (n_layers - 1)  # linear interpolation n_s -> n_ns
        q = granularity * math.floor(target / granularity + 0.5)  # nearest multiple (halves round up)
        q = max(q, min(granularity, n_s))
        out.append(min(q, out[-1]))
    return out + [0]


# ----------------------------------------------------------------------------------------------
# 2. the block


class OneTransBlock(nn.Module):
    """One OneTrans layer, pre-norm (paper §3)::

        Z  = MixedMHA(RMSNorm(X)) + X
        X' = MixedFFN(RMSNorm(Z)) + Z

    with X = [S-tokens ; NS-tokens]. Only the last ``n_q`` S-tokens (and all NS-tokens) issue queries
    (pyramid); queries, attention outputs, W_O and the FFN run on those tokens only, keys and values on
    all of them. ``has_s_queries=False`` (the top layer) makes an NS-only layer: it still reads the
    S-tokens as keys/values but owns no S-side query, output or FFN weights.

    Entry points (each one feeds ``_update``, where the block's maths is written once):

    - ``forward(x_s, x_ns, s_real, n_q)``: the full forward of one layer;
    - ``forward_s(x_s, s_real, n_q, past=None) -> (x_s', keys)``: Stage I, the S-tokens alone (causal: an
      S-token never sees an NS-token), also returning this layer's S keys/values (``LayerKV``) to cache.
      With ``past`` (cached keys/values of the positions before ``x_s``: the user cache's append), the
      keys are ``[past ; x_s]`` and only the new rows are computed, as nanochat's KV cache does;
    - ``forward_ns(x_ns, layer, packing) -> x_ns'``: Stage II, candidates' NS-tokens against their
      request's cached S keys/values (``LayerKV``), packed per request (``attention.Packing``).
    """

    def __init__(self, config: ModelConfig, n_ns: int, layer_idx: int = 0, has_s_queries: bool = True):
        super().__init__()
        d = config.d_model
        rs = residual_scale(config.n_layers)
        self.has_s_queries = has_s_queries
        self.norm1 = RMSNorm(d)
        self.attn = MixedAttention(d, config.n_heads, n_ns, has_s_queries=has_s_queries,
                                   shared_params=config.shared_params, mixed_out_proj=config.mixed_out_proj,
                                   causal=config.causal, dropout=config.dropout, resid_scale=rs, layer_idx=layer_idx)
        self.norm2 = RMSNorm(d)
        self.ffn = MixedFFN(d, config.ffn_mult * d, n_ns, shared_params=config.shared_params,
                            has_s=has_s_queries, resid_scale=rs)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x_s: torch.Tensor, x_ns: torch.Tensor, s_real: torch.Tensor, n_q: int):
        """x_s (N, Ls, d), x_ns (N, L_NS, d), s_real (N, Ls) -> (x_s' (N, n_q, d) or None, x_ns' (N, L_NS, d))."""
        h_s = self.norm1(x_s)  # (N, Ls, d): every S-token is a key
        kv = self.attn.kv_s(h_s)  # 2 x (N, H, Ls, hd)
        x_sq, h_sq = self._tail(x_s, h_s, n_q)
        return self._update(x_sq, h_sq, x_ns, LayerKV(*kv, s_real))

    def forward_s(self, x_s: torch.Tensor, s_real: torch.Tensor, n_q: int, past: LayerKV | None = None):
        """Stage I: x_s (N, n, d) -> (x_s' (N, n_q, d) or None at the top layer, keys ``LayerKV`` (N, H, Ls, hd)),
        where the keys are those of ``[past ; x_s]`` and the queries the last ``n_q`` rows of ``x_s``."""
        h_s = self.norm1(x_s)  # (N, n, d)
        k, v = self.attn.kv_s(h_s)  # 2 x (N, H, n, hd)
        keys = LayerKV(k, v, s_real)
        if past is not None:  # cached rows first: (N, H, Ls, hd) with Ls = past + n
            keys = LayerKV(torch.cat([past.k, k], 2), torch.cat([past.v, v], 2), torch.cat([past.s_real, s_real], 1))
        x_sq, h_sq = self._tail(x_s, h_s, n_q)
        if x_sq is None:
            return None, keys
        return self._update(x_sq, h_sq, None, keys)[0], keys

    def forward_ns(self, x_ns: torch.Tensor, layer: LayerKV, packing: Packing) -> torch.Tensor:
        """Stage II: NS-tokens (B, L_NS, d) against their request's S keys/values -> (B, L_NS, d)."""
        return self._update(None, None, x_ns, layer, packing)[1]

    def _tail(self, x_s, h_s, n_q):
        if not self.has_s_queries:
            if n_q:
                raise ValueError(f"this block has no S-token queries (top layer) but n_q={n_q}")
            return None, None
        ls = x_s.shape[1]
        return x_s[:, ls - n_q:], h_s[:, ls - n_q:]  # (N, n_q, d): the most recent S-tokens

    def _update(self, x_sq, h_sq, x_ns, keys: LayerKV, packing: Packing | None = None):
        """The block, for the S query tokens ``x_sq`` (normalized: ``h_sq``) and/or the NS-tokens ``x_ns``,
        given the S keys/values of the layer input (``keys``: one row per token row, or with ``packing``,
        one per REQUEST, the candidates packed against them: Stage II)."""
        h_ns = None if x_ns is None else self.norm1(x_ns)  # (N, L_NS, d)
        if packing is None:
            o_s, o_ns = self.attn(h_sq, h_ns, (keys.k, keys.v), keys.s_real)  # (N, n_q, d), (N, L_NS, d)
        else:
            o_s, o_ns = None, self.attn.forward_packed(h_ns, keys, packing)  # (B, L_NS, d)
        out_s = None if o_s is None else self._residual_ffn(x_sq, o_s, ns=False)  # (N, n_q, d)
        out_ns = None if o_ns is None else self._residual_ffn(x_ns, o_ns, ns=True)  # (N, L_NS, d)
        return out_s, out_ns

    def _residual_ffn(self, x: torch.Tensor, o: torch.Tensor, ns: bool) -> torch.Tensor:
        z = x + self.drop(o)  # Z = MixedMHA(RMSNorm(X)) + X
        ffn = self.ffn.forward_ns if ns else self.ffn.forward_s
        return z + self.drop(ffn(self.norm2(z)))  # X' = MixedFFN(RMSNorm(Z)) + Z


# ----------------------------------------------------------------------------------------------
# 3. the model


def task_loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
    """Mean binary cross-entropy of logits (B, n_tasks) against 0/1 targets of the same shape (None: no loss).
    The mean over candidates and tasks is the mean over tasks of each task's mean BCE (same B for each)."""
    if targets is None:
        return None
    if targets.shape != logits.shape:
        raise ValueError(f"targets must have shape (B, n_tasks)={tuple(logits.shape)}, got {tuple(targets.shape)}")
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


def maybe_checkpoint(fn, *args, enabled: bool):
    """``fn(*args)``; when ``enabled`` (a model training with ``activation_checkpointing``) and autograd is
    on, only the inputs are kept for backward and everything inside ``fn`` is computed again there (memory
    for compute; the RNG state is replayed, so dropout masks and gradients are the same)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class OneTrans(nn.Module):
    """Tokenizer -> OneTrans blocks (pyramid) -> one tower per task over the final NS-token states.

    Args:
        config: ``ModelConfig`` (see ``config.get_preset``).
        schema: the dataset's ``features.Schema``.
        vocab_sizes: ``features.Vocabularies`` or ``{feature name: vocabulary size}``.

    ``forward(batch, targets=None) -> (logits (B, n_tasks), loss or None)``; ``loss`` is the mean binary
    cross-entropy over tasks and candidates. A batch holds R requests and B candidates; the candidates of
    one request share its history, so the forward computes the S side ONCE PER REQUEST (paper §5), in
    training as in serving::

        x_s, s_real, x_ns = model.tokenizer(batch)          # (R, L_S, d), (R, L_S), (B, L_NS, d)
        cache = model.stage_one(x_s, s_real)                # Stage I: each layer's S keys/values, per request
        h_ns = model.stage_two(cache, x_ns, request_index)  # Stage II: every candidate against its request's
        logits = model.head(h_ns)                           #   cached keys (and its own NS-tokens, causally)

    ``forward_full`` is the slow twin: each candidate runs ``[S-tokens of its request ; its NS-tokens]``
    through the blocks, with its own copy of the history; tested equal. The full-attention ablation
    (``causal=False``) lets S-tokens see the candidate, so only ``forward_full`` is possible there, and
    ``forward`` runs it.

    Batch length: the schedule is sized for ``config.max_len`` events; a batch may be padded to fewer
    (the schedule is clipped, which is exactly what extra left padding would give), never to more.
    """

    def __init__(self, config: ModelConfig, schema: Schema, vocab_sizes):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config, self.schema = config, schema
        self.n_ns = n_ns_tokens(config, schema)
        if self.n_ns < 1:
            raise ValueError(f"L_NS must be >= 1: ns_tokenizer={config.ns_tokenizer!r} gives {self.n_ns} NS tokens")
        self.n_s = n_s_tokens(config, schema)  # L_S at config.max_len, [SEP]s included
        self.n_tasks = len(schema.tasks)
        if config.pyramid_schedule:
            sched = list(config.pyramid_schedule)
            if sched[0] > self.n_s:
                raise ValueError(
                    f"ModelConfig.pyramid_schedule[0]={sched[0]} exceeds L_S={self.n_s} "
                    f"(max_len={config.max_len} + {self.n_s - config.max_len} [SEP])"
                )
        else:
            sched = pyramid_schedule(self.n_s, self.n_ns, config.n_layers, config.pyramid_granularity, config.pyramid)
        self.layer_queries = sched  # S queries per layer at L_S = self.n_s

        self.tokenizer = Tokenizer(config, schema, vocab_sizes)
        self.blocks = nn.ModuleList(
            OneTransBlock(config, self.n_ns, layer_idx=i, has_s_queries=q > 0) for i, q in enumerate(sched)
        )
        self.norm_f = RMSNorm(config.d_model)
        # one tower per task over the flattened NS-token states: the tokens are not interchangeable
        # (each has its own weights), so flattening keeps which token said what; pooling would not
        self.towers = nn.ModuleList(
            mlp(self.n_ns * config.d_model, config.head_hidden, 1) for _ in schema.tasks
        )

    # -- schedule ---------------------------------------------------------------------------------
    def schedule(self, n_s: int | None = None) -> list[int]:
        """S queries per layer for a batch with ``n_s`` S-tokens ([SEP]s included; default L_S)."""
        n_s = self.n_s if n_s is None else n_s
        if n_s > self.n_s:
            raise ValueError(
                f"batch has {n_s} S-tokens but the model is sized for L_S={self.n_s} "
                f"(ModelConfig.max_len={self.config.max_len}); raise max_len or pad the batch to fewer events"
            )
        out, prev = [], n_s
        for q in self.layer_queries:
            prev = min(q, prev)
            out.append(prev)
        return out

    # -- forward: request level (Stage I + Stage II) ---------------------------------------------------
    def forward(self, batch, targets: torch.Tensor | None = None):
        if batch.n_candidates == 0:
            raise ValueError("batch has no candidates: nothing to score (and the mean loss of zero samples is undefined)")
        if not self.config.causal:  # S-tokens see the candidate: nothing is shared per request
            return self.forward_full(batch, targets)
        self.check_batch(batch)
        x_s, s_real, x_ns = self.tokenizer(batch)  # (R, L_S, d), (R, L_S), (B, L_NS, d)
        h_ns = self.stage_two(self.stage_one(x_s, s_real), x_ns, batch.request_index)  # (B, L_NS, d)
        logits = self.head(h_ns)  # (B, n_tasks)
        return logits, task_loss(logits, targets)

    def stage_one(self, x_s: torch.Tensor, s_real: torch.Tensor) -> RequestCache:
        """Stage I: the S-tokens (R, L_S, d) of R requests through every layer, alone. Keeps each layer's
        S keys/values; the S outputs only feed the next layer. Differentiable (training)."""
        if not self.config.causal:
            raise ValueError("Stage I needs causal attention: with ModelConfig.causal=False every S-token attends to "
                             "the candidate's NS-tokens, so the S side cannot be computed once per request")
        layers = []
        for block, n_q in zip(self.blocks, self.schedule(x_s.shape[1])):
            x_next, keys = self._call(block.forward_s, x_s, s_real, n_q)  # (R, n_q, d) or None, (R, H, Ls, hd)
            layers.append(keys)
            s_real = s_real[:, s_real.shape[1] - n_q:]  # (R, n_q): the kept tail
            x_s = x_next
        return RequestCache(layers)

    def stage_two(self, cache: RequestCache, x_ns: torch.Tensor, request_index: torch.Tensor) -> torch.Tensor:
        """Stage II: NS-tokens (B, L_NS, d) of candidates of the cached requests (``request_index`` (B,))
        -> final normalized NS states (B, L_NS, d)."""
        if len(cache.layers) != len(self.blocks):
            raise ValueError(f"the cache has {len(cache.layers)} layers, the model {len(self.blocks)}")
        packing = Packing(request_index, cache.n_requests)
        for block, layer in zip(self.blocks, cache.layers):
            x_ns = self._call(block.forward_ns, x_ns, layer, packing)  # (B, L_NS, d)
        return self.norm_f(x_ns)

    def score(self, cache: RequestCache, ns: dict, request_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, n_tasks) of candidates (``ns``: NS feature ids, as in ``Batch.ns``) of cached requests:
        serving's Stage II. ``request_index[b]`` is candidate b's request in ``cache``; it may be left out
        when the cache holds one request. No candidates: an empty (0, n_tasks) tensor. Checked like a batch
        (features present, integer ids, ranges on the CPU); inputs move to the model's device."""
        emb = self.tokenizer.embeddings
        device = self.norm_f.weight.device
        if request_index is None:
            if cache.n_requests != 1:
                raise ValueError(f"the cache holds {cache.n_requests} requests: pass request_index (B,) "
                                 "to say which request each candidate belongs to")
            first = self.schema.ns_features[0].name
            n = len(ns[first]) if first in ns else 0
            request_index = torch.zeros(n, dtype=torch.long, device=device)
        if not isinstance(request_index, torch.Tensor) or request_index.dim() != 1:
            raise ValueError(f"request_index must be a 1-D tensor (B,), got {getattr(request_index, 'shape', request_index)!r}")
        require_integer("request_index", request_index)
        # ids are range-checked while they are still on the CPU (cheap, and a bad id then raises a clear error
        # instead of a CUDA device-side assert); inputs already on a GPU are not synced back for it
        on_cpu = all(getattr(v, "device", torch.device("cpu")).type == "cpu" for v in ns.values())
        check_ns(ns, self.schema, emb.size, len(request_index), check_ids=on_cpu, where="ns")
        if request_index.numel() == 0:
            return torch.zeros(0, self.n_tasks, device=device)
        if int(request_index.max()) >= cache.n_requests or int(request_index.min()) < 0:
            raise ValueError(f"request_index must be in [0, {cache.n_requests}) (the cached requests)")
        request_index = request_index.to(device, torch.long)
        ns = {k: v.to(device) for k, v in ns.items()}
        x_ns = self.tokenizer.ns(self.tokenizer.embeddings, ns)  # (B, L_NS, d)
        return self.head(self.stage_two(cache, x_ns, request_index))

    # -- forward_full: the slow twin, every candidate with its own copy of the history -----------------
    def forward_full(self, batch, targets: torch.Tensor | None = None):
        self.check_batch(batch)
        x_s, s_real, x_ns = self.tokenizer(batch)  # (R, L_S, d), (R, L_S), (B, L_NS, d)
        ri = batch.request_index
        h_ns, _ = self.run_blocks(x_s[ri], s_real[ri], x_ns)  # (B, L_NS, d): each candidate with its request's S
        logits = self.head(h_ns)
        return logits, task_loss(logits, targets)

    def run_blocks(self, x_s: torch.Tensor, s_real: torch.Tensor, x_ns: torch.Tensor, return_states: bool = False):
        """The block stack on full sequences: x_s (N, L_S, d), s_real (N, L_S) bool, x_ns (N, L_NS, d).

        Returns ``(norm_f(x_ns) (N, L_NS, d), states)``; with ``return_states``, ``states[l]`` is a dict of
        layer l's outputs: ``x_s`` (N, q_l, d) (the LAST q_l S positions of the input; None at the top),
        ``s_real`` (N, q_l) and ``x_ns`` (N, L_NS, d).
        """
        states = []
        for block, n_q in zip(self.blocks, self.schedule(x_s.shape[1])):
            x_s_next, x_ns = self._call(block, x_s, x_ns, s_real, n_q)
            s_real = s_real[:, s_real.shape[1] - n_q:]  # (N, n_q) padding flags of the kept tail
            x_s = x_s_next if x_s_next is not None else x_s[:, x_s.shape[1]:]  # (N, n_q, d)
            if return_states:
                states.append({"x_s": x_s_next, "s_real": s_real, "x_ns": x_ns})
        return self.norm_f(x_ns), states

    def _call(self, fn, *args):
        """A block step ``fn(*args)``, checkpointed when training with ``activation_checkpointing``."""
        return maybe_checkpoint(fn, *args, enabled=self.config.activation_checkpointing and self.training)

    def head(self, h_ns: torch.Tensor) -> torch.Tensor:
        """Task towers: (B, L_NS, d) -> logits (B, n_tasks)."""
        flat = rearrange(h_ns, "b n d -> b (n d)")  # (B, L_NS * d)
        return torch.cat([tower(flat) for tower in self.towers], dim=-1)  # (B, n_tasks)

    # -- input checks -----------------------------------------------------------------------------
    def check_batch(self, batch) -> None:
        """Clear errors for a batch that does not match the schema. Shapes always; id ranges for a batch on
        the CPU (a few reductions; on a GPU they would synchronize every step, and a bad id there fails in
        the embedding lookup's device assert anyway)."""
        check_batch(batch, self.schema, self.tokenizer.embeddings.size, batch.seq_mask.device.type == "cpu",
                    self.config.max_len)

    # -- accounting -------------------------------------------------------------------------------
    def embedding_parameters(self):
        """The sparse feature tables (the paper trains them with Adagrad)."""
        return list(self.tokenizer.embeddings.parameters())

    def dense_parameters(self):
        """Everything else: tokenizer MLPs, type/[SEP] embeddings, blocks, towers (RMSProp in the paper)."""
        emb = {id(p) for p in self.embedding_parameters()}
        return [p for p in self.parameters() if id(p) not in emb]

    def num_params(self) -> dict[str, int]:
        """Parameter counts the way the paper reports them: dense separately from embeddings."""
        dense = sum(p.numel() for p in self.dense_parameters())
        emb = sum(p.numel() for p in self.embedding_parameters())
        blocks = sum(p.numel() for p in self.blocks.parameters())
        return {"dense": dense, "embedding": emb, "total": dense + emb, "blocks": blocks}

    def estimate_flops(self, n_candidates: int = 1, n_requests: int | None = None, seq_len: int | None = None,
                       two_stage: bool = False) -> dict[str, int]:
        """Analytic FLOPs of one forward (2 per multiply-add; matmuls only, norms/softmax ignored).

        ``n_requests`` defaults to ``n_candidates`` (one request per candidate). S-tokens are tokenized per
        request. The blocks' S side (keys/values, S queries, their FFN) runs per candidate in
        ``forward_full`` and per REQUEST with ``two_stage`` (``forward``); the NS side always per candidate.
        Attention counts the whole (queries x keys) rectangle that a dense masked kernel computes: in the
        full forward every query against ``L_S + L_NS`` keys; in Stage I the S queries against the S keys.
        Backward is about 2x forward.
        """
        cfg = self.config
        n_req = n_candidates if n_requests is None else n_requests
        d, f, n_ns = cfg.d_model, cfg.ffn_mult * cfg.d_model, self.n_ns
        length = cfg.max_len if seq_len is None else seq_len
        n_s = length + (self.n_s - cfg.max_len)

        def lin(m: nn.Linear) -> int:
            return 2 * m.in_features * m.out_features

        def seq_mlp(s: nn.Sequential) -> int:
            return lin(s[0]) + lin(s[2])

        s_runs = n_req if two_stage else n_candidates  # how often the blocks' S side runs
        ns_tok = self.tokenizer.ns
        tok_ns = sum(seq_mlp(m) for m in ns_tok.mlps) if hasattr(ns_tok, "mlps") else seq_mlp(ns_tok.mlp)
        out = {"tokenizer": n_req * length * seq_mlp(self.tokenizer.seq.mlps[0]) + n_candidates * tok_ns,
               "projections": 0, "attention": 0, "ffn": 0}  # each event goes through ONE MLP_i
        ls = n_s
        for n_q in self.schedule(n_s):
            s_keys = ls if two_stage else ls + n_ns  # Stage I's S queries see S keys only
            out["projections"] += s_runs * (2 * ls * d * 2 * d + 2 * n_q * d * d * 2)  # K, V of S; Q, W_O of S queries
            out["projections"] += n_candidates * 2 * n_ns * d * d * 4  # Q, K, V, W_O of the NS-tokens
            # q k^T and p v over all heads
            out["attention"] += s_runs * 2 * 2 * n_q * s_keys * d + n_candidates * 2 * 2 * n_ns * (ls + n_ns) * d
            out["ffn"] += (s_runs * n_q + n_candidates * n_ns) * 2 * 2 * d * f  # W1 and W2
            ls = n_q
        out["heads"] = n_candidates * self.n_tasks * seq_mlp(self.towers[0])
        out["total"] = sum(out.values())
        return out
