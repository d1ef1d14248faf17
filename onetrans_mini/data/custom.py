"""Your own interactions as requests: a CSV (or a folder of CSVs), a DataFrame or a ``datasets.Dataset``.

Required columns of the interactions table: ``user``, ``item``, ``timestamp`` (seconds) and one 0/1
column per task. Optional: ``behaviour`` (the event type, e.g. click / cart / purchase; one behaviour
sequence per value, ``impression`` rows never enter the history), any number of feature columns.
Optional tables: users (``user`` + feature columns) and items (``item`` + feature columns).

Without a ``behaviour`` column, rows whose first task is positive form a ``positive`` sequence and the
others a ``negative`` one (MovieLens' liked / disliked). ``infer_schema`` turns columns into features:
text and integer columns become categorical, floats bucketized by training quantiles, ``|``-joined text
multi-valued.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..config import DataConfig
from ..features import Bucketized, Categorical, MultiCategorical, Schema, SequenceSpec, Task
from .movielens import GAP_BOUNDARIES
from .requests import DataError, RequestData, _to_frame, build_requests

RESERVED = {"user", "item", "timestamp", "behaviour"}


def _feature_for(name: str, col: pd.Series, source: str):
    if col.dtype == object and col.dropna().astype(str).str.contains("|", regex=False).any():
        return MultiCategorical(name, source, column=name)
    if pd.api.types.is_float_dtype(col):
        return Bucketized(name, source, column=name, n_buckets=10)
    return Categorical(name, source, column=name)


def infer_schema(interactions: pd.DataFrame, tasks: list[str], users: pd.DataFrame | None = None,
                 items: pd.DataFrame | None = None) -> Schema:
    """A reasonable schema from the tables' columns (see the module docstring)."""
    ns = [Categorical("user_id", "user", group="user_id", column="user"),
          Categorical("item_id", "item", group="item_id", column="item")]
    for tbl, source, key in ((users, "user", "user"), (items, "item", "item")):
        if tbl is not None:
            ns += [_feature_for(c, tbl[c], source) for c in tbl.columns if c != key]
    ns += [Categorical("hour", "context"), Categorical("weekday", "context"),
           Bucketized("gap_since_last", "context", boundaries=GAP_BOUNDARIES, log=True)]
    if "behaviour" in interactions.columns:
        behaviours = sorted(set(interactions["behaviour"].astype(str)) - {"impression"})
    else:
        behaviours = ["positive", "negative"]
    events = [Categorical("hist_item", "event", column="item", vocab_of="item_id"),
              Bucketized("hist_gap", "event", column="gap_prev", boundaries=GAP_BOUNDARIES, log=True)]
    return Schema(
        ns_features=tuple(ns),
        event_fields=tuple(events),
        sequences=tuple(SequenceSpec(b, (b,)) for b in behaviours),
        tasks=tuple(Task(t, t) for t in tasks),
    )


def load_custom(interactions, tasks: list[str] | None = None, users=None, items=None, schema: Schema | None = None,
                config: DataConfig | None = None, name: str | None = None) -> RequestData:
    """Requests from your own tables. ``interactions`` may be a folder holding ``interactions.csv``
    (and optionally ``users.csv`` and ``items.csv``)."""
    if isinstance(interactions, (str, Path)) and Path(interactions).is_dir():
        folder = Path(interactions)
        interactions = folder / "interactions.csv"
        users = users if users is not None else (folder / "users.csv" if (folder / "users.csv").exists() else None)
        items = items if items is not None else (folder / "items.csv" if (folder / "items.csv").exists() else None)
    what = str(interactions) if isinstance(interactions, (str, Path)) else "interactions"
    df = _to_frame(interactions, what)
    if len(df) == 0:
        raise DataError(f"{what}: the table is empty (expected at least one interaction)")
    users_df, items_df = _to_frame(users, "users table"), _to_frame(items, "items table")
    if tasks is None:
        tasks = [c for c in ("label", "click", "like") if c in df.columns][:1]
        if not tasks:
            raise DataError(f"{what}: no task given and no 'label', 'click' or 'like' column; columns: {list(df.columns)}")
    if "behaviour" not in df.columns:
        missing = [t for t in tasks if t not in df.columns]
        if missing:
            raise DataError(f"{what}: missing required column(s) {missing}; columns present: {list(df.columns)}")
        df = df.copy()
        df["behaviour"] = np.where(pd.to_numeric(df[tasks[0]], errors="coerce") == 1, "positive", "negative")
    schema = schema or infer_schema(df, tasks, users_df, items_df)
    return build_requests(df, schema, config or DataConfig(), users=users_df, items=items_df, name=name or what)
