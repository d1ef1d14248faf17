"""KV caches against their slow twins: the request cache (Stage I / Stage II) against the full forward of
every candidate, the training path's gradients against per-candidate ones, the cross-request user cache
against recompute from scratch over appends, truncations and evictions; store bound; bad inputs."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers_model import single_thread  # noqa: F401  (autouse fixture)
from helpers_model import all_switch_combos, make_batch, make_model, tiny_config
from onetrans_mini.kv_cache import RequestCache
from onetrans_mini.serving import (EventLog, Events, OutOfOrderError, Request, Server, UnknownUserError, Window, replay,
                                   window_batch)
from onetrans_mini.user_cache import UserCache, UserCacheStore, fresh_stage_one, plan

TOL = 1e-5


def max_diff(a, b) -> float:
    return float((a - b).detach().abs().max())


def per_candidate(model, batch) -> torch.Tensor:
    """The slow twin: the full forward of every candidate with its own copy of the request's history."""
    return model.forward_full(batch)[0]


# ----------------------------------------------------------------------------------------------
# request cache: Stage I once per request, Stage II per candidate


@pytest.mark.parametrize("pyramid", [True, False])
@pytest.mark.parametrize("n_cand", [1, 7, 64])
def test_two_stage_equals_full_forward_per_candidate(pyramid, n_cand):
    """Requests of different history lengths (padding, one empty) and candidate counts in one batch."""
    model = make_model(tiny_config(pyramid=pyramid, n_layers=4))
    batch = make_batch(3, (n_cand, 3, 1), lengths=[16, 7, 0], seed=n_cand)
    with torch.no_grad():
        fast, _ = model(batch)
        slow = per_candidate(model, batch)
    assert fast.shape == (batch.n_candidates, 2)
    assert max_diff(fast, slow) <= TOL


def test_two_stage_with_interleaved_candidates():
    """Candidates need not be grouped by request: packing finds each one's slot."""
    model = make_model()
    batch = make_batch(3, (4, 2, 5), lengths=[16, 3, 9], seed=3)
    perm = torch.randperm(batch.n_candidates, generator=torch.Generator().manual_seed(0))
    shuffled = batch.select_candidates(perm)
    with torch.no_grad():
        assert max_diff(model(shuffled)[0], per_candidate(model, shuffled)) <= TOL


@pytest.mark.parametrize("combo", [c for c in all_switch_combos() if c["causal"]], ids=str)
def test_two_stage_in_every_causal_switch_combination(combo):
    model = make_model(tiny_config(**combo))
    batch = make_batch(3, (3, 1, 2), lengths=[16, 5, 1], seed=5)
    with torch.no_grad():
        assert max_diff(model(batch)[0], per_candidate(model, batch)) <= TOL


def test_full_attention_ablation_rules_out_the_cache():
    """With causal=False an S-token sees the candidate: the forward is the full one, no cache can be built."""
    model = make_model(tiny_config(causal=False))
    batch = make_batch()
    assert max_diff(model(batch)[0], per_candidate(model, batch)) == 0
    x_s, s_real, _ = model.tokenizer(batch)
    with pytest.raises(ValueError, match="causal attention"):
        model.stage_one(x_s, s_real)
    with pytest.raises(ValueError, match="causal attention"):
        UserCacheStore(model, 1 << 20)


def test_stage_two_holds_no_per_candidate_copy_of_the_history():
    """No tensor Stage II creates is as large as a per-candidate copy of one layer's S keys (B * Ls * d):
    memory per request grows as L_S + C * L_NS, not C * (L_S + L_NS)."""
    model = make_model(tiny_config(d_model=32, n_heads=4, max_len=32))  # H * L_NS = 16 < d = 32
    batch = make_batch(2, (40, 24), seq_len=32, lengths=[32, 20], seed=1)
    b, ls, d = batch.n_candidates, 32, 32

    class Biggest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Biggest.numel = max(Biggest.numel, t.numel())
            return out

    with torch.no_grad():
        x_s, s_real, x_ns = model.tokenizer(batch)
        cache = model.stage_one(x_s, s_real)
        assert cache.layers[0].k.shape[0] == batch.n_requests  # one copy per REQUEST
        with Biggest():
            model.stage_two(cache, x_ns, batch.request_index)
    assert 0 < Biggest.numel < b * ls * d


