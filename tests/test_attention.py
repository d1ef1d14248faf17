"""Mixed causal attention: the mask, SDPA vs the explicit softmax, padding, pruning, capture."""

import pytest
import torch

from helpers_model import single_thread  # noqa: F401  (autouse fixture)
from helpers_model import make_batch, make_model, tiny_config
from onetrans_mini.attention import MixedAttention, attend, attention_mask, capture_attention, explicit_attention


def _real(lengths, ls):
    lengths = torch.as_tensor(lengths)
    return torch.arange(ls)[None, :] >= (ls - lengths)[:, None]  # (N, Ls) left padding


def test_mask_is_lower_triangular_over_s_then_ns():
    m = attention_mask(torch.ones(1, 4, dtype=torch.bool), n_s_queries=4, n_ns=2)[0, 0]  # (6, 6)
    assert torch.equal(m, torch.ones(6, 6, dtype=torch.bool).tril())


def test_mask_pruned_queries_keep_absolute_positions():
    # last 2 of 4 S-tokens + 2 NS-tokens query 6 keys
    m = attention_mask(torch.ones(1, 4, dtype=torch.bool), n_s_queries=2, n_ns=2)[0, 0]
    assert torch.equal(m, torch.ones(6, 6, dtype=torch.bool).tril()[2:])
    # Stage II: NS-tokens alone see every S-token and the NS-tokens before them
    m2 = attention_mask(torch.ones(1, 4, dtype=torch.bool), n_s_queries=0, n_ns=2)[0, 0]
    assert torch.equal(m2, torch.ones(6, 6, dtype=torch.bool).tril()[4:])


def test_mask_padding_keys_hidden_but_diagonal_kept():
    real = _real([2], 4)  # S positions 0, 1 are padding
    m = attention_mask(real, n_s_queries=4, n_ns=1)[0, 0]  # (5, 5)
    assert m[0].tolist() == [True, False, False, False, False]  # padding query sees only itself
    assert m[1].tolist() == [False, True, False, False, False]
    assert m[2].tolist() == [False, False, True, False, False]  # first real token: itself only
    assert m[4].tolist() == [False, False, True, True, True]  # NS sees the real S-tokens and itself
    full = attention_mask(real, n_s_queries=4, n_ns=1, causal=False)[0, 0]
    assert full[2].tolist() == [False, False, True, True, True]  # full attention: all real keys
    assert full[0].tolist() == [True, False, True, True, True]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_q", [7, 3, 0])
def test_sdpa_matches_explicit_softmax(causal, n_q):
    torch.manual_seed(0)
    n, h, ls, n_ns, hd = 5, 2, 7, 3, 4
    real = _real([7, 4, 0, 1, 6], ls)  # one empty history, one single event
    mask = attention_mask(real, n_q, n_ns, causal)
    q = torch.randn(n, h, n_q + n_ns, hd)
    k = torch.randn(n, h, ls + n_ns, hd)
    v = torch.randn(n, h, ls + n_ns, hd)
    fast, _ = attend(q, k, v, mask)
    slow, probs = attend(q, k, v, mask, explicit=True)
    assert not torch.isnan(fast).any() and not torch.isnan(slow).any()
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    assert (probs.masked_select(~mask.expand_as(probs)) == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))


def _attn(causal=True, **kw):
    torch.manual_seed(0)
    return MixedAttention(16, 4, n_ns=3, causal=causal, **kw)


