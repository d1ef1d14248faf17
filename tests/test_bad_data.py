"""Bad own data, as a table (issue 13, 'A test you keep'): each malformed CSV goes through the CLI
(``onetrans-mini data FILE``, a few through ``train``) and must give its exit code and ONE stderr line
that names the file, the column or line, and what was expected; nothing may be written to the cache
dir or a run folder, and the input files stay as they were."""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

import pytest

from onetrans_mini import cli
from onetrans_mini.data import DataWarning

HEADER = "user,item,timestamp,like\n"


def _good_rows(n_users=3, n=10, t0=1_000_000):
    return "".join(f"{u},{i % 7},{t0 + 7200 * i + u},{(i + u) % 2}\n" for u in range(n_users) for i in range(n))


GOOD = HEADER + _good_rows()
LINES = GOOD.splitlines(keepends=True)  # LINES[k] is line k + 1 of the file


def _replace_line(k: int, text: str) -> str:
    """GOOD with file line ``k`` (1-based, header = 1) replaced."""
    lines = list(LINES)
    lines[k - 1] = text + "\n"
    return "".join(lines)


# id, files {name: text} (the first is what the command reads: a file, or "" for the folder), argv tail,
# exit code, regex the single stderr line must match (exit 2) or that stderr must contain (exit 0)
ROWS = [
    ("missing-timestamp-column", {"i.csv": "user,item,like\n1,2,1\n1,3,0\n"}, [], 2,
     r"i\.csv: missing required column\(s\) \['timestamp'\]; columns present: \['user', 'item', 'like'\]"),
    ("missing-user-column", {"i.csv": "item,timestamp,like\n2,5,1\n"}, [], 2,
     r"i\.csv: missing required column\(s\) \['user'\]"),
    ("timestamp-is-text", {"i.csv": _replace_line(6, "1,3,yesterday,1")}, [], 2,
     r"i\.csv: column 'timestamp' line 6: expected a number of seconds since 1970, got 'yesterday'"),
    ("timestamp-is-a-date", {"i.csv": _replace_line(4, "0,2,2024-01-01 10:00,1")}, [], 2,
     r"i\.csv: column 'timestamp' line 4: expected a number of seconds since 1970, got '2024-01-01 10:00'"),
    ("timestamp-empty-NaN", {"i.csv": _replace_line(9, "0,5,,1")}, [], 2,
     r"i\.csv: column 'timestamp' line 9: expected a number of seconds since 1970, got an empty cell"),
    ("timestamp-literal-nan", {"i.csv": _replace_line(9, "0,5,nan,1")}, [], 2,
     r"i\.csv: column 'timestamp' line 9: expected a number of seconds since 1970, got an empty cell"),
    ("timestamp-negative", {"i.csv": _replace_line(3, "0,1,-5,1")}, [], 2,
     r"i\.csv: column 'timestamp' line 3: expected seconds since 1970 \(a finite number >= 0\), got -5"),
    ("timestamp-infinite", {"i.csv": _replace_line(3, "0,1,inf,1")}, [], 2,
     r"i\.csv: column 'timestamp' line 3: expected seconds since 1970 \(a finite number >= 0\), got inf"),
    ("timestamp-in-milliseconds", {"i.csv": HEADER + _good_rows(t0=1_700_000_000_000)}, [], 2,
     r"i\.csv: column 'timestamp' line 2: 1700000000000 is after the year 5000: milliseconds\? expected seconds"),
    ("label-is-2", {"i.csv": _replace_line(5, "0,3,1021600,2")}, [], 2,
     r"i\.csv: label column 'like' line 5: expected 0 or 1, got 2"),
    ("label-is-yes", {"i.csv": _replace_line(5, "0,3,1021600,yes")}, [], 2,
     r"i\.csv: label column 'like' line 5: expected 0 or 1, got 'yes' \(the column is 0/1 elsewhere"),
    ("label-empty", {"i.csv": _replace_line(7, "0,5,1036000,")}, [], 2,
     r"i\.csv: column 'like' line 7: expected a 0/1 label, got an empty cell"),
    ("no-label-column", {"i.csv": "user,item,timestamp,rating\n1,2,3,4\n"}, [], 2,
     r"i\.csv: no task column: expected at least one 0/1 label column .*columns: \['user', 'item', 'timestamp', 'rating'\]"),
    ("user-id-empty", {"i.csv": _replace_line(8, ",5,1036000,1")}, [], 2,
     r"i\.csv: column 'user' line 8: missing id"),
    ("row-with-extra-fields", {"i.csv": _replace_line(3, "0,1,1007200,1,9,9")}, [], 2,
     r"i\.csv: could not read .*i\.csv as CSV with a header row: .*Expected 4 fields in line 3, saw 6"),
    ("semicolon-separated", {"i.csv": GOOD.replace(",", ";")}, [], 2,
     r"i\.csv has one column 'user;item;timestamp;like': expected comma-separated columns .*';'"),
    ("empty-file", {"i.csv": ""}, [], 2, r"i\.csv is empty \(expected a header row"),
    ("header-only", {"i.csv": HEADER}, [], 2, r"i\.csv: the table is empty \(expected at least one interaction\)"),
    ("not-utf8", {"i.csv": b"user,item,timestamp,like\n1,\xe9\xff\xfe,3,1\n"}, [], 2,
     r"i\.csv: could not read .* as CSV with a header row: 'utf-8' codec can't decode"),
    ("every-user-one-event", {"i.csv": HEADER + "1,2,100,1\n2,3,200,0\n3,3,300,1\n"}, [], 2,
     r"i\.csv: the test split is empty \(split='user' .* a user needs at least 3 of them; the largest user here has 1\)"),
    ("items-without-item-column", {"": "", "interactions.csv": GOOD, "items.csv": "id,genres\n1,Drama\n"}, [], 2,
     r"items\.csv: missing required column\(s\) \['item'\]; columns present: \['id', 'genres'\]"),
    ("items-duplicate-id", {"": "", "interactions.csv": GOOD, "items.csv": "item,genres\n1,Drama\n2,War\n1,Comedy\n"}, [], 2,
     r"items\.csv: item 1 appears more than once \(line 4\); expected one row per item"),
    ("items-ids-of-another-kind", {"": "", "interactions.csv": GOOD, "items.csv": "item,genres\nm1,Drama\nm2,War\n"}, [], 2,
     r"items\.csv: column 'item' holds text \('m1', \.\.\.\) but the interactions' 'item' holds numbers \(0, \.\.\.\); expected the same ids"),
    ("items-ids-that-never-match", {"": "", "interactions.csv": GOOD, "items.csv": "item,genres\n101,Drama\n102,War\n"}, [], 2,
     r"items\.csv: no item of the interactions was found in it \(check the 'item' ids and their type\)"),
    ("folder-without-interactions", {"": "", "items.csv": "item,genres\n1,Drama\n"}, [], 2,
     r"the folder holds no interactions\.csv"),
    ("dataset-json-unknown-task", {"": "", "interactions.csv": GOOD, "dataset.json": '{"tasks": ["love"]}'}, [], 2,
     r"interactions\.csv: missing task column\(s\) \['love'\]; columns present: \['user', 'item', 'timestamp', 'like'\]"),
    ("train-on-a-bad-csv", {"i.csv": _replace_line(3, "0,1,-5,1")}, ["train"], 2,
     r"i\.csv: column 'timestamp' line 3: expected seconds since 1970"),
    ("train-on-a-moved-folder", {}, ["train"], 2, r"own data '.*gone': no such file or folder"),
    # loads, and says what may not be meant
    ("duplicated-rows", {"i.csv": GOOD + "".join(LINES[1:4])}, [], 0,
     r"i\.csv: 3 of 33 rows repeat an earlier row exactly \(first: line 32 repeats line 2\)"),
    ("a-user-with-one-event", {"i.csv": GOOD + "9,3,1100000,1\n"}, [], 0, r""),
]


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_own_data_gives_one_clear_line_and_writes_nothing(row, tmp_path, monkeypatch, capsys):
    rid, files, command, code, pattern = row
    inp = tmp_path / "input"
    inp.mkdir()
    target = inp / "gone"
    for name, text in files.items():
        if name:
            (inp / name).write_bytes(text if isinstance(text, bytes) else text.encode())
            target = target if target.name != "gone" else inp / name
    if "" in files:  # the command reads the folder
        target = inp
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("ONETRANS_CACHE_DIR", str(cache))
    monkeypatch.chdir(work)  # where a default run folder (runs/...) would go
    before = _digest(inp)
    if command == ["train"]:
        argv = ["train", "--dataset", str(target), "--out", str(work / "run"), "--no-progress"]
    else:
        argv = ["data", str(target)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == code, (rid, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert re.search(pattern, lines[0]), lines[0]
        assert "Traceback" not in err
    else:  # the CLI prints warnings on stderr; here they are caught
        said = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
        assert any(re.search(pattern, m) for m in said) if pattern else not said, said
    # nothing written or lost: no cache entry, no run folder, the input untouched
    assert not cache.exists() or not any(cache.iterdir())
    assert list(work.iterdir()) == []
    assert _digest(inp) == before


def test_a_user_with_one_event_lands_in_training_only(tmp_path):
    """The row above exits 0: say what it means (the user's one interaction is a training candidate
    with no history; the user has no test request)."""
    from onetrans_mini.data import load_dataset

    path = tmp_path / "i.csv"
    path.write_text(GOOD + "9,3,1100000,1\n")
    data = load_dataset(str(path))
    u = data.info["user_ids"].index(9)
    rid = (data.requests["user"] == u).nonzero()[0]
    assert len(rid) == 1 and data.requests["split"][rid[0]] == 0
    assert data.requests["hist_end"][rid[0]] == data.requests["hist_start"][rid[0]]
