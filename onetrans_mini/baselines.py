"""The paper's "separate tracks" baselines (§1, §7): encode the sequence, THEN interact with the features.

Industrial rankers before OneTrans run two modules one after the other: a sequence module compresses
the behaviour history into a few vectors, a feature-interaction module mixes them with the
non-sequential (NS) features. The sequence and the features meet once, at the hand-over. OneTrans's
claim is that letting them meet in every layer beats this at the same budget, so the baselines here
are built to be compared fairly:

- the SAME features: one ``tokenizer.FeatureEmbeddings`` (identical tables, identical embedding count)
  and the same ``tokenizer.SequenceTokenizer`` for the events;
- the SAME contract: ``Model(config: ModelConfig, schema, vocab_sizes)``,
  ``forward(batch, targets=None) -> (logits (B, n_tasks), mean BCE-with-logits or None)``,
  ``num_params() -> {"dense", "embedding", "total", ...}``, ``embedding_parameters()`` /
  ``dense_parameters()`` for the paper's two optimizers; ``config.activation_checkpointing`` recomputes
  each sequence / interaction block in backward, as OneTrans does with its blocks;
- a MATCHED dense budget: ``matched_config`` picks the baseline's ``d_model`` so that its dense
  parameter count is within ``tol`` of OneTrans at the same preset.

Two baselines, top to bottom:

1. ``DinDcnV2`` ("din-dcnv2", the paper's production baseline): DIN target attention of the candidate
   item over the events -> one user-interest vector; DCNv2 cross network in parallel with a deep MLP
   over ``[all NS embeddings ; interest]``; one tower per task.
2. ``RankMixerTransformer`` ("rankmixer-transformer", the paper's strongest baseline): a pre-norm
   Transformer over the S-tokens pooled into 2 sequence tokens; RankMixer over
   ``[NS tokens ; sequence tokens]`` (parameter-free token mixing + per-token FFNs); towers over the
   mean token.

Request-level compute: every part that depends on the history alone (event tokens, the sequence
Transformer, DIN's key-side projection) runs ONCE PER REQUEST (R rows) and is gathered per candidate
with ``batch.request_index``; only what needs the candidate runs per candidate (B rows).

Shapes: ``R`` requests, ``B`` candidates, ``L`` S-tokens, ``d`` = ``config.d_model``, ``E`` = ``emb_dim``,
``F`` NS features, ``T`` RankMixer tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .config import ModelConfig
from .data.batching import check_batch
from .features import Schema
from .layers import MixedFFN, RMSNorm
from .model import OneTrans, maybe_checkpoint, task_loss
from .tokenizer import FeatureEmbeddings, SequenceTokenizer, Tokenizer, mlp, n_ns_tokens

# ----------------------------------------------------------------------------------------------
# 0. what both baselines share: the contract, the input checks, the parameter accounting


class _Baseline(nn.Module):
    """Base of the baselines: ``forward`` = ``logits(batch)`` + the loss; checks and counts."""

    name = ""

    def __init__(self, config: ModelConfig, schema: Schema, vocab_sizes):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        if not schema.ns_features:
            raise ValueError("schema has no ns_features: the feature track needs at least one")
        self.config, self.schema = config, schema
        self.n_tasks = len(schema.tasks)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, batch, targets: torch.Tensor | None = None):
        self.check_batch(batch)
        logits = self.logits(batch)  # (B, n_tasks)
        return logits, task_loss(logits, targets)

    def logits(self, batch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def run_block(self, fn, *args):
        """A block step ``fn(*args)``, checkpointed when training with ``activation_checkpointing``."""
        return maybe_checkpoint(fn, *args, enabled=self.config.activation_checkpointing and self.training)

    # -- accounting -------------------------------------------------------------------------------
    def embedding_parameters(self):
        """The sparse feature tables (identical to OneTrans's for the same schema and emb_dim)."""
        return list(self.embeddings.parameters())

    def dense_parameters(self):
        emb = {id(p) for p in self.embedding_parameters()}
        return [p for p in self.parameters() if id(p) not in emb]

    def num_params(self) -> dict[str, int]:
        """``dense`` / ``embedding`` / ``total`` as OneTrans reports them, plus the dense count of each
        track (``sequence``: event tokens and the sequence module; ``interaction``; ``towers``)."""
        dense = sum(p.numel() for p in self.dense_parameters())
        emb = sum(p.numel() for p in self.embedding_parameters())
        out = {"dense": dense, "embedding": emb, "total": dense + emb}
        for part, modules in self.parts().items():
            out[part] = sum(p.numel() for m in modules for p in m.parameters())
        return out

    def parts(self) -> dict[str, list[nn.Module]]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- input checks -----------------------------------------------------------------------------
    def check_batch(self, batch) -> None:
        """Clear errors for a batch that does not match the schema: shapes always, id ranges for CPU
        tensors only (cheap there, while on a GPU they would synchronize every batch), as OneTrans does.
        Unlike OneTrans there is no ``max_len`` limit: nothing here is sized by the history length."""
        check_batch(batch, self.schema, self.embeddings.size, check_ids=batch.seq_mask.device.type == "cpu")

    # -- sizing ----------------------------------------------------------------------------------
    @staticmethod
    def width_granule(config: ModelConfig, schema: Schema) -> int:
        """``d_model`` must be a multiple of this (``matched_config`` searches over multiples)."""
        return config.n_heads


# ----------------------------------------------------------------------------------------------
# 1. DIN + DCNv2


class TargetAttention(nn.Module):
    """DIN's activation unit (Zhou et al. 2018): the weight of event l for candidate b is
    ``a(q_b, k_l) = MLP([q, k, q - k, q * k])``, the interest ``sum_l sigmoid(a_l) * mask_l * k_l / scale``.

    As in DIN the weights are NOT softmax-normalised over the history (a user with five matching events
    is more interested than one with a single one); the sum is scaled by the constant ``1 / scale``
    (``max_len``) so its magnitude does not grow with the window.

    The first layer is linear in ``[q, k, q - k, q * k]``, so it splits into
    ``(W_q + W_d) q  +  (W_k - W_d) k  +  W_p (q * k)``: the key term runs once per REQUEST, the query
    term once per candidate, and only the product term (DIN's candidate-specific part by nature) runs per
    (candidate, event), on the request's keys gathered by ``request_index``.
    """

    def __init__(self, d: int, hidden: int, scale: float):
        super().__init__()
        self.w1 = nn.Linear(4 * d, hidden)  # over [q, k, q - k, q * k], as in DIN
        self.act = nn.PReLU(hidden)  # DIN's PReLU (Dice is its adaptive variant)
        self.w2 = nn.Linear(hidden, 1)
        self.d, self.scale = d, scale

    def forward(self, q: torch.Tensor, keys: torch.Tensor, real: torch.Tensor, request_index: torch.Tensor):
        """q (B, d) per candidate, keys (R, L, d) and real (R, L) per request -> interest (B, d)."""
        d = self.d
        w_q, w_k, w_d, w_p = self.w1.weight.split(d, dim=1)  # 4 x (hidden, d)
        k_term = keys @ (w_k - w_d).T  # (R, L, hidden): once per request
        q_term = q @ (w_q + w_d).T + self.w1.bias  # (B, hidden): once per candidate
        k_b = keys[request_index]  # (B, L, d): the request's keys, gathered
        pre = k_term[request_index] + q_term[:, None, :] + (q[:, None, :] * k_b) @ w_p.T  # (B, L, hidden)
        a = self.w2(self.act(pre.flatten(0, 1)).view_as(pre)).squeeze(-1)  # (B, L); PReLU wants channels in dim 1
        w = torch.sigmoid(a) * real[request_index]  # (B, L): padding weighs exactly 0
        return torch.einsum("bl,bld->bd", w, k_b) / self.scale  # (B, d)

    @torch.no_grad()
    def reference(self, q, keys, real, request_index):
        """Slow twin: the textbook activation unit on explicit per-candidate copies (tests only)."""
        k_b = keys[request_index]  # (B, L, d)
        qq = q[:, None, :].expand_as(k_b)
        pre = self.w1(torch.cat([qq, k_b, qq - k_b, qq * k_b], dim=-1))  # (B, L, hidden)
        a = self.w2(self.act(pre.flatten(0, 1)).view_as(pre)).squeeze(-1)
        return ((torch.sigmoid(a) * real[request_index])[..., None] * k_b).sum(1) / self.scale


class CrossNetV2(nn.Module):
    """DCNv2's full-rank cross layers (Wang et al. 2021): ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l``.

    Each layer raises the polynomial degree of the feature crosses by one; the residual keeps the lower
    degrees. Full rank (no low-rank / mixture-of-experts factorisation): D0^2 weights per layer.
    """

    def __init__(self, d_in: int, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d_in, d_in) for _ in range(n_layers))
        for lin in self.layers:  # small start: each layer begins close to the identity
            nn.init.normal_(lin.weight, std=d_in**-0.5 / math.sqrt(n_layers))
            nn.init.zeros_(lin.bias)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for lin in self.layers:
            x = x0 * lin(x) + x  # (B, D0)
        return x


