"""The separate-tracks baselines (DIN + DCNv2, Transformer + RankMixer): contract, gradients, padding,
request-level = per-candidate, and the matched dense budget."""

from __future__ import annotations

import pytest
import torch
from helpers_model import SCHEMA, VOCAB, clone_batch, make_batch

from onetrans_mini.baselines import (
    BASELINES,
    DinDcnV2,
    RankMixerTransformer,
    TargetAttention,
    build_baseline,
    matched_config,
    token_mixing,
)
from onetrans_mini.config import get_preset
from onetrans_mini.data.batching import Batch
from onetrans_mini.features import Categorical, Schema
from onetrans_mini.model import OneTrans

NAMES = sorted(BASELINES)


def _model(name, schema=SCHEMA, vocab=VOCAB, seed=0, **overrides):
    torch.manual_seed(seed)
    model, _ = build_baseline(name, get_preset("nano", **overrides), schema, vocab)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_batch(tiny_data):
    return tiny_data.collate(tiny_data.request_ids("train")[:8], max_len=16)


# ----------------------------------------------------------------------------------------------
# contract


@pytest.mark.parametrize("name", NAMES)
def test_forward_contract_on_real_batch(name, tiny_data, tiny_batch):
    model = _model(name, tiny_data.schema, tiny_data.vocab_sizes())
    b = tiny_batch
    logits, loss = model(b)
    assert logits.shape == (b.n_candidates, len(tiny_data.schema.tasks)) and loss is None
    assert b.n_requests < b.n_candidates  # a real request-level batch: several candidates per request
    logits, loss = model(b, b.labels)
    assert loss.shape == () and torch.isfinite(loss)
    torch.testing.assert_close(loss, torch.nn.functional.binary_cross_entropy_with_logits(logits, b.labels))
    with pytest.raises(ValueError, match="targets must have shape"):
        model(b, b.labels[:, :1])
    counts = model.num_params()
    assert counts["total"] == counts["dense"] + counts["embedding"]
    assert counts["sequence"] + counts["interaction"] + counts["towers"] == counts["dense"]


