"""Interactions -> requests: the path every dataset takes (MovieLens and synthetic are thin layers).

Input: an interactions table (one row per impression: ``user``, ``item``, ``timestamp``, one 0/1
column per task, optionally ``behaviour`` and ``prob_<task>``), plus optional user and item feature
tables. Output: a :class:`RequestData` holding three Arrow-backed tables

- ``requests``: one row per request (user, split, time, its candidate rows, its history window),
- ``candidates``: one row per candidate (encoded NS features, labels),
- ``history``: one row per history event (encoded event fields, sequence type), grouped by user,

and the vocabularies fitted on the training split. Building a batch only slices these tables, so a
request's history is never copied: ``history[hist_start:hist_end]`` of its user, the last ``max_len``
of them kept at batch time.

Rules (see ``DataConfig``): rows are ordered by (user, timestamp, original row), so ties of one
second are broken by file order; a request's history holds only events strictly before its first
candidate in that order; splits are chronological and requests never straddle them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import DataConfig
from ..features import (
    STATISTICS,
    Bucketized,
    Categorical,
    HistoryStat,
    MultiCategorical,
    RequestStat,
    Schema,
    TrainingStat,
    Vocabularies,
    bucketized,
    column_of,
    encode_feature,
    fit_feature,
)
from .batching import Batch, concat_ranges, left_padded_windows
from .statistics import history_stat, prior_means, request_stat, shared_codes, training_stat

SPLITS = ("train", "val", "test")
MAX_SECONDS = 1e11  # about the year 5138: a larger timestamp is milliseconds (or microseconds), not seconds
CACHE_VERSION = 2  # bump when the prepared format changes, so old caches are not reused

# context columns derived for every request (request-relative features live on NS tokens only)
DERIVED_CONTEXT = ("hour", "weekday", "gap_since_last", "n_history")
# event columns derived for every history event (prefix-stable: depend on the event and earlier ones)
DERIVED_EVENT = ("behaviour", "gap_prev")


class DataError(ValueError):
    """Bad input data: the message names the table (or file), the row or column, and what was expected."""


# ----------------------------------------------------------------------------------------------
# validation


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _columns(df: pd.DataFrame, most: int = 12) -> str:
    """A table's column names for a one-line message (at most ``most``, long names cut)."""
    names = [str(c) if len(str(c)) <= 40 else str(c)[:37] + "..." for c in df.columns]
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return repr(names[:most]) + more


def _at(df: pd.DataFrame, row: int) -> str:
    """Where a row is: the file's line (header = line 1) when the table was read from a CSV, else its row."""
    return f"line {row + 2}" if df.attrs.get("source_file") else f"row {row}"


def _cell(v) -> str:
    return "an empty cell" if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)) else repr(_plain(v))


def _to_frame(table, what: str) -> pd.DataFrame:
    if table is None:
        return None
    if isinstance(table, pd.DataFrame):
        return table
    if isinstance(table, (str, Path)):
        path = Path(table)
        if not path.exists():
            raise DataError(f"{what}: file {path} does not exist")
        if path.is_dir():
            raise DataError(f"{what}: {path} is a folder, expected a CSV file")
        try:
            df = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            raise DataError(f"{what}: {path} is empty (expected a header row, e.g. user,item,timestamp,label, "
                            f"and one row per interaction)") from None
        except Exception as e:  # pandas' parser errors name the line; keep the file name in front
            raise DataError(f"{what}: could not read {path} as CSV with a header row: {_one_line(e)}") from e
        if len(df.columns) == 1:
            header = str(df.columns[0])
            seps = [s for s in (";", "\t", "|") if s in header]
            if seps:
                raise DataError(f"{what}: {path} has one column {header[:60]!r}: expected comma-separated columns "
                                f"(the header looks separated by {seps[0]!r})")
        df.attrs["source_file"] = str(path)
        return df
    try:  # datasets.Dataset and anything else with to_pandas
        return table.to_pandas()
    except AttributeError:
        raise DataError(f"{what}: expected a pandas DataFrame, a datasets.Dataset or a CSV path, got {type(table).__name__}")


def _require_columns(df: pd.DataFrame, cols, what: str):
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"{what}: missing required column(s) {missing}; columns present: {_columns(df)}")


