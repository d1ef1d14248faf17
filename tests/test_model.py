"""OneTrans end to end: tokenizers, pyramid, causality, padding, gradients, presets, errors."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers_model import single_thread  # noqa: F401  (autouse fixture)
from helpers_model import SCHEMA, VOCAB, all_switch_combos, clone_batch, make_batch, make_model, tiny_config
from onetrans_mini.attention import explicit_attention
from onetrans_mini.config import ModelConfig, get_preset
from onetrans_mini.features import Categorical, Schema, SequenceSpec, Task
from onetrans_mini.model import OneTrans, OneTransBlock, pyramid_schedule
from onetrans_mini.tokenizer import FeatureEmbeddings, SequenceTokenizer, n_ns_tokens, n_s_tokens

TOL = dict(rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# forward contract


def test_forward_returns_logits_and_loss():
    model = make_model()
    batch = make_batch()
    logits, loss = model(batch)
    assert logits.shape == (batch.n_candidates, 2) and loss is None
    logits2, loss = model(batch, batch.labels)
    torch.testing.assert_close(logits2, logits)
    want = torch.stack([torch.nn.functional.binary_cross_entropy_with_logits(logits[:, t], batch.labels[:, t])
                        for t in range(2)]).mean()
    torch.testing.assert_close(loss, want)
    with pytest.raises(ValueError, match=r"targets must have shape \(B, n_tasks\)"):
        model(batch, batch.labels[:, :1])


def test_candidates_of_one_request_share_its_history():
    """The forward is the per-candidate full forward: equal to expanding every candidate's request."""
    model = make_model()
    batch = make_batch()
    torch.testing.assert_close(model(batch)[0], model(batch.expand_per_candidate())[0], **TOL)


def test_sdpa_and_explicit_attention_agree_end_to_end():
    for causal in (True, False):
        model = make_model(tiny_config(causal=causal))
        batch = make_batch(seed=3)
        fast = model(batch)[0]
        with explicit_attention(model):
            slow = model(batch)[0]
        torch.testing.assert_close(fast, slow, **TOL)


# ----------------------------------------------------------------------------------------------
# tokenizers


def test_n_tokens_helpers():
    cfg = tiny_config()
    assert n_ns_tokens(cfg, SCHEMA) == cfg.ns_tokens
    assert n_ns_tokens(cfg.replace(ns_tokenizer="group_wise"), SCHEMA) == 3  # user, item, context
    assert n_s_tokens(cfg, SCHEMA) == 16
    assert n_s_tokens(cfg.replace(seq_merge="timestamp_agnostic"), SCHEMA) == 17  # one [SEP]
    assert n_s_tokens(cfg.replace(seq_merge="timestamp_agnostic", use_sep=False), SCHEMA) == 16
    m = make_model(tiny_config(ns_tokenizer="group_wise"))
    assert m.tokenizer(make_batch())[2].shape == (6, 3, 16)


def test_vocab_of_shares_one_table():
    emb = make_model().tokenizer.embeddings
    assert emb.owner["hist_item"] == "item_id"
    assert "hist_item" not in emb.tables and emb.size("hist_item") == VOCAB["item_id"]
    ids = torch.tensor([3, 7])
    torch.testing.assert_close(emb("hist_item", ids), emb("item_id", ids))


def test_multi_valued_feature_embeds_as_mean_of_non_pad_ids():
    emb = FeatureEmbeddings(SCHEMA, VOCAB, 4)
    table = emb.tables["genres"].weight
    out = emb("genres", torch.tensor([[3, 5, 0], [0, 0, 0], [2, 0, 0]]))
    torch.testing.assert_close(out[0], (table[3] + table[5]) / 2)
    torch.testing.assert_close(out[1], torch.zeros(4))
    torch.testing.assert_close(out[2], table[2])


