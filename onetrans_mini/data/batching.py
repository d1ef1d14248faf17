"""Request-level batches: the S-side once per request, the NS-side once per candidate.

A batch holds ``R`` requests and ``B >= R`` candidates. Candidate ``b`` belongs to request
``request_index[b]``. Histories are LEFT-padded to ``L_S``, so the newest real event is always the
last S-token: the pyramid (which keeps the tail of the S-tokens) then keeps the most recent real
events and never a padding token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

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
