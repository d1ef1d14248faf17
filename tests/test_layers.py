"""Mixed parameters: one shared weight for S-tokens, one einsum over token-specific NS weights."""

import pytest
import torch
import torch.nn.functional as F

from helpers_model import single_thread  # noqa: F401  (autouse fixture)
from onetrans_mini.layers import MixedFFN, MixedLinear, RMSNorm


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x = torch.randn(3, 5, 8)
    want = x / torch.sqrt((x**2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    torch.testing.assert_close(norm(x), want, rtol=1e-6, atol=1e-6)


def test_rmsnorm_fused_fp32_path_matches_the_half_precision_path():
    """fp32 runs F.rms_norm (one op); other dtypes the explicit fp32 maths: same values and gradients."""
    torch.manual_seed(0)
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)  # float64 takes the explicit path
    x32 = x.detach().float().requires_grad_()
    y64, y32 = norm.double()(x), norm.float()(x32)
    torch.testing.assert_close(y32, y64.float(), rtol=1e-6, atol=1e-6)
    (g64,), (g32,) = torch.autograd.grad(y64.sum(), x), torch.autograd.grad(y32.sum(), x32)
    torch.testing.assert_close(g32, g64.float(), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast the norm still runs (and returns) fp32
        assert norm(x32).dtype == torch.float32


@pytest.mark.parametrize("shared", [False, True])
def test_mixed_linear_einsum_matches_per_token_loop(shared):
    torch.manual_seed(0)
    lin = MixedLinear(6, 10, n_ns=4, shared_params=shared)
    x = torch.randn(7, 4, 6)
    torch.testing.assert_close(lin.forward_ns(x), lin.reference_ns(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shared", [False, True])
def test_mixed_ffn_matches_per_token_loop(shared):
    torch.manual_seed(1)
    ffn = MixedFFN(6, 12, n_ns=3, shared_params=shared)
    x = torch.randn(5, 3, 6)
    torch.testing.assert_close(ffn.forward_ns(x), ffn.reference_ns(x), rtol=1e-6, atol=1e-6)


def test_token_specific_weight_is_one_tensor():
    lin = MixedLinear(6, 10, n_ns=4)
    assert lin.weight.shape == (6, 10)
    assert lin.weight_ns.shape == (4, 6, 10)
    assert [n for n, _ in lin.named_parameters()] == ["weight", "weight_ns"]


def test_s_path_is_shared_over_positions():
    """Every S position goes through the same weight: outputs are position-wise and permutation-equivariant."""
    torch.manual_seed(0)
    ffn = MixedFFN(6, 12, n_ns=3)
    x = torch.randn(2, 9, 6)
    y = ffn.forward_s(x)
    for i in range(9):
        torch.testing.assert_close(y[:, i], ffn.forward_s(x[:, i]), rtol=1e-6, atol=1e-6)
    perm = torch.randperm(9)
    torch.testing.assert_close(ffn.forward_s(x[:, perm]), y[:, perm], rtol=1e-6, atol=1e-6)


def test_ns_tokens_are_not_interchangeable():
    torch.manual_seed(0)
    ffn = MixedFFN(6, 12, n_ns=3)
    x = torch.randn(4, 3, 6)
    y = ffn.forward_ns(x)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():  # permute the token-specific weights: token i now uses token perm[i]'s weights
        ffn.w1.weight_ns.copy_(ffn.w1.weight_ns[perm].clone())
        ffn.w2.weight_ns.copy_(ffn.w2.weight_ns[perm].clone())
    y_perm = ffn.forward_ns(x)
    for i in range(3):
        assert not torch.allclose(y_perm[:, i], y[:, i], atol=1e-4)
    # ... and it is still the per-token formula, now with the permuted weights
    ref = torch.stack([F.gelu(x[:, i] @ ffn.w1.weight_ns[i]) @ ffn.w2.weight_ns[i] for i in range(3)], 1)
    torch.testing.assert_close(y_perm, ref, rtol=1e-6, atol=1e-6)


def test_shared_params_ablation_treats_ns_tokens_alike():
    torch.manual_seed(0)
    ffn = MixedFFN(6, 12, n_ns=3, shared_params=True)
    assert ffn.w1.weight_ns is None and ffn.w2.weight_ns is None
    x = torch.randn(4, 3, 6)
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(ffn.forward_ns(x[:, perm]), ffn.forward_ns(x)[:, perm], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ffn.forward_ns(x), ffn.forward_s(x), rtol=1e-6, atol=1e-6)


def test_ns_only_layer_allocates_no_s_weight():
    lin = MixedLinear(6, 10, n_ns=4, has_s=False)
    assert lin.weight is None and lin.weight_ns is not None
    with pytest.raises(RuntimeError, match="no S-token weight"):
        lin.forward_s(torch.randn(2, 3, 6))
    # in the shared ablation the S weight is the NS tokens' weight, so it must exist
    assert MixedLinear(6, 10, n_ns=4, has_s=False, shared_params=True).weight is not None


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="n_ns"):
        MixedLinear(6, 10, n_ns=0)
    lin = MixedLinear(6, 10, n_ns=4)
    with pytest.raises(ValueError, match="expects 4 NS tokens"):
        lin.forward_ns(torch.randn(2, 3, 6))


def test_gradients_reach_every_token_weight():
    torch.manual_seed(0)
    ffn = MixedFFN(6, 12, n_ns=3)
    ffn.forward_ns(torch.randn(4, 3, 6)).sum().backward()
    for w in (ffn.w1.weight_ns, ffn.w2.weight_ns):
        assert (w.grad.flatten(1).abs().sum(1) > 0).all()