def test_timestamp_agnostic_regroups_by_intent_order_with_sep():
    for use_sep in (True, False):
        tok = SequenceTokenizer(tiny_config(seq_merge="timestamp_agnostic", use_sep=use_sep), SCHEMA)
        real = torch.tensor([[False, False, True, True, True, True], [True] * 6])
        types = torch.tensor([[0, 0, 2, 1, 2, 1], [1, 1, 1, 1, 1, 1]])
        x = torch.arange(1.0, 7.0)[None, :, None].expand(2, 6, 16) * real[..., None]  # token p carries p + 1
        out, out_real = tok._regroup(x, types, real)
        got = out[..., 0]
        if use_sep:
            sep = tok.sep[0].item()
            assert torch.equal(out_real[0], torch.tensor([False, False, True, True, True, True, True]))
            # [PAD, PAD, seq 1 (pos 3, 5), SEP, seq 2 (pos 2, 4)]
            torch.testing.assert_close(got[0], torch.tensor([0, 0, 4, 6, sep, 3, 5]))
            # sequence 2 empty: the [SEP] still closes sequence 1, so the newest event is not the tail
            torch.testing.assert_close(got[1], torch.tensor([1, 2, 3, 4, 5, 6, sep]))
        else:
            torch.testing.assert_close(got[0], torch.tensor([0.0, 0, 4, 6, 3, 5]))
            assert torch.equal(out_real[0], real[0])


def test_timestamp_aware_adds_a_type_embedding_and_keeps_time_order():
    model = make_model()
    tok = model.tokenizer
    batch = make_batch()
    x, real = tok.seq(tok.embeddings, batch.seq, batch.seq_type, batch.seq_mask)
    assert torch.equal(real, batch.seq_mask)
    assert (x[~real] == 0).all()
    b2 = clone_batch(batch)
    r, p = torch.nonzero(batch.seq_mask)[0].tolist()
    b2.seq_type[r, p] = 3 - batch.seq_type[r, p]  # same event, other sequence
    x2, _ = tok.seq(tok.embeddings, b2.seq, b2.seq_type, b2.seq_mask)
    assert not torch.allclose(x2[r, p], x[r, p])
    x2[r, p] = x[r, p]
    torch.testing.assert_close(x2, x)  # no other token moved


# ----------------------------------------------------------------------------------------------
# pyramid


def test_pyramid_schedule_is_linear_rounded_and_ends_with_ns_only():
    assert pyramid_schedule(1024, 12, 6, 32) == [1024, 832, 608, 416, 224, 0]
    assert pyramid_schedule(1536, 16, 8, 32) == [1536, 1312, 1088, 896, 672, 448, 224, 0]
    assert pyramid_schedule(128, 8, 2, 8) == [128, 0]
    assert pyramid_schedule(16, 4, 3, 4) == [16, 12, 0]
    assert pyramid_schedule(16, 4, 1, 4) == [0]
    assert pyramid_schedule(100, 8, 4, 8, pyramid=False) == [100, 100, 100, 0]
    for n_s, n_ns, n_layers, g in [(37, 5, 5, 8), (10, 20, 4, 4), (3, 2, 6, 32), (300, 12, 7, 32)]:
        s = pyramid_schedule(n_s, n_ns, n_layers, g)
        assert s[0] == n_s and s[-1] == 0
        assert all(b <= a for a, b in zip(s, s[1:]))
        assert all(q % g == 0 or q == n_s for q in s[1:-1])
        assert all(q >= 1 for q in s[:-1])


def _full_then_select(model, x_s, s_real, x_ns):
    """Slow twin of the pyramid: every S-token issues a query at every layer, then keep the tail."""
    states = []
    for block, n_q in zip(model.blocks, model.schedule(x_s.shape[1])):
        ls = x_s.shape[1]
        if block.has_s_queries:
            all_s, x_ns = block(x_s, x_ns, s_real, ls)  # (N, Ls, d): all queries
            x_s = all_s[:, ls - n_q:]
        else:
            _, x_ns = block(x_s, x_ns, s_real, 0)
            x_s = None
        s_real = s_real[:, ls - n_q:]
        states.append((x_s, x_ns))
    return model.norm_f(x_ns), states


