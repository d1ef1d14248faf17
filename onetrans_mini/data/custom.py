"""Your own interactions as requests: a CSV (or a folder of CSVs), a DataFrame or a ``datasets.Dataset``.

The documented layout (see data/README.md): a CSV file of interactions, or a folder holding

- ``interactions.csv``: one row per impression. Required columns ``user``, ``item``, ``timestamp``
  (seconds since 1970, >= 0) and one 0/1 column per task. Optional: ``behaviour`` (the event type,
  e.g. click / cart / purchase; one behaviour sequence per value, ``impression`` rows never enter the
  history) and ``prob_<task>`` (a known true probability: its AUC is reported as the oracle).
- ``users.csv`` (optional): ``user`` + user feature columns; ``items.csv`` (optional): ``item`` + item
  feature columns.
- ``dataset.json`` (optional): ``{"tasks": [...], "sequences": [...], "data_config": {...}}`` to name
  the tasks, the behaviours that form sequences (in intent order) and the ``DataConfig`` fields
  (``max_candidates``, ``session_gap``, ...) instead of inferring or defaulting them; ``"schema"``
  (``Schema.to_dict()``) replaces the inferred schema whole.

Tasks, unless given: EVERY 0/1 column of the interactions (numbers or booleans, empty cells allowed:
they are then reported as bad labels), in file order. Other interaction columns are not features; a
warning names them (put features in ``users.csv`` / ``items.csv``).

Without a ``behaviour`` column, rows whose first task is positive form a ``positive`` sequence and the
others a ``negative`` one (MovieLens' liked / disliked). ``infer_schema`` turns the users' and items'
columns into features: text (pandas 2 ``object`` or pandas 3 ``str`` / ``string`` columns) and integer
columns become categorical, floats bucketized by training quantiles, ``|``-joined text (or list cells)
multi-valued.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import DataConfig
from ..features import Bucketized, Categorical, MultiCategorical, Schema, SequenceSpec, Task, column_of
from .movielens import GAP_BOUNDARIES
from .requests import SPLITS, DataError, RequestData, _at, _cell, _columns, _require_columns, _to_frame, build_requests

RESERVED = {"user", "item", "timestamp", "behaviour"}
MULTI_MAX_LEN = 16  # most values a multi-valued feature keeps per row
DATASET_JSON_KEYS = ("tasks", "sequences", "data_config", "schema")


class DataWarning(UserWarning):
    """Own data that loads, but maybe not as meant (repeated rows, unused columns)."""


# ----------------------------------------------------------------------------------------------
# column kinds, for pandas 2 (text is ``object``) and pandas 3 (text is ``str``) alike


def _values_dtype(col: pd.Series):
    dt = col.dtype
    return dt.categories.dtype if isinstance(dt, pd.CategoricalDtype) else dt


def is_text_column(col: pd.Series) -> bool:
    """Strings: a ``str`` / ``string`` column (pandas 3, or ``dtype="string"``), or an ``object`` column
    whose non-missing values are all strings (pandas 2's text columns). Mixed objects are not text."""
    dt = _values_dtype(col)
    values = col.cat.categories.to_series() if isinstance(col.dtype, pd.CategoricalDtype) else col
    if pd.api.types.is_object_dtype(dt):
        return pd.api.types.infer_dtype(values, skipna=True) in ("string", "empty")
    return pd.api.types.is_string_dtype(dt)


def _is_list_column(col: pd.Series) -> bool:
    if not pd.api.types.is_object_dtype(col.dtype):
        return False
    vals = col.dropna()
    return len(vals) > 0 and all(isinstance(v, (list, tuple, np.ndarray)) for v in vals)


def _multi_len(col: pd.Series, text: bool) -> int:
    n = col.dropna().astype(str).str.count(r"\|") + 1 if text else col.dropna().map(len)
    return int(max(1, min(MULTI_MAX_LEN, n.max() if len(n) else 1)))


def _feature_for(name: str, col: pd.Series, source: str):
    if is_text_column(col):
        text = col.dropna().astype(str)
        if text.str.contains("|", regex=False).any():
            return MultiCategorical(name, source, column=name, max_len=_multi_len(col, True))
        return Categorical(name, source, column=name)
    if _is_list_column(col):
        return MultiCategorical(name, source, column=name, max_len=_multi_len(col, False))
    if pd.api.types.is_float_dtype(col.dtype):
        return Bucketized(name, source, column=name, n_buckets=10)
    return Categorical(name, source, column=name)


def _is_binary(col: pd.Series) -> bool:
    """A 0/1 column: booleans, or numbers that are all 0 or 1 (empty cells aside)."""
    if pd.api.types.is_bool_dtype(col.dtype):
        return True
    if not pd.api.types.is_numeric_dtype(col.dtype):
        return False
    vals = col.dropna()
    return len(vals) > 0 and bool(vals.isin((0, 1)).all())


def infer_tasks(interactions: pd.DataFrame, what: str = "interactions") -> list[str]:
    """Every 0/1 column of the interactions table (in file order), bar the reserved and ``prob_`` ones.
    A column that is 0/1 but for a few cells (at least 90% 0/1) is taken for a label with bad cells, and
    the first of them is reported, rather than dropping the task silently."""
    tasks = []
    for c in interactions.columns:
        if c in RESERVED or str(c).startswith("prob_"):
            continue
        col = interactions[c]
        if _is_binary(col):
            tasks.append(c)
            continue
        vals = col.dropna()
        is01 = vals.astype(str).str.strip().isin(("0", "1", "0.0", "1.0", "True", "False")).to_numpy()
        if len(vals) and is01.mean() >= 0.9:
            row = int(np.flatnonzero(col.notna().to_numpy())[np.flatnonzero(~is01)[0]])
            raise DataError(f"{what}: label column {c!r} {_at(interactions, row)}: expected 0 or 1, got "
                            f"{_cell(col.iloc[row])} (the column is 0/1 elsewhere; fix the cell, or name the tasks "
                            f"in dataset.json)")
    return tasks


def infer_schema(interactions: pd.DataFrame, tasks: list[str], users: pd.DataFrame | None = None,
                 items: pd.DataFrame | None = None, sequences: list[str] | None = None) -> Schema:
    """A reasonable schema from the tables' columns (see the module docstring). ``sequences``: the
    behaviours that form history sequences, in intent order (default: every behaviour but
    ``impression``, sorted)."""
    ns = [Categorical("user_id", "user", group="user_id", column="user"),
          Categorical("item_id", "item", group="item_id", column="item")]
    for tbl, source, key in ((users, "user", "user"), (items, "item", "item")):
        if tbl is not None:
            ns += [_feature_for(c, tbl[c], source) for c in tbl.columns if c != key]
    ns += [Categorical("hour", "context"), Categorical("weekday", "context"),
           Bucketized("gap_since_last", "context", boundaries=GAP_BOUNDARIES, log=True)]
    if sequences:
        behaviours = list(sequences)
    elif "behaviour" in interactions.columns:
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


# ----------------------------------------------------------------------------------------------
# the folder layout


def read_dataset_json(path: Path) -> dict:
    """``dataset.json`` of an own-data folder: tasks, sequences and DataConfig fields, each optional."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not readable as JSON ({' '.join(str(e).split())})") from e
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a JSON object with keys {list(DATASET_JSON_KEYS)}, got {type(d).__name__}")
    unknown = [k for k in d if k not in DATASET_JSON_KEYS]
    if unknown:
        raise DataError(f"{path}: unknown key(s) {unknown}; expected some of {list(DATASET_JSON_KEYS)}")
    for k in ("tasks", "sequences"):
        if k in d and not (isinstance(d[k], list) and d[k] and all(isinstance(x, str) for x in d[k])):
            raise DataError(f"{path}: {k!r} must be a non-empty list of column / behaviour names, got {d[k]!r}")
    if "data_config" in d:
        dc = d["data_config"]
        names = [f.name for f in fields(DataConfig)]
        if not isinstance(dc, dict) or any(k not in names for k in dc):
            raise DataError(f"{path}: 'data_config' must be an object with some of {names}, got {dc!r}")
        try:
            d["data_config"] = DataConfig(**dc)
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: 'data_config': {e}") from e
    if "schema" in d:
        try:
            d["schema"] = Schema.from_dict(d["schema"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{path}: 'schema' is not a schema ({type(e).__name__}: {e}); write it with Schema.to_dict()") from e
    return d


def _resolve_folder(interactions, users, items):
    """Paths of a folder's tables (and its dataset.json settings), or the arguments as given."""
    if not (isinstance(interactions, (str, Path)) and Path(interactions).is_dir()):
        return interactions, users, items, {}
    folder = Path(interactions)
    if not (folder / "interactions.csv").is_file():
        raise DataError(f"{folder}: the folder holds no interactions.csv (own data: a CSV file, or a folder with "
                        f"interactions.csv and optional users.csv, items.csv, dataset.json)")
    users = users if users is not None else (folder / "users.csv" if (folder / "users.csv").exists() else None)
    items = items if items is not None else (folder / "items.csv" if (folder / "items.csv").exists() else None)
    settings = read_dataset_json(folder / "dataset.json") if (folder / "dataset.json").exists() else {}
    return folder / "interactions.csv", users, items, settings


def load_custom(interactions, tasks: list[str] | None = None, users=None, items=None, schema: Schema | None = None,
                config: DataConfig | None = None, name: str | None = None,
                sequences: list[str] | None = None) -> RequestData:
    """Requests from your own tables. ``interactions`` may be a folder holding ``interactions.csv``
    (and optionally ``users.csv``, ``items.csv`` and ``dataset.json``). Arguments given here win over
    the folder's ``dataset.json``."""
    interactions, users, items, settings = _resolve_folder(interactions, users, items)
    schema = schema or settings.get("schema")
    tasks_from = "argument" if tasks else "dataset.json" if settings.get("tasks") or settings.get("schema") \
        else "schema" if schema else "every 0/1 column"
    tasks = tasks or settings.get("tasks") or ([t.column for t in schema.tasks] if schema else None)
    sequences = sequences or settings.get("sequences")
    config = config or settings.get("data_config") or DataConfig()
    what = str(interactions) if isinstance(interactions, (str, Path)) else "interactions"
    df = _to_frame(interactions, what)
    if len(df) == 0:
        raise DataError(f"{what}: the table is empty (expected at least one interaction)")
    _require_columns(df, ["user", "item", "timestamp"], what)
    users_df, items_df = _to_frame(users, "users table"), _to_frame(items, "items table")
    if tasks is None:
        tasks = infer_tasks(df, what)
        if not tasks:
            raise DataError(f"{what}: no task column: expected at least one 0/1 label column besides user, item, "
                            f"timestamp, behaviour; columns: {_columns(df)}")
    missing = [t for t in tasks if t not in df.columns]
    if missing:
        raise DataError(f"{what}: missing task column(s) {missing}; columns present: {_columns(df)}")
    _warn_about(df, tasks, what, schema)
    if "behaviour" not in df.columns:
        if sequences:
            raise DataError(f"{what}: sequences {list(sequences)} are named but the table has no 'behaviour' column")
        df = df.copy()
        df["behaviour"] = np.where(pd.to_numeric(df[tasks[0]], errors="coerce") == 1, "positive", "negative")
    elif sequences:
        present = set(df["behaviour"].astype(str))
        absent = [s for s in sequences if s not in present]
        if absent:
            raise DataError(f"{what}: sequence behaviour(s) {absent} never occur in column 'behaviour' "
                            f"(it has {sorted(present)[:10]})")
    schema = schema or infer_schema(df, tasks, users_df, items_df, sequences)
    data = build_requests(df, schema, config, users=users_df, items=items_df, name=name or what)
    data.info["tasks_from"] = tasks_from
    return data


def _warn_about(df: pd.DataFrame, tasks: list[str], what: str, schema: Schema | None = None) -> None:
    """Say what is loaded but probably not meant: columns that are neither tasks nor used, repeated rows."""
    used = RESERVED | set(tasks) | {f"prob_{t}" for t in tasks}
    if schema is not None:  # a given schema may read context columns of the interactions
        used |= {column_of(f) for f in schema.ns_features if f.source == "context"}
    unused = [c for c in df.columns if c not in used]
    if unused:
        warnings.warn(
            f"{what}: column(s) {_columns(df[unused])} not used: tasks are {list(tasks)} (every 0/1 column unless "
            f"named), and interaction columns are not features (put them in users.csv / items.csv)",
            DataWarning, stacklevel=3)
    dup = df.duplicated(keep="first").to_numpy()
    if dup.any():
        first = int(np.flatnonzero(dup)[0])
        h = pd.util.hash_pandas_object(df, index=False).to_numpy()
        earlier = int(np.flatnonzero(h[:first] == h[first])[0])
        line = (lambda r: f"line {r + 2}") if df.attrs.get("source_file") else (lambda r: f"row {r}")
        warnings.warn(
            f"{what}: {int(dup.sum())} of {len(df)} rows repeat an earlier row exactly (first: {line(first)} repeats "
            f"{line(earlier)}); each is kept as one more impression: remove them if the file was written twice",
            DataWarning, stacklevel=3)


def check_splits(data: RequestData, what: str) -> RequestData:
    """Own data must give a training and a test split (else a run trains on nothing or scores nothing)."""
    cfg = data.config
    for split in ("train", "test"):
        if len(data.request_ids(split)):
            continue
        if cfg.split == "user":
            need = math.ceil(0.5 / cfg.test_frac) if split == "test" else 1
            n_max = int(np.bincount(data.candidates["user"]).max())
            why = (f"split='user' puts the last {cfg.test_frac:.0%} of each user's interactions in test, so a user "
                   f"needs at least {need} of them; the largest user here has {n_max}")
        else:
            why = f"split='time' cuts at global time quantiles and every interaction falls on one side"
        raise DataError(f"{what}: the {split} split is empty ({why}); expected interactions in train and test "
                        f"({data.info.get('n_interactions')} interactions, {data.info.get('n_users')} users)")
    return data


__all__ = ["DataWarning", "check_splits", "infer_schema", "infer_tasks", "is_text_column", "load_custom",
           "read_dataset_json", "SPLITS"]