def test_training_path_gradients_equal_per_candidate_gradients():
    model = make_model(tiny_config(n_layers=4))
    model.train()  # dropout is 0 in the preset: train mode changes nothing but must be allowed
    batch = make_batch(3, (5, 1, 3), lengths=[16, 6, 0], seed=11)
    targets = batch.labels
    _, loss = model(batch, targets)
    loss.backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    _, ref = model(batch.expand_per_candidate(), targets)
    ref.backward()
    assert abs(float(loss.detach()) - float(ref.detach())) <= TOL
    n_checked = 0
    for name, p in model.named_parameters():
        if p.grad is None:
            assert name not in fast
            continue
        torch.testing.assert_close(fast[name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        n_checked += 1
    assert n_checked == len(fast) > 20


def test_empty_candidate_lists():
    model = make_model()
    batch = make_batch(2, (0, 0), lengths=[5, 3])
    with pytest.raises(ValueError, match="no candidates"):
        model(batch)
    x_s, s_real, _ = model.tokenizer(batch)
    out = model.score(model.stage_one(x_s, s_real), batch.ns, batch.request_index)
    assert out.shape == (0, 2)
    # a request with no candidates next to requests with some
    batch = make_batch(3, (2, 0, 3), lengths=[5, 3, 16], seed=2)
    with torch.no_grad():
        assert max_diff(model(batch)[0], per_candidate(model, batch)) <= TOL


def test_request_caches_stack_with_padding():
    """Users of different history lengths (one empty) scored together in one Stage II call."""
    model = make_model(tiny_config(n_layers=4))
    batch = make_batch(3, (2, 3, 1), lengths=[16, 5, 0], seed=4)
    wins = [_window_of(batch, r) for r in range(3)]
    with torch.no_grad():
        ucs = []
        for w in wins:
            uc = UserCache()
            uc.advance(model, w)
            ucs.append(uc.request_cache())
        out = model.score(RequestCache.stack(ucs), batch.ns, batch.request_index)
        assert max_diff(out, per_candidate(model, batch)) <= TOL


def test_score_one_request_needs_no_index():
    """One cached request: score(cache, ns) scores every candidate against it; several: the index is required."""
    model = make_model()
    batch = make_batch(2, (3, 2), lengths=[9, 4], seed=5)
    with torch.no_grad():
        x_s, s_real, _ = model.tokenizer(batch)
        first = {k: v[:3] for k, v in batch.ns.items()}  # request 0's candidates
        one = model.stage_one(x_s[:1], s_real[:1])
        short = model.score(one, first)
        assert torch.equal(short, model.score(one, first, torch.zeros(3, dtype=torch.long)))
        assert max_diff(short, per_candidate(model, batch)[:3]) <= TOL
        with pytest.raises(ValueError, match="holds 2 requests: pass request_index"):
            model.score(model.stage_one(x_s, s_real), first)


# ----------------------------------------------------------------------------------------------
# cross-request user cache


def _window_of(batch, r: int) -> Window:
    m = batch.seq_mask[r]
    ev = Events({k: v[r][m] for k, v in batch.seq.items()}, batch.seq_type[r][m],
                torch.arange(int(m.sum()), dtype=torch.float64))
    return Window(ev, 0)


class Stream:
    """Random append-only event streams for a few users (ids in the helper schema's vocabularies)."""

    def __init__(self, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.t = 0.0

    def events(self, n: int) -> Events:
        g = self.g
        f = {"hist_item": torch.randint(2, 23, (n,), generator=g), "hist_genre": torch.randint(2, 7, (n,), generator=g),
             "hist_gap": torch.randint(1, 6, (n,), generator=g)}
        ev = Events(f, torch.randint(1, 3, (n,), generator=g), self.t + torch.arange(n, dtype=torch.float64))
        self.t += n
        return ev


def _reference(model, window: Window, ns: dict) -> torch.Tensor:
    """Recompute from scratch: the full forward of every candidate over the window."""
    return per_candidate(model, window_batch(window, ns, model.n_tasks))


@pytest.mark.parametrize("pyramid,n_layers,drop_block", [(True, 4, 4), (False, 4, 4), (True, 3, 1), (True, 5, 3)])
def test_user_cache_equals_recompute_over_appends_truncations_and_evictions(pyramid, n_layers, drop_block):
    model = make_model(tiny_config(pyramid=pyramid, n_layers=n_layers))
    log = EventLog(model.config.max_len, drop_block)
    probe = UserCache()
    probe.advance(model, Window(Stream(9).events(16), 0))
    store = UserCacheStore(model, max_bytes=int(2.5 * probe.nbytes))  # room for two full users of three
    stream = Stream()
    ns = make_batch(1, (6,), seed=3).ns
    g = torch.Generator().manual_seed(1)
    sizes = [3, 0, 5, 1, 8, 2, 0, 4, 6, 1, 7, 3, 2, 5, 9, 1]
    for step, n in enumerate(sizes * 2):
        user = int(torch.randint(0, 3, (1,), generator=g))
        window = log.append(user, stream.events(n))
        with torch.no_grad():
            rc = store.request_cache(user, window)
            got = model.score(rc, ns, torch.zeros(6, dtype=torch.long))
            want = _reference(model, window, ns)
            assert max_diff(got, want) <= TOL, f"step {step}"
            # the cached keys/values themselves equal a fresh Stage I's, layer by layer
            ref = fresh_stage_one(model, window)
            for a, b in zip(rc.layers, ref.layers):
                ka, kb = a.k[:, :, a.s_real[0]], b.k[:, :, b.s_real[0]]
                assert ka.shape == kb.shape and max_diff(ka, kb) <= TOL if ka.numel() else True
        assert store.stats.bytes_held <= store.max_bytes
        assert sum(uc.nbytes for uc in store._users.values()) == store.stats.bytes_held
    st = store.stats
    assert st.hits > 0 and st.evictions > 0 and st.truncations > 0 and log.truncations > 0
    assert st.positions_reused > 0
    if pyramid and n_layers >= 4:
        assert st.pyramid_recomputes > 0  # layers >= 2 whose key window moved were recomputed
    if n_layers == 3:
        assert st.pyramid_recomputes == 0  # only the top layer's window moves, and it has no S queries


def test_append_computes_only_the_new_events_where_reuse_is_exact():
    """Without truncation, a 3-layer pyramid (and any model without pyramid) computes only the new
    positions; a 4-layer pyramid recomputes layer 2's tail, whose key window moved."""
    for pyramid, n_layers, moved in ((True, 3, False), (False, 4, False), (True, 4, True)):
        model = make_model(tiny_config(pyramid=pyramid, n_layers=n_layers))
        s = Stream()
        ev = s.events(14)
        uc = UserCache()
        uc.advance(model, Window(ev.slice(0, 10), 0))
        steps = uc.advance(model, Window(ev, 0))
        assert not steps[0].window_moved and not steps[1].window_moved
        if not moved:
            assert all(st.computed(14) <= 4 for st in steps), steps
        else:
            assert steps[2].window_moved and steps[2].computed(14) == model.layer_queries[2], steps


def test_approximate_mode_reuses_everything_and_drifts_only_where_exactness_needs_recompute():
    model = make_model(tiny_config(pyramid=True, n_layers=4))
    ns = make_batch(1, (4,), seed=2).ns
    ri = torch.zeros(4, dtype=torch.long)
    log = EventLog(16, drop_block=4)
    exact, approx = UserCacheStore(model, 1 << 20), UserCacheStore(model, 1 << 20, mode="approx")
    s = Stream()
    drift_before, drift_after = 0.0, 0.0
    for n in (3, 2, 4, 5, 6, 2):
        w = log.append(0, s.events(n))
        with torch.no_grad():
            a = model.score(exact.request_cache(0, w), ns, ri)
            b = model.score(approx.request_cache(0, w), ns, ri)
        if w.end <= model.layer_queries[1]:  # no window has moved yet: both are exact
            drift_before = max(drift_before, max_diff(a, b))
        else:
            drift_after = max(drift_after, max_diff(a, b))
    assert drift_before <= TOL and drift_after > 1e-4
    assert approx.stats.positions_computed < exact.stats.positions_computed


def test_timestamp_agnostic_merge_falls_back_to_recompute_and_says_so():
    model = make_model(tiny_config(seq_merge="timestamp_agnostic"))
    with pytest.warns(UserWarning, match="never reusable"):
        store = UserCacheStore(model, 1 << 20)
    log, s = EventLog(16, 4), Stream()
    ns = make_batch(1, (3,), seed=1).ns
    for n in (4, 3, 12):
        w = log.append(7, s.events(n))
        with torch.no_grad():
            got = model.score(store.request_cache(7, w), ns, torch.zeros(3, dtype=torch.long))
            assert max_diff(got, _reference(model, w, ns)) <= TOL
    assert store.stats.fallbacks == 3 and store.stats.hits == 0 and len(store) == 0
    with pytest.raises(ValueError, match="timestamp_aware"):
        UserCache().advance(model, w)


def test_store_bound_and_lru_order():
    model = make_model()
    s = Stream()
    uc = UserCache()
    uc.advance(model, Window(s.events(8), 0))
    store = UserCacheStore(model, max_bytes=2 * uc.nbytes)
    log = EventLog(16)
    for user in (0, 1, 0, 2):  # 0 is used again, so 1 is the least recently used when 2 arrives
        store.request_cache(user, log.append(user, s.events(8 if user not in log else 0)))
        assert store.stats.bytes_held <= store.max_bytes
    assert 0 in store and 2 in store and 1 not in store and store.stats.evictions == 1
    tiny = UserCacheStore(model, max_bytes=10)  # a state larger than the whole store is returned, not kept
    tiny.request_cache(5, log.append(5, s.events(4)))
    assert len(tiny) == 0 and tiny.stats.not_stored == 1 and tiny.stats.bytes_held == 0


# ----------------------------------------------------------------------------------------------
# bad inputs


def test_unknown_user_without_history_is_an_error_and_cold_start_is_explicit():
    model = make_model()
    log = EventLog(16)
    with pytest.raises(UnknownUserError, match="has no history"):
        log.window(42)
    fields = model.tokenizer.seq.fields
    w = log.append(42, Events.empty(fields))  # explicit cold start: an empty history
    ns = make_batch(1, (2,), seed=1).ns
    store = UserCacheStore(model, 1 << 20)
    with torch.no_grad():
        got = model.score(store.request_cache(42, w), ns, torch.zeros(2, dtype=torch.long))
        assert max_diff(got, _reference(model, w, ns)) <= TOL


def test_out_of_order_events_are_rejected():
    model = make_model()
    s = Stream()
    log = EventLog(16)
    log.append(1, s.events(5))
    late = s.events(2)
    late.time -= 100.0  # older than what was appended
    with pytest.raises(OutOfOrderError, match="older than the last appended"):
        log.append(1, late)
    with pytest.raises(OutOfOrderError, match="non-decreasing"):
        Events(late.fields, late.seq_type, torch.tensor([2.0, 1.0], dtype=torch.float64))
    # the cache itself checks the window extends what it holds
    uc = UserCache()
    ev = s.events(6)
    uc.advance(model, Window(ev.slice(0, 4), 0))
    with pytest.raises(OutOfOrderError, match="non-decreasing"):
        Events.cat([ev.slice(0, 4), late])  # a window cannot even hold them
    with pytest.raises(ValueError, match="not the cached history"):
        uc.advance(model, Window(Stream(5).events(6), 0))
    with pytest.raises(ValueError, match="does not extend"):
        uc.advance(model, Window(ev.slice(0, 2), 0))


@pytest.mark.parametrize("field,value,message", [
    ("seq_type", 0, r"seq_type must be in 1..2 .*got range \[0, [12]\]"),
    ("seq_type", 3, r"seq_type must be in 1..2 .*got range \[[12], 3\]"),
    ("hist_item", 23, r"field 'hist_item': ids must be in \[0, 23\)"),
    ("hist_gap", -1, r"field 'hist_gap': ids must be in \[0, "),
])
def test_appending_bad_events_names_the_field(field, value, message):
    """The append path checks events only when the tokenizer's lookups fail; the error must still name the
    field and the expected range, for a new user and for an append alike."""
    model = make_model()
    s = Stream()
    good, bad = s.events(6), s.events(2)
    (bad.seq_type if field == "seq_type" else bad.fields[field])[-1] = value
    with pytest.raises(ValueError, match=message):
        UserCache().advance(model, Window(bad, 0))
    uc = UserCache()
    uc.advance(model, Window(good, 0))
    with pytest.raises(ValueError, match=message):
        uc.advance(model, Window(Events.cat([good, bad]), 0))


def test_appending_events_with_float_ids_names_the_field():
    ev = Stream().events(3)
    ev.fields["hist_item"] = ev.fields["hist_item"].float()
    with pytest.raises(ValueError, match="hist_item must hold integer ids, got dtype torch.float32"):
        UserCache().advance(make_model(), Window(ev, 0))


def test_appending_events_without_a_field_names_it():
    model = make_model()
    ev = Stream().events(3)
    del ev.fields["hist_genre"]
    with pytest.raises(ValueError, match=r"lack event field\(s\) \['hist_genre'\]"):
        UserCache().advance(model, Window(ev, 0))


def test_server_modes_agree_and_empty_requests():
    model = make_model(tiny_config(n_layers=4))
    s = Stream()
    servers = {m: Server(model, m, drop_block=4, cache_bytes=1 << 20) for m in ("none", "request", "both")}
    ns = make_batch(1, (3,), seed=1).ns
    for i, n in enumerate((5, 4, 0, 9, 3)):
        ev = s.events(n)
        req = Request(user=i % 2, request_id=i, time=s.t, new_events=ev, ns=ns, n_candidates=3)  # after its events
        outs = {m: srv.score(req) for m, srv in servers.items()}
        assert max_diff(outs["request"], outs["none"]) <= TOL and max_diff(outs["both"], outs["none"]) <= TOL
    empty = Request(user=0, request_id=9, new_events=s.events(2), ns={k: v[:0] for k, v in ns.items()},
                    n_candidates=0)
    assert servers["both"].score(empty).shape == (0, 2)
    assert len(servers["both"].log.window(0).events) == min(16, 5 + 0 + 3 + 2)  # its events were kept
    with pytest.raises(ValueError, match="mode must be"):
        Server(model, "bogus")


def test_replay_on_synthetic_data_is_exact(tiny_data):
    from onetrans_mini.model import OneTrans

    torch.manual_seed(0)
    model = OneTrans(tiny_config(max_len=tiny_data.config.max_len, n_layers=4, pyramid_granularity=8),
                     tiny_data.schema, tiny_data.vocab_sizes()).eval()
    res = replay(model, tiny_data, ("none", "request", "both", "approx"), max_requests=40, drop_block=8, warmup=1)
    for mode in ("request", "both"):
        assert res[mode]["max_abs_diff"] <= TOL
    assert res["both"]["cache"]["hits"] > 0 and res["both"]["requests"] == 40
    assert res["none"]["p50_ms"] > 0


def test_cli_replay_on_synthetic(tiny_data, capsys):
    from onetrans_mini.cli import main

    rc = main(["replay", "--dataset", "synthetic-tiny", "--preset", "nano", "--max-requests", "12", "--modes",
               "none,both"])
    out = capsys.readouterr().out
    assert rc == 0 and "max |diff|" in out and "both" in out
    assert main(["replay", "--dataset", "synthetic-tiny", "--modes", "none,bogus"]) == 2
    assert "--modes" in capsys.readouterr().err


def test_user_cache_needs_eval_mode_when_the_model_has_dropout():
    model = make_model(tiny_config(dropout=0.1)).train()
    with pytest.raises(ValueError, match=r"eval mode .*model.eval\(\)"):
        UserCache().advance(model, Window(Stream().events(4), 0))


def _check_cache_then_append(model, between=lambda: None):
    """Cache 8 events of a user, run ``between``, append 4 more: the scores must equal recompute from scratch."""
    ev = Stream().events(12)
    ns = make_batch(1, (3,), seed=1).ns
    uc = UserCache()
    with torch.no_grad():
        uc.advance(model, Window(ev.slice(0, 8), 0))
        between()
        uc.advance(model, Window(ev, 0))
        got = model.score(uc.request_cache(), ns, torch.zeros(3, dtype=torch.long))
        assert max_diff(got, _reference(model, Window(ev, 0), ns)) <= TOL


def test_schedules_ending_in_several_zero_layers():
    """Layers above the top S-query layer compute keys/values from no new S outputs (an empty input)."""
    _check_cache_then_append(make_model(tiny_config(pyramid_schedule=(16, 0, 0))))


def test_the_plan_is_pure_integers_and_names_what_it_reuses():
    """A 4-layer pyramid over a full window of 16 events (queries 16, 12, 8, 0), 2 events appended after
    the front dropped 2: layer 0's window moved, so everything is recomputed from its cached inputs."""
    queries = [16, 12, 8, 0]
    append = plan(queries, start=0, end=14, cached_end=12, cached_key_starts=[0, 0, 0, 4])
    assert [(p.inputs_from, p.key_start, p.query_start, p.outputs_from, p.window_moved) for p in append] == [
        (12, 0, 0, 12, False), (12, 0, 2, 12, False), (12, 2, 6, 6, True), (6, 6, 14, 14, True)]
    assert [p.computed(14) for p in append] == [2, 2, 8, 0] and [p.reused() for p in append] == [12, 10, 0, 0]
    approx = plan(queries, start=0, end=14, cached_end=12, cached_key_starts=[0, 0, 0, 4], approx=True)
    assert [p.outputs_from for p in approx] == [12, 12, 12, 14]  # reuses the moved layer's old outputs
    truncated = plan(queries, start=2, end=18, cached_end=16, cached_key_starts=[0, 0, 4, 8])
    assert truncated[0].window_moved and truncated[0].outputs_from == 2  # every layer-0 output again
    fresh = plan(queries, start=0, end=5, cached_end=0, cached_key_starts=None)
    assert [p.outputs_from for p in fresh] == [0, 0, 0, 5] and not any(p.window_moved for p in fresh)


def test_after_new_weights_the_server_forgets_its_cached_users():
    """Cached states belong to the weights they were computed with: ``Server.load_state_dict`` loads new weights
    and clears the user cache, so the next request recomputes; without it a state would be stale."""
    model = make_model(tiny_config(n_layers=4))
    other = make_model(tiny_config(n_layers=4), seed=1).state_dict()
    server = Server(model, "both", drop_block=4, cache_bytes=1 << 20)
    s, ns = Stream(), make_batch(1, (3,), seed=1).ns
    server.score(Request(0, 0, new_events=s.events(6), ns=ns))
    stale = UserCache()  # what a cache that is not cleared would hold: the old weights' states
    stale.advance(model, server.log.window(0))
    server.load_state_dict(other)
    assert len(server.store) == 0
    req = Request(0, 1, new_events=s.events(3), ns=ns)
    got = server.score(req)
    window = server.log.window(0)
    assert max_diff(got, _reference(model, window, ns)) <= TOL
    with torch.no_grad():
        stale.advance(model, window)
        old = model.score(stale.request_cache(), ns, torch.zeros(3, dtype=torch.long))
    assert max_diff(old, got) > 1e-3  # the failure clear() prevents


def test_a_rejected_request_changes_nothing():
    """Bad events are refused before they reach the event log or the user cache: the user's next good
    request is served from its cached state, exactly."""
    model = make_model(tiny_config(n_layers=4))
    server = Server(model, "both", drop_block=4, cache_bytes=1 << 20)
    s, ns = Stream(), make_batch(1, (3,), seed=1).ns
    server.score(Request(0, 0, new_events=s.events(6), ns=ns))
    bad = s.events(2)
    bad.fields["hist_item"][0] = 999
    with pytest.raises(ValueError, match="hist_item"):
        server.score(Request(0, 1, new_events=bad, ns=ns))
    assert len(server.log.window(0).events) == 6 and server.store.stats.hits == 0
    got = server.score(Request(0, 2, new_events=s.events(3), ns=ns))
    assert server.store.stats.hits == 1
    assert max_diff(got, _reference(model, server.log.window(0), ns)) <= TOL


# ----------------------------------------------------------------------------------------------
# bf16 autocast on every path (CPU autocast stands in for CUDA's)


BF16_TOL = 0.1  # logits of a tiny random model; bf16 keeps 8 bits of mantissa


def test_every_forward_path_runs_under_bf16_autocast_forward_and_backward():
    model = make_model(tiny_config(n_layers=4)).train()
    batch = make_batch(3, (4, 2, 3), lengths=[16, 5, 0], seed=6)
    with torch.no_grad():
        ref = per_candidate(model, batch)
    for name, fwd in (("request level", model), ("full", model.forward_full)):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss = fwd(batch, batch.labels)
        loss.backward()
        assert max_diff(logits.float(), ref) <= BF16_TOL, name
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), name
    # serving: the user cache's appends, under autocast too
    model.eval()
    ev, ns = Stream().events(12), make_batch(1, (3,), seed=1).ns
    uc = UserCache()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        uc.advance(model, Window(ev.slice(0, 8), 0))
        uc.advance(model, Window(ev, 0))
        got = model.score(uc.request_cache(), ns, torch.zeros(3, dtype=torch.long))
    assert max_diff(got.float(), _reference(model, Window(ev, 0), ns)) <= BF16_TOL


def test_activation_checkpointing_gives_the_same_gradients():
    batch = make_batch(3, (4, 2, 3), lengths=[16, 5, 0], seed=6)
    grads = {}
    for on in (False, True):
        model = make_model(tiny_config(n_layers=4, activation_checkpointing=on)).train()
        for name, fwd in (("request level", model), ("full", model.forward_full)):
            model.zero_grad(set_to_none=True)
            fwd(batch, batch.labels)[1].backward()
            grads[on, name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for name in ("request level", "full"):
        assert grads[True, name].keys() == grads[False, name].keys()
        for n, g in grads[False, name].items():
            torch.testing.assert_close(grads[True, name][n], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name} {n}: {m}")


def test_activation_checkpointing_recomputes_in_backward():
    """It really recomputes: the blocks run again during backward (counted with a forward hook)."""
    batch = make_batch(2, (3, 2), lengths=[16, 5], seed=2)
    for on, expected in ((False, 0), (True, 1)):
        model = make_model(tiny_config(n_layers=3, activation_checkpointing=on)).train()
        calls = {"forward": 0, "backward": 0}
        phase = ["forward"]
        model.blocks[0].norm1.register_forward_hook(lambda *_: calls.__setitem__(phase[0], calls[phase[0]] + 1))
        _, loss = model(batch, batch.labels)
        phase[0] = "backward"
        loss.backward()
        assert calls["forward"] == 2  # Stage I and Stage II
        assert calls["backward"] == 2 * expected


def test_a_cache_built_under_autocast_scores_outside_it_and_the_reverse():
    """Stage I in bf16 (autocast), Stage II in fp32, or the reverse: same logits within bf16's error."""
    model = make_model(tiny_config(n_layers=3)).eval()
    batch = make_batch(1, (3,), lengths=[12], seed=3)
    with torch.no_grad():
        ref = per_candidate(model, batch)
        x_s, s_real, _ = model.tokenizer(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_cache = model.stage_one(x_s, s_real)
        assert bf16_cache.layers[0].k.dtype == torch.bfloat16
        assert max_diff(model.score(bf16_cache, batch.ns), ref) <= BF16_TOL
        fp32_cache = model.stage_one(x_s, s_real)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert max_diff(model.score(fp32_cache, batch.ns).float(), ref) <= BF16_TOL


def _bad_score_inputs(batch):
    ns, ri = batch.ns, batch.request_index
    without = {k: v for k, v in ns.items() if k != "item_id"}
    too_big = {**ns, "item_id": ns["item_id"] + 1000}
    as_float = {**ns, "item_id": ns["item_id"].float()}
    return [
        ((without, ri), r"ns lacks NS feature 'item_id'"),
        ((as_float, ri), r"ns\['item_id'\] must hold integer ids, got dtype torch.float32"),
        ((too_big, ri), r"ns: feature 'item_id': ids must be in \[0, 23\) \(its vocabulary size\)"),
        ((ns, ri[:-1]), r"ns\['user_id'\] must have shape \(4,\), got \(5,\)"),
        ((ns, ri.float()), r"request_index must hold integer ids, got dtype torch.float32"),
        ((ns, ri[None]), r"request_index must be a 1-D tensor"),
        ((ns, ri + 5), r"request_index must be in \[0, 2\) \(the cached requests\)"),
    ]


@pytest.mark.parametrize("i", range(7))
def test_score_refuses_bad_candidates_in_one_clear_line(i):
    model = make_model()
    batch = make_batch(2, (3, 2), lengths=[9, 4], seed=5)
    (ns, ri), pattern = _bad_score_inputs(batch)[i]
    with torch.no_grad():
        x_s, s_real, _ = model.tokenizer(batch)
        cache = model.stage_one(x_s, s_real)
        with pytest.raises(ValueError, match=pattern):
            model.score(cache, ns, ri)
        # int32 ids and index are fine (as in a batch): same logits as int64
        small = {k: v.int() for k, v in batch.ns.items()}
        assert torch.equal(model.score(cache, small, batch.request_index.int()),
                           model.score(cache, batch.ns, batch.request_index))
