"""Statistic features (``TrainingStat``, ``HistoryStat``, ``RequestStat``), computed without leakage.

Industrial rankers feed numbers next to the ids: how popular an item is, how often it is liked, how
often this user likes things, how much of the user's history shares the candidate's genre. The paper's
NS tokens carry such features; here they become ordinary bucketized NS features, so every model (and
the baselines) reads them the same way.

Leakage is the whole difficulty, and each kind has one rule that rules it out:

- ``TrainingStat`` (per key, from the training split): a training candidate's statistic is computed
  out of fold. Requests are dealt into ``folds`` folds (request id modulo ``folds``), and a row's value
  comes from the training rows of the OTHER folds, so its own label, and those of the other candidates
  of its request, never reach it. Validation rows use every training row; test rows every labelled row
  before the test period (training and validation, as the floors do). Counts (popularity) hold no label
  and read the training split for every row, so that their scale does not shift between the splits.
- ``HistoryStat`` (from the request's own history): the history holds only events strictly before the
  request's first candidate (``requests.py``), so no candidate's label can be in it.
- ``RequestStat`` (from the request's candidate list): it counts candidates, never their labels.
- The smoothing prior (the training mean of the column) is out of fold in the same way, so even that
  one number never holds a training candidate's own label.

Each function has a slow twin in the tests (a plain loop over rows) that it must equal.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..features import HistoryStat, TrainingStat


def smoothed_mean(total: np.ndarray, count: np.ndarray, prior: float, alpha: float) -> np.ndarray:
    """(total + alpha * prior) / (count + alpha): the mean with ``alpha`` pseudo-observations at ``prior``
    (``prior`` itself where there is nothing to count and ``alpha`` > 0; NaN where alpha = 0 and count = 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total + alpha * prior) / (count + alpha)


def prior_means(values: np.ndarray, train: np.ndarray, request: np.ndarray, folds: int, query_request: np.ndarray,
                query_split: np.ndarray) -> np.ndarray:
    """The smoothing prior of each query: the mean of ``values`` over the training rows (``train`` mask, rows
    belonging to ``request``), leaving out the query's own fold when the query is a training one."""
    fold = request[train] % folds
    v = values[train]
    total, n = float(v.sum()), len(v)
    total_i = total - np.bincount(fold, weights=v, minlength=folds)  # (folds,) sums over the other folds
    n_i = n - np.bincount(fold, minlength=folds)
    overall = total / n if n else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        out_of_fold = np.where(n_i > 0, total_i / np.maximum(n_i, 1), overall)
    return np.where(query_split == 0, out_of_fold[query_request % folds], overall)


def training_stat(f: TrainingStat, keys: np.ndarray, values: np.ndarray | None, split: np.ndarray,
                  request: np.ndarray) -> np.ndarray:
    """``f`` for every candidate. ``keys``: (N,) integer codes of ``f.key`` (-1 = missing: counted nowhere);
    ``values``: (N,) floats of ``f.mean_of`` (None for a count); ``split``: (N,) 0/1/2; ``request``: (N,) ids."""
    n_keys = int(keys.max()) + 2  # code -1 (missing) -> the extra last slot, never read back as a real key
    k = np.where(keys < 0, n_keys - 1, keys)
    train = split == 0

    def sums(rows):  # per key: (count, total of values) over the given rows
        count = np.bincount(k[rows], minlength=n_keys).astype(np.float64)
        total = None if values is None else np.bincount(k[rows], weights=values[rows], minlength=n_keys)
        return count, total

    count, total = sums(train)
    count[-1] = 0.0  # a missing key has no statistic
    if values is None:  # popularity: no label involved, so every row reads the full training count
        return count[k]
    prior = prior_means(values, train, request, f.folds, request, split)  # (N,)
    if total is not None:
        total[-1] = 0.0
    out = smoothed_mean(total[k], count[k], prior, f.alpha)  # validation and test rows (training: below)
    fold = request % f.folds
    for i in range(f.folds):
        rows = train & (fold == i)
        c_i, t_i = sums(rows)
        c_i[-1], t_i[-1] = 0.0, 0.0
        kr = k[rows]
        out[rows] = smoothed_mean(total[kr] - t_i[kr], count[kr] - c_i[kr], prior[rows], f.alpha)
    # test rows: every labelled row before the test period (training + validation), like the floors; the
    # validation rows stay on the training split, so that early stopping sees what training saw
    test = split == 2
    if test.any():
        before = split <= 1
        c_t, t_t = sums(before)
        c_t[-1], t_t[-1] = 0.0, 0.0
        out[test] = smoothed_mean(t_t[k[test]], c_t[k[test]], float(values[before].mean()), f.alpha)
    return out


