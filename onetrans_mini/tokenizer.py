"""The unified tokenizer (paper §2): a request's behaviour sequences become S-tokens, a candidate's
non-sequential features become NS-tokens, all of width d, so that one Transformer can read them as
one sequence ``[S-tokens ; NS-tokens]``.

Pieces, each a module:

- ``FeatureEmbeddings``: one table per vocabulary (``padding_idx = PAD = 0``). Features that name
  another feature in ``vocab_of`` (the history's item ids and the candidate's item id) share its table,
  so an item means the same thing in the history and as the candidate.
- ``SequenceTokenizer``: event = concat(field embeddings); per behaviour sequence ONE MLP shared over
  its positions maps it to width d; then the sequences are merged into one S stream:
  ``timestamp_aware`` (events stay interleaved by time, a learned sequence-type embedding marks each)
  or ``timestamp_agnostic`` (events regrouped by sequence in intent order, ``[SEP]`` between groups).
- ``AutoSplitNSTokenizer``: ``split(MLP(concat(all NS embeddings)), L_NS)``, the paper's default.
- ``GroupWiseNSTokenizer``: ``[MLP_g(concat(group g)) for each schema group]``, L_NS = number of groups.
- ``Tokenizer``: all of the above for a ``Batch``.

S-tokens carry no absolute position embedding. Order is visible to the causal attention itself
(a token sees exactly its prefix), and time enters through prefix-stable event fields such as the
gap to the previous event. An index counted from the left padding or from the newest event would
change every S-token whenever an event is appended, and "time since the event, at request time"
would change with every request: either would invalidate cached S keys/values (``user_cache.py``).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
from einops import rearrange

from .config import ModelConfig
from .features import MultiCategorical, NSFeature, PAD, Schema, group_of

# ----------------------------------------------------------------------------------------------
# token counts (needed before any module exists: pyramid schedules, FLOPs, tests)


def n_ns_tokens(config: ModelConfig, schema: Schema) -> int:
    """L_NS: ``config.ns_tokens`` for the auto-split tokenizer, the number of schema groups for the
    group-wise one."""
    if config.ns_tokenizer == "group_wise":
        return len(schema.groups())
    return config.ns_tokens


def n_sep_tokens(config: ModelConfig, schema: Schema) -> int:
    """[SEP] tokens the merge inserts: one between consecutive sequences in the timestamp-agnostic merge."""
    if config.seq_merge == "timestamp_agnostic" and config.use_sep:
        return len(schema.sequences) - 1
    return 0


def n_s_tokens(config: ModelConfig, schema: Schema, seq_len: int | None = None) -> int:
    """L_S = events (``seq_len``, default ``config.max_len``) + [SEP] tokens."""
    return (config.max_len if seq_len is None else seq_len) + n_sep_tokens(config, schema)


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """The tokenizers' MLP: Linear -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


# ----------------------------------------------------------------------------------------------
# embeddings


def vocab_sizes_of(vocabs) -> dict[str, int]:
    """Accept a ``features.Vocabularies`` or a plain ``{feature name: size}`` mapping."""
    if hasattr(vocabs, "sizes"):
        return dict(vocabs.sizes())
    if isinstance(vocabs, Mapping):
        return {str(k): int(v) for k, v in vocabs.items()}
    raise TypeError(f"vocab sizes must be a Vocabularies or a {{name: size}} mapping, got {type(vocabs).__name__}")


