"""MovieLens 100K, 1M, 20M and 32M as requests: a thin layer over ``requests.build_requests``.

Raw files come from GroupLens (downloaded on first use into the data dir, md5-checked; their licence
forbids redistribution, so the project never ships them). Parsing is strict: a wrong column count or a
non-numeric id names the file and line; files are read with pandas' C reader. 100K and 1M: header-less,
latin-1 item files, a users table (age, gender, occupation, zip). 20M and 32M: utf-8 CSV with a header,
half-star ratings, no users table (``MOVIELENS_CSV_SCHEMA`` is the schema without the demographics).

Task labels: ``like`` = rating >= 4 (the literature's label), ``love`` = rating == 5 (second head).
Behaviour sequences: ``liked`` (rating >= 4) and ``disliked`` (rating < 4) events, interleaved by time.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import DATA_PRESETS, DataConfig
from ..features import Bucketized, Categorical, HistoryStat, MultiCategorical, Schema, SequenceSpec, Task, TrainingStat
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
# the CSV releases (md5 from GroupLens' ml-20m.zip.md5 / ml-32m.zip.md5 files); no users table: no demographics
ML20M = RemoteZip(
    name="movielens-20m",
    url="https://files.grouplens.org/datasets/movielens/ml-20m.zip",
    md5="cd245b17a1ae2cc31bb14903e1204af3",
    folder="ml-20m",
    files=("ratings.csv", "movies.csv"),
    size=198_702_078,
)
ML32M = RemoteZip(
    name="movielens-32m",
    url="https://files.grouplens.org/datasets/movielens/ml-32m.zip",
    md5="d472be332d4daa821edc399621853b57",
    folder="ml-32m",
    files=("ratings.csv", "movies.csv"),
    size=238_950_008,
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
        # statistics, without leakage (data/statistics.py): the item's popularity and rates in the training
        # split (out of fold for training rows), the user's rates and genre history from the request's history
        TrainingStat("item_n", key="item"),
        TrainingStat("item_like_rate", key="item", mean_of="like"),
        TrainingStat("item_love_rate", key="item", mean_of="love"),
        HistoryStat("user_like_rate", mean_of="like"),
        HistoryStat("user_love_rate", mean_of="love"),
        HistoryStat("genre_n", match="genre1"),
        HistoryStat("genre_like_rate", mean_of="like", match="genre1"),
        # no RequestStat (the synthetic schema's candidate-list share): a MovieLens "request" is the movies a
        # user chose to rate in one sitting, so its list would tell the model what the user picked, which no
        # ranker knows before it shows anything
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

# ML-20M / ML-32M: the same requests without the users table's demographics (the CSV releases have none)
DEMOGRAPHICS = ("age", "gender", "occupation", "zip2")
MOVIELENS_CSV_SCHEMA = Schema(
    ns_features=tuple(f for f in MOVIELENS_SCHEMA.ns_features if f.name not in DEMOGRAPHICS),
    event_fields=MOVIELENS_SCHEMA.event_fields,
    sequences=MOVIELENS_SCHEMA.sequences,
    tasks=MOVIELENS_SCHEMA.tasks,
)


# ----------------------------------------------------------------------------------------------
# strict parsing


def read_delimited(path: Path, sep: str, names: list[str], numeric: list[str], encoding: str = "utf-8") -> pd.DataFrame:
    """Read a header-less delimited file with pandas' C reader; every line must have ``len(names)`` fields
    and numeric fields must be integers. Errors name the file, the line (1-based) and what was expected."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    if not raw.strip():
        raise DataError(f"{path}: the file is empty")
    byte_sep = sep.encode()
    if len(byte_sep) > 1:  # ML-1M's "::": the C reader takes one character, and \x1f (unit separator) is unused
        if b"\x1f" in raw:
            raise DataError(f"{path}: holds the control character \\x1f; expected plain {sep!r}-separated text")
        raw, byte_sep = raw.replace(byte_sep, b"\x1f"), b"\x1f"
    blank = _check_field_counts(raw, byte_sep, len(names), path, sep, names)
    line_of_row = np.flatnonzero(~blank) + 1  # (rows,) 1-based line numbers: blank lines are skipped
    read = dict(sep=byte_sep.decode(), header=None, names=names, encoding=encoding, quoting=csv.QUOTE_NONE,
                keep_default_na=False, na_values=[], skip_blank_lines=True, engine="c")
    try:
        return pd.read_csv(io.BytesIO(raw), dtype={c: (np.int64 if c in numeric else str) for c in names}, **read)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: cannot decode as {encoding} ({e})") from e
    except ValueError as e:  # a numeric field that is not an integer: read as text to name its line
        df = pd.read_csv(io.BytesIO(raw), dtype=str, **read)
        for col in numeric:
            x = pd.to_numeric(df[col], errors="coerce")
            bad = x.isna().to_numpy() | (x.to_numpy() % 1 != 0)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise DataError(f"{path}, line {line_of_row[i]}: field {col!r} must be an integer, "
                                f"got {df[col].iloc[i]!r}") from None
        raise DataError(f"{path}: cannot read it as {sep!r}-separated integers ({e})") from e


