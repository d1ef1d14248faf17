"""Request-level batches: the S-side once per request, the NS-side once per candidate.

A batch holds ``R`` requests and ``B >= R`` candidates. Candidate ``b`` belongs to request
``request_index[b]``. Histories are LEFT-padded to ``L_S``, so the newest real event is always the
last S-token: the pyramid (which keeps the tail of the S-tokens) then keeps the most recent real
events and never a padding token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch


@dataclass
class Batch:
    seq: dict[str, torch.Tensor]  # event field -> (R, L_S) long, left-padded with PAD=0
    seq_type: torch.Tensor  # (R, L_S) long: sequence index 1..n_sequences of each event, 0 on padding
    seq_mask: torch.Tensor  # (R, L_S) bool: True on real events
    ns: dict[str, torch.Tensor]  # NS feature -> (B,) long, or (B, max_len) long for multi-valued ones
    request_index: torch.Tensor  # (B,) long: the candidate's request, a row of the seq tensors
    labels: torch.Tensor  # (B, n_tasks) float in {0, 1}
    user: torch.Tensor  # (B,) long: user index (for UAUC / GAUC)
    request_id: torch.Tensor  # (R,) long: ids of the requests in the prepared dataset
    prob: torch.Tensor | None = None  # (B, n_tasks) true probabilities (synthetic data only)

    @property
    def n_requests(self) -> int:
        return self.seq_mask.shape[0]

    @property
    def n_candidates(self) -> int:
        return self.request_index.shape[0]

    @property
    def seq_len(self) -> int:
        return self.seq_mask.shape[1]

    def to(self, device, non_blocking: bool = False) -> "Batch":
        def mv(x):
            if isinstance(x, torch.Tensor):
                return x.to(device, non_blocking=non_blocking)
            if isinstance(x, dict):
                return {k: v.to(device, non_blocking=non_blocking) for k, v in x.items()}
            return x

        return Batch(**{f.name: mv(getattr(self, f.name)) for f in fields(self)})

    def expand_per_candidate(self) -> "Batch":
        """The same candidates with one request EACH (the S-side copied per candidate).

        This is the "full forward of every candidate" that the two-stage cache is measured against:
        ``R == B`` and ``request_index == arange(B)``.
        """
        ri = self.request_index
        return Batch(
            seq={k: v[ri] for k, v in self.seq.items()},
            seq_type=self.seq_type[ri],
            seq_mask=self.seq_mask[ri],
            ns=dict(self.ns),
            request_index=torch.arange(self.n_candidates, device=ri.device),
            labels=self.labels,
            user=self.user,
            request_id=self.request_id[ri],
            prob=self.prob,
        )

    def select_candidates(self, idx: torch.Tensor) -> "Batch":
        """A batch with candidates ``idx`` only (the requests are kept as they are)."""
        return Batch(
            seq=self.seq,
            seq_type=self.seq_type,
            seq_mask=self.seq_mask,
            ns={k: v[idx] for k, v in self.ns.items()},
            request_index=self.request_index[idx],
            labels=self.labels[idx],
            user=self.user[idx],
            request_id=self.request_id,
            prob=None if self.prob is None else self.prob[idx],
        )


def left_padded_windows(start: np.ndarray, end: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the last ``max_len`` rows of each range ``[start, end)``, left-padded.

    Returns ``idx`` (R, max_len) int64 (0 where padded) and ``mask`` (R, max_len) bool.
    """
    lo = np.maximum(start, end - max_len)
    n = end - lo  # (R,) real events kept per request
    off = np.arange(max_len)[None, :] - (max_len - n)[:, None]  # (R, max_len): <0 on padding
    mask = off >= 0
    idx = np.where(mask, lo[:, None] + off, 0)
    return idx, mask


