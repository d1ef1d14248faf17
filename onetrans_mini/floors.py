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


def logistic_regression(data, task: str, l2: tuple[float, ...] = (1e-5, 1e-4, 1e-3), steps: int = 200,
                        seed: int = 0, refit: bool = True) -> dict:
    """The practitioner's baseline: a logistic regression on the one-hot NS features of the schema (every id and
    bucket, the statistics included; a multi-valued feature as the mean of its one-hots), no history sequence.

    Fitted on the training split by full-batch Adam for ``steps`` steps at each L2 strength in ``l2``; the strength
    with the best validation AUC is kept and, with ``refit`` (the default), fitted again on train + validation,
    so that it learns from the same labelled rows as the floors and as ``train()`` with its validation pass.
    Returns ``{"l2", "val_auc", "prob": test probabilities (N,)}`` in ``data.candidate_rows("test")`` order."""
    import torch

    from .metrics import auc

    names = [f.name for f in data.schema.ns_features]
    sizes = data.vocab_sizes()
    offsets = np.cumsum([0] + [sizes[n] for n in names])[:-1]  # each feature's block of columns

    def design(rows):  # (N, W) column ids and (N, W) weights of the one-hot design, W = total width of the features
        cols, wts = [], []
        for off, n in zip(offsets, names):
            ids = np.asarray(data.candidates[n][rows]).reshape(len(rows), -1)  # (N, 1) or (N, max_len)
            real = ids != 0
            cols.append(ids + off)
            wts.append(real / np.maximum(real.sum(1, keepdims=True), 1))  # PAD weighs 0; mean of a multi-valued cell
        return torch.from_numpy(np.concatenate(cols, 1)), torch.from_numpy(np.concatenate(wts, 1)).float()

    split_rows = {s: data.candidate_rows(s) for s in ("train", "val", "test")}
    x = {s: design(r) for s, r in split_rows.items()}
    y = {s: torch.from_numpy(data.candidates[f"label:{task}"][r]).float() for s, r in split_rows.items()}
    x["train+val"] = tuple(torch.cat([a, b]) for a, b in zip(x["train"], x["val"]))
    y["train+val"] = torch.cat([y["train"], y["val"]])
    width = int(offsets[-1] + sizes[names[-1]])

    def fit(lam: float, rows: str):  # -> logits(split): full-batch Adam on one split's rows
        g = torch.Generator().manual_seed(seed)
        w = torch.nn.Parameter(torch.randn(width, generator=g) * 0.01)
        b = torch.nn.Parameter(torch.zeros(()))
        opt = torch.optim.Adam([w, b], lr=0.05)

        def logits(s):
            cols, wts = x[s]
            return (w[cols] * wts).sum(1) + b  # (N,): the weights of the active columns, summed

        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(rows), y[rows]) + lam * (w * w).sum()
            loss.backward()
            opt.step()
        return logits

    best = None
    for lam in l2:
        logits = fit(lam, "train")
        with torch.no_grad():
            val = auc(y["val"].numpy(), logits("val").numpy())
        if best is None or val > best["val_auc"]:
            best = {"l2": lam, "val_auc": val, "logits": logits}
    logits = best.pop("logits")
    if refit:  # the chosen strength again, on every labelled row before the test period
        logits = fit(best["l2"], "train+val")
    with torch.no_grad():
        best["prob"] = torch.sigmoid(logits("test")).numpy()
    return best
