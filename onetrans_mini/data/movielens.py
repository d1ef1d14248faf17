"""MovieLens 100K and 1M as requests: a thin layer over ``requests.build_requests``.

Raw files come from GroupLens (downloaded on first use into the data dir, md5-checked; their licence
forbids redistribution, so the project never ships them). Parsing is strict: a wrong column count or a
non-numeric id names the file and line. Item files are latin-1.

Task labels: ``like`` = rating >= 4 (the literature's label), ``love`` = rating == 5 (second head).
Behaviour sequences: ``liked`` (rating >= 4) and ``disliked`` (rating <= 3) events, interleaved by time.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import DATA_PRESETS, DataConfig
from ..features import Bucketized, Categorical, MultiCategorical, Schema, SequenceSpec, Task
from .download import RemoteZip, cache_dir, fetch, file_digest
from .requests import DataError, RequestData, build_requests, cached

ML100K = RemoteZip(
    name="movielens-100k",
    url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
    md5="0e33842e24a9c977be4e0107933c0723",
    folder="ml-100k",
    files=("u.data", "u.user", "u.item"),
    size=4_924_029,
)
ML1M = RemoteZip(
    name="movielens-1m",
    url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
    md5="c4d9eecfca2ab87c1945afe126590906",
    folder="ml-1m",
    files=("ratings.dat", "users.dat", "movies.dat"),
)
# sha256 of the extracted ML-100K files, as pinned by other projects for the GroupLens files
ML100K_SHA256 = {
    "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
    "u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
    "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
}

GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)
AGE_BOUNDARIES = (18.0, 25.0, 35.0, 45.0, 50.0, 56.0)  # ML-1M's own age groups, used for both
GAP_BOUNDARIES = tuple(float(x) for x in np.log1p([60, 600, 3600, 6 * 3600, 86400, 7 * 86400, 30 * 86400, 180 * 86400]))

# ----------------------------------------------------------------------------------------------
# the schema: what a MovieLens request looks like to the model

MOVIELENS_SCHEMA = Schema(
    ns_features=(
        Categorical("user_id", "user", group="user_id", column="user"),
        Bucketized("age", "user", boundaries=AGE_BOUNDARIES),
        Categorical("gender", "user"),
        Categorical("occupation", "user"),
        Categorical("zip2", "user"),
        Categorical("item_id", "item", group="item_id", column="item"),
        MultiCategorical("genres", "item", max_len=6),
        Bucketized("year", "item", n_buckets=12),
        Categorical("hour", "context"),
        Categorical("weekday", "context"),
        Bucketized("gap_since_last", "context", boundaries=GAP_BOUNDARIES, log=True),
        Bucketized("n_history", "context", boundaries=(0.5, 5, 10, 20, 50, 100, 200, 400)),
    ),
    event_fields=(
        Categorical("hist_item", "event", column="item", vocab_of="item_id"),
        Categorical("hist_genre", "event", column="genre1"),
        Categorical("hist_rating", "event", column="rating"),
        Bucketized("hist_gap", "event", column="gap_prev", boundaries=GAP_BOUNDARIES, log=True),
    ),
    sequences=(SequenceSpec("liked", ("liked",)), SequenceSpec("disliked", ("disliked",))),
    tasks=(Task("like", "like"), Task("love", "love")),
)


# ----------------------------------------------------------------------------------------------
# strict parsing


def read_delimited(path: Path, sep: str, names: list[str], numeric: list[str], encoding: str = "utf-8") -> pd.DataFrame:
    """Read a header-less delimited file; every line must have ``len(names)`` fields and numeric
    fields must be integers. Errors name the file, the line (1-based) and what was expected."""
    path = Path(path)
    try:
        text = path.read_text(encoding=encoding)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: cannot decode as {encoding} ({e})") from e
    lines = text.splitlines()
    if not lines:
        raise DataError(f"{path}: the file is empty")
    rows = []
    n = len(names)
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split(sep)
        if len(parts) != n:
            raise DataError(f"{path}, line {i}: expected {n} fields separated by {sep!r} ({', '.join(names)}), got {len(parts)}: {line[:80]!r}")
        rows.append(parts)
    df = pd.DataFrame(rows, columns=names)
    for col in numeric:
        x = pd.to_numeric(df[col], errors="coerce")
        if x.isna().any():
            i = int(np.flatnonzero(x.isna().to_numpy())[0])
            raise DataError(f"{path}, line {i + 1}: field {col!r} must be an integer, got {df[col].iloc[i]!r}")
        df[col] = x.astype(np.int64)
    return df


def _ratings_to_interactions(r: pd.DataFrame, path: Path) -> pd.DataFrame:
    bad = ~r["rating"].between(1, 5)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}, line {i + 1}: rating must be 1..5, got {r['rating'].iloc[i]}")
    r = r.copy()
    r["like"] = (r["rating"] >= 4).astype(np.int8)
    r["love"] = (r["rating"] == 5).astype(np.int8)
    r["behaviour"] = np.where(r["like"] == 1, "liked", "disliked")
    return r


def _year(s: str) -> float:
    m = re.search(r"(\d{4})", s or "")
    return float(m.group(1)) if m else np.nan


def read_ml100k(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(interactions, users, items) of ML-100K's u.data, u.user, u.item (latin-1)."""
    folder = Path(folder)
    r = read_delimited(folder / "u.data", "\t", ["user", "item", "rating", "timestamp"], ["user", "item", "rating", "timestamp"])
    interactions = _ratings_to_interactions(r, folder / "u.data")
    u = read_delimited(folder / "u.user", "|", ["user", "age", "gender", "occupation", "zip"], ["user", "age"], "latin-1")
    u["zip2"] = u["zip"].str[:2]
    names = ["item", "title", "release", "video_release", "url", *GENRES_100K]
    it = read_delimited(folder / "u.item", "|", names, ["item"], "latin-1")
    flags = it[list(GENRES_100K)].to_numpy()
    if not np.isin(flags, ("0", "1")).all():
        i = int(np.flatnonzero(~np.isin(flags, ("0", "1")).all(axis=1))[0])
        raise DataError(f"{folder / 'u.item'}, line {i + 1}: genre flags must be 0 or 1")
    genres = ["|".join(g for g, f in zip(GENRES_100K, row) if f == "1") for row in flags]
    items = pd.DataFrame({"item": it["item"], "title": it["title"], "genres": genres})
    items["genre1"] = [g.split("|")[0] if g else "unknown" for g in genres]
    items["year"] = [_year(s) for s in it["release"]]
    return interactions, u[["user", "age", "gender", "occupation", "zip2"]], items