def concat_ranges(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All rows of the ranges ``[start_r, end_r)`` concatenated, and the range ``r`` of each row."""
    counts = end - start
    owner = np.repeat(np.arange(len(start)), counts)  # (B,)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    rows = np.repeat(start, counts) + (np.arange(counts.sum()) - first)
    return rows, owner


def check_batch(batch: Batch, schema, vocab_size: Callable[[str], int], check_ids: bool = True,
                max_len: int | None = None) -> None:
    """Clear errors for a batch that does not match ``schema`` (every model calls this first).

    Shapes always; with ``check_ids`` also the id ranges (``vocab_size(name)`` rows per feature), the
    sequence types and ``request_index`` (a few reductions, which synchronize a GPU). ``max_len``: the
    most history positions the model accepts (None: any).
    """
    if batch.seq_mask.dim() != 2:
        raise ValueError(f"batch.seq_mask must be (R, L_S), got shape {tuple(batch.seq_mask.shape)}")
    r, length = batch.seq_mask.shape
    if length < 1:
        raise ValueError("batch has L_S = 0 history positions; pad histories to at least 1 (left padding)")
    if max_len is not None and length > max_len:
        raise ValueError(f"batch is padded to L_S={length} events but ModelConfig.max_len={max_len}")
    if batch.seq_mask.dtype != torch.bool:
        raise ValueError(f"batch.seq_mask must be bool, got {batch.seq_mask.dtype}")
    if tuple(batch.seq_type.shape) != (r, length):
        raise ValueError(f"batch.seq_type must be (R, L_S)={(r, length)}, got {tuple(batch.seq_type.shape)}")
    for f in schema.event_fields:
        if f.name not in batch.seq:
            raise ValueError(f"batch.seq lacks event field {f.name!r}; expected {[g.name for g in schema.event_fields]}")
        if tuple(batch.seq[f.name].shape) != (r, length):
            raise ValueError(f"batch.seq[{f.name!r}] must be (R, L_S)={(r, length)}, got {tuple(batch.seq[f.name].shape)}")
        require_integer(f"batch.seq[{f.name!r}]", batch.seq[f.name])
    require_integer("batch.seq_type", batch.seq_type)
    ri = batch.request_index
    if ri.dim() != 1:
        raise ValueError(f"batch.request_index must be (B,), got shape {tuple(ri.shape)}")
    require_integer("batch.request_index", ri)
    b = ri.shape[0]
    check_ns(batch.ns, schema, vocab_size, b, check_ids=False)
    if not check_ids:
        return
    if b and (int(ri.min()) < 0 or int(ri.max()) >= r):
        raise ValueError(f"batch.request_index must be in [0, R={r}), got range [{int(ri.min())}, {int(ri.max())}]")
    n_seq = len(schema.sequences)
    st, mask = batch.seq_type, batch.seq_mask
    if bool(((st < 1) | (st > n_seq))[mask].any()):
        raise ValueError(f"batch.seq_type must be in 1..{n_seq} (the schema's sequences) on real events")
    if bool((st[~mask] != 0).any()):
        raise ValueError("batch.seq_type must be 0 on padding (where seq_mask is False)")
    for f in schema.event_fields:
        check_id_range(f"batch.seq: field {f.name!r}", batch.seq[f.name], vocab_size(f.name))
    for f in schema.ns_features:
        check_id_range(f"batch.ns: feature {f.name!r}", batch.ns[f.name], vocab_size(f.name))


def check_ns(ns: dict, schema, vocab_size: Callable[[str], int], b: int, check_ids: bool = True,
             where: str = "batch.ns") -> None:
    """Clear errors for the NS features of ``b`` candidates (``Batch.ns``, or a serving request's): every
    feature of ``schema`` present, integer ids, shape (b,) or (b, width) for a multi-valued one; with
    ``check_ids`` also the id ranges (a reduction per feature, which synchronizes a GPU)."""
    from ..features import MultiCategorical

    for f in schema.ns_features:
        if f.name not in ns:
            raise ValueError(f"{where} lacks NS feature {f.name!r}; expected {[g.name for g in schema.ns_features]}")
        ids = ns[f.name]
        multi = isinstance(f, MultiCategorical)
        got = tuple(ids.shape)
        if not ((len(got) == 2 and got[0] == b) if multi else got == (b,)):
            raise ValueError(f"{where}[{f.name!r}] must have shape {(b, f.max_len) if multi else (b,)}, got {got}")
        require_integer(f"{where}[{f.name!r}]", ids)
    if check_ids:
        for f in schema.ns_features:
            check_id_range(f"{where}: feature {f.name!r}", ns[f.name], vocab_size(f.name))


def require_integer(what: str, ids: torch.Tensor) -> None:
    """A clear error when ``ids`` (named ``what``) are not integer ids (a float id fails deep in an embedding)."""
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{what} must hold integer ids, got dtype {ids.dtype}")


def check_id_range(what: str, ids: torch.Tensor, n: int) -> None:
    """A clear error when an id of ``ids`` (named ``what``) falls outside a vocabulary of ``n`` rows."""
    if ids.numel():
        lo, hi = (int(t) for t in torch.aminmax(ids))
        if lo < 0 or hi >= n:
            raise ValueError(f"{what}: ids must be in [0, {n}) (its vocabulary size), got range [{lo}, {hi}]")