@pytest.mark.parametrize("n_layers", [3, 4])
def test_pyramid_pruned_queries_equal_full_computation_then_tail(n_layers):
    model = make_model(tiny_config(n_layers=n_layers, max_len=24, pyramid_granularity=4))
    batch = make_batch(n_requests=4, cands_per_request=(2, 1, 1, 2), seq_len=24, lengths=[24, 13, 2, 0])
    x_s, s_real, x_ns = model.tokenizer(batch)
    ri = batch.request_index
    fast, states = model.run_blocks(x_s[ri], s_real[ri], x_ns, return_states=True)
    slow, ref = _full_then_select(model, x_s[ri], s_real[ri], x_ns)
    assert [st["x_s"].shape[1] if st["x_s"] is not None else 0 for st in states] == model.schedule()
    torch.testing.assert_close(fast, slow, **TOL)
    for st, (rs, rns) in zip(states, ref):
        torch.testing.assert_close(st["x_ns"], rns, **TOL)
        if rs is not None:
            torch.testing.assert_close(st["x_s"], rs, **TOL)


def test_pyramid_really_saves_compute():
    """Counted FLOPs (explicit attention, so every matmul is visible) equal the analytic estimate, for the
    full forward and the request-level one, and the pyramid's count is lower: queries, attention and FFN
    run for the kept tail only."""
    counted = {}
    for pyr in (True, False):
        model = make_model(tiny_config(n_layers=4, max_len=32, pyramid_granularity=4, pyramid=pyr))
        batch = make_batch(n_requests=3, cands_per_request=(1, 1, 1), seq_len=32, lengths=[32, 32, 32])
        for fwd, two_stage in ((model.forward_full, False), (model, True)):
            with explicit_attention(model), FlopCounterMode(display=False) as fc:
                fwd(batch)
            counted[pyr, two_stage] = fc.get_total_flops()
            assert counted[pyr, two_stage] == model.estimate_flops(3, two_stage=two_stage)["total"]
    assert counted[True, False] < 0.8 * counted[False, False]
    assert counted[True, True] < 0.8 * counted[False, True]


def test_two_stage_flops_are_per_request_on_the_s_side():
    """With C candidates per request, the request-level forward's S side does not grow with C: each extra
    candidate adds exactly its NS side (projections, attention, FFN, tower)."""
    model = make_model(tiny_config(n_layers=4))
    c1, c2, c3 = (model.estimate_flops(c, n_requests=1, two_stage=True)["total"] for c in (1, 2, 3))
    full = model.estimate_flops(64, n_requests=1)["total"]
    assert c3 - c2 == c2 - c1 < c1  # linear in C, and a candidate costs less than the S side
    assert model.estimate_flops(64, n_requests=1, two_stage=True)["total"] < full / 2


def test_pyramid_tail_holds_no_padding_when_history_is_long_enough():
    model = make_model(tiny_config(n_layers=4, max_len=24, pyramid_granularity=4))
    lengths = torch.arange(0, 25, 2)  # 0, 2, ..., 24 real events, left-padded
    batch = make_batch(n_requests=len(lengths), cands_per_request=[1] * len(lengths), seq_len=24, lengths=lengths)
    x_s, s_real, x_ns = model.tokenizer(batch)
    _, states = model.run_blocks(x_s, s_real, x_ns, return_states=True)
    for st, q in zip(states, model.schedule()):
        kept = st["s_real"]  # (N, q) flags of the kept tail
        assert kept.shape == (len(lengths), q)
        for n_real, row in zip(lengths.tolist(), kept):
            if n_real >= q:
                assert row.all(), f"padding kept although {n_real} >= {q} events exist"
            else:  # a short history keeps all its events, padding fills the rest of the window
                assert row.sum() == n_real and row[q - n_real:].all()


# ----------------------------------------------------------------------------------------------
# causality and padding


