"""Ranking metrics: AUC, UAUC (the paper's impression-weighted per-user AUC), GAUC, logloss.

UAUC and GAUC average per-user AUCs. A user whose test impressions are all of one class has no AUC
(no positive-negative pair to rank) and is left out of the average, as in the paper's definition and
in DIN's; the number of users that counted is returned alongside so reports can show it.

- UAUC: weighted by the user's number of impressions (the paper: "impression-weighted").
- GAUC: here, the unweighted mean over users (a second view, less dominated by heavy users).
"""

from __future__ import annotations

import numpy as np


def auc(y_true, y_score) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic, ties counted as half.

    Returns NaN when ``y_true`` holds only one class.
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"auc: y_true has {y.shape[0]} values but y_score has {s.shape[0]}")
    n_pos = float((y == 1).sum())
    n_neg = float(len(y) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    first = np.r_[True, sorted_s[1:] != sorted_s[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1 .. end
    ranks = np.empty(len(s))
    ranks[order] = avg[group]
    return ranks


def per_user_auc(y_true, y_score, users) -> tuple[np.ndarray, np.ndarray]:
    """(auc, n_impressions) per user that has both classes."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    u = np.asarray(users).ravel()
    order = np.argsort(u, kind="mergesort")
    u, y, s = u[order], y[order], s[order]
    bounds = np.flatnonzero(np.r_[True, u[1:] != u[:-1], True])
    aucs, weights = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        yy = y[a:b]
        if 0 < yy.sum() < len(yy):
            aucs.append(auc(yy, s[a:b]))
            weights.append(b - a)
    return np.asarray(aucs), np.asarray(weights, dtype=np.float64)


def uauc(y_true, y_score, users) -> float:
    """Impression-weighted mean of per-user AUCs (users with one class only are skipped)."""
    a, w = per_user_auc(y_true, y_score, users)
    return float((a * w).sum() / w.sum()) if len(a) else float("nan")


def gauc(y_true, y_score, users) -> float:
    """Unweighted mean of per-user AUCs (users with one class only are skipped)."""
    a, _ = per_user_auc(y_true, y_score, users)
    return float(a.mean()) if len(a) else float("nan")


def logloss(y_true, p, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``p``."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.clip(np.asarray(p, dtype=np.float64).ravel(), eps, 1 - eps)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def task_metrics(y_true, p, users) -> dict:
    """AUC, UAUC, GAUC, logloss and counts for one task."""
    a, _ = per_user_auc(y_true, p, users)
    return {
        "auc": auc(y_true, p),
        "uauc": uauc(y_true, p, users),
        "gauc": gauc(y_true, p, users),
        "logloss": logloss(y_true, p),
        "n": int(len(np.ravel(y_true))),
        "users_counted": int(len(a)),
    }


def weighted_auc(y_true, y_score, weight) -> float:
    """AUC with a weight per row (a row of weight k counts as k copies of it; ties count half)."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    w = np.asarray(weight, dtype=np.float64).ravel()
    order = np.argsort(s, kind="mergesort")
    s, pos, neg = s[order], (w * y)[order], (w * (1 - y))[order]
    first = np.r_[True, s[1:] != s[:-1]]
    group = np.cumsum(first) - 1  # tie groups of equal scores
    pos_g = np.bincount(group, weights=pos)
    neg_g = np.bincount(group, weights=neg)
    below = np.cumsum(neg_g) - neg_g  # negative weight strictly below each group
    n_pos, n_neg = pos_g.sum(), neg_g.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((pos_g * (below + 0.5 * neg_g)).sum() / (n_pos * n_neg))


def paired_user_bootstrap(y_true, score_a, score_b, users, n_boot: int = 1000, seed: int = 0) -> dict:
    """AUC(a) - AUC(b) on the same rows, with a 95% interval from resampling USERS with replacement
    (their rows move together, since a user's impressions are not independent): ``{"diff", "lo", "hi",
    "p_le_0"}``, ``p_le_0`` being the share of resamples where a does not beat b."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    _, u = np.unique(np.asarray(users).ravel(), return_inverse=True)
    rng = np.random.default_rng(seed)
    n_users = int(u.max()) + 1
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        w = np.bincount(rng.integers(n_users, size=n_users), minlength=n_users)[u]  # (N,) draws of each row's user
        diffs[i] = weighted_auc(y, score_a, w) - weighted_auc(y, score_b, w)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"diff": auc(y, score_a) - auc(y, score_b), "lo": float(lo), "hi": float(hi),
            "p_le_0": float((diffs <= 0).mean())}
