"""MovieLens-20M / 32M (the CSV releases) and the C-reader parsing of every MovieLens file.

No test downloads: the CSV files are written here in the official format (header, quoted titles,
half-star ratings) from the shared ML-100K copy, and the download path is driven by a fake ``urlopen``.
"""

from __future__ import annotations

import io
import re
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from onetrans_mini import cli
from onetrans_mini.data import DATASETS, DataError, load_dataset
from onetrans_mini.data import download as dl
from onetrans_mini.data.movielens import (ML20M, ML32M, MOVIELENS_CSV_SCHEMA, read_delimited, read_ml100k,
                                          read_ml_csv)
from onetrans_mini.model import OneTrans
from onetrans_mini.config import get_preset

RATINGS_HEADER = "userId,movieId,rating,timestamp"


def write_csv_release(folder: Path, ml_dir: Path, n_ratings: int | None = None) -> pd.DataFrame:
    """ML-100K rewritten as an ML-20M-style release in ``folder``; returns the ratings written. Every
    third rating loses half a star (4 -> 3.5 is no longer a like), as real half-star data does."""
    inter, _, items = read_ml100k(ml_dir / "ml-100k")
    r = inter[["user", "item", "rating", "timestamp"]].head(n_ratings).astype({"rating": float})
    r.loc[r.index % 3 == 0, "rating"] -= 0.5
    folder.mkdir(parents=True)
    r.to_csv(folder / "ratings.csv", header=RATINGS_HEADER.split(","), index=False)
    movies = pd.DataFrame({"movieId": items["item"], "title": items["title"], "genres": items["genres"]})
    movies.loc[0, "title"] = "Babylon 5"  # no year, as a few ML-20M titles
    movies.loc[1, "title"] = "2001: A Space Odyssey, The (1968)"  # a year-like word and a comma (quoted)
    movies.to_csv(folder / "movies.csv", index=False)
    return r


def test_the_csv_release_parses_with_half_stars_titles_and_no_users(tmp_path, ml_dir):
    written = write_csv_release(tmp_path / "ml-20m", ml_dir)
    inter, users, items = read_ml_csv(tmp_path / "ml-20m")
    assert users is None and len(inter) == 100_000 and len(items) == 1682
    assert np.array_equal(inter["rating"].to_numpy(), written["rating"].to_numpy())
    assert np.array_equal(inter["like"].to_numpy(), (written["rating"] >= 4).to_numpy().astype(np.int8))
    assert np.array_equal(inter["love"].to_numpy(), (written["rating"] == 5).to_numpy().astype(np.int8))
    assert np.isnan(items["year"].iloc[0]) and items["year"].iloc[1] == 1968.0
    assert items["title"].iloc[1] == "2001: A Space Odyssey, The (1968)"
    assert items["genre1"].iloc[2] == items["genres"].iloc[2].split("|")[0]


@pytest.mark.parametrize("name,spec", [("movielens-20m", ML20M), ("movielens-32m", ML32M)])
def test_a_csv_release_in_the_data_dir_trains_like_any_dataset(name, spec, tmp_path, ml_dir, monkeypatch):
    monkeypatch.setenv("ONETRANS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ONETRANS_CACHE_DIR", str(tmp_path / "cache"))
    write_csv_release(tmp_path / "data" / spec.folder, ml_dir, n_ratings=20_000)
    assert name in DATASETS
    data = load_dataset(name, progress=False)
    assert data.schema == MOVIELENS_CSV_SCHEMA
    names = [f.name for f in data.schema.ns_features]
    assert "age" not in names and "gender" not in names and "user_id" in names
    s = data.summary()
    assert s["n_interactions"] == 20_000 and s["splits"]["test"]["requests"] > 0
    model = OneTrans(get_preset("nano", max_len=data.config.max_len), data.schema, data.vocab_sizes())
    batch = data.collate(data.request_ids("train")[:4])
    logits, loss = model(batch, batch.labels)
    assert logits.shape == (len(batch.request_index), 2) and torch.isfinite(loss)


@pytest.mark.parametrize("file,text,pattern", [
    ("ratings.csv", "user,item,rating,timestamp\n1,2,4.0,5\n",
     r"ratings\.csv, line 1: expected the header 'userId,movieId,rating,timestamp', got 'user,item,rating,timestamp'"),
    ("ratings.csv", f"{RATINGS_HEADER}\n1,2,4.0,5\n1,2,4.0,5,9\n", r"ratings\.csv: Expected 4 fields in line 3, saw 5"),
    ("ratings.csv", f"{RATINGS_HEADER}\n1,2,4.0,5\n1,2,4.0,5\nu7,2,4.0,5\n",
     r"ratings\.csv, line 4: field 'userId' must be an integer, got 'u7'"),
    ("ratings.csv", f"{RATINGS_HEADER}\n1,2,four,5\n", r"ratings\.csv, line 2: field 'rating' must be a number, got 'four'"),
    ("ratings.csv", f"{RATINGS_HEADER}\n1,2,4.0,5\n1,3,6.0,5\n", r"ratings\.csv, line 3: rating must be 0\.5\.\.5, got 6\.0"),
    ("movies.csv", "movieId,title,genres\nx,Heat (1995),Action\n",
     r"movies\.csv, line 2: field 'movieId' must be an integer, got 'x'"),
])
def test_a_malformed_csv_release_names_file_line_and_field(file, text, pattern, tmp_path, ml_dir):
    folder = tmp_path / "ml-20m"
    write_csv_release(folder, ml_dir, n_ratings=10)
    (folder / file).write_text(text)
    with pytest.raises(DataError, match=pattern):
        read_ml_csv(folder)