class DinDcnV2(_Baseline):
    """DIN over the history + DCNv2 over the features: the paper's production baseline.

    ::

        keys      = SequenceTokenizer(events)                      (R, L, d)  once per request
        q         = Linear(concat(candidate item-side embeddings))  (B, d)
        interest  = TargetAttention(q, keys)                        (B, d)
        x0        = [all NS embeddings ; interest]                  (B, D0 = F * E + d)
        h         = [CrossNetV2(x0) ; DeepMLP(x0)]                  (B, D0 + ffn_mult * d)   (parallel DCNv2)
        logit_t   = Tower_t(h)

    ``ModelConfig`` fields used: ``emb_dim`` (tables), ``d_model`` (event tokens, query, interest, the
    activation unit's hidden width), ``n_layers`` (cross layers AND deep layers), ``ffn_mult`` (deep
    MLP width = ffn_mult * d_model), ``head_hidden`` (towers), ``max_len`` (the interest scale),
    ``seq_merge`` / ``use_sep`` (event tokens), ``dropout`` (deep MLP). Ignored: ``n_heads`` (only
    ModelConfig's own d_model % n_heads check), ``ns_tokens``, ``ns_tokenizer``, the pyramid and block
    switches. The query is the candidate's ITEM side: the NS features with ``source == "item"``.
    """

    name = "din-dcnv2"

    def __init__(self, config: ModelConfig, schema: Schema, vocab_sizes):
        super().__init__(config, schema, vocab_sizes)
        d, e = config.d_model, config.emb_dim
        self.item_features = tuple(f.name for f in schema.ns_features if f.source == "item")
        if not self.item_features:
            raise ValueError("din-dcnv2: DIN's query is the candidate item, but the schema has no NS feature with "
                             "source='item'")
        self.ns_names = tuple(f.name for f in schema.ns_features)
        self.embeddings = FeatureEmbeddings(schema, vocab_sizes, e)
        self.seq = SequenceTokenizer(config, schema)  # events -> keys (R, L, d), same as OneTrans's S-tokens
        self.query = nn.Linear(len(self.item_features) * e, d)
        self.attention = TargetAttention(d, d, scale=float(config.max_len))
        d0 = len(self.ns_names) * e + d
        deep_width = config.ffn_mult * d
        self.cross = CrossNetV2(d0, config.n_layers)
        layers, width = [], d0
        for _ in range(config.n_layers):
            layers += [nn.Linear(width, deep_width), nn.ReLU(), nn.Dropout(config.dropout)]
            width = deep_width
        self.deep = nn.Sequential(*layers)
        self.towers = nn.ModuleList(mlp(d0 + deep_width, config.head_hidden, 1) for _ in schema.tasks)
        self.d0 = d0

    def logits(self, batch) -> torch.Tensor:
        emb, ri = self.embeddings, batch.request_index
        keys, real = self.seq(emb, batch.seq, batch.seq_type, batch.seq_mask)  # (R, L, d), (R, L): per request
        ns = {n: emb(n, batch.ns[n]) for n in self.ns_names}  # each (B, E)
        q = self.query(torch.cat([ns[n] for n in self.item_features], dim=-1))  # (B, d)
        interest = self.run_block(self.attention, q, keys, real, ri)  # (B, d); its (B, L, hidden) is the largest
        x0 = torch.cat([*ns.values(), interest], dim=-1)  # (B, D0)
        h = torch.cat([self.run_block(self.cross, x0), self.run_block(self.deep, x0)], dim=-1)  # (B, D0 + ffn_mult * d)
        return torch.cat([tower(h) for tower in self.towers], dim=-1)  # (B, n_tasks)

    def parts(self):
        return {"sequence": [self.seq, self.query, self.attention], "interaction": [self.cross, self.deep],
                "towers": [self.towers]}