def _check_field_counts(raw: bytes, sep: bytes, n: int, path: Path, shown_sep: str, names: list[str]) -> np.ndarray:
    """Every non-blank line of ``raw`` has ``n`` fields (counted vectorized: separators per line); returns
    the blank-line flags (lines,). A short or long line is an error naming its number."""
    buf = np.frombuffer(raw, np.uint8)
    ends = np.flatnonzero(buf == 10)  # newline positions
    if not raw.endswith(b"\n"):
        ends = np.append(ends, len(buf))
    starts = np.r_[0, ends[:-1] + 1]
    length = ends - starts
    length -= (length > 0) & (buf[np.maximum(ends - 1, 0)] == 13)  # a \r before the \n is not content
    blank = length == 0
    seps = np.bincount(np.searchsorted(ends, np.flatnonzero(buf == sep[0])), minlength=len(ends))  # (lines,)
    bad = ~blank & (seps != n - 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        line = raw[starts[i]:ends[i]].replace(sep, shown_sep.encode()).decode("latin-1")
        raise DataError(f"{path}, line {i + 1}: expected {n} fields separated by {shown_sep!r} ({', '.join(names)}), "
                        f"got {int(seps[i]) + 1}: {line[:80]!r}")
    return blank


def read_csv_with_header(path: Path, dtypes: dict) -> pd.DataFrame:
    """Read a CSV file whose header is exactly ``dtypes``' columns, with pandas' C reader and those dtypes.
    Errors name the file, the line (1-based, the header is line 1) and what was expected."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            header = f.readline().strip()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: cannot decode as utf-8 ({e})") from e
    if header.split(",") != list(dtypes):
        raise DataError(f"{path}, line 1: expected the header {','.join(dtypes)!r}, got {header[:80]!r}")
    try:
        return pd.read_csv(path, dtype=dtypes, engine="c", keep_default_na=False, na_values=[])
    except pd.errors.ParserError as e:  # "Expected 4 fields in line 7, saw 5": pandas names the line
        raise DataError(f"{path}: {str(e).replace('Error tokenizing data. C error: ', '')}") from None
    except ValueError:  # a value of the wrong type: find its line, a chunk at a time (never all as text)
        numeric = [c for c, t in dtypes.items() if t is not str]
        for start, chunk in enumerate(pd.read_csv(path, dtype=str, chunksize=1 << 20, keep_default_na=False, na_values=[])):
            for col in numeric:
                bad = pd.to_numeric(chunk[col], errors="coerce").isna().to_numpy()
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    want = "an integer" if np.dtype(dtypes[col]).kind == "i" else "a number"
                    raise DataError(f"{path}, line {start * (1 << 20) + i + 2}: field {col!r} must be {want}, "
                                    f"got {chunk[col].iloc[i]!r}") from None
        raise


def _ratings_to_interactions(r: pd.DataFrame, path: Path, lowest: float = 1, first_line: int = 1) -> pd.DataFrame:
    bad = ~r["rating"].between(lowest, 5)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}, line {i + first_line}: rating must be {lowest:g}..5, got {r['rating'].iloc[i]}")
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


def read_ml_csv(folder: Path) -> tuple[pd.DataFrame, None, pd.DataFrame]:
    """(interactions, None, items) of ML-20M's / ML-32M's ratings.csv and movies.csv (utf-8, half-star ratings)."""
    folder = Path(folder)
    r = read_csv_with_header(folder / "ratings.csv", {"userId": np.int64, "movieId": np.int64, "rating": np.float64,
                                                      "timestamp": np.int64})
    r = r.rename(columns={"userId": "user", "movieId": "item"})
    interactions = _ratings_to_interactions(r, folder / "ratings.csv", lowest=0.5, first_line=2)
    m = read_csv_with_header(folder / "movies.csv", {"movieId": np.int64, "title": str, "genres": str})
    items = pd.DataFrame({"item": m["movieId"], "title": m["title"], "genres": m["genres"]})
    items["genre1"] = items["genres"].str.split("|").str[0]
    # "Heat (1995)", "Babylon 5" (no year), "Ashes of Time (Dung che sai duk) (1994)": the last "(YYYY)"
    items["year"] = items["title"].str.extract(r"\((\d{4})(?:[-\u2013]\d{0,4})?\)\s*$", expand=False).astype(float)
    return interactions, None, items


def verify_ml100k(folder: Path) -> None:
    """Check the extracted ML-100K files against their sha256 pins (a changed or truncated copy fails)."""
    for name, want in ML100K_SHA256.items():
        got = file_digest(Path(folder) / name, "sha256")
        if got != want:
            raise DataError(f"{Path(folder) / name}: sha256 {got} does not match the official file ({want}); re-download it")


# ----------------------------------------------------------------------------------------------
# requests


def users_table(spec: RemoteZip) -> bool:
    """Whether the release has a users table (ML-100K, ML-1M: age, gender, occupation, zip)."""
    return spec in (ML100K, ML1M)


def load_movielens(name: str = "movielens-100k", config: DataConfig | None = None, root: Path | None = None,
                   use_cache: bool = True, progress: bool = True) -> RequestData:
    """Prepared requests of ``movielens-100k``, ``-1m``, ``-20m`` or ``-32m`` (downloaded on first use)."""
    specs = {"movielens-100k": (ML100K, read_ml100k), "movielens-1m": (ML1M, read_ml1m),
             "movielens-20m": (ML20M, read_ml_csv), "movielens-32m": (ML32M, read_ml_csv)}
    if name not in specs:
        raise DataError(f"unknown MovieLens dataset {name!r}; expected one of {sorted(specs)}")
    spec, reader = specs[name]
    config = config or DATA_PRESETS[name]
    schema = MOVIELENS_SCHEMA if users_table(spec) else MOVIELENS_CSV_SCHEMA
    folder = fetch(spec, root, progress=progress)
    # size and mtime of each raw file: a replaced copy is re-prepared (and re-verified), never served stale
    fingerprint = [(f, (folder / f).stat().st_size, (folder / f).stat().st_mtime_ns) for f in spec.files]

    def build():
        if spec is ML100K:
            verify_ml100k(folder)
        interactions, users, items = reader(folder)
        return build_requests(interactions, schema, config, users=users, items=items, name=name)

    if not use_cache:
        return build()
    data = cached(cache_dir(), name, [name, fingerprint, schema.to_dict(), config.preprocessing_key()], build)
    data.config = config  # the cache is shared by configs that differ only in max_len
    return data
