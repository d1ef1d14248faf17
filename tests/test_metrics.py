"""Ranking metrics against hand-computed cases: AUC with ties, UAUC's impression weighting, one-class
users skipped, GAUC, logloss."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onetrans_mini.metrics import auc, gauc, logloss, per_user_auc, task_metrics, uauc


def brute_auc(y, s):
    """P(score of a random positive > score of a random negative), ties counted as half."""
    pos = [b for a, b in zip(y, s) if a == 1]
    neg = [b for a, b in zip(y, s) if a == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# ---------------------------------------------------------------------------------------------
# AUC


def test_auc_hand_computed():
    # pairs (neg, pos): (0.1, 0.35) win, (0.1, 0.8) win, (0.4, 0.35) loss, (0.4, 0.8) win -> 3/4
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([0, 1], [0.2, 0.9]) == 1.0
    assert auc([1, 0], [0.2, 0.9]) == 0.0


def test_auc_ties_count_half():
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    # pairs: (0.2,0.5) 1, (0.2,0.9) 1, (0.5,0.5) 1/2, (0.5,0.9) 1 -> 3.5 / 4
    assert auc([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.9]) == pytest.approx(0.875)
    assert auc([0, 1, 0, 1, 1], [3, 3, 3, 3, 3]) == 0.5  # all tied: no information


def test_auc_matches_brute_force_with_many_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 7, 300) / 7  # heavy ties
    assert auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)


def test_auc_one_class_is_nan_and_shapes_must_match():
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([0, 0], [0.1, 0.2]))
    with pytest.raises(ValueError, match="y_true has 3 values but y_score has 2"):
        auc([0, 1, 1], [0.1, 0.2])


# ---------------------------------------------------------------------------------------------
# UAUC / GAUC


def _three_users():
    # user 7: 4 impressions, AUC 0.75; user 3: 2 impressions, AUC 0; user 5: all positive -> skipped.
    # Rows interleaved on purpose (the metrics group by user, whatever the order).
    users = [7, 3, 7, 5, 7, 3, 5, 7, 5]
    y = [0, 1, 0, 1, 1, 0, 1, 1, 1]
    s = [0.1, 0.1, 0.4, 0.9, 0.35, 0.9, 0.2, 0.8, 0.5]
    return y, s, users


def test_uauc_is_impression_weighted_and_skips_one_class_users():
    y, s, users = _three_users()
    a, w = per_user_auc(y, s, users)
    assert sorted(zip(a.tolist(), w.tolist())) == [(0.0, 2.0), (0.75, 4.0)]  # user 5 left out
    assert uauc(y, s, users) == pytest.approx((4 * 0.75 + 2 * 0.0) / 6)  # 0.5


def test_gauc_is_the_unweighted_user_mean():
    y, s, users = _three_users()
    assert gauc(y, s, users) == pytest.approx((0.75 + 0.0) / 2)


def test_uauc_nan_when_no_user_has_both_classes():
    assert math.isnan(uauc([1, 0], [0.3, 0.4], [1, 2]))
    assert math.isnan(gauc([1, 0], [0.3, 0.4], [1, 2]))


def test_uauc_of_a_single_user_is_its_auc():
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert uauc(y, s, [4] * 4) == gauc(y, s, [4] * 4) == auc(y, s)


# ---------------------------------------------------------------------------------------------
# logloss and the per-task bundle


def test_logloss_hand_computed_and_clipped():
    assert logloss([1, 0], [0.8, 0.3]) == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    assert logloss([1, 1], [0.5, 0.5]) == pytest.approx(math.log(2))
    # p = 0 for a positive would be infinite: clipped at eps = 1e-7
    assert logloss([1], [0.0]) == pytest.approx(-math.log(1e-7))
    assert logloss([0], [1.0]) == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_task_metrics_bundle():
    y, s, users = _three_users()
    m = task_metrics(y, s, users)
    assert set(m) == {"auc", "uauc", "gauc", "logloss", "n", "users_counted"}
    assert m["n"] == 9 and m["users_counted"] == 2
    assert m["auc"] == pytest.approx(brute_auc(y, s))
    assert m["uauc"] == pytest.approx(0.5) and m["gauc"] == pytest.approx(0.375)
    assert m["logloss"] == pytest.approx(logloss(y, s))


def test_weighted_auc_equals_auc_on_repeated_rows():
    from onetrans_mini.metrics import weighted_auc

    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 300), rng.integers(0, 20, 300) / 20  # many ties
    w = rng.integers(0, 4, 300)
    assert weighted_auc(y, s, w) == pytest.approx(auc(np.repeat(y, w), np.repeat(s, w)), abs=1e-12)


def test_paired_user_bootstrap_brackets_a_real_difference_and_not_a_null_one():
    from onetrans_mini.metrics import paired_user_bootstrap

    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(200), 20)
    y = rng.integers(0, 2, len(users))
    good = y + rng.normal(0, 1.0, len(y))
    worse = y + rng.normal(0, 2.0, len(y))
    r = paired_user_bootstrap(y, good, worse, users, n_boot=200)
    assert r["lo"] > 0 and r["lo"] <= r["diff"] <= r["hi"] and r["p_le_0"] == 0.0
    same = paired_user_bootstrap(y, good, good, users, n_boot=50)
    assert same["diff"] == same["lo"] == same["hi"] == 0.0