# ----------------------------------------------------------------------------------------------
# 2. Transformer + RankMixer


class SeqBlock(nn.Module):
    """A plain pre-norm Transformer block over S-tokens (one set of weights for all of them)::

        x = x + W_O MHA(RMSNorm(x));   x = x + FFN(RMSNorm(x))

    ``allow`` (R, 1, L, L) bool says which keys each query may see: real events only (and, when causal, not
    the future), so padding never reaches a real token. Every token may also see itself, so no row is
    empty (an empty row would be NaN): with left padding and a causal mask a padding token reads only
    itself; its output is never read.
    """

    def __init__(self, d: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.norm1 = RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm2 = RMSNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allow: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(self.norm1(x)), "r l (three h e) -> three r h l e", three=3, h=self.n_heads)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allow,
                                           dropout_p=self.dropout if self.training else 0.0)  # (R, H, L, hd)
        x = x + self.drop(self.proj(rearrange(o, "r h l e -> r l (h e)")))  # (R, L, d)
        return x + self.drop(self.ffn(self.norm2(x)))


def token_mixing(x: torch.Tensor) -> torch.Tensor:
    """RankMixer's parameter-free multi-head token mixing with H = T heads.

    Token t is cut into T heads of width d / T; output token h is the concatenation of head h of every
    input token. Every output token thus sees a slice of every input token, at zero parameters and
    zero FLOPs (a transpose), and the shape is kept, so a residual can be added.
    (B, T, d) -> (B, T, d); needs d % T == 0.
    """
    t = x.shape[1]
    return rearrange(x, "b t (h e) -> b h (t e)", h=t)  # (B, H = T, T * d / T = d)