@pytest.mark.parametrize("name", NAMES)
def test_loss_decreases_on_a_fixed_batch(name, tiny_data, tiny_batch):
    model = _model(name, tiny_data.schema, tiny_data.vocab_sizes()).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        _, loss = model(tiny_batch, tiny_batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("switches", [{}, {"seq_merge": "timestamp_agnostic"}, {"causal": False, "ns_tokenizer": "group_wise"}])
def test_every_parameter_gets_a_gradient(name, switches):
    """DDP fails on a parameter that never gets a gradient: every one must be on the loss's path."""
    model = _model(name, **switches).train()
    b = make_batch(n_requests=4, cands_per_request=(2, 1, 3, 2), min_len=4, seed=1)
    _, loss = model(b, b.labels)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # and none is dead on this batch (every sequence type present, ids everywhere)
    dead = [n for n, p in model.named_parameters() if not p.grad.any() and "embeddings" not in n]
    assert not dead, dead


# ----------------------------------------------------------------------------------------------
# padding, request-level compute


@pytest.mark.parametrize("name", NAMES)
def test_padding_does_not_leak(name):
    model = _model(name)
    b = make_batch(n_requests=4, cands_per_request=(2, 1, 3, 2), lengths=[0, 5, 16, 9], seed=2)
    ref, _ = model(b)
    assert torch.isfinite(ref).all()  # an empty history (request 0) is fine
    # 1) garbage ids on padded positions
    g = torch.Generator().manual_seed(3)
    noisy = clone_batch(b)
    for k, v in noisy.seq.items():
        rnd = torch.randint(1, VOCAB[k], v.shape, generator=g)
        noisy.seq[k] = torch.where(b.seq_mask, v, rnd)
    torch.testing.assert_close(model(noisy)[0], ref, rtol=0, atol=1e-6)
    # 2) more left padding (a longer window with the same events)
    extra = 5
    wider = Batch(
        seq={k: torch.cat([torch.randint(1, VOCAB[k], (b.n_requests, extra), generator=g), v], 1) for k, v in b.seq.items()},
        seq_type=torch.cat([torch.zeros(b.n_requests, extra, dtype=torch.long), b.seq_type], 1),
        seq_mask=torch.cat([torch.zeros(b.n_requests, extra, dtype=torch.bool), b.seq_mask], 1),
        ns=b.ns, request_index=b.request_index, labels=b.labels, user=b.user, request_id=b.request_id,
    )
    torch.testing.assert_close(model(wider)[0], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_request_level_equals_per_candidate(name, tiny_data, tiny_batch):
    """The slow twin: the same candidates with the history copied per candidate (R == B)."""
    model = _model(name, tiny_data.schema, tiny_data.vocab_sizes())
    ref, _ = model(tiny_batch.expand_per_candidate())
    got, _ = model(tiny_batch)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    model, b = _model(name), make_batch(n_requests=3, cands_per_request=(2, 1, 3), seed=4)  # multi-valued NS too
    torch.testing.assert_close(model(b)[0], model(b.expand_per_candidate())[0], rtol=1e-5, atol=1e-6)


def test_target_attention_split_matches_textbook_unit():
    torch.manual_seed(0)
    att = TargetAttention(d=6, hidden=5, scale=8.0)
    keys, q = torch.randn(3, 8, 6), torch.randn(5, 6)
    real = torch.rand(3, 8) > 0.3
    ri = torch.tensor([0, 0, 2, 1, 2])
    torch.testing.assert_close(att(q, keys, real, ri), att.reference(q, keys, real, ri))


def test_token_mixing_is_the_rankmixer_transpose():
    x = torch.randn(2, 4, 12)  # T = 4 tokens, d = 12: heads of width 3
    y = token_mixing(x)
    e = 12 // 4
    for h in range(4):
        for t in range(4):  # output token h, chunk t = head h of input token t
            assert torch.equal(y[:, h, t * e:(t + 1) * e], x[:, t, h * e:(h + 1) * e])
    assert torch.equal(token_mixing(y), x)  # with H = T it is its own inverse (a permutation)


# ----------------------------------------------------------------------------------------------
# matched budget


@pytest.mark.parametrize("preset", ["nano", "small"])
@pytest.mark.parametrize("name", NAMES)
def test_matched_dense_budget(name, preset, tiny_data):
    schema, vocab = tiny_data.schema, tiny_data.vocab_sizes()
    cfg = get_preset(preset)
    m = matched_config(name, cfg, schema, vocab)
    assert abs(m.rel_diff) <= 0.15, str(m)
    assert m.config.emb_dim == cfg.emb_dim and m.config.n_layers == cfg.n_layers
    # the meta-device counts are the real ones, and the embedding tables are OneTrans's
    real = BASELINES[name](m.config, schema, vocab).num_params()
    onetrans = OneTrans(cfg, schema, vocab).num_params()
    assert real["dense"] == m.dense and onetrans["dense"] == m.onetrans_dense
    assert real["embedding"] == onetrans["embedding"] == m.embedding
    print(m)


# ----------------------------------------------------------------------------------------------
# bad configs and batches


def test_bad_configs_raise_clear_errors():
    nano = get_preset("nano")  # d_model=16, L_NS=4: T=6 does not divide 16
    with pytest.raises(ValueError, match=r"d_model=16 .*T = L_NS \+ 2 = 6.*ns_tokens"):
        RankMixerTransformer(nano, SCHEMA, VOCAB)
    with pytest.raises(ValueError, match="unknown baseline 'din'"):
        matched_config("din", nano, SCHEMA, VOCAB)
    with pytest.raises(TypeError, match="config must be a ModelConfig"):
        DinDcnV2({"d_model": 16}, SCHEMA, VOCAB)
    no_item = Schema(ns_features=tuple(f for f in SCHEMA.ns_features if f.source != "item"),
                     event_fields=tuple(f for f in SCHEMA.event_fields if f.name != "hist_item") + (
                         Categorical("hist_item", "event"),),
                     sequences=SCHEMA.sequences, tasks=SCHEMA.tasks)
    with pytest.raises(ValueError, match="source='item'"):
        DinDcnV2(nano, no_item, VOCAB)
    with pytest.raises(ValueError, match="misses OneTrans's dense count"):
        matched_config("rankmixer-transformer", nano, SCHEMA, VOCAB, tol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_bad_batches_name_the_feature(name):
    model = _model(name)
    b = make_batch(seed=5)
    bad = clone_batch(b)
    bad.ns["gender"] = bad.ns["gender"] + 100
    with pytest.raises(ValueError, match="feature 'gender': ids must be in"):
        model(bad)
    bad = clone_batch(b)
    del bad.seq["hist_gap"]
    with pytest.raises(ValueError, match="hist_gap"):
        model(bad)


# ----------------------------------------------------------------------------------------------
# activation checkpointing


@pytest.mark.parametrize("name", NAMES)
def test_activation_checkpointing_gives_the_same_gradients(name, tiny_data, tiny_batch):
    """Recomputing the blocks in backward changes what is stored, not the result: same loss, same
    gradients, dropout included (its RNG state is replayed); and the blocks really are recomputed."""
    schema, vocab = tiny_data.schema, tiny_data.vocab_sizes()
    grads, losses = {}, {}
    for on in (False, True):
        model = _model(name, schema, vocab, dropout=0.2, activation_checkpointing=on).train()
        assert model.config.activation_checkpointing is on
        calls = []
        model.run_block = _counting(model.run_block, calls)
        torch.manual_seed(7)  # the same dropout masks in both runs
        _, loss = model(tiny_batch, tiny_batch.labels)
        loss.backward()
        losses[on] = loss.detach()
        grads[on] = {n: p.grad for n, p in model.named_parameters()}
        assert calls, "the model runs no block through run_block"
    torch.testing.assert_close(losses[True], losses[False], rtol=0, atol=0)
    assert grads[True].keys() == grads[False].keys()
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("name", NAMES)
def test_activation_checkpointing_recomputes_in_backward_only_when_training(name, tiny_data, tiny_batch):
    model = _model(name, tiny_data.schema, tiny_data.vocab_sizes(), activation_checkpointing=True)
    forwards = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda *_: forwards.append(1))

    def linear_calls_in_backward(training: bool) -> int:
        model.train(training)
        _, loss = model(tiny_batch, tiny_batch.labels)
        n = len(forwards)
        loss.backward()
        return len(forwards) - n

    assert linear_calls_in_backward(training=True) > 0  # the blocks ran again in backward
    assert linear_calls_in_backward(training=False) == 0  # eval mode: stored as usual


def _counting(fn, calls):
    def wrapped(*args):
        calls.append(1)
        return fn(*args)

    return wrapped
