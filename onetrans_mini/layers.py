"""Mixed parameters (paper §3): one weight shared by all S-tokens, one weight per NS-token.

    token i of [S-tokens ; NS-tokens]:   W_i = W_S          if i is an S-token   (i <= L_S)
                                         W_i = W_NS[i-L_S]  if i is an NS-token

S-tokens are homogeneous (events of a behaviour stream), so sharing one weight across them is what a
normal Transformer does and lets the sequence grow without growing the model. NS-tokens are
heterogeneous (token 3 of the auto-split tokenizer means something different from token 5), so each
gets its own projection, as in RankMixer's per-token FFNs. "Relative to a standard causal Transformer,
OneTrans changes only the parameterization."

Token-specific weights are stored as ONE tensor ``(L_NS, d_in, d_out)`` and applied with ONE einsum:
a Python loop over tokens would launch L_NS small matmuls (slow on GPUs, and L_NS separate
parameters would fragment the optimizer state). ``reference_ns`` is the loop, kept as the obviously
correct slow twin that the tests compare against.

``shared_params=True`` is the paper's "all parameters shared" ablation: NS-tokens then use the S
weights and no token-specific tensor is created (a parameter that never receives a gradient breaks
DistributedDataParallel, so nothing unused is ever allocated).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dimension: ``RMSNorm``'s maths. Half types (bf16 under autocast)
    are normalized in fp32: their mean of squares would lose precision."""
    if x.dtype == torch.float32:  # the same maths in one fused op (tested equal to the lines below)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    # normalize in fp32 at least, even under autocast: the mean of squares loses precision in half types
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight


class RMSNorm(nn.Module):
    """x / rms(x) * g. Cheaper than LayerNorm (no mean, no bias) and what the paper uses: pre-norm
    on every token keeps S- and NS-tokens, whose statistics differ, on one scale before attention."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MixedLinear(nn.Module):
    """``y = x W_S`` for S-tokens, ``y_i = x_i W_NS[i]`` for NS-token i (no bias, LLaMA-style).

    Args:
        d_in, d_out: widths.
        n_ns: number of NS-tokens (L_NS), the first dimension of the token-specific weight.
        shared_params: NS-tokens use ``weight`` too (ablation); no ``weight_ns`` is created.
        has_s: whether S-tokens go through this layer. The top block has no S-token queries (see
            ``model.pyramid_schedule``), so its query, output and FFN layers are NS-only and must not
            allocate an S weight that would never get a gradient.
        init_std: std of the normal init; default ``d_in ** -0.5`` keeps activations O(1).

    Shapes: ``forward_s``: (..., d_in) -> (..., d_out); ``forward_ns``: (N, L_NS, d_in) -> (N, L_NS, d_out).
    """

    def __init__(self, d_in: int, d_out: int, n_ns: int, *, shared_params: bool = False, has_s: bool = True,
                 init_std: float | None = None):
        super().__init__()
        if n_ns < 1:
            raise ValueError(f"MixedLinear: n_ns (the number of NS tokens) must be >= 1, got {n_ns}")
        self.d_in, self.d_out, self.n_ns = d_in, d_out, n_ns
        self.shared_params = shared_params
        std = d_in**-0.5 if init_std is None else init_std
        # stored (d_in, d_out) so that the maths reads x @ W, the same for shared and token-specific
        self.weight = nn.Parameter(torch.randn(d_in, d_out) * std) if (has_s or shared_params) else None
        self.weight_ns = None if shared_params else nn.Parameter(torch.randn(n_ns, d_in, d_out) * std)

    def forward_s(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError("MixedLinear built with has_s=False has no S-token weight")
        return x @ self.weight  # (..., d_out)

    def forward_ns(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] != self.n_ns:
            raise ValueError(f"MixedLinear.forward_ns expects {self.n_ns} NS tokens in dim -2, got shape {tuple(x.shape)}")
        if self.weight_ns is None:  # shared_params ablation: every NS token uses the S weight
            return x @ self.weight
        # one batched matmul over the token axis: token n uses its own (d_in, d_out) slice
        return torch.einsum("bnd,nde->bne", x, self.weight_ns)  # (N, L_NS, d_out)

    @torch.no_grad()
    def reference_ns(self, x: torch.Tensor) -> torch.Tensor:
        """Slow twin of ``forward_ns``: an explicit loop over NS tokens (tests only)."""
        w = [self.weight] * self.n_ns if self.weight_ns is None else list(self.weight_ns)
        return torch.stack([x[:, i] @ w[i] for i in range(self.n_ns)], dim=1)  # (N, L_NS, d_out)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, n_ns={self.n_ns}, shared_params={self.shared_params}, "
                f"has_s={self.weight is not None}")


class MixedFFN(nn.Module):
    """``W2 phi(W1 x)`` with both matrices mixed like ``MixedLinear`` (phi = GELU, width ffn_mult * d).

    The paper leaves the activation and width open; GELU and 4d are the usual Transformer choices.
    ``W2`` starts smaller (``resid_scale``) so that each residual branch adds a small update at init.
    """

    def __init__(self, d: int, d_ff: int, n_ns: int, *, shared_params: bool = False, has_s: bool = True,
                 resid_scale: float = 1.0):
        super().__init__()
        self.w1 = MixedLinear(d, d_ff, n_ns, shared_params=shared_params, has_s=has_s)
        self.w2 = MixedLinear(d_ff, d, n_ns, shared_params=shared_params, has_s=has_s,
                              init_std=d_ff**-0.5 * resid_scale)

    def forward_s(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2.forward_s(F.gelu(self.w1.forward_s(x)))  # (..., d)

    def forward_ns(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2.forward_ns(F.gelu(self.w1.forward_ns(x)))  # (N, L_NS, d)

    @torch.no_grad()
    def reference_ns(self, x: torch.Tensor) -> torch.Tensor:
        """Slow twin: the FFN of each NS token applied one token at a time."""
        w1 = [self.w1.weight] * self.w1.n_ns if self.w1.weight_ns is None else list(self.w1.weight_ns)
        w2 = [self.w2.weight] * self.w2.n_ns if self.w2.weight_ns is None else list(self.w2.weight_ns)
        return torch.stack([F.gelu(x[:, i] @ w1[i]) @ w2[i] for i in range(self.w1.n_ns)], dim=1)


def residual_scale(n_layers: int) -> float:
    """GPT-2's init: each block adds two residual branches, so scale their output weights by
    1/sqrt(2 n_layers) to keep the residual stream's variance from growing with depth."""
    return 1.0 / math.sqrt(2 * n_layers)