def _states(model, batch):
    x_s, s_real, x_ns = model.tokenizer(batch)
    ri = batch.request_index
    return model.run_blocks(x_s[ri], s_real[ri], x_ns, return_states=True)[1]


@pytest.mark.parametrize("pyramid", [True, False])
def test_changing_a_later_event_leaves_earlier_s_states_unchanged(pyramid):
    model = make_model(tiny_config(n_layers=3, pyramid=pyramid))
    batch = make_batch(lengths=[16, 10, 12], seed=1)
    length = batch.seq_len
    p = 11  # a real event of request 0 (candidates 0 and 1)
    b2 = clone_batch(batch)
    b2.seq["hist_item"][0, p] = 2 + (batch.seq["hist_item"][0, p] - 1) % 20
    b2.seq["hist_gap"][0, p] = 2 + (batch.seq["hist_gap"][0, p] - 1) % 4
    s1, s2 = _states(model, batch), _states(model, b2)
    for st1, st2 in zip(s1, s2):
        if st1["x_s"] is None:
            continue
        q = st1["x_s"].shape[1]
        pos = torch.arange(length - q, length)  # absolute positions of the kept tail
        before = pos < p
        torch.testing.assert_close(st2["x_s"][:, before], st1["x_s"][:, before], rtol=0, atol=0)
        assert not torch.allclose(st2["x_s"][:2, ~before], st1["x_s"][:2, ~before])
        torch.testing.assert_close(st2["x_s"][2:], st1["x_s"][2:], rtol=0, atol=0)  # other requests
    assert not torch.allclose(s2[-1]["x_ns"][:2], s1[-1]["x_ns"][:2])


def test_candidate_features_never_reach_s_tokens():
    for causal in (True, False):
        model = make_model(tiny_config(causal=causal))
        batch = make_batch(seed=2)
        b2 = clone_batch(batch)
        b2.ns["item_id"][0] = 2 + (batch.ns["item_id"][0] - 1) % 20
        b2.ns["hour"][0] = 2 + (batch.ns["hour"][0] - 1) % 4
        s1, s2 = _states(model, batch), _states(model, b2)
        assert not torch.allclose(s2[-1]["x_ns"][0], s1[-1]["x_ns"][0])
        torch.testing.assert_close(s2[-1]["x_ns"][1:], s1[-1]["x_ns"][1:], rtol=0, atol=0)
        s_same = all(torch.equal(a["x_s"], b["x_s"]) for a, b in zip(s1, s2) if a["x_s"] is not None)
        assert s_same == causal  # full attention (ablation) lets the candidate leak into the history


def test_ns_token_i_does_not_see_ns_token_j_after_it():
    model = make_model(tiny_config(n_layers=3, ns_tokens=4))
    batch = make_batch()
    x_s, s_real, x_ns = model.tokenizer(batch)
    ri = batch.request_index
    base, states = model.run_blocks(x_s[ri], s_real[ri], x_ns, return_states=True)
    for j in range(4):
        x2 = x_ns.clone()
        x2[:, j] += torch.randn_like(x2[:, j])
        out, states2 = model.run_blocks(x_s[ri], s_real[ri], x2, return_states=True)
        for a, b in zip(states, states2):
            torch.testing.assert_close(b["x_ns"][:, :j], a["x_ns"][:, :j], rtol=0, atol=0)
            assert not torch.allclose(b["x_ns"][:, j:], a["x_ns"][:, j:])
            if a["x_s"] is not None:
                torch.testing.assert_close(b["x_s"], a["x_s"], rtol=0, atol=0)


@pytest.mark.parametrize("merge", ["timestamp_aware", "timestamp_agnostic"])
def test_padded_positions_change_nothing(merge):
    model = make_model(tiny_config(seq_merge=merge))
    batch = make_batch(lengths=[3, 0, 9], seed=4)
    b2 = clone_batch(batch)
    pad = ~batch.seq_mask
    g = torch.Generator().manual_seed(0)
    for name, ids in b2.seq.items():
        ids[pad] = torch.randint(1, VOCAB[name], (int(pad.sum()),), generator=g)
    logits = model(batch)[0]
    assert not torch.isnan(logits).any()
    torch.testing.assert_close(model(b2)[0], logits, rtol=0, atol=0)


