"""The request cache as plain data (paper §5): each layer's S keys/values, computed once per request.

Stage I (``OneTrans.stage_one``) runs a request's S-tokens through every layer and keeps what the
candidates need: the S keys and values of each layer. Stage II (``OneTrans.stage_two``) reads them for
every candidate of that request. Nothing here computes; like nanochat's ``KVCache`` it is a small
container with a clear life cycle:

- built by ``OneTrans.stage_one`` for a batch of requests, or by ``UserCache.request_cache`` for one
  user whose state is carried across requests (``user_cache.py``);
- read by ``OneTrans.stage_two`` / ``OneTrans.score``;
- dropped (or, for a user, advanced) when the request is done.

Layer ``l`` holds ``Ls_l`` keys: the S-tokens of that layer's input, which shrink up the pyramid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LayerKV:
    """One layer's S keys/values of R requests: ``k``, ``v`` (R, H, Ls_l, hd); ``s_real`` (R, Ls_l) bool,
    False on left padding (masked as keys)."""

    k: torch.Tensor
    v: torch.Tensor
    s_real: torch.Tensor


@dataclass
class RequestCache:
    """Stage I of R requests: ``layers[l]`` is layer l's ``LayerKV``."""

    layers: list[LayerKV]

    @property
    def n_requests(self) -> int:
        return self.layers[0].k.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for lay in self.layers for t in (lay.k, lay.v))

    @staticmethod
    def stack(caches: list[RequestCache]) -> RequestCache:
        """Several requests' caches as one (R = sum), each layer left-padded to the longest (masked), so
        that one Stage II call scores the candidates of several users."""
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