class RankMixerLayer(nn.Module):
    """One RankMixer layer (Zhu et al. 2025), post-norm as in its paper::

        S = LayerNorm(TokenMixing(X) + X);   X' = LayerNorm(PerTokenFFN(S) + S)

    Per-token FFN: token t has its own ``W2_t GELU(W1_t x)``, stored as one (T, d, d_ff) tensor per matrix
    and applied with one einsum (``layers.MixedFFN``'s NS side, which is exactly this).
    """

    def __init__(self, d: int, d_ff: int, n_tokens: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.ffn = MixedFFN(d, d_ff, n_tokens, has_s=False)  # token-specific weights only
        self.norm2 = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.norm1(token_mixing(x) + x)  # (B, T, d)
        return self.norm2(self.drop(self.ffn.forward_ns(s)) + s)  # (B, T, d)


class RankMixerTransformer(_Baseline):
    """Transformer over the history, RankMixer over the features: the paper's strongest baseline.

    ::

        x_s, real = SequenceTokenizer(events)                   (R, L, d)   once per request
        h         = SeqBlock x n_layers (x_s), RMSNorm          (R, L, d)   once per request
        seq_tok   = [masked mean of h ; h at the newest event]  (R, 2, d)   once per request
        tokens    = [NS tokens ; seq_tok[request_index]]        (B, T = L_NS + 2, d)
        z         = RankMixerLayer x n_layers (tokens)          (B, T, d)
        logit_t   = Tower_t(mean over tokens of z)

    NS tokens come from OneTrans's own NS tokenizer (auto-split by default: ``split(MLP(concat(all NS)),
    L_NS)``, which is RankMixer's "feature tokenization"), so both models see the same tokens. The
    sequence Transformer is causal or bidirectional per ``config.causal``; like OneTrans it has no position
    embedding (order is visible to the causal mask; time enters through event fields).

    ``ModelConfig`` fields used: ``emb_dim``, ``d_model`` (all tokens), ``n_heads`` (sequence
    Transformer), ``n_layers`` (Transformer layers AND RankMixer layers), ``ffn_mult`` (both FFNs),
    ``ns_tokens`` / ``ns_tokenizer`` (L_NS), ``seq_merge`` / ``use_sep``, ``causal``, ``head_hidden``,
    ``dropout``. Needs ``d_model % T == 0`` (T = L_NS + 2) for the token mixing: ``matched_config`` picks
    such a ``d_model``.
    """

    name = "rankmixer-transformer"
    n_seq_tokens = 2  # masked mean + newest event

    def __init__(self, config: ModelConfig, schema: Schema, vocab_sizes):
        super().__init__(config, schema, vocab_sizes)
        d = config.d_model
        self.n_ns = n_ns_tokens(config, schema)
        self.n_tokens = self.n_ns + self.n_seq_tokens
        if d % self.n_tokens:
            field = "ns_tokens" if config.ns_tokenizer == "auto_split" else "ns_tokenizer (group_wise: one token per schema group)"
            raise ValueError(
                f"rankmixer-transformer: ModelConfig.d_model={d} must be divisible by the RankMixer token count "
                f"T = L_NS + {self.n_seq_tokens} = {self.n_tokens} (L_NS={self.n_ns} from ModelConfig.{field}): token "
                f"mixing cuts each token into T heads; use matched_config or change d_model"
            )
        self.tokenizer = Tokenizer(config, schema, vocab_sizes)  # same embeddings, S-tokens and NS-tokens as OneTrans
        self.embeddings = self.tokenizer.embeddings
        self.seq_blocks = nn.ModuleList(
            SeqBlock(d, config.n_heads, config.ffn_mult * d, config.dropout) for _ in range(config.n_layers)
        )
        self.seq_norm = RMSNorm(d)
        self.mixer = nn.ModuleList(
            RankMixerLayer(d, config.ffn_mult * d, self.n_tokens, config.dropout) for _ in range(config.n_layers)
        )
        self.towers = nn.ModuleList(mlp(d, config.head_hidden, 1) for _ in schema.tasks)

    def encode_sequence(self, batch) -> torch.Tensor:
        """The sequence track, once per request: (R, 2, d) sequence tokens."""
        x, real = self.tokenizer.seq(self.embeddings, batch.seq, batch.seq_type, batch.seq_mask)  # (R, L, d), (R, L)
        length = x.shape[1]
        eye = torch.eye(length, dtype=torch.bool, device=x.device)  # (L, L): a token always sees itself
        allow = real[:, None, :]  # (R, 1, L): keys that are real events
        if self.config.causal:
            allow = allow & torch.ones_like(eye).tril()  # (R, L, L): and not in the future
        allow = (allow | eye)[:, None]  # (R, 1, L, L), broadcast over heads
        for block in self.seq_blocks:
            x = self.run_block(block, x, allow)
        h = self.seq_norm(x)  # (R, L, d)
        w = real.to(h.dtype)[..., None]  # (R, L, 1)
        mean = (h * w).sum(1) / w.sum(1).clamp(min=1)  # (R, d): 0 for an empty history
        last = h[:, -1] * w[:, -1]  # (R, d): the newest event (left padding), 0 for an empty history
        return torch.stack([mean, last], dim=1)  # (R, 2, d)

    def logits(self, batch) -> torch.Tensor:
        seq_tok = self.encode_sequence(batch)[batch.request_index]  # (B, 2, d): gathered per candidate
        x_ns = self.tokenizer.ns(self.embeddings, batch.ns)  # (B, L_NS, d)
        z = torch.cat([x_ns, seq_tok], dim=1)  # (B, T, d)
        for layer in self.mixer:
            z = self.run_block(layer, z)
        pooled = z.mean(1)  # (B, d)
        return torch.cat([tower(pooled) for tower in self.towers], dim=-1)  # (B, n_tasks)

    def parts(self):
        return {"sequence": [self.tokenizer.seq, self.seq_blocks, self.seq_norm],
                "interaction": [self.tokenizer.ns, self.mixer], "towers": [self.towers]}

    @staticmethod
    def width_granule(config: ModelConfig, schema: Schema) -> int:
        t = n_ns_tokens(config, schema) + RankMixerTransformer.n_seq_tokens
        return math.lcm(config.n_heads, t)


# ----------------------------------------------------------------------------------------------
# 3. registry and the matched budget


BASELINES: dict[str, type[_Baseline]] = {"din-dcnv2": DinDcnV2, "rankmixer-transformer": RankMixerTransformer}


def baseline_class(name: str) -> type[_Baseline]:
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    return BASELINES[name]


def num_params_of(model_cls, config: ModelConfig, schema: Schema, vocab_sizes) -> dict[str, int]:
    """``model_cls(config, schema, vocab_sizes).num_params()`` built on the meta device: no memory, no init."""
    with torch.device("meta"):
        return model_cls(config, schema, vocab_sizes).num_params()


@dataclass(frozen=True)
class Matched:
    """A baseline config sized to OneTrans: both dense counts and the (identical) embedding count."""

    name: str
    config: ModelConfig
    dense: int
    onetrans_dense: int
    embedding: int
    onetrans_embedding: int

    @property
    def rel_diff(self) -> float:
        """(baseline - OneTrans) / OneTrans, dense parameters."""
        return self.dense / self.onetrans_dense - 1.0

    def __str__(self) -> str:
        return (f"{self.name}: d_model={self.config.d_model}, ffn_mult={self.config.ffn_mult}, dense {self.dense:,} vs OneTrans {self.onetrans_dense:,} "
                f"({self.rel_diff:+.1%}); embedding {self.embedding:,} (OneTrans {self.onetrans_embedding:,})")


def matched_config(name: str, onetrans_config: ModelConfig, schema: Schema, vocab_sizes, tol: float = 0.15,
                   exact_within: float = 0.05) -> Matched:
    """The baseline config whose DENSE parameter count is closest to OneTrans at ``onetrans_config``.

    Sizing rule (embedding tables are identical because ``emb_dim`` is kept):

    1. keep every field of the OneTrans config (``emb_dim``, ``n_layers``, ``ffn_mult``, ``n_heads``,
       ``head_hidden``, ...) and choose ``d_model`` only, among multiples of the baseline's width granule
       (``n_heads``; for RankMixer lcm(n_heads, T) since token mixing cuts each token into T heads): the
       one whose dense count is closest to OneTrans's;
    2. if that still misses by more than ``exact_within`` (a coarse granule: RankMixer at ``small`` steps
       d_model by 20), also let ``ffn_mult`` range over 1 .. 2 x its value, each with its closest width:
       among the pairs within ``exact_within`` the ``ffn_mult`` nearest the original, else the closest.

    Counts come from building the models on the meta device (no memory, milliseconds). Raises if the
    best is off by more than ``tol``.

    ``m = matched_config("din-dcnv2", get_preset("small"), schema, vocab); DinDcnV2(m.config, schema, vocab)``
    """
    cls = baseline_class(name)
    target = num_params_of(OneTrans, onetrans_config, schema, vocab_sizes)
    goal = target["dense"]
    g = cls.width_granule(onetrans_config, schema)
    seen: dict[tuple[int, int], int] = {}

    def dense(m: int, fm: int) -> int:  # dense count at d_model = m * g, ffn_mult = fm (memoized)
        if (m, fm) not in seen:
            cfg = onetrans_config.replace(d_model=m * g, ffn_mult=fm)
            seen[m, fm] = num_params_of(cls, cfg, schema, vocab_sizes)["dense"]
        return seen[m, fm]

    def closest_width(fm: int) -> int:
        """The multiple m of g closest to the goal (the count grows with d_model: double, then bisect)."""
        lo, hi = 1, 1
        while dense(hi, fm) < goal:
            lo, hi = hi, hi * 2
            if hi * g > 1 << 16:
                raise ValueError(f"matched_config({name!r}): no d_model up to {hi * g} reaches OneTrans's dense "
                                 f"count {goal:,}")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if dense(mid, fm) < goal else (lo, mid)
        return min((lo, hi), key=lambda m: abs(dense(m, fm) / goal - 1))

    def miss(m_fm) -> float:
        return abs(dense(*m_fm) / goal - 1)

    fm0 = onetrans_config.ffn_mult
    best = (closest_width(fm0), fm0)
    if miss(best) > exact_within:
        pairs = [(closest_width(fm), fm) for fm in range(1, 2 * fm0 + 1)]
        near = [p for p in pairs if miss(p) <= exact_within]
        best = min(near, key=lambda p: (abs(p[1] - fm0), miss(p))) if near else min(pairs, key=miss)
    cfg = onetrans_config.replace(d_model=best[0] * g, ffn_mult=best[1])
    counts = num_params_of(cls, cfg, schema, vocab_sizes)
    out = Matched(name, cfg, counts["dense"], goal, counts["embedding"], target["embedding"])
    if abs(out.rel_diff) > tol:
        raise ValueError(f"matched_config({name!r}): the closest width misses OneTrans's dense count by "
                         f"{out.rel_diff:+.1%} (tol={tol:.0%}): {out}")
    return out


def build_baseline(name: str, onetrans_config: ModelConfig, schema: Schema, vocab_sizes, tol: float = 0.15):
    """``(model, matched)``: the named baseline at OneTrans's dense budget, ready to train."""
    m = matched_config(name, onetrans_config, schema, vocab_sizes, tol=tol)
    return baseline_class(name)(m.config, schema, vocab_sizes), m
