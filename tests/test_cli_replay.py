"""``onetrans-mini replay --run RUN_DIR``: a run trained by the CLI replays its test period in every
cache mode, with the same scores; a run the replay cannot serve gets one clear line."""

from __future__ import annotations

import pytest

from onetrans_mini.cli import main

TINY_RUN = ["--dataset", "synthetic-tiny", "--preset", "nano", "--epochs", "1", "--steps-per-epoch", "2",
            "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("replay") / "run"
    assert main(["train", *TINY_RUN, "--out", str(out)]) == 0
    return out


def _rows(table: str, modes) -> dict[str, list[str]]:
    rows = {}
    for line in table.splitlines():
        cells = line.split()
        if cells and cells[0] in modes:
            rows[cells[0]] = cells
    return rows


def test_replay_a_trained_run(run_dir, capsys):
    capsys.readouterr()
    modes = ("none", "request", "both")
    rc = main(["replay", "--run", str(run_dir), "--max-requests", "20", "--modes", ",".join(modes)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "replay of 20 requests" in out
    rows = _rows(out, modes)
    assert set(rows) == set(modes), out
    diffs = {m: float(cells[-1]) for m, cells in rows.items()}  # the last column: max |diff| against "none"
    assert diffs["none"] == 0.0
    assert diffs["request"] < 1e-4 and diffs["both"] < 1e-4, diffs
    assert rows["none"][4] == "-" and rows["both"][4].endswith("%")  # hit rate: only the user cache has one


def test_replay_refuses_a_baseline_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY_RUN, "--model", "din-dcnv2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["replay", "--run", str(out), "--max-requests", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "OneTrans" in err[0], err
