"""Statistic features: the vectorized computations equal plain loops, and no candidate's own label reaches them."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from onetrans_mini.data import SYNTHETIC_SCHEMA, build_requests
from onetrans_mini.data.requests import DataError
from onetrans_mini.data.statistics import history_stat, prior_means, request_stat, shared_codes, training_stat
from onetrans_mini.data.synthetic import data_config, generate
from onetrans_mini.features import STATISTICS, HistoryStat, RequestStat, Schema, TrainingStat


# ---- slow twins: one row at a time, straight from the definitions ------------------------------------


def slow_prior(values, split, request, folds, own_request, own_split):
    """The training mean, leaving out the own fold for a training query."""
    rows = [j for j in range(len(values)) if split[j] == 0
            and (own_split != 0 or request[j] % folds != own_request % folds)]
    return np.mean([values[j] for j in rows])


def slow_training_stat(f, keys, values, split, request):
    out = np.empty(len(keys))
    train = np.flatnonzero(split == 0)
    for i in range(len(keys)):
        rows = [j for j in train if keys[j] == keys[i] and keys[i] >= 0]
        if values is None:
            out[i] = len(rows)
            continue
        prior = slow_prior(values, split, request, f.folds, request[i], split[i])
        if split[i] == 0:  # out of fold: only the training rows of the other folds
            rows = [j for j in rows if request[j] % f.folds != request[i] % f.folds]
        if split[i] == 2:  # test: training and validation rows
            rows = [j for j in range(len(keys)) if split[j] <= 1 and keys[j] == keys[i] and keys[i] >= 0]
            prior = values[split <= 1].mean()
        out[i] = (sum(values[j] for j in rows) + f.alpha * prior) / (len(rows) + f.alpha)
    return out


def slow_history_stat(f, start, end, values, prior, event_keys=None, cand_keys=None):
    out = np.empty(len(start))
    prior = np.broadcast_to(prior, (len(start),))
    for q in range(len(start)):
        a = max(start[q], end[q] - f.window) if f.window else start[q]
        events = [j for j in range(a, end[q]) if not f.match or (cand_keys[q] >= 0 and event_keys[j] == cand_keys[q])]
        if values is None:
            out[q] = len(events)
        else:
            out[q] = (sum(values[j] for j in events) + f.alpha * prior[q]) / (len(events) + f.alpha)
    return out


def slow_request_stat(request, keys):
    out = np.empty(len(keys))
    for i in range(len(keys)):
        mine = [j for j in range(len(keys)) if request[j] == request[i]]
        out[i] = 0.0 if keys[i] < 0 else sum(keys[j] == keys[i] for j in mine) / len(mine)
    return out


@pytest.mark.parametrize("mean_of", ["", "y"])
def test_training_stat_equals_its_slow_twin(mean_of):
    rng = np.random.default_rng(0)
    n = 400
    keys = rng.integers(-1, 12, size=n)  # -1: a missing key
    values = rng.random(n).round() if mean_of else None
    split = rng.choice(3, size=n, p=[0.7, 0.1, 0.2])
    request = np.sort(rng.integers(0, 90, size=n))
    f = TrainingStat("s", key="k", mean_of=mean_of, alpha=3.0, folds=4)
    np.testing.assert_allclose(training_stat(f, keys, values, split, request),
                               slow_training_stat(f, keys, values, split, request), rtol=1e-12)


@pytest.mark.parametrize("mean_of,match,window", [("", "", 0), ("y", "", 0), ("", "g", 0), ("y", "g", 0), ("y", "g", 3)])
def test_history_stat_equals_its_slow_twin(mean_of, match, window):
    rng = np.random.default_rng(1)
    h, q = 300, 200
    values = rng.random(h) if mean_of else None
    start = rng.integers(0, h, size=q)
    end = np.minimum(h, start + rng.integers(0, 40, size=q))
    event_keys, cand_keys = shared_codes(rng.choice(["a", "b", "c", None], size=h), rng.choice(["a", "c", "d", None], size=q))
    f = HistoryStat("s", mean_of=mean_of, match=match, window=window, alpha=2.0)
    args = (start, end, values, rng.random(q)) + ((event_keys, cand_keys) if match else ())
    np.testing.assert_allclose(history_stat(f, *args), slow_history_stat(f, *args), rtol=1e-12)


def test_request_stat_equals_its_slow_twin():
    rng = np.random.default_rng(4)
    request = np.sort(rng.integers(0, 40, size=300))
    keys = rng.integers(-1, 5, size=300)  # -1: a missing key, which matches nothing
    got = request_stat(request, keys)
    np.testing.assert_allclose(got, slow_request_stat(request, keys), rtol=1e-12)
    assert got.max() <= 1.0 and (got[keys >= 0] > 0).all()


def test_the_prior_leaves_out_the_own_fold_of_training_queries():
    rng = np.random.default_rng(2)
    values, split, request = rng.random(200), rng.choice(3, size=200, p=[0.6, 0.2, 0.2]), np.sort(rng.integers(0, 50, 200))
    q_req, q_split = rng.integers(0, 60, size=30), rng.choice(3, size=30)
    got = prior_means(values, split == 0, request, 3, q_req, q_split)
    want = [slow_prior(values, split, request, 3, r, s) for r, s in zip(q_req, q_split)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_shared_codes_give_equal_values_equal_codes_and_missing_minus_one():
    a, b = shared_codes(np.array(["x", "y", None], dtype=object), np.array(["y", "z", "x"], dtype=object))
    assert a[0] == b[2] and a[1] == b[0] and a[2] == -1 and b[1] not in a
    a, b = shared_codes(np.array([3, 5, 7]), np.array([7.0, np.nan, 3.0]))  # numbers: ints and floats agree
    assert a[0] == b[2] and a[2] == b[0] and b[1] == -1 and a[1] not in b


# ---- leakage: change labels, the affected candidates' own statistics must not move ----------------------

# the built-in synthetic schema's statistics, plus a count and a history mean of a label
EXTRA = (TrainingStat("item_n", key="item"), HistoryStat("purchase_rate", mean_of="purchase"))
SCHEMA = dataclasses.replace(SYNTHETIC_SCHEMA, ns_features=SYNTHETIC_SCHEMA.ns_features + EXTRA)
STATS = tuple(f for f in SCHEMA.ns_features if isinstance(f, STATISTICS))


def _build(inter, users, items):
    return build_requests(inter, SCHEMA, data_config("tiny"), users=users, items=items, name="tiny")


def source_rows(inter):
    """The interactions' index in the order of the prepared candidates (sorted by user, time, then file row)."""
    return inter.sort_values(["user", "timestamp"], kind="mergesort").index.to_numpy()