def read_ml1m(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(interactions, users, items) of ML-1M's ratings.dat, users.dat, movies.dat (latin-1)."""
    folder = Path(folder)
    r = read_delimited(folder / "ratings.dat", "::", ["user", "item", "rating", "timestamp"], ["user", "item", "rating", "timestamp"])
    interactions = _ratings_to_interactions(r, folder / "ratings.dat")
    u = read_delimited(folder / "users.dat", "::", ["user", "gender", "age", "occupation", "zip"], ["user", "age", "occupation"], "latin-1")
    u["zip2"] = u["zip"].str[:2]
    m = read_delimited(folder / "movies.dat", "::", ["item", "title", "genres"], ["item"], "latin-1")
    items = pd.DataFrame({"item": m["item"], "title": m["title"], "genres": m["genres"]})
    items["genre1"] = [g.split("|")[0] for g in m["genres"]]
    items["year"] = [_year(t[-6:]) for t in m["title"]]
    return interactions, u[["user", "age", "gender", "occupation", "zip2"]], items


def verify_ml100k(folder: Path) -> None:
    """Check the extracted ML-100K files against their sha256 pins (a changed or truncated copy fails)."""
    for name, want in ML100K_SHA256.items():
        got = file_digest(Path(folder) / name, "sha256")
        if got != want:
            raise DataError(f"{Path(folder) / name}: sha256 {got} does not match the official file ({want}); re-download it")


# ----------------------------------------------------------------------------------------------
# requests


def load_movielens(name: str = "movielens-100k", config: DataConfig | None = None, root: Path | None = None,
                   use_cache: bool = True, progress: bool = True) -> RequestData:
    """Prepared requests of ``movielens-100k`` or ``movielens-1m`` (downloaded on first use)."""
    specs = {"movielens-100k": (ML100K, read_ml100k), "movielens-1m": (ML1M, read_ml1m)}
    if name not in specs:
        raise DataError(f"unknown MovieLens dataset {name!r}; expected one of {sorted(specs)}")
    spec, reader = specs[name]
    config = config or DATA_PRESETS[name]
    folder = fetch(spec, root, progress=progress)
    # size and mtime of each raw file: a replaced copy is re-prepared (and re-verified), never served stale
    fingerprint = [(f, (folder / f).stat().st_size, (folder / f).stat().st_mtime_ns) for f in spec.files]

    def build():
        if spec is ML100K:
            verify_ml100k(folder)
        interactions, users, items = reader(folder)
        return build_requests(interactions, MOVIELENS_SCHEMA, config, users=users, items=items, name=name)

    if not use_cache:
        return build()
    data = cached(cache_dir(), name, [name, fingerprint, MOVIELENS_SCHEMA.to_dict(), config.preprocessing_key()], build)
    data.config = config  # the cache is shared by configs that differ only in max_len
    return data