@pytest.mark.parametrize("causal", [True, False])
def test_module_fast_and_explicit_paths_agree(causal):
    attn = _attn(causal)
    torch.manual_seed(1)
    h_s, h_ns = torch.randn(4, 9, 16), torch.randn(4, 3, 16)
    real = _real([9, 5, 0, 2], 9)
    kv = attn.kv_s(h_s)
    fast = attn(h_s[:, -4:], h_ns, kv, real)
    attn.explicit = True
    slow = attn(h_s[:, -4:], h_ns, kv, real)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_pruned_queries_equal_full_queries_then_tail():
    attn = _attn()
    torch.manual_seed(2)
    h_s, h_ns = torch.randn(3, 10, 16), torch.randn(3, 3, 16)
    real = _real([10, 6, 3], 10)
    kv = attn.kv_s(h_s)
    full_s, full_ns = attn(h_s, h_ns, kv, real)
    for n_q in (6, 1, 0):
        o_s, o_ns = attn(h_s[:, 10 - n_q:], h_ns, kv, real)
        torch.testing.assert_close(o_s, full_s[:, 10 - n_q:], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(o_ns, full_ns, rtol=1e-5, atol=1e-6)


def test_stage_one_and_two_split_the_full_attention():
    """Causal: S queries never see NS keys, so the S side alone (Stage I) and the NS side against
    the S keys/values (Stage II) reproduce the joint attention."""
    attn = _attn()
    torch.manual_seed(3)
    h_s, h_ns = torch.randn(3, 8, 16), torch.randn(3, 3, 16)
    real = _real([8, 2, 0], 8)
    kv = attn.kv_s(h_s)
    o_s, o_ns = attn(h_s[:, -5:], h_ns, kv, real)
    s_only, none = attn(h_s[:, -5:], None, kv, real)
    none2, ns_only = attn(None, h_ns, kv, real)
    assert none is None and none2 is None
    torch.testing.assert_close(s_only, o_s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ns_only, o_ns, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="causal"):
        _attn(causal=False)(h_s, None, kv, real)


def test_padding_keys_never_leak():
    attn = _attn()
    torch.manual_seed(4)
    h_s, h_ns = torch.randn(2, 8, 16), torch.randn(2, 3, 16)
    real = _real([5, 3], 8)
    o_s, o_ns = attn(h_s, h_ns, attn.kv_s(h_s), real)
    h_s2 = torch.where(real[..., None], h_s, torch.randn_like(h_s) * 100)  # garbage on padding
    o_s2, o_ns2 = attn(h_s2, h_ns, attn.kv_s(h_s2), real)
    torch.testing.assert_close(o_ns2, o_ns, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o_s2[real], o_s[real], rtol=1e-5, atol=1e-6)


def test_capture_attention_records_every_layer_and_costs_nothing_when_off():
    model = make_model(tiny_config(n_layers=3))
    batch = make_batch()
    logits, _ = model(batch)
    with capture_attention(model) as maps:
        logits2, _ = model.forward_full(batch)
    torch.testing.assert_close(logits2, logits, rtol=1e-5, atol=1e-6)
    assert [m.layer for m in maps] == [0, 1, 2]
    sched = model.schedule()
    b, h, n_ns = batch.n_candidates, model.config.n_heads, model.n_ns
    n_keys = [model.n_s] + sched[:-1]
    for m, q, k in zip(maps, sched, n_keys):
        assert m.probs.shape == (b, h, q + n_ns, k + n_ns)
        assert (m.n_s_queries, m.n_s_keys, m.n_ns) == (q, k, n_ns)
        torch.testing.assert_close(m.probs.sum(-1), torch.ones(b, h, q + n_ns))
    # NS-tokens give padding S keys exactly zero probability in the bottom layer
    pad = ~batch.seq_mask[batch.request_index]  # (B, L_S)
    ns_to_s = maps[0].probs[:, :, -n_ns:, : model.n_s]  # (B, H, L_NS, L_S)
    assert pad.any() and (ns_to_s.masked_select(pad[:, None, None, :].expand_as(ns_to_s)) == 0).all()
    # off again: nothing recorded, fast path
    assert all(a._record is None and not a.explicit for a in model.modules() if isinstance(a, MixedAttention))
    model(batch)
    assert len(maps) == 3


def test_explicit_attention_switch_restores():
    model = make_model()
    batch = make_batch()
    fast, _ = model(batch)
    with explicit_attention(model):
        assert all(a.explicit for a in model.modules() if isinstance(a, MixedAttention))
        slow, _ = model(batch)
    assert not any(a.explicit for a in model.modules() if isinstance(a, MixedAttention))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_bad_heads_raise():
    with pytest.raises(ValueError, match="divisible"):
        MixedAttention(10, 3, n_ns=2)