def _numeric_column(df: pd.DataFrame, col: str, what: str, expected: str = "a number") -> np.ndarray:
    x = pd.to_numeric(df[col], errors="coerce")
    bad = x.isna() & ~df[col].isna() | df[col].isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{what}: column {col!r} {_at(df, row)}: expected {expected}, got {_cell(df[col].iloc[row])}")
    return x.to_numpy()


def _same_kind_of_ids(df: pd.DataFrame, tbl: pd.DataFrame, key: str, what: str) -> None:
    """The ids of a users / items table must be of the interactions' kind (numbers or text), else no row
    would join (and pandas refuses to merge int64 with str keys)."""
    _require_columns(tbl, [key], what)
    numeric = [pd.api.types.is_numeric_dtype(x[key].dtype) for x in (df, tbl)]
    if len(tbl) and numeric[0] != numeric[1]:
        kinds = ["numbers" if n else "text" for n in numeric]
        raise DataError(f"{what}: column {key!r} holds {kinds[1]} ({_cell(tbl[key].iloc[0])}, ...) but the "
                        f"interactions' {key!r} holds {kinds[0]} ({_cell(df[key].iloc[0])}, ...); expected the same ids")


def validate_interactions(df: pd.DataFrame, schema: Schema, what: str = "interactions") -> pd.DataFrame:
    """Check the interactions table and return a clean copy with ``timestamp`` as float and labels 0/1."""
    if len(df) == 0:
        raise DataError(f"{what}: the table is empty (expected at least one interaction)")
    _require_columns(df, ["user", "item", "timestamp"] + [t.column for t in schema.tasks], what)
    out = df.copy()
    for col in ("user", "item"):
        if out[col].isna().any():
            row = int(np.flatnonzero(out[col].isna().to_numpy())[0])
            raise DataError(f"{what}: column {col!r} {_at(out, row)}: missing id")
    ts = _numeric_column(out, "timestamp", what, "a number of seconds since 1970").astype(np.float64)
    bad = ~np.isfinite(ts) | (ts < 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{what}: column 'timestamp' {_at(out, row)}: expected seconds since 1970 (a finite "
                        f"number >= 0), got {_cell(df['timestamp'].iloc[row])}")
    if (ts > MAX_SECONDS).any():
        row = int(np.flatnonzero(ts > MAX_SECONDS)[0])
        raise DataError(f"{what}: column 'timestamp' {_at(out, row)}: {_cell(df['timestamp'].iloc[row])} is after the "
                        f"year 5000: milliseconds? expected seconds since 1970")
    out["timestamp"] = ts
    for t in schema.tasks:
        y = _numeric_column(out, t.column, what, "a 0/1 label")
        bad = ~np.isin(y, (0, 1))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"{what}: label column {t.column!r} {_at(out, row)}: expected 0 or 1, got {_cell(y[row])}")
        out[t.column] = y.astype(np.float32)
    if "behaviour" not in out.columns:
        out["behaviour"] = "interaction"
    return out


# ----------------------------------------------------------------------------------------------
# the pipeline


