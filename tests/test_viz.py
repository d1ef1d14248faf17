"""viz: the attention statistics on hand-made maps, and every plot on a nano model (MPLBACKEND=Agg)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from helpers_model import single_thread  # noqa: F401,E402  (autouse fixture)
from helpers_model import SCHEMA, make_batch, make_model, tiny_config  # noqa: E402
from onetrans_mini import viz  # noqa: E402
from onetrans_mini.attention import AttentionMap, capture_attention  # noqa: E402
from onetrans_mini.data.batching import Batch  # noqa: E402
from onetrans_mini.features import Vocab, Vocabularies  # noqa: E402

# ----------------------------------------------------------------------------------------------
# a hand-made batch and map: 2 requests, 3 candidates, L = 4 history slots, 2 NS-tokens


def _batch():
    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])  # request 0: 1 padding slot
    seq_type = torch.tensor([[0, 1, 2, 1], [2, 2, 1, 1]])
    hist_genre = torch.tensor([[0, 2, 3, 4], [4, 3, 2, 2]])  # ids of the hist_genre vocabulary below
    return Batch(
        seq={"hist_genre": hist_genre}, seq_type=seq_type, seq_mask=mask,
        ns={"genres": torch.tensor([[2, 0], [3, 4], [2, 0]])},  # ids of the genres vocabulary below
        request_index=torch.tensor([0, 0, 1]), labels=torch.zeros(3, 1), user=torch.tensor([0, 0, 1]),
        request_id=torch.tensor([10, 11]),
    )


VOCABS = Vocabularies({"hist_genre": Vocab(["Drama", "Comedy", "Action"]),  # ids 2, 3, 4
                       "genres": Vocab(["Comedy", "Action", "Drama"])})  # ids 2, 3, 4


def _probs():
    """(N=3, H=2, Q=2, K=6): queries are the 2 NS-tokens (n_s_queries=0), keys 4 S + 2 NS.
    Every row is a valid causal distribution: zero on padding keys and on the later NS key."""
    p = torch.zeros(3, 2, 2, 6)
    # candidates 0 and 1 (request 0, key 0 is padding)
    p[:2, 0, 0] = torch.tensor([0, 0.1, 0.2, 0.5, 0.2, 0])
    p[:2, 0, 1] = torch.tensor([0, 0.1, 0.1, 0.2, 0.3, 0.3])
    p[:2, 1, 0] = torch.tensor([0, 0.3, 0.3, 0.3, 0.1, 0])
    p[:2, 1, 1] = torch.tensor([0, 0.0, 0.5, 0.5, 0.0, 0.0])
    # candidate 2 (request 1, no padding)
    p[2, :, 0] = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.6, 0])
    p[2, :, 1] = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.1, 0.1])
    return p


def _map():
    return [AttentionMap(layer=0, probs=_probs(), n_s_queries=0, n_s_keys=4, n_ns=2)]


def test_ns_query_mass_sums_to_one_and_padding_gets_nothing():
    df = viz.ns_query_mass(_map(), _batch())
    assert len(df) == 3 * 2 * 2
    np.testing.assert_allclose(df.s_mass + df.ns_mass + df.pad_mass, 1.0, rtol=1e-6)
    assert (df.pad_mass == 0).all()
    row = df[(df["row"] == 0) & (df["head"] == 0) & (df["ns_query"] == 1)].iloc[0]
    assert row.s_mass == pytest.approx(0.4) and row.ns_mass == pytest.approx(0.6)


def test_ns_to_s_table_excludes_padding_and_counts_distance_from_newest():
    t = viz.ns_to_s_table(_map(), _batch(), match=viz.feature_match(_batch(), VOCABS))
    # 3 real events for candidates 0 and 1, 4 for candidate 2
    assert len(t) == 3 + 3 + 4
    c0 = t[t.row == 0].sort_values("position")
    assert c0.position.tolist() == [1, 2, 3] and c0.distance.tolist() == [2, 1, 0]
    assert c0.behaviour.tolist() == [1, 2, 1] and c0.n_events.tolist() == [3, 3, 3]
    assert t[t.row == 2].request_id.unique().tolist() == [11]
    # mass: mean over NS queries and heads; for the newest event of candidate 0: (0.5 + 0.2 + 0.3 + 0.5) / 4
    assert c0.mass.iloc[-1] == pytest.approx(1.5 / 4)
    # uniform: NS0 sees 3 events + itself, NS1 3 events + 2 NS
    assert c0.uniform.iloc[0] == pytest.approx((1 / 4 + 1 / 5) / 2)
    np.testing.assert_allclose(t.lift, t.mass / t.uniform, rtol=1e-6)
    # over a candidate's events, mass = the NS->S share of ns_query_mass, averaged over queries and heads
    q = viz.ns_query_mass(_map(), _batch())
    np.testing.assert_allclose(t.groupby("row").mass.sum().to_numpy(), q.groupby("row").s_mass.mean().to_numpy(),
                               rtol=1e-6)
    # by head: the head average gives the same mass
    th = viz.ns_to_s_table(_map(), _batch(), by_head=True)
    assert len(th) == 2 * len(t)
    np.testing.assert_allclose(th.groupby(["row", "position"]).mass.mean().to_numpy(),
                               t.sort_values(["row", "position"]).mass.to_numpy(), rtol=1e-6)


def test_feature_match_compares_values_not_ids():
    m = viz.feature_match(_batch(), VOCABS)  # (B=3, L=4)
    # candidate 0 has genres {Comedy}; request 0's events: pad, Drama, Comedy, Action
    assert m[0].tolist() == [False, False, True, False]
    # candidate 1 has {Action, Drama}
    assert m[1].tolist() == [False, True, False, True]
    # candidate 2 has {Comedy}; request 1's events: Action, Comedy, Drama, Drama
    assert m[2].tolist() == [False, True, False, False]
    assert viz.id_to_value(VOCABS, "hist_genre")[[0, 1, 3]].tolist() == [None, "(OOV)", "Comedy"]


def test_recency_buckets_and_shares():
    buckets = viz.recency_bucket([0, 1, 2, 3, 4, 7, 8, 200], (1, 2, 4, 8))
    assert list(buckets) == ["0", "1", "2-3", "2-3", "4-7", "4-7", "8+", "8+"]
    with pytest.raises(ValueError):
        viz.recency_bucket([0], (2, 2))
    t = viz.ns_to_s_table(_map(), _batch())
    df = viz.attention_by_recency(t, bins=(1, 2))
    assert df.bucket.astype(str).tolist() == ["0", "1", "2+"]
    assert df.events.tolist() == [3, 3, 4]  # one newest and one next event per candidate, the rest older
    np.testing.assert_allclose(df.share.sum(), 1.0)
    np.testing.assert_allclose(df.uniform_share.sum(), 1.0)
    # share by hand: the newest events' mass over all S mass
    newest = t[t.distance == 0].mass.sum() / t.mass.sum()
    assert df.share.iloc[0] == pytest.approx(newest)
    # uniform share of the newest event: one of 3, 3 and 4 events of equal uniform weight within a row
    u = t.groupby("row").uniform.first()
    assert df.uniform_share.iloc[0] == pytest.approx(u.sum() / (3 * u[0] + 3 * u[1] + 4 * u[2]))
    # the same from (maps, batch), and recent_share == the first bucket of bins=(k,)
    pd.testing.assert_frame_equal(viz.attention_by_recency(_map(), _batch(), bins=(1, 2)), df)
    rs = viz.recent_share(t, k=2)
    assert rs.share.iloc[0] == pytest.approx(t[t.distance < 2].mass.sum() / t.mass.sum())


def test_attention_by_group_and_extra_keys():
    t = viz.ns_to_s_table(_map(), _batch(), match=viz.feature_match(_batch(), VOCABS), schema=SCHEMA)
    g = viz.attention_by_group(t, "match")
    assert g.events.tolist() == [6, 4]  # False, True
    assert g.lift.iloc[1] == pytest.approx(t[t.match].lift.mean())
    np.testing.assert_allclose(g.share.sum(), 1.0)
    b = viz.attention_by_group(t, "behaviour")
    assert [str(x) for x in b.behaviour] == ["liked", "disliked"]
    both = pd.concat([t.assign(model="a"), t.assign(model="b")])
    gb = viz.attention_by_group(both, "match", by="model")
    assert len(gb) == 4 and gb.groupby("model").share.sum().tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="not in the table"):
        viz.attention_by_group(t, "nope")


def test_attention_by_distance_and_its_heatmap():
    t = viz.ns_to_s_table(_map(), _batch(), match=viz.feature_match(_batch(), VOCABS))
    d = viz.attention_by_distance(t, "match")
    # one row per (match, layer, distance) that has events; lift = the mean lift of those events
    assert len(d) == len(t.groupby(["match", "distance"]))
    for _, r in d.iterrows():
        sel = t[(t.match == r.match) & (t.distance == r.distance)]
        assert r.events == len(sel) and r.lift == pytest.approx(sel.lift.mean())
    np.testing.assert_allclose(d.groupby("match").share.sum(), 1.0)  # shares within each match group
    assert viz.attention_by_distance(t, max_distance=1).distance.tolist() == [0, 1]
    with pytest.raises(ValueError, match="not in the table"):
        viz.attention_by_distance(t, "nope")
    ax = viz.lift_heatmap(d, "match", label={True: "same genre", False: "other"})
    shown = np.asarray(ax.images[0].get_array())
    assert shown.shape == (2, int(t.distance.max()) + 1)  # False, True x distances 0..3
    assert shown[1, 0] == pytest.approx(d[(d.match) & (d.distance == 0)].lift.iloc[0])
    assert [x.get_text() for x in ax.get_yticklabels()] == ["other", "same genre"]
    narrow = viz.lift_heatmap(d, "match", vmin=0.5, vmax=1.5)
    assert (narrow.images[0].norm.vmin, narrow.images[0].norm.vcenter, narrow.images[0].norm.vmax) == (0.5, 1.0, 1.5)
    with pytest.raises(ValueError, match="layer 5"):
        viz.lift_heatmap(d, "match", layer=5)
    plt.close("all")


def test_s_to_s_by_offset_on_a_hand_made_map():
    # one request, L = 3 with 1 padding slot, 2 S queries (the last two tokens), no NS
    p = torch.zeros(1, 1, 2, 3)
    p[0, 0, 0] = torch.tensor([0.0, 1.0, 0.0])  # query at position 1 (first real event): itself only
    p[0, 0, 1] = torch.tensor([0.0, 0.25, 0.75])  # query at position 2
    b = Batch(seq={}, seq_type=torch.tensor([[0, 1, 1]]), seq_mask=torch.tensor([[False, True, True]]), ns={},
              request_index=torch.tensor([0]), labels=torch.zeros(1, 1), user=torch.tensor([0]),
              request_id=torch.tensor([0]))
    df = viz.s_to_s_by_offset([AttentionMap(0, p, 2, 3, 0)], b)
    assert df.offset.tolist() == [0, 1] and df.pairs.tolist() == [2, 1]
    assert df.prob.tolist() == pytest.approx([(1.0 + 0.75) / 2, 0.25])
    assert df.lift.tolist() == pytest.approx([(1.0 + 1.5) / 2, 0.5])  # n_visible 1 and 2


def test_helpers_reject_mismatched_inputs():
    with pytest.raises(ValueError, match="rows"):  # 3 rows, but 4 candidates and 2 requests
        viz.ns_query_mass(_map(), make_batch(n_requests=2, cands_per_request=(2, 2)))
    with pytest.raises(ValueError, match="timestamp-agnostic"):  # 3 candidates, but 16 events, not 4
        viz.ns_to_s_table(_map(), make_batch(n_requests=3, cands_per_request=(1, 1, 1)))
    maps = _map() + _map()
    with pytest.raises(ValueError, match="several forward"):
        viz.get_map(maps, 0)
    assert viz.get_map(_map(), -1).layer == 0


def test_heatmap_lift_scale_is_probability_times_visible_keys():
    ax = viz.ns_to_s_heatmap(_map(), 0, candidate=0, batch=_batch())
    shown = np.asarray(ax.images[0].get_array())  # (n_ns, real events): padding key left out
    p = _probs()[0].mean(0)[:, 1:4].numpy()  # heads averaged, the 3 real S keys
    np.testing.assert_allclose(shown, p * np.array([[4.0], [5.0]]), rtol=1e-6)  # NS0 sees 3 + 1 keys, NS1 3 + 2
    ax2 = viz.ns_to_s_heatmap(_map(), 0, candidate=0, batch=_batch(), scale="prob", head=1)
    np.testing.assert_allclose(np.asarray(ax2.images[0].get_array()), _probs()[0, 1][:, 1:4].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="scale"):
        viz.ns_to_s_heatmap(_map(), 0, scale="nope")
    plt.close("all")


# ----------------------------------------------------------------------------------------------
# a nano model: real maps, every plot


@pytest.fixture(scope="module")
def nano():
    model = make_model(tiny_config(n_layers=3))
    batch = make_batch(n_requests=3, cands_per_request=(2, 1, 3), lengths=[16, 9, 3])
    with torch.no_grad(), capture_attention(model) as maps:
        model.forward_full(batch)
    return model, batch, maps


def test_real_maps_statistics(nano):
    model, batch, maps = nano
    q = viz.ns_query_mass(maps, batch)
    np.testing.assert_allclose(q.s_mass + q.ns_mass, 1.0, rtol=1e-5)
    assert q.pad_mass.abs().max() < 1e-7
    t = viz.ns_to_s_table(maps, batch)
    sched = model.schedule(batch.seq_len)
    keys = [batch.seq_len] + sched[:-1]
    real = batch.seq_mask[batch.request_index]
    for layer, k in enumerate(keys):
        tl = t[t.layer == layer]
        assert len(tl) == int(real[:, batch.seq_len - k:].sum())  # every real key of the layer, nothing else
        assert tl.distance.max() < k
    df = viz.attention_by_recency(t)
    np.testing.assert_allclose(df.groupby("layer").share.sum(), 1.0, rtol=1e-6)
    p = viz.pyramid_kept(model, batch)
    assert p.s_queries.tolist() == sched and p.s_keys.tolist() == keys
    assert p.real_keys.iloc[0] == pytest.approx(batch.seq_mask.sum(1).float().mean().item())
    off = viz.s_to_s_by_offset(maps, batch)
    assert set(off.layer) == {layer for layer, n in enumerate(sched) if n > 0}


def test_every_plot_runs(nano):
    model, batch, maps = nano
    t = viz.ns_to_s_table(maps, batch)
    figs = []
    for ax in (viz.ns_to_s_heatmap(maps, 0, batch=batch), viz.ns_to_s_heatmap(maps, -1, head=1, candidate=2),
               viz.ns_to_s_heatmap(maps, 1, scale="prob", batch=batch),
               viz.s_to_s_heatmap(maps, 0, batch=batch), viz.s_to_s_heatmap(maps, 1, head=0, scale="log"),
               viz.s_to_s_heatmap(maps, 0, scale="prob"),
               viz.attention_mask_plot(maps, 0, batch=batch), viz.attention_mask_plot(maps, 2, probs=False),
               viz.pyramid_kept_plot(model, batch, request=2)):
        assert isinstance(ax, matplotlib.axes.Axes)
        figs.append(ax.figure)
    rec = pd.concat([viz.attention_by_recency(t, bins=(1, 4)).assign(model=m) for m in ("a", "b")])
    grp = viz.attention_by_group(t, "behaviour")
    hist = {"epochs": [{"epoch": 1, "train_loss": 0.6, "val": {"click": {"auc": 0.6}}},
                       {"epoch": 2, "train_loss": 0.5, "val": {"click": {"auc": 0.65}}}], "best_epoch": 2}
    for fig in (viz.ns_to_s_grid(maps, batch), viz.ns_to_s_grid(maps, heads=False, candidate=1, scale="prob"),
                viz.recency_plot(rec, hue="model"), viz.recency_plot(viz.attention_by_recency(t), y="share"),
                viz.group_plot(grp, "behaviour"), viz.learning_curves(hist)):
        assert isinstance(fig, matplotlib.figure.Figure)
        figs.append(fig)
    with pytest.raises(ValueError, match="no S queries"):
        viz.s_to_s_heatmap(maps, 2)
    for f in set(figs):
        plt.close(f)


def test_every_heatmap_has_a_colour_bar(nano):
    """A heatmap without its colour bar cannot be read: each one draws its bar by default (the grid with the
    lift scale one bar for all panels, with "prob" one per panel), and ``colorbar=False`` leaves it out."""
    model, batch, maps = nano
    t = viz.ns_to_s_table(maps, batch, match=torch.ones(batch.n_candidates, batch.seq_len, dtype=torch.bool))
    d = viz.attention_by_distance(t, "match")

    def bars(fig):
        return [im for a in fig.axes for im in a.images if im.colorbar is not None]

    for draw in (lambda **kw: viz.ns_to_s_heatmap(maps, 0, batch=batch, **kw),
                 lambda **kw: viz.s_to_s_heatmap(maps, 0, batch=batch, **kw),
                 lambda **kw: viz.attention_mask_plot(maps, 1, batch=batch, **kw),
                 lambda **kw: viz.lift_heatmap(d, "match", **kw)):
        ax = draw()
        assert len(bars(ax.figure)) == 1 and ax.images[-1].colorbar is not None
        assert len(ax.figure.axes) == 2  # the heatmap and its bar
        assert bars(draw(colorbar=False).figure) == []
    fig = viz.ns_to_s_grid(maps, batch)
    assert len(bars(fig)) == 1 and bars(fig)[0].colorbar.ax.get_ylabel().startswith("lift")
    panels = len(maps) * (maps[0].probs.shape[1] + 1)
    assert len(bars(viz.ns_to_s_grid(maps, batch, scale="prob"))) == panels
    assert bars(viz.ns_to_s_grid(maps, batch, colorbar=False)) == []
    plt.close("all")