@pytest.mark.parametrize("merge", ["timestamp_aware", "timestamp_agnostic"])
def test_more_left_padding_changes_nothing(merge):
    """A batch padded to 11 events and the same requests padded to 16 give the same logits (the
    pyramid schedule is clipped for shorter batches, which is exactly what extra padding gives)."""
    model = make_model(tiny_config(n_layers=4, seq_merge=merge))
    short = make_batch(seq_len=11, lengths=[11, 4, 0], seed=5)
    long = clone_batch(short)
    pad = lambda t: torch.cat([t.new_zeros(t.shape[0], 5), t], dim=1)  # noqa: E731
    long.seq = {k: pad(v) for k, v in short.seq.items()}
    long.seq_type, long.seq_mask = pad(short.seq_type), pad(short.seq_mask)
    torch.testing.assert_close(model(long)[0], model(short)[0], **TOL)


def test_padding_token_states_never_leak_into_real_tokens():
    model = make_model(tiny_config(n_layers=3))
    batch = make_batch(lengths=[5, 12, 1], seed=6)
    x_s, s_real, x_ns = model.tokenizer(batch)
    ri = batch.request_index
    x_s, s_real = x_s[ri], s_real[ri]
    out, st = model.run_blocks(x_s, s_real, x_ns, return_states=True)
    garbage = torch.where(s_real[..., None], x_s, torch.randn_like(x_s) * 50)
    out2, st2 = model.run_blocks(garbage, s_real, x_ns, return_states=True)
    torch.testing.assert_close(out2, out, **TOL)
    for a, b in zip(st, st2):
        if a["x_s"] is not None:
            torch.testing.assert_close(b["x_s"][a["s_real"]], a["x_s"][a["s_real"]], **TOL)


def test_empty_history_gives_finite_outputs():
    model = make_model()
    batch = make_batch(lengths=[0, 0, 0])
    logits, loss = model(batch, batch.labels)
    assert torch.isfinite(logits).all() and torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------
# two-stage structure (what model.score and user_cache.py build on)


def test_blocks_split_into_stage_one_and_stage_two():
    """Stage I per REQUEST (S-tokens alone, K/V kept per layer), Stage II per candidate (NS-tokens against
    their request's cached K/V, packed) reproduce the full per-candidate forward, block by block."""
    from onetrans_mini.attention import Packing

    model = make_model(tiny_config(n_layers=4))
    batch = make_batch(lengths=[16, 7, 0], seed=7)
    full = model.forward_full(batch)[0]
    x_s, s_real, x_ns = model.tokenizer(batch)  # S-tokens once per request
    packing = Packing(batch.request_index, x_s.shape[0])
    for block, n_q in zip(model.blocks, model.schedule(x_s.shape[1])):
        x_s_next, keys = block.forward_s(x_s, s_real, n_q)  # Stage I: (R, n_q, d), LayerKV (R, H, Ls, hd)
        x_ns = block.forward_ns(x_ns, keys, packing)  # Stage II: (B, L_NS, d)
        s_real = s_real[:, s_real.shape[1] - n_q:]
        x_s = x_s_next
    torch.testing.assert_close(model.head(model.norm_f(x_ns)), full, **TOL)
    torch.testing.assert_close(model(batch)[0], full, **TOL)  # what the model's forward runs


# ----------------------------------------------------------------------------------------------
# parameters


def test_every_parameter_gets_a_gradient_in_every_switch_combination():
    batch = make_batch(lengths=[16, 9, 4], seed=8)
    assert set(batch.seq_type[batch.seq_mask].tolist()) == {1, 2}
    for combo in all_switch_combos():
        model = make_model(tiny_config(**combo)).train()
        _, loss = model(batch, batch.labels)
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"{combo}: no gradient for {missing}"
        zero = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
        assert not zero, f"{combo}: all-zero gradient for {zero}"