def _raw(data):
    return np.stack([data.candidates[f"stat:{f.name}"] for f in STATS], axis=1)  # (N, n_stats)


@pytest.fixture(scope="module")
def world():
    inter, users, items = generate("tiny", seed=3)
    return inter, users, items, _build(inter, users, items)


def test_flipping_a_requests_labels_leaves_its_own_statistics_unchanged(world):
    inter, users, items, data = world
    C = data.candidates
    base = _raw(data)
    for split in ("train", "val", "test"):
        rid = data.request_ids(split)[5]
        rows = np.arange(data.requests["cand_start"][rid], data.requests["cand_end"][rid])
        # rows of the prepared table are the interactions sorted by (user, timestamp, row): find them back
        mine = source_rows(inter)[rows]
        flipped = inter.copy()
        for task in ("click", "purchase"):
            flipped.loc[mine, task] = 1 - flipped.loc[mine, task]
        again = _build(flipped, users, items)
        assert (again.candidates["label:click"][rows] != C["label:click"][rows]).all()  # the flip took
        np.testing.assert_array_equal(_raw(again)[rows], base[rows], err_msg=f"a {split} request's own labels leaked")
        if split == "train":  # ...while other folds' rates did see the change (so the comparison can fail)
            assert (_raw(again) != base).any()