def assign_splits(users: np.ndarray, ts: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Split id (0 train, 1 val, 2 test) per row; rows must be sorted by (user, time, row)."""
    n = len(users)
    if cfg.split == "time":
        t_test = np.quantile(ts, 1 - cfg.test_frac)
        t_val = np.quantile(ts, 1 - cfg.test_frac - cfg.val_frac)
        return np.where(ts >= t_test, 2, np.where(ts >= t_val, 1, 0)).astype(np.int8)
    # per user: rank within the user and the user's size
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    sizes = np.diff(np.r_[starts, n])
    rank = np.arange(n) - np.repeat(starts, sizes)
    size = np.repeat(sizes, sizes)
    n_test = np.floor(size * cfg.test_frac + 0.5)
    n_val = np.floor(size * cfg.val_frac + 0.5)
    split = np.where(rank >= size - n_test, 2, np.where(rank >= size - n_test - n_val, 1, 0)).astype(np.int8)
    # events of one user in the same second are never split apart: a tie group takes the split of
    # its first row (otherwise a test candidate could see a co-impressed training event as history)
    tie_start = np.r_[True, (users[1:] != users[:-1]) | (ts[1:] != ts[:-1])]
    return split[np.flatnonzero(tie_start)[np.cumsum(tie_start) - 1]]


def assign_requests(users: np.ndarray, ts: np.ndarray, split: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Request id per row (rows sorted by user, time): consecutive rows of one user and split at most
    ``session_gap`` apart, cut every ``max_candidates`` rows."""
    n = len(users)
    brk = np.ones(n, dtype=bool)
    brk[1:] = (users[1:] != users[:-1]) | (split[1:] != split[:-1]) | (np.diff(ts) > cfg.session_gap)
    session = np.cumsum(brk) - 1
    starts = np.flatnonzero(brk)
    pos = np.arange(n) - starts[session]  # position within the session
    new = brk | (pos % cfg.max_candidates == 0)
    return np.cumsum(new) - 1


def build_requests(
    interactions,
    schema: Schema,
    config: DataConfig,
    users=None,
    items=None,
    name: str = "interactions",
) -> "RequestData":
    """Turn an interactions table (plus optional user and item tables) into a :class:`RequestData`.

    ``interactions``/``users``/``items``: pandas DataFrames, ``datasets.Dataset`` objects or CSV paths.
    ``users`` must have a ``user`` column, ``items`` an ``item`` column; every other column may be
    named by the schema's features (``source="user"`` / ``"item"``).
    """
    df = validate_interactions(_to_frame(interactions, name), schema, name)
    users_df = _to_frame(users, "users table")
    items_df = _to_frame(items, "items table")
    for tbl, key, what in ((users_df, "user", "users table"), (items_df, "item", "items table")):
        if tbl is not None:
            what = tbl.attrs.get("source_file", what)
            _same_kind_of_ids(df, tbl, key, what)
            dup = tbl[key].duplicated()
            if dup.any():
                row = int(np.flatnonzero(dup.to_numpy())[0])
                raise DataError(f"{what}: {key} {_cell(tbl[key].iloc[row])} appears more than once ({_at(tbl, row)}); "
                                f"expected one row per {key}")

    # ---- order, splits, requests -------------------------------------------------------------
    df["_row"] = np.arange(len(df))
    df = df.sort_values(["user", "timestamp", "_row"], kind="mergesort").reset_index(drop=True)
    user_codes, user_values = pd.factorize(df["user"], sort=True)
    item_codes, item_values = pd.factorize(df["item"], sort=True)
    ts = df["timestamp"].to_numpy()
    split = assign_splits(user_codes, ts, config)
    req = assign_requests(user_codes, ts, split, config)
    n_req = int(req[-1]) + 1

    # ---- history events: behaviours named by the schema's sequences ------------------------------
    seq_of = schema.sequence_of_behaviour()
    beh = df["behaviour"].astype(str).to_numpy()
    if not np.isin(beh, list(seq_of)).any():
        raise DataError(
            f"{name}: no row has a behaviour that enters the history; column 'behaviour' has "
            f"{sorted(set(beh))[:5]} but the schema's sequences expect {list(seq_of)}"
        )
    eligible = np.isin(beh, list(seq_of))
    before = np.cumsum(eligible) - eligible  # eligible rows before each row (global, rows grouped by user)
    req_first = np.flatnonzero(np.r_[True, req[1:] != req[:-1]])  # first row of each request
    user_first = np.flatnonzero(np.r_[True, user_codes[1:] != user_codes[:-1]])
    req_user = user_codes[req_first]
    hist_start = before[user_first][req_user]
    hist_end = before[req_first]

    # ---- derived columns -------------------------------------------------------------------------
    t_req = ts[req_first]
    prev_any = np.r_[np.nan, ts[:-1]]
    prev_any[user_first] = np.nan
    ctx = pd.DataFrame(
        {
            "hour": (t_req // 3600 % 24).astype(np.int64),
            "weekday": ((t_req // 86400 + 3) % 7).astype(np.int64),  # 1970-01-01 was a Thursday
            "gap_since_last": ts[req_first] - prev_any[req_first],
            "n_history": (hist_end - hist_start).astype(np.float64),
        }
    )
    for f in schema.ns_features:  # user-supplied context columns: taken from the request's first row
        if f.source == "context" and column_of(f) not in ctx.columns:
            _require_columns(df, [column_of(f)], name)
            ctx[column_of(f)] = df[column_of(f)].to_numpy()[req_first]

    hist_df = df[eligible].reset_index(drop=True)
    h_ts = hist_df["timestamp"].to_numpy()
    h_user = user_codes[eligible]
    gap_prev = np.r_[np.nan, np.diff(h_ts)]
    gap_prev[np.r_[True, h_user[1:] != h_user[:-1]]] = np.nan  # the user's first event has no gap
    hist_df["gap_prev"] = gap_prev
    hist_df["seq_type"] = np.array([seq_of[b] for b in beh[eligible]], dtype=np.int64)

    cand_df = df
    if items_df is not None:
        item_cols = [c for c in items_df.columns if c != "item"]
        clash = [c for c in item_cols if c in df.columns]
        items_join = items_df.rename(columns={c: f"{c}__item" for c in clash}) if clash else items_df
        cand_df = df.merge(items_join, on="item", how="left", sort=False)
        hist_df = hist_df.merge(items_join, on="item", how="left", sort=False)
        missing_items = cand_df[item_cols[0]].isna() if item_cols else None
        if missing_items is not None and missing_items.all():
            raise DataError(f"{items_df.attrs.get('source_file', 'items table')}: no item of the interactions was found in "
                            f"it (check the 'item' ids and their type)")
    if users_df is not None:
        u_tbl = users_df.set_index("user")
        req_user_raw = user_values[req_user]
        user_feat = u_tbl.reindex(req_user_raw).reset_index(drop=True)
        if len(u_tbl.columns) and user_feat.isna().all(axis=1).all():
            raise DataError(f"{users_df.attrs.get('source_file', 'users table')}: no user of the interactions was found in "
                            f"it (check the 'user' ids and their type)")
    else:
        user_feat = pd.DataFrame(index=range(n_req))
    user_feat["user"] = user_values[req_user]
    _add_statistics(schema, cand_df, hist_df, user_feat, split, req, eligible, req_first, hist_start, hist_end, name)

    # ---- vocabularies on the training split only ---------------------------------------------------
    train_rows = split == 0
    train_req = split[req_first] == 0
    train_hist = split[eligible] == 0
    tables = {"user": (user_feat, train_req), "context": (ctx, train_req), "item": (cand_df, train_rows)}
    tables["event"] = (hist_df, train_hist)

    def values_of(f, tbl):
        col = column_of(f)
        if col not in tbl.columns:
            raise DataError(
                f"schema feature {f.name!r} reads column {col!r} of the {f.source} table, which has {list(tbl.columns)}"
            )
        return tbl[col]

    vocabs: dict = {}
    for f in list(schema.ns_features) + list(schema.event_fields):
        if getattr(f, "vocab_of", ""):
            continue
        tbl, mask = tables[f.source]
        vocabs[f.name] = fit_feature(_with_min_count(f, config), values_of(f, tbl)[mask])
    for f in list(schema.ns_features) + list(schema.event_fields):
        if getattr(f, "vocab_of", ""):
            if f.vocab_of not in vocabs:
                raise DataError(f"schema feature {f.name!r}: vocab_of={f.vocab_of!r} names no feature with a vocabulary")
            vocabs[f.name] = vocabs[f.vocab_of]

    # ---- encode ------------------------------------------------------------------------------------
    cand_cols: dict[str, np.ndarray] = {"request": req.astype(np.int64)}
    for f in schema.ns_features:
        tbl, _ = tables[f.source]
        numeric = isinstance(bucketized(f), Bucketized)
        ids = encode_feature(f, vocabs[f.name], values_of(f, tbl).to_numpy() if numeric else values_of(f, tbl).tolist())
        if f.source in ("user", "context"):  # per request -> per candidate
            ids = ids[req]
        cand_cols[f.name] = ids
        if isinstance(f, STATISTICS):  # the raw number too: for plots, linear baselines, tests
            raw = values_of(f, tbl).to_numpy(np.float32)
            cand_cols[f"stat:{f.name}"] = raw[req] if f.source == "user" else raw
    for t in schema.tasks:
        cand_cols[f"label:{t.name}"] = df[t.column].to_numpy(np.float32)
        if f"prob_{t.name}" in df.columns:
            cand_cols[f"prob:{t.name}"] = df[f"prob_{t.name}"].to_numpy(np.float32)
    cand_cols["user"] = user_codes.astype(np.int64)
    cand_cols["item"] = item_codes.astype(np.int64)
    cand_cols["timestamp"] = ts

    hist_cols: dict[str, np.ndarray] = {
        "user": h_user.astype(np.int64),
        "item": item_codes[eligible].astype(np.int64),
        "timestamp": h_ts,
        "seq_type": hist_df["seq_type"].to_numpy(),
    }
    for f in schema.event_fields:
        vals = values_of(f, hist_df)
        hist_cols[f.name] = encode_feature(f, vocabs[f.name], vals.to_numpy() if isinstance(f, Bucketized) else vals.tolist())

    req_cols = {
        "user": req_user.astype(np.int64),
        "split": split[req_first].astype(np.int64),
        "time": t_req,
        "cand_start": req_first.astype(np.int64),
        "cand_end": np.r_[req_first[1:], len(df)].astype(np.int64),
        "hist_start": hist_start.astype(np.int64),
        "hist_end": hist_end.astype(np.int64),
    }
    info = {
        "name": name,
        "n_interactions": int(len(df)),
        "n_users": int(len(user_values)),
        "n_items": int(len(item_values)),
        "n_history_events": int(eligible.sum()),
        "user_ids": [_plain(u) for u in user_values],
    }
    return RequestData(schema, config, Vocabularies(vocabs), req_cols, cand_cols, hist_cols, info)


def _add_statistics(schema: Schema, cand_df, hist_df, user_feat, split, req, eligible, req_first, hist_start,
                    hist_end, name: str) -> None:
    """Compute the schema's statistic features into their tables (``statistics.py``): a ``TrainingStat``, a
    ``RequestStat`` and a matched ``HistoryStat`` as a column of the candidates, a per-request ``HistoryStat``
    as one of the requests."""
    def need(tbl, col, f, what):
        if col not in tbl.columns:
            raise DataError(f"{name}: statistic {f.name!r} reads column {col!r} of the {what}, which has {_columns(tbl)}")

    def candidate_column(col, f):  # a column of the candidates, or of their user (the users table)
        if col in cand_df.columns:
            return cand_df[col].to_numpy()
        if col in user_feat.columns:
            return user_feat[col].to_numpy()[req]
        raise DataError(f"{name}: statistic {f.name!r} reads column {col!r} of the candidates, which have "
                        f"{_columns(cand_df)} (and their users {_columns(user_feat)})")

    for f in schema.ns_features:
        if not isinstance(f, STATISTICS):
            continue
        for tbl in (cand_df, user_feat):
            if f.name in tbl.columns:
                raise DataError(f"{name}: statistic {f.name!r} would overwrite the column of that name; rename the feature")
        if isinstance(f, RequestStat):
            keys, = shared_codes(candidate_column(f.match, f))
            cand_df[f.name] = request_stat(req, keys)
            continue
        if isinstance(f, TrainingStat):
            key = (f.key,) if isinstance(f.key, str) else tuple(f.key)
            cols = pd.DataFrame({col: candidate_column(col, f) for col in key})  # (N, len(key))
            values = None
            if f.mean_of:
                need(cand_df, f.mean_of, f, "candidates")
                values = _numeric_column(cand_df, f.mean_of, name).astype(np.float64)
            # one code per combination of the key columns; a missing value in any of them -> -1
            codes = pd.MultiIndex.from_frame(cols).factorize()[0]
            codes = np.where(cols.isna().any(axis=1).to_numpy(), -1, codes)
            cand_df[f.name] = training_stat(f, codes, values, split, req)
            continue
        # the queries: every candidate (with a match) or every request; each gets its own out-of-fold prior
        q_req = req if f.match else np.arange(len(hist_start))
        q_split = split if f.match else split[req_first]
        values, prior = None, 0.0
        if f.mean_of:
            need(hist_df, f.mean_of, f, "history events")
            values = _numeric_column(hist_df, f.mean_of, f"{name} (history events)").astype(np.float64)
            prior = prior_means(values, split[eligible] == 0, req[eligible], f.folds, q_req, q_split)
        if f.match:
            need(hist_df, f.match, f, "history events")
            need(cand_df, f.match, f, "candidates")
            event_keys, cand_keys = shared_codes(hist_df[f.match], cand_df[f.match])
            cand_df[f.name] = history_stat(f, hist_start[req], hist_end[req], values, prior, event_keys, cand_keys)
        else:
            user_feat[f.name] = history_stat(f, hist_start, hist_end, values, prior)


def _with_min_count(f, cfg: DataConfig):
    if isinstance(f, (Categorical, MultiCategorical)) and f.min_count == 1 and cfg.min_count > 1:
        from dataclasses import replace

        return replace(f, min_count=cfg.min_count)
    return f


def _plain(x):
    return x.item() if isinstance(x, np.generic) else x


# ----------------------------------------------------------------------------------------------
# the prepared data


class RequestData:
    """Prepared requests of one dataset: tables as numpy arrays, vocabularies, schema and config."""

    def __init__(self, schema, config, vocabs, requests, candidates, history, info):
        self.schema: Schema = schema
        self.config: DataConfig = config
        self.vocabs: Vocabularies = vocabs
        self.requests: dict[str, np.ndarray] = requests
        self.candidates: dict[str, np.ndarray] = candidates
        self.history: dict[str, np.ndarray] = history
        self.info: dict = info

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def n_requests(self) -> int:
        return len(self.requests["split"])

    def vocab_sizes(self) -> dict[str, int]:
        """Embedding rows per feature (PAD and OOV included), the sizes the model's tables need."""
        return self.vocabs.sizes()

    def request_ids(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return np.flatnonzero(self.requests["split"] == SPLITS.index(split))

    def candidate_rows(self, split: str) -> np.ndarray:
        rid = self.request_ids(split)
        rows, _ = concat_ranges(self.requests["cand_start"][rid], self.requests["cand_end"][rid])
        return rows

    def labels(self, split: str) -> np.ndarray:
        """(N, n_tasks) labels of the split's candidates, in request order."""
        rows = self.candidate_rows(split)
        return np.stack([self.candidates[f"label:{t}"][rows] for t in self.schema.task_names], axis=1)

    @property
    def has_prob(self) -> bool:
        return all(f"prob:{t}" in self.candidates for t in self.schema.task_names)

    # ---- batching --------------------------------------------------------------------------------
    def collate(self, request_ids, max_len: int | None = None) -> Batch:
        """A request-level :class:`Batch` of the given requests (histories cut to ``max_len``)."""
        rid = np.asarray(request_ids, dtype=np.int64)
        L = max_len or self.config.max_len
        R = self.requests
        idx, mask = left_padded_windows(R["hist_start"][rid], R["hist_end"][rid], L)  # (R, L)
        seq = {f.name: torch.from_numpy(np.where(mask, self.history[f.name][idx], 0)) for f in self.schema.event_fields}
        seq_type = torch.from_numpy(np.where(mask, self.history["seq_type"][idx], 0))
        rows, owner = concat_ranges(R["cand_start"][rid], R["cand_end"][rid])  # (B,), (B,)
        C = self.candidates
        ns = {f.name: torch.from_numpy(C[f.name][rows]) for f in self.schema.ns_features}
        tasks = self.schema.task_names
        labels = torch.from_numpy(np.stack([C[f"label:{t}"][rows] for t in tasks], axis=1))
        prob = None
        if self.has_prob:
            prob = torch.from_numpy(np.stack([C[f"prob:{t}"][rows] for t in tasks], axis=1))
        return Batch(
            seq=seq,
            seq_type=seq_type,
            seq_mask=torch.from_numpy(mask),
            ns=ns,
            request_index=torch.from_numpy(owner),
            labels=labels,
            user=torch.from_numpy(C["user"][rows]),
            request_id=torch.from_numpy(rid),
            prob=prob,
        )

    def loader(self, split: str, batch_requests: int = 64, shuffle: bool = False, seed: int = 0,
               max_len: int | None = None, drop_last: bool = False, sampler=None, num_workers: int = 0):
        """A ``torch.utils.data.DataLoader`` of request-level batches of ``batch_requests`` requests."""
        ids = self.request_ids(split)
        if sampler is None:
            g = torch.Generator().manual_seed(seed)
            sampler = torch.utils.data.RandomSampler(range(len(ids)), generator=g) if shuffle else range(len(ids))
        bs = torch.utils.data.BatchSampler(sampler, batch_requests, drop_last)
        return torch.utils.data.DataLoader(
            range(len(ids)), batch_sampler=bs, collate_fn=lambda pos: self.collate(ids[np.asarray(pos)], max_len),
            num_workers=num_workers,
        )

    # ---- persistence (Arrow files, memory-mapped) ------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write to ``path`` atomically: a temporary folder renamed into place, so a failure leaves nothing.
        Each table is one Arrow stream file holding ONE record batch, so that ``load`` can map it without a copy."""
        import pyarrow as pa

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
        try:
            for tname, tbl in (("requests", self.requests), ("candidates", self.candidates), ("history", self.history)):
                table = pa.table({k: _numpy_to_arrow(v) for k, v in tbl.items()})
                # the Arrow stream format that datasets reads; ONE record batch, so columns are contiguous
                with pa.OSFile(str(tmp / f"{tname}.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
                    w.write_table(table, max_chunksize=max(1, table.num_rows))
            meta = {
                "schema": self.schema.to_dict(),
                "config": asdict(self.config),
                "info": self.info,
                "cache_version": CACHE_VERSION,
            }
            (tmp / "meta.json").write_text(json.dumps(meta))
            (tmp / "vocabs.json").write_text(self.vocabs.to_json())
            if path.exists():
                shutil.rmtree(path)
            tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path: Path) -> "RequestData":
        """Read a saved copy (``datasets.Dataset.from_file``, memory-mapped). Numeric columns are read-only
        numpy views of the mapped files: the OS pages them in as batches touch them (and may drop them
        again), so a large dataset need not fit in the process's own memory."""
        from datasets import Dataset

        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        vocabs = Vocabularies.from_json((path / "vocabs.json").read_text())
        tables = [_arrow_to_numpy(Dataset.from_file(str(path / f"{t}.arrow"), in_memory=False).data.table)
                  for t in ("requests", "candidates", "history")]
        schema = Schema.from_dict(meta["schema"])
        return cls(schema, DataConfig(**meta["config"]), vocabs, *tables, meta["info"])

    # ---- summary ----------------------------------------------------------------------------------
    def summary(self) -> dict:
        """Counts per split, history and request-size statistics, positive rates (what ``data`` prints)."""
        R = self.requests
        n_cand = R["cand_end"] - R["cand_start"]
        hist = np.minimum(R["hist_end"] - R["hist_start"], self.config.max_len)
        out = {k: v for k, v in self.info.items() if k != "user_ids"}
        out["splits"] = {}
        for s in SPLITS:
            rid = self.request_ids(s)
            y = self.labels(s)
            out["splits"][s] = {
                "requests": int(len(rid)),
                "candidates": int(n_cand[rid].sum()),
                "users": int(len(np.unique(R["user"][rid]))),
                "positive_rate": {t: float(y[:, i].mean()) if len(y) else float("nan") for i, t in enumerate(self.schema.task_names)},
            }
        out["request_size"] = _stats(n_cand)
        out["history_length"] = _stats(R["hist_end"] - R["hist_start"])
        out["history_length_kept"] = _stats(hist)
        out["max_len"] = self.config.max_len
        return out


def _numpy_to_arrow(x: np.ndarray):
    """A numpy column as Arrow: a 2-D (n, k) array becomes a fixed-size list column of k values per row."""
    import pyarrow as pa

    if x.ndim == 2:
        return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x).reshape(-1)), x.shape[1])
    return pa.array(x)


def _arrow_to_numpy(table) -> dict[str, np.ndarray]:
    """Columns of an Arrow table as numpy arrays, without a copy where the column is one chunk of numbers
    (as ``save`` writes them); fixed-size list columns become 2-D arrays."""
    import pyarrow as pa

    out = {}
    for name, col in zip(table.column_names, table.columns):
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


def _stats(x: np.ndarray) -> dict:
    x = np.asarray(x)
    return {
        "mean": float(x.mean()),
        "p50": float(np.percentile(x, 50)),
        "p90": float(np.percentile(x, 90)),
        "max": int(x.max()),
        "min": int(x.min()),
    }


# ----------------------------------------------------------------------------------------------
# on-disk cache, keyed by everything that changes the prepared tables


def cache_key(*parts) -> str:
    blob = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached(cache_dir: Path, name: str, key_parts: list, build) -> RequestData:
    """Load ``name``'s prepared requests from the cache, or build, save and return them."""
    path = Path(cache_dir) / f"{name}-{cache_key(*key_parts)}"
    if (path / "meta.json").exists():
        try:
            return RequestData.load(path)
        except Exception:  # a corrupt cache entry is rebuilt, never trusted
            shutil.rmtree(path, ignore_errors=True)
    data = build()
    data.save(path)
    return RequestData.load(path)  # memory-mapped: the built copy's memory goes back as soon as it is dropped