def test_token_specific_weights_make_ns_tokens_distinct():
    model = make_model()
    batch = make_batch()
    logits = model(batch)[0]
    w = model.blocks[0].ffn.w1.weight_ns
    with torch.no_grad():
        w.copy_(w[torch.tensor([1, 0, 2, 3])].clone())  # swap the FFN weights of NS-tokens 0 and 1
    assert not torch.allclose(model(batch)[0], logits, atol=1e-4)


def test_shared_params_ablation_has_no_token_specific_weights():
    model = make_model(tiny_config(shared_params=True))
    assert not [n for n, _ in model.named_parameters() if n.endswith("weight_ns")]
    full = make_model()
    assert full.num_params()["dense"] > model.num_params()["dense"]


def _block_params(cfg: ModelConfig, n_ns: int, has_s: bool) -> int:
    d, f = cfg.d_model, cfg.ffn_mult * cfg.d_model
    s = (4 * d * d + 2 * d * f) if has_s else 2 * d * d  # S: Q, K, V, O, FFN (top layer: K, V only)
    ns = n_ns * (4 * d * d + 2 * d * f)
    return 2 * d + s + ns


def test_parameter_counts_dense_vs_embedding():
    model = make_model()
    counts = model.num_params()
    emb_dim = model.config.emb_dim
    tables = {"user_id", "gender", "item_id", "genres", "hour", "hist_genre", "hist_gap"}  # hist_item shares item_id
    assert counts["embedding"] == sum(VOCAB[t] * emb_dim for t in tables)
    assert counts["dense"] + counts["embedding"] == sum(p.numel() for p in model.parameters())
    want = sum(_block_params(model.config, model.n_ns, q > 0) for q in model.layer_queries)
    assert counts["blocks"] == want


# ----------------------------------------------------------------------------------------------
# presets


@pytest.mark.parametrize("name,seq_len", [("nano", 16), ("small", 128)])
def test_small_presets_build_and_run(name, seq_len):
    torch.manual_seed(0)
    model = OneTrans(get_preset(name), SCHEMA, VOCAB)
    batch = make_batch(n_requests=2, cands_per_request=(2, 1), seq_len=seq_len, lengths=[seq_len, seq_len // 3])
    logits, loss = model(batch, batch.labels)
    assert logits.shape == (3, 2) and torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("name", ["S", "L"])
def test_paper_presets_build(name):
    cfg = get_preset(name)
    with torch.device("meta"):  # no memory, no init time: counts only
        model = OneTrans(cfg, SCHEMA, VOCAB)
    counts = model.num_params()
    want = sum(_block_params(cfg, model.n_ns, q > 0) for q in model.layer_queries)
    assert counts["blocks"] == want
    assert model.layer_queries[0] == cfg.max_len and model.layer_queries[-1] == 0
    assert counts["dense"] > 10_000_000


# ----------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("kw,match", [
    (dict(d_model=30, n_heads=4), "d_model=30 must be divisible by n_heads=4"),
    (dict(ns_tokens=0), "ns_tokens must be an integer >= 1"),
    (dict(ns_tokenizer="rankmixer"), "ns_tokenizer must be one of"),
    (dict(seq_merge="by_time"), "seq_merge must be one of"),
    (dict(n_layers=0), "n_layers must be an integer >= 1"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(pyramid_schedule=(16, 8)), "one S-query count per layer"),
    (dict(pyramid_schedule=(16, 12, 4)), "must end with 0"),
    (dict(pyramid_schedule=(8, 12, 0)), "non-increasing"),
    (dict(pyramid_schedule=(16, 8, 0), pyramid=False), "pyramid=False"),
])
def test_bad_configs_raise_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kw)


def test_schedule_longer_than_the_sequence_raises():
    with pytest.raises(ValueError, match=r"pyramid_schedule\[0\]=20 exceeds L_S=16"):
        make_model(tiny_config(pyramid_schedule=(20, 8, 0)))
    m = make_model(tiny_config(pyramid_schedule=(16, 4, 0)))
    assert m.schedule() == [16, 4, 0]