def history_stat(f: HistoryStat, start: np.ndarray, end: np.ndarray, values: np.ndarray | None, prior,
                 event_keys: np.ndarray | None = None, cand_keys: np.ndarray | None = None) -> np.ndarray:
    """``f`` for every request (no ``match``) or every candidate (with ``match``).

    ``start, end``: (Q,) the history range of each request (or of each candidate's request), global indices
    into the history table; ``values``: (H,) floats of ``f.mean_of`` per history event (None for a count);
    ``prior``: (Q,) or a number, the training mean of ``values`` (``prior_means``). With ``match``: ``event_keys`` (H,) and ``cand_keys`` (Q,)
    integer codes of the match column in one code space (-1 = missing: matches nothing)."""
    start = np.asarray(start, dtype=np.int64)
    end = np.asarray(end, dtype=np.int64)
    if f.window:
        start = np.maximum(start, end - f.window)
    if not f.match:
        count = (end - start).astype(np.float64)
        if values is None:
            return count
        cs = np.r_[0.0, np.cumsum(values, dtype=np.float64)]  # (H + 1,) prefix sums
        return smoothed_mean(cs[end] - cs[start], count, prior, f.alpha)
    # events sorted by (key, position): the matching events of [start, end) are one contiguous run
    h = len(event_keys)
    ev = np.asarray(event_keys, dtype=np.int64)
    order = np.lexsort((np.arange(h), ev))
    code = ev[order] * (h + 1) + order  # sorted, unique; (H,)
    q = np.asarray(cand_keys, dtype=np.int64)
    lo = np.searchsorted(code, q * (h + 1) + start)
    hi = np.searchsorted(code, q * (h + 1) + end)
    count = np.where(q < 0, 0, hi - lo).astype(np.float64)
    if values is None:
        return count
    cs = np.r_[0.0, np.cumsum(np.asarray(values, dtype=np.float64)[order])]
    total = np.where(q < 0, 0.0, cs[hi] - cs[lo])
    return smoothed_mean(total, count, prior, f.alpha)


def request_stat(request: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``RequestStat`` for every candidate: the share of its request's candidates with the same key, itself
    included. ``request``: (N,) ids; ``keys``: (N,) integer codes of the match column (-1 = missing: such a
    candidate matches nothing and gets 0). No label is read."""
    request = np.asarray(request, dtype=np.int64)
    keys = np.asarray(keys, dtype=np.int64)
    _, per_request, size = np.unique(request, return_inverse=True, return_counts=True)
    _, per_pair, same = np.unique(np.stack([request, keys]), axis=1, return_inverse=True, return_counts=True)
    share = same[per_pair.reshape(-1)] / size[per_request.reshape(-1)]  # (N,)
    return np.where(keys < 0, 0.0, share)


def shared_codes(*columns) -> list[np.ndarray]:
    """Integer codes of several columns in ONE code space (equal values, equal codes; missing -> -1)."""
    arrays = [np.asarray(c) for c in columns]
    if all(a.dtype.kind in "iuf" for a in arrays):  # numbers: factorize them as numbers (fast; NaN -> -1)
        codes, _ = pd.factorize(np.concatenate([a.astype(np.float64) for a in arrays]))
    else:
        codes, _ = pd.factorize(pd.concat([pd.Series(a.astype(object)) for a in arrays], ignore_index=True))
    bounds = np.cumsum([0] + [len(c) for c in columns])
    return [codes[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
