"""Own data (a CSV / folder the project has never seen): column kinds on pandas 2 and 3, every 0/1
column a task, dataset names and moved paths as one clear line, and the synthetic world written to the
documented layout giving the built-in dataset's requests and floors."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest

from onetrans_mini import cli
from onetrans_mini.config import DATA_PRESETS
from onetrans_mini.data import (
    DATASETS,
    DataError,
    DataWarning,
    infer_schema,
    infer_tasks,
    load_custom,
    load_dataset,
    load_synthetic,
    write_own_data,
)
from onetrans_mini.data.custom import is_text_column
from onetrans_mini.features import PAD, Bucketized, Categorical, MultiCategorical
from onetrans_mini.floors import floors


def _interactions(n_users=4, n=12, seed=0, n_items=6):
    rng = np.random.default_rng(seed)
    rows = [{"user": u, "item": int(rng.integers(n_items)), "timestamp": 1_000_000 + 7200 * i + u,
             "like": int(rng.random() < 0.5), "love": int(rng.random() < 0.3)}
            for u in range(n_users) for i in range(n)]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# 1. |-joined text is multi-valued, whatever dtype pandas gives text


GENRES = ["Action|Comedy", "Drama", "Action|Drama|War", None, "Comedy", "Drama|Romance"]


@pytest.mark.parametrize("dtype", [object, "string", "str"], ids=["object (pandas 2 text)", "string", "str (pandas 3 text)"])
def test_pipe_joined_text_column_is_multi_valued_for_every_text_dtype(dtype):
    items = pd.DataFrame({"item": range(6), "genres": pd.Series(GENRES, dtype=dtype),
                          "studio": pd.Series(["A", "B", "A", "C", None, "B"], dtype=dtype)})
    assert is_text_column(items["genres"]) and is_text_column(items["studio"])
    inter = _interactions().drop(columns="love")
    schema = infer_schema(inter, ["like"], items=items)
    f = {x.name: x for x in schema.ns_features}
    assert isinstance(f["genres"], MultiCategorical) and f["genres"].max_len == 3
    assert isinstance(f["studio"], Categorical)  # text without "|" stays one value
    data = load_custom(inter, tasks=["like"], items=items)
    vocab = data.vocabs.by_name["genres"]
    ids = data.candidates["genres"]
    item = data.candidates["item"]  # item codes = item ids 0..5 (all appear)
    for i, g in enumerate(GENRES):
        rows = np.flatnonzero(item == i)
        if not len(rows):
            continue
        want = [vocab.index[v] for v in (g.split("|") if g else [])]
        got = [v for v in ids[rows[0]] if v != PAD]
        assert got == want, (i, g)  # one id per genre, not one id for the joined string


def test_non_string_objects_are_not_taken_for_text():
    lists = pd.Series([["a", "b"], ["c"], ["a"], None, ["b"], ["c", "a"]], dtype=object)
    mixed = pd.Series([1, "x|y", 2, 3, "z", 4], dtype=object)
    assert not is_text_column(lists) and not is_text_column(mixed)
    assert not is_text_column(pd.Series([1.5, 2.5])) and not is_text_column(pd.Series([1, 2]))
    items = pd.DataFrame({"item": range(6), "tags": lists, "code": mixed, "price": np.linspace(1, 6, 6)})
    inter = _interactions().drop(columns="love")
    f = {x.name: x for x in infer_schema(inter, ["like"], items=items).ns_features}
    assert isinstance(f["tags"], MultiCategorical) and f["tags"].max_len == 2  # list cells: several values
    assert isinstance(f["code"], Categorical)  # mixed ids: one value each
    assert isinstance(f["price"], Bucketized)
    load_custom(inter, tasks=["like"], items=items)  # and they encode without error


def test_text_columns_of_a_csv_are_recognised(tmp_path):
    """What a user does: items.csv read by pandas (str dtype on pandas 3, object on pandas 2)."""
    folder = tmp_path / "own"
    folder.mkdir()
    _interactions().to_csv(folder / "interactions.csv", index=False)
    pd.DataFrame({"item": range(6), "genres": [g or "" for g in GENRES]}).to_csv(folder / "items.csv", index=False)
    data = load_dataset(str(folder))
    f = {x.name: x for x in data.schema.ns_features}
    assert isinstance(f["genres"], MultiCategorical)
    assert (data.candidates["genres"] != PAD).sum(axis=1).max() == 3


# ---------------------------------------------------------------------------------------------
# 2. every 0/1 column is a task


def test_every_01_column_is_a_task_and_other_columns_are_named(tmp_path):
    df = _interactions()
    df["rating"] = np.where(df["love"] == 1, 5, np.where(df["like"] == 1, 4, 2))
    df["clicked"] = df["like"].astype(bool)
    df["prob_like"] = 0.5
    assert infer_tasks(df) == ["like", "love", "clicked"]  # file order; rating is not 0/1; prob_ is the oracle
    path = tmp_path / "ratings.csv"
    df.to_csv(path, index=False)
    with pytest.warns(DataWarning, match=r"ratings.csv: column\(s\) \['rating'\] not used: tasks are \['like', 'love', 'clicked'\]"):
        data = load_dataset(str(path))
    assert data.schema.task_names == ("like", "love", "clicked")
    assert data.info["tasks_from"] == "every 0/1 column"
    np.testing.assert_array_equal(np.sort(data.candidates["label:love"]), np.sort(df["love"].to_numpy(np.float32)))
    # named tasks win, and the other 0/1 columns are then said to be unused
    with pytest.warns(DataWarning, match=r"\['love', 'rating', 'clicked'\] not used"):
        assert load_custom(df.drop(columns=["prob_like"]), tasks=["like"]).schema.task_names == ("like",)


def test_cli_data_on_a_like_love_csv_reports_both_tasks(tmp_path, capsys):
    path = tmp_path / "mine.csv"
    _interactions().to_csv(path, index=False)
    assert cli.main(["data", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tasks: like, love" in out
    for task in ("like", "love"):  # a floor line per task
        assert re.search(rf"^  {task} +item_mean ", out, re.M), out


def test_no_01_column_says_what_a_task_is(tmp_path):
    path = tmp_path / "r.csv"
    _interactions().drop(columns=["like", "love"]).assign(rating=3).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"r.csv: no task column: expected at least one 0/1 label column.*'rating'"):
        load_dataset(str(path))


# ---------------------------------------------------------------------------------------------
# 3. names that are not datasets, and paths that are gone: one line, exit code 2


@pytest.mark.parametrize("argv", [
    ["data", "movielens-2m"], ["data", "synthetic-huge"], ["data", "movielens-10k"],
    ["train", "--dataset", "movielens-10k"], ["train", "--dataset", "synthetic-xl"],
])
def test_unknown_dataset_name_is_one_line_naming_the_choices(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a train that got further would write runs/ here
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    bad = argv[-1]
    assert err.startswith(f"error: unknown dataset {bad!r}: expected one of")
    for name in DATASETS:
        assert name in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["synthetic-huge", "movielens-25m", "movielens-2m", "nope"])
def test_load_dataset_raises_data_error_for_unknown_names(name):
    with pytest.raises(DataError, match=rf"unknown dataset '{name}'.*movielens-100k, movielens-1m"):
        load_dataset(name)


def test_moved_own_data_says_the_path_does_not_exist(tmp_path, capsys, monkeypatch):
    folder = write_own_data(tmp_path / "mine", "tiny")
    moved = tmp_path / "moved"
    folder.rename(moved)
    for name in (str(folder), str(folder / "interactions.csv"), "mine/interactions.csv", "gone.csv"):
        with pytest.raises(DataError, match=r"no such file or folder .* does not exist; was it moved") as e:
            load_dataset(name)
        assert "unknown dataset" not in str(e.value)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: own data {str(folder)!r}: no such file or folder") and "\n" not in err
    assert not out.exists() and not (tmp_path / "runs").exists()
    # and a folder without interactions.csv says what it should hold
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: the folder holds no interactions.csv"):
        load_dataset(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------
# 4. the round trip: the synthetic world as own data


def _assert_same_requests(ref, own):
    assert ref.n_requests == own.n_requests
    for k, v in ref.requests.items():
        np.testing.assert_array_equal(v, own.requests[k], err_msg=f"requests.{k}")
    for k in ("request", "user", "item", "timestamp", "label:click", "label:purchase", "prob:click", "prob:purchase"):
        np.testing.assert_array_equal(ref.candidates[k], own.candidates[k], err_msg=f"candidates.{k}")
    for k in ("user", "item", "timestamp", "seq_type", "hist_item", "hist_gap"):
        np.testing.assert_array_equal(ref.history[k], own.history[k], err_msg=f"history.{k}")


@pytest.mark.filterwarnings("ignore::onetrans_mini.data.DataWarning")  # checked once below
def test_synthetic_world_written_as_own_data_gives_the_same_requests_and_floors(tmp_path):
    ref = load_synthetic("tiny", seed=0, use_cache=False)
    folder = write_own_data(tmp_path / "world", "tiny", seed=0)
    settings = json.loads((folder / "dataset.json").read_text())
    assert settings["tasks"] == ["click", "purchase"] and settings["sequences"] == ["purchase", "cart", "click"]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        own = load_dataset(str(folder))
    # the world shows some items twice in one request: the loader keeps them and says so
    assert any("rows repeat an earlier row exactly" in str(x.message) for x in w)
    assert own.schema.task_names == ("click", "purchase") and own.has_prob
    assert [s.name for s in own.schema.sequences] == ["purchase", "cart", "click"]
    assert own.config == DATA_PRESETS["synthetic-tiny"]
    _assert_same_requests(ref, own)
    assert floors(own) == floors(ref)  # item_mean, user_item_mean and the oracle, both tasks, exactly
    # the features: the shared categorical ones encode identically; the |-joined tags are multi-valued
    for k in ("user_id", "age_group", "gender", "region", "item_id", "category", "brand", "hour", "weekday", "gap_since_last"):
        np.testing.assert_array_equal(ref.candidates[k], own.candidates[k], err_msg=k)
    tags = {x.name: x for x in own.schema.ns_features}["tags"]
    assert isinstance(tags, MultiCategorical) and own.candidates["tags"].shape[1] == 2
    v = own.vocabs.by_name["tags"].values
    first = own.candidates["tags"][0] - 2
    cat, brand = (ref.vocabs.by_name[k].values[ref.candidates[k][0] - 2] for k in ("category", "brand"))
    assert [v[i] for i in first] == [f"cat{cat}", f"brand{brand}"]
    # what inference cannot know: price gets quantile buckets (the built-in schema fixes its boundaries),
    # and history events carry no category or price: with the built-in schema written too, all is equal
    assert {x.name: x for x in own.schema.ns_features}["price"].boundaries == ()
    same = load_dataset(str(write_own_data(tmp_path / "world2", "tiny", seed=0, schema=True)))
    assert same.schema == ref.schema
    for tbl in ("requests", "candidates", "history"):
        for k, v in getattr(ref, tbl).items():
            np.testing.assert_array_equal(v, getattr(same, tbl)[k], err_msg=f"{tbl}.{k}")
    assert same.vocab_sizes() == ref.vocab_sizes()


@pytest.mark.filterwarnings("ignore::onetrans_mini.data.DataWarning")  # the world's repeated rows
def test_dataset_json_errors_name_the_file_and_key(tmp_path):
    folder = write_own_data(tmp_path / "w", "tiny")
    for bad, match in (({"tasks": "click"}, r"'tasks' must be a non-empty list"),
                       ({"data_config": {"max_candidate": 8}}, r"'data_config' must be an object with some of"),
                       ({"data_config": {"test_frac": 0}}, r"'data_config': DataConfig: need"),
                       ({"sequences": ["purchase", "wishlist"]}, r"sequence behaviour\(s\) \['wishlist'\] never occur"),
                       ({"colour": 1}, r"unknown key\(s\) \['colour'\]")):
        (folder / "dataset.json").write_text(json.dumps(bad))
        with pytest.raises(DataError, match=match):
            load_dataset(str(folder))
    (folder / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset.json: not readable as JSON"):
        load_dataset(str(folder))