def test_test_labels_reach_no_training_statistic_and_no_earlier_history(world):
    inter, users, items, data = world
    is_test = source_rows(inter)[data.candidate_rows("test")]
    shuffled = inter.copy()
    shuffled.loc[is_test, "click"] = np.random.default_rng(0).permutation(shuffled.loc[is_test, "click"].to_numpy())
    again = _raw(_build(shuffled, users, items))
    base = _raw(data)
    training = [i for i, f in enumerate(STATS) if isinstance(f, TrainingStat)]
    np.testing.assert_array_equal(again[:, training], base[:, training])
    np.testing.assert_array_equal(again[data.candidate_rows("train")], base[data.candidate_rows("train")])


def test_statistics_are_bucketized_on_the_training_split_and_saved(world, tmp_path):
    *_, data = world
    for f in STATS:
        ids = data.candidates[f.name]
        assert ids.min() >= 2 and ids.max() < data.vocab_sizes()[f.name]  # buckets, never PAD / OOV
        train = data.candidates[f"stat:{f.name}"][data.candidate_rows("train")]
        assert len(np.unique(ids)) > 2 and np.isfinite(train).all()
    data.save(tmp_path / "d")
    from onetrans_mini.data import RequestData

    back = RequestData.load(tmp_path / "d")
    assert back.schema == data.schema
    np.testing.assert_array_equal(_raw(back), _raw(data))


def test_the_built_in_schemas_carry_statistics():
    from onetrans_mini.data.movielens import MOVIELENS_CSV_SCHEMA, MOVIELENS_SCHEMA

    for schema in (SYNTHETIC_SCHEMA, MOVIELENS_SCHEMA, MOVIELENS_CSV_SCHEMA):
        kinds = {type(f) for f in schema.ns_features}
        assert {TrainingStat, HistoryStat} <= kinds
    assert RequestStat in {type(f) for f in SYNTHETIC_SCHEMA.ns_features}  # the synthetic world's intent
    assert len(STATS) == 9 and any(isinstance(f.key, tuple) for f in STATS if isinstance(f, TrainingStat))


def test_a_statistic_on_a_missing_column_names_it():
    inter, users, items = generate("tiny", seed=0)
    bad = dataclasses.replace(SYNTHETIC_SCHEMA, ns_features=SYNTHETIC_SCHEMA.ns_features + (HistoryStat("x", match="colour"),))
    with pytest.raises(DataError, match=r"statistic 'x' reads column 'colour' of the history events"):
        build_requests(inter, bad, data_config("tiny"), users=users, items=items)
    bad = dataclasses.replace(SYNTHETIC_SCHEMA, ns_features=SYNTHETIC_SCHEMA.ns_features + (TrainingStat("y", mean_of="like"),))
    with pytest.raises(DataError, match=r"statistic 'y' reads column 'like' of the candidates"):
        build_requests(inter, bad, data_config("tiny"), users=users, items=items)
    bad = dataclasses.replace(SYNTHETIC_SCHEMA, ns_features=SYNTHETIC_SCHEMA.ns_features + (RequestStat("z", match="colour"),))
    with pytest.raises(DataError, match=r"statistic 'z' reads column 'colour' of the candidates"):
        build_requests(inter, bad, data_config("tiny"), users=users, items=items)


@pytest.mark.parametrize("feature,match", [
    (TrainingStat("s", folds=1), "folds >= 2"),
    (HistoryStat("s", window=-1), "window >= 0"),
    (HistoryStat("s", alpha=-1.0), "alpha >= 0"),
    (RequestStat("s", match=""), "needs a match column"),
    (RequestStat("s", n_buckets=0), "n_buckets >= 1"),
])
def test_bad_statistic_specs_are_refused_by_the_schema(feature, match):
    with pytest.raises(ValueError, match=match):
        Schema(SYNTHETIC_SCHEMA.ns_features + (feature,), SYNTHETIC_SCHEMA.event_fields, SYNTHETIC_SCHEMA.sequences,
               SYNTHETIC_SCHEMA.tasks)