def test_schema_and_vocab_mismatch_raise_clear_errors():
    cfg = tiny_config()
    vocab = dict(VOCAB)
    del vocab["gender"]
    with pytest.raises(ValueError, match="no entry for feature 'gender'"):
        OneTrans(cfg, SCHEMA, vocab)
    with pytest.raises(ValueError, match="'hist_item' shares the table of 'item_id'"):
        OneTrans(cfg, SCHEMA, {**VOCAB, "hist_item": 99})
    with pytest.raises(ValueError, match="must be >= 2"):
        OneTrans(cfg, SCHEMA, {**VOCAB, "hour": 1})
    bad = Schema(ns_features=SCHEMA.ns_features,
                 event_fields=(Categorical("hist_x", "event", vocab_of="nope"),),
                 sequences=(SequenceSpec("a", ("a",)),), tasks=(Task("t", "t"),))
    with pytest.raises(ValueError, match="vocab_of='nope'"):
        OneTrans(cfg, bad, VOCAB)
    with pytest.raises(TypeError, match="vocab sizes"):
        OneTrans(cfg, SCHEMA, [1, 2])


def test_bad_batches_raise_clear_errors():
    model = make_model()
    with pytest.raises(ValueError, match="max_len=16"):
        model(make_batch(seq_len=20))
    b = make_batch()
    del b.seq["hist_gap"]
    with pytest.raises(ValueError, match="lacks event field 'hist_gap'"):
        model(b)
    b = make_batch()
    b.ns["item_id"][0] = VOCAB["item_id"]
    with pytest.raises(ValueError, match=r"'item_id': ids must be in \[0, 23\)"):
        model(b)
    b = make_batch(lengths=[16, 16, 16])
    b.seq_type[0, 0] = 3
    with pytest.raises(ValueError, match="seq_type must be in 1..2"):
        model(b)
    b = make_batch(lengths=[4, 4, 4])
    b.seq_type[0, 0] = 1
    with pytest.raises(ValueError, match="0 on padding"):
        model(b)
    b = make_batch()
    b.request_index[0] = 7
    with pytest.raises(ValueError, match="request_index must be in"):
        model(b)


def test_block_rejects_queries_at_an_ns_only_layer():
    block = OneTransBlock(tiny_config(), n_ns=4, has_s_queries=False)
    x_s, x_ns = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="no S-token queries"):
        block(x_s, x_ns, torch.ones(2, 5, dtype=torch.bool), 3)
    s, ns = block(x_s, x_ns, torch.ones(2, 5, dtype=torch.bool), 0)
    assert s is None and ns.shape == (2, 4, 16)


def test_dropout_only_in_training():
    model = make_model(tiny_config(dropout=0.2))
    batch = make_batch()
    model.train()
    a, loss = model(batch, batch.labels)
    loss.backward()
    assert not torch.allclose(a, model(batch)[0])  # dropout is active in training
    model.eval()
    torch.testing.assert_close(model(batch)[0], model(batch)[0], rtol=0, atol=0)


@pytest.mark.parametrize("where", ["seq", "seq_type", "request_index", "ns"])
def test_float_ids_in_a_batch_are_refused_by_name(where):
    """A float tensor where ids belong fails in the shape checks, not deep inside an embedding lookup."""
    b = make_batch()
    if where == "seq":
        b.seq["hist_item"], name = b.seq["hist_item"].float(), r"batch\.seq\['hist_item'\]"
    elif where == "ns":
        b.ns["item_id"], name = b.ns["item_id"].float(), r"batch\.ns\['item_id'\]"
    else:
        setattr(b, where, getattr(b, where).float())
        name = rf"batch\.{where}"
    for fwd in (make_model(), make_model().forward_full):
        with pytest.raises(ValueError, match=name + r" must hold integer ids, got dtype torch\.float32"):
            fwd(b)
