"""Floors: the AUC of the simplest predictors on the same test split, so every AUC has context.

- ``item_mean``: the item's smoothed positive rate.
- ``user_item_mean``: global rate + smoothed user deviation + smoothed item deviation (the item's
  deviation fitted after removing the user's), a classic baseline-predictor model.

Both are fitted on every candidate before the test period (train + validation splits: the same events
the model sees, as histories, at test time) and scored on the test split. Smoothing adds ``alpha``
pseudo-observations at the global mean, so a rarely rated item stays near the mean. Unseen users and
items get deviation 0.
"""

from __future__ import annotations

import numpy as np

from .metrics import task_metrics


def _smoothed_deviation(keys: np.ndarray, residual: np.ndarray, n_keys: int, alpha: float) -> np.ndarray:
    sums = np.bincount(keys, weights=residual, minlength=n_keys)
    counts = np.bincount(keys, minlength=n_keys)
    return sums / (counts + alpha)


def fit_floors(users, items, y, alpha: float = 5.0) -> dict:
    """Fit both floors on (user, item, label) triples; users and items are integer indices."""
    users, items, y = np.asarray(users), np.asarray(items), np.asarray(y, dtype=np.float64)
    nu, ni = int(users.max()) + 1, int(items.max()) + 1
    g = float(y.mean())
    item_dev_only = _smoothed_deviation(items, y - g, ni, alpha)
    user_dev = _smoothed_deviation(users, y - g, nu, alpha)
    item_dev = _smoothed_deviation(items, y - g - user_dev[users], ni, alpha)
    return {"global": g, "item_only": item_dev_only, "user": user_dev, "item": item_dev}


def predict_floors(model: dict, users, items) -> dict[str, np.ndarray]:
    users, items = np.asarray(users), np.asarray(items)

    def lookup(table, idx):
        out = np.zeros(len(idx))
        ok = idx < len(table)
        out[ok] = table[idx[ok]]
        return out

    g = model["global"]
    return {
        "item_mean": np.clip(g + lookup(model["item_only"], items), 1e-4, 1 - 1e-4),
        "user_item_mean": np.clip(g + lookup(model["user"], users) + lookup(model["item"], items), 1e-4, 1 - 1e-4),
    }


def floors(data, alpha: float = 5.0) -> dict:
    """Test metrics of both floors for every task of a prepared dataset: ``{task: {floor: metrics}}``."""
    C = data.candidates
    fit_rows = np.concatenate([data.candidate_rows("train"), data.candidate_rows("val")])
    test_rows = data.candidate_rows("test")
    out = {}
    for t in data.schema.task_names:
        y = C[f"label:{t}"]
        model = fit_floors(C["user"][fit_rows], C["item"][fit_rows], y[fit_rows], alpha)
        preds = predict_floors(model, C["user"][test_rows], C["item"][test_rows])
        out[t] = {name: task_metrics(y[test_rows], p, C["user"][test_rows]) for name, p in preds.items()}
        if data.has_prob:
            out[t]["oracle"] = task_metrics(y[test_rows], C[f"prob:{t}"][test_rows], C["user"][test_rows])
    return out