class FeatureEmbeddings(nn.Module):
    """One ``nn.Embedding(size, emb_dim, padding_idx=PAD)`` per vocabulary of the schema.

    A feature with ``vocab_of="x"`` looks up the table of feature ``x`` (resolved transitively). The
    table's size is the owner's vocabulary size; if the sizes also list the sharing feature, both must
    agree. Multi-valued features embed as the mean of their non-PAD ids (zero when all are PAD).
    """

    def __init__(self, schema: Schema, vocab_sizes, emb_dim: int):
        super().__init__()
        sizes = vocab_sizes_of(vocab_sizes)
        feats: dict[str, NSFeature] = {f.name: f for f in (*schema.ns_features, *schema.event_fields)}
        self.owner: dict[str, str] = {name: _resolve_owner(name, feats) for name in feats}
        self.multi = {name for name, f in feats.items() if isinstance(f, MultiCategorical)}
        self.tables = nn.ModuleDict()
        for name, owner in self.owner.items():
            if "." in owner:
                raise ValueError(f"schema feature name {owner!r} must not contain '.' (it names a parameter)")
            if owner not in sizes:
                via = "" if owner == name else f" (the table of {name!r} through vocab_of)"
                raise ValueError(
                    f"vocab sizes have no entry for feature {owner!r}{via}; expected one size per schema feature, "
                    f"got sizes for {sorted(sizes)}"
                )
            n = sizes[owner]
            if n < 2:
                raise ValueError(f"vocab size of feature {owner!r} must be >= 2 (PAD and OOV are reserved), got {n}")
            if owner != name and name in sizes and sizes[name] != n:
                raise ValueError(
                    f"feature {name!r} shares the table of {owner!r} (vocab_of) but its vocab size {sizes[name]} "
                    f"differs from {owner!r}'s {n}"
                )
            if owner not in self.tables:
                self.tables[owner] = nn.Embedding(n, emb_dim, padding_idx=PAD)
        self.emb_dim = emb_dim

    def size(self, name: str) -> int:
        return self.tables[self.owner[name]].num_embeddings

    def forward(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """(...,) ids -> (..., emb_dim); multi-valued (..., max_len) ids -> (..., emb_dim) mean of non-PAD."""
        e = self.tables[self.owner[name]](ids)
        if name not in self.multi:
            return e
        n = (ids != PAD).sum(-1, keepdim=True).clamp(min=1)  # (..., 1); PAD rows embed to 0 already
        return e.sum(-2) / n


def _resolve_owner(name: str, feats: dict[str, NSFeature]) -> str:
    seen = [name]
    while getattr(feats[seen[-1]], "vocab_of", ""):
        nxt = feats[seen[-1]].vocab_of
        if nxt not in feats:
            raise ValueError(f"schema feature {seen[-1]!r} has vocab_of={nxt!r}, but the schema has no feature named {nxt!r}")
        if nxt in seen:
            raise ValueError(f"schema features share vocabularies in a cycle: {' -> '.join(seen + [nxt])}")
        seen.append(nxt)
    return seen[-1]


# ----------------------------------------------------------------------------------------------
# S-tokens


class SequenceTokenizer(nn.Module):
    """Behaviour events -> S-tokens of width d.

    ``forward(emb, seq, seq_type, seq_mask) -> (tokens (R, L_S, d), real (R, L_S) bool)``

    - event e = concat over ``schema.event_fields`` of the field embeddings (every sequence has the
      same fields here, so the same raw width);
    - sequence i (``seq_type == i``, 1-based) goes through its own MLP_i, shared over its positions;
    - ``timestamp_aware`` (default, better in the paper's ablation): the batch's time order is kept and a
      learned sequence-type embedding is added (the paper's "sequence-type indicator");
      L_S = L (the batch's padded length);
    - ``timestamp_agnostic``: each request's events are regrouped by sequence in the schema's (intent)
      order, keeping time order inside a sequence, with one learnable ``[SEP]`` token between consecutive
      sequences (always there, also after an empty sequence, so L_S = L + n_sequences - 1 is fixed) or
      none when ``use_sep=False``; still left-padded, so the tail holds the last sequence's newest events.

    Prefix stability (what a KV cache needs): in the timestamp-aware merge an S-token depends on its
    own event only (embeddings, MLP, type embedding): no position index, no request time, so appending
    newer events never changes an older token. The timestamp-agnostic merge is NOT prefix-stable across
    requests (a new event of an earlier sequence is inserted in the middle of the stream and shifts
    every token after it); it is still exact within a request (Stage I / Stage II).
    Padding positions (``seq_mask`` False) become zero vectors whatever their ids.
    """

    def __init__(self, config: ModelConfig, schema: Schema):
        super().__init__()
        d = config.d_model
        self.fields = tuple(f.name for f in schema.event_fields)
        if not self.fields:
            raise ValueError("schema has no event_fields: S-tokens need at least one per-event field")
        self.n_sequences = len(schema.sequences)
        self.merge = config.seq_merge
        d_in = len(self.fields) * config.emb_dim
        self.mlps = nn.ModuleList(mlp(d_in, max(d_in, d), d) for _ in schema.sequences)
        self.type_emb = None
        self.sep = None
        if self.merge == "timestamp_aware":
            self.type_emb = nn.Embedding(self.n_sequences + 1, d, padding_idx=0)  # 0 = padding
            nn.init.normal_(self.type_emb.weight, std=0.02)
            with torch.no_grad():
                self.type_emb.weight[0].zero_()
        elif config.use_sep and self.n_sequences > 1:  # one sequence needs no separator
            self.sep = nn.Parameter(torch.randn(d) * 0.02)
        self.n_sep = 0 if self.sep is None else self.n_sequences - 1
        self.d = d

    def forward(self, emb: FeatureEmbeddings, seq: dict[str, torch.Tensor], seq_type: torch.Tensor,
                seq_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = torch.cat([emb(name, seq[name]) for name in self.fields], dim=-1)  # (R, L, F * emb_dim)
        r, length, _ = e.shape
        x = e.new_zeros(r, length, self.d)  # (R, L, d); padding stays 0
        for i, f in enumerate(self.mlps):  # a loop over a handful of SEQUENCES, never over positions
            sel = seq_mask & (seq_type == i + 1)  # (R, L)
            # an empty selection still runs (and gives MLP_i a zero gradient): DDP needs every param used
            # (under autocast the MLP returns bf16 rows: written into the fp32 stream as they would be added)
            x = x.index_put((sel,), f(e[sel]).to(x.dtype))  # rows of sequence i through MLP_i
        if self.merge == "timestamp_aware":
            x = x + self.type_emb(seq_type * seq_mask)  # (R, L, d), type 0 (zero) on padding
            return x, seq_mask
        return self._regroup(x, seq_type, seq_mask)

    def _regroup(self, x: torch.Tensor, seq_type: torch.Tensor, real: torch.Tensor):
        """Timestamp-agnostic layout of each row: [PAD.. | seq 1 | SEP | seq 2 | SEP | ... | seq n].

        Vectorized: every input token gets a destination index, then one scatter moves them.
        """
        r, length, d = x.shape
        n, n_sep = self.n_sequences, self.n_sep
        t = length + n_sep
        onehot = nn.functional.one_hot(seq_type * real, n + 1)[..., 1:]  # (R, L, n): real tokens only
        counts = onehot.sum(1)  # (R, n) events per sequence
        n_pad = length - counts.sum(1)  # (R,)
        block = counts.clone()
        if n_sep:
            block[:, :-1] += 1  # a [SEP] closes every sequence but the last
        start = n_pad[:, None] + block.cumsum(1) - block  # (R, n) first slot of each sequence's block
        rank = onehot.cumsum(1) - 1  # (R, L, n): order of the event inside its sequence (time order kept)
        dest_real = ((start[:, None, :] + rank) * onehot).sum(-1)  # (R, L)
        dest_pad = (~real).long().cumsum(1) - 1  # (R, L): padding goes to the left, in order
        dest = torch.where(real, dest_real, dest_pad)  # (R, L) distinct slots in [0, T)
        out = x.new_zeros(r, t, d).scatter(1, dest[..., None].expand(r, length, d), x)  # (R, T, d)
        if n_sep:
            sep_dest = (start + counts)[:, :-1]  # (R, n - 1): right after each sequence but the last
            out = out.scatter(1, sep_dest[..., None].expand(r, n - 1, d), self.sep.expand(r, n - 1, d))
        out_real = torch.arange(t, device=x.device)[None, :] >= n_pad[:, None]  # (R, T): SEPs count as real
        return out, out_real


# ----------------------------------------------------------------------------------------------
# NS-tokens


class AutoSplitNSTokenizer(nn.Module):
    """``split(MLP(concat(all NS embeddings)), L_NS)``: one dense projection learns which feature
    crosses belong together (the paper's default; better than hand-made groups in its ablation)."""

    def __init__(self, config: ModelConfig, schema: Schema):
        super().__init__()
        self.names = tuple(f.name for f in schema.ns_features)
        self.n_tokens, self.d = config.ns_tokens, config.d_model
        d_in = len(self.names) * config.emb_dim
        self.mlp = mlp(d_in, max(d_in, config.d_model), self.n_tokens * config.d_model)

    def forward(self, emb: FeatureEmbeddings, ns: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.cat([emb(n, ns[n]) for n in self.names], dim=-1)  # (B, F * emb_dim)
        return rearrange(self.mlp(x), "b (n d) -> b n d", n=self.n_tokens)  # (B, L_NS, d)


class GroupWiseNSTokenizer(nn.Module):
    """``[MLP_1(concat(g_1)), ..., MLP_G(concat(g_G))]``: one token per feature group of the schema
    (``feature.group``, default its source: user / item / context)."""

    def __init__(self, config: ModelConfig, schema: Schema):
        super().__init__()
        self.groups = schema.groups()
        self.members = [tuple(f.name for f in schema.ns_features if group_of(f) == g) for g in self.groups]
        self.mlps = nn.ModuleList(
            mlp(len(m) * config.emb_dim, max(len(m) * config.emb_dim, config.d_model), config.d_model) for m in self.members
        )
        self.n_tokens = len(self.groups)

    def forward(self, emb: FeatureEmbeddings, ns: dict[str, torch.Tensor]) -> torch.Tensor:
        toks = [f(torch.cat([emb(n, ns[n]) for n in names], dim=-1)) for f, names in zip(self.mlps, self.members)]
        return torch.stack(toks, dim=1)  # (B, L_NS = groups, d)


NS_TOKENIZER_CLASSES = {"auto_split": AutoSplitNSTokenizer, "group_wise": GroupWiseNSTokenizer}


# ----------------------------------------------------------------------------------------------
# everything for a Batch


class Tokenizer(nn.Module):
    """Embeddings + sequence tokenizer + NS tokenizer.

    ``forward(batch) -> (x_s (R, L_S, d), s_real (R, L_S) bool, x_ns (B, L_NS, d))``: S-tokens once
    per REQUEST, NS-tokens once per candidate; the model gathers ``x_s[request_index]``.
    """

    def __init__(self, config: ModelConfig, schema: Schema, vocab_sizes):
        super().__init__()
        if not schema.ns_features:
            raise ValueError("schema has no ns_features: the NS tokenizer needs at least one")
        if config.ns_tokenizer not in NS_TOKENIZER_CLASSES:
            raise ValueError(f"ModelConfig.ns_tokenizer must be one of {sorted(NS_TOKENIZER_CLASSES)}, got {config.ns_tokenizer!r}")
        self.embeddings = FeatureEmbeddings(schema, vocab_sizes, config.emb_dim)
        self.seq = SequenceTokenizer(config, schema)
        self.ns = NS_TOKENIZER_CLASSES[config.ns_tokenizer](config, schema)

    def forward(self, batch):
        x_s, s_real = self.seq(self.embeddings, batch.seq, batch.seq_type, batch.seq_mask)
        x_ns = self.ns(self.embeddings, batch.ns)
        return x_s, s_real, x_ns