def test_the_header_less_reader_counts_fields_per_line_and_skips_blank_lines(tmp_path):
    """ML-1M's "::" files through the C reader: blank lines and \\r\\n endings as before, a short or long
    line and a non-integer named by their line number in the file (blank lines counted)."""
    p = tmp_path / "ratings.dat"
    names = ["user", "item", "rating", "timestamp"]
    p.write_bytes(b"1::10::5::100\r\n\r\n2::20::3::200\r\n")
    df = read_delimited(p, "::", names, names)
    assert df.to_dict("list") == {"user": [1, 2], "item": [10, 20], "rating": [5, 3], "timestamp": [100, 200]}
    assert all(df[c].dtype == np.int64 for c in names)
    for body, pattern in ((b"1::10::5::100\n\n2::20::3\n", r"line 3: expected 4 fields separated by '::' .* got 3: '2::20::3'"),
                          (b"1::10::5::100\n2::20::3::200::9\n", r"line 2: expected 4 fields .* got 5"),
                          (b"1::10::5::100\n\n\n2::2x::3::200", r"line 4: field 'item' must be an integer, got '2x'"),
                          (b"1::10::5.5::100\n", r"line 1: field 'rating' must be an integer, got '5.5'")):
        p.write_bytes(body)
        with pytest.raises(DataError, match=re.escape(str(p)) + ", " + pattern):
            read_delimited(p, "::", names, names)


# ---------------------------------------------------------------------------------------------
# the download path, offline and truncated (no network: urlopen is replaced)


@pytest.mark.parametrize("name", ["movielens-100k", "movielens-20m", "movielens-32m"])
def test_offline_data_command_is_one_line_naming_the_url_and_the_manual_route(name, tmp_path, monkeypatch, capsys):
    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(dl.urllib.request, "urlopen", offline)
    monkeypatch.setenv("ONETRANS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ONETRANS_CACHE_DIR", str(tmp_path / "cache"))
    assert cli.main(["data", name]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    folder = name.replace("movielens", "ml")
    assert len(lines) == 1, lines
    assert re.fullmatch(rf"error: {name}: could not download https://files\.grouplens\.org/datasets/movielens/"
                        rf"{folder}\.zip \(.*name resolution.*\)\. Offline\? download .* by hand \(md5 [0-9a-f]{{32}}\) "
                        rf"and unzip it so that \S+/data/{folder}/ holds .*", lines[0]), lines[0]
    assert list((tmp_path / "data").iterdir()) == []  # no half-made folder


class _FakeResponse(io.BytesIO):
    headers: dict = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_a_truncated_download_of_a_large_release_leaves_nothing_behind(tmp_path, ml_dir, monkeypatch):
    """The server stops half-way through ml-20m.zip: the md5 check refuses it and the data dir stays empty;
    the next (complete) download is unpacked into place."""
    write_csv_release(tmp_path / "src" / "ml-20m", ml_dir, n_ratings=50)
    zpath = tmp_path / "ml-20m.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for f in ML20M.files:
            z.write(tmp_path / "src" / "ml-20m" / f, f"ml-20m/{f}")
    full = zpath.read_bytes()
    served = [full[: len(full) // 2]]
    monkeypatch.setattr(dl.urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(served[0]))
    root = tmp_path / "data"
    with pytest.raises(DataError, match=r"movielens-20m: checksum mismatch for https://\S+/ml-20m\.zip: expected md5 "
                                        r"cd245b17a1ae2cc31bb14903e1204af3, got [0-9a-f]{32} \(a truncated or changed "
                                        r"download\); nothing was kept"):
        dl.fetch(ML20M, root, progress=False)
    assert list(root.iterdir()) == []
    # the complete file (its md5 pinned here to the test's zip, as the real one is to GroupLens')
    served[0] = full
    spec = dl.RemoteZip(**{**ML20M.__dict__, "md5": dl.hashlib.md5(full).hexdigest()})
    folder = dl.fetch(spec, root, progress=False)
    assert folder == root / "ml-20m" and sorted(p.name for p in root.iterdir()) == ["ml-20m"]
    assert (folder / "ratings.csv").read_bytes() == (tmp_path / "src" / "ml-20m" / "ratings.csv").read_bytes()