# ---- on real data ---------------------------------------------------------------------------------------


def test_ml100k_statistics_carry_signal_and_the_naive_rate_would_leak(ml100k):
    """Each ML-100K statistic alone ranks test candidates better than chance; the item like rate computed with
    the row's own label inside (the leak the folds avoid) ranks the same training rows better than the
    out-of-fold rate does: that extra is the label itself."""
    from onetrans_mini.metrics import auc

    C = ml100k.candidates
    split = ml100k.requests["split"][C["request"]]
    y = C["label:like"]
    train, test = split == 0, split == 2
    for name in ("item_like_rate", "user_like_rate", "genre_like_rate"):
        assert auc(y[test], C[f"stat:{name}"][test]) > 0.6, name
    oof = C["stat:item_like_rate"]
    n = np.bincount(C["item"][train])
    s = np.bincount(C["item"][train], weights=y[train])
    naive = (s[C["item"][train]] + 20 * y[train].mean()) / (n[C["item"][train]] + 20)
    assert auc(y[train], naive) > auc(y[train], oof[train]) + 0.015


def test_logistic_regression_baseline_learns_from_the_same_features(tiny_data):
    from onetrans_mini.floors import floors, logistic_regression
    from onetrans_mini.metrics import auc

    rows = tiny_data.candidate_rows("test")
    y = tiny_data.candidates["label:click"][rows]
    lr = logistic_regression(tiny_data, "click", steps=100)
    assert lr["prob"].shape == (len(rows),) and ((lr["prob"] > 0) & (lr["prob"] < 1)).all()
    assert lr["l2"] in (1e-5, 1e-4, 1e-3) and lr["val_auc"] > 0.6
    assert auc(y, lr["prob"]) > floors(tiny_data)["click"]["item_mean"]["auc"]
    again = logistic_regression(tiny_data, "click", steps=100)
    np.testing.assert_allclose(again["prob"], lr["prob"], rtol=1e-5)  # seeded: the same numbers (up to float sums)
    # the chosen strength is fitted again on train + validation: the same choice, other weights
    plain = logistic_regression(tiny_data, "click", steps=100, refit=False)
    assert plain["l2"] == lr["l2"] and plain["val_auc"] == lr["val_auc"]
    assert np.abs(plain["prob"] - lr["prob"]).max() > 1e-3


def test_a_schema_without_statistics_keeps_everything_else():
    bare = SCHEMA.without_statistics()
    assert not any(isinstance(f, STATISTICS) for f in bare.ns_features)
    assert [f.name for f in bare.ns_features] == [f.name for f in SCHEMA.ns_features if f not in STATS]
    assert (bare.event_fields, bare.sequences, bare.tasks) == (SCHEMA.event_fields, SCHEMA.sequences, SCHEMA.tasks)


def test_the_candidate_list_reveals_the_synthetic_intent_that_no_history_shows():
    """Half of a synthetic request comes from the user's current intent (``generate``): the share of the list in
    the candidate's category separates intent candidates from the rest, which the history's category counts
    (the intent may have just switched) do much less well."""
    from onetrans_mini.metrics import auc

    inter, users, items = generate("small", seed=0, with_terms=True)
    inter = inter[inter.user < 60].reset_index(drop=True)  # 60 users: enough requests, quick to prepare
    data = build_requests(inter, SYNTHETIC_SCHEMA, data_config("small"), users=users, items=items, name="small")
    C = data.candidates
    is_intent = (inter["term_intent"].to_numpy()[source_rows(inter)] > 0).astype(float)
    assert auc(is_intent, C["stat:request_category_share"]) > 0.98
    assert auc(is_intent, C["stat:category_recent"]) < 0.9
