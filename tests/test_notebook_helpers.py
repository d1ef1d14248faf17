"""The first cell's helpers: smoke and GPU sizes, where the notebook computes, where runs are saved."""

import pytest
import torch

from onetrans_mini import notebook


def test_pick_gives_smoke_then_gpu_then_full_sizes(monkeypatch):
    monkeypatch.setattr(notebook, "SMOKE", True)
    monkeypatch.setattr(notebook, "GPU", True)
    assert notebook.pick(128, 16, gpu=512) == 16
    monkeypatch.setattr(notebook, "SMOKE", False)
    assert notebook.pick(128, 16, gpu=512) == 512
    assert notebook.pick(128, 16) == 128  # no GPU size given: the full size
    monkeypatch.setattr(notebook, "GPU", False)
    assert notebook.pick(128, 16, gpu=512) == 128


def test_setup_returns_where_it_computes_and_says_so(capsys, monkeypatch):
    monkeypatch.setattr(notebook, "GPU", False)
    assert notebook.setup(device="cpu") == torch.device("cpu")
    assert notebook.setup() == torch.device("cpu")
    assert "computing on CPU:" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no GPU visible"):
        notebook.setup(device="cuda")
    with pytest.raises(ValueError, match="expected 'auto', 'cpu' or 'cuda'"):
        notebook.setup(device="tpu")


def test_run_folder_keeps_smoke_runs_apart(monkeypatch, tmp_path):
    monkeypatch.setenv("ONETRANS_RUNS_DIR", str(tmp_path))
    monkeypatch.setattr(notebook, "SMOKE", False)
    assert notebook.run_folder("05-small") == tmp_path / "course" / "05-small"
    monkeypatch.setattr(notebook, "SMOKE", True)
    assert notebook.run_folder("05-small") == tmp_path / "course" / "05-small-smoke"
    monkeypatch.delenv("ONETRANS_RUNS_DIR")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")  # a kernel runs in notebooks/: the runs still go to the project's
    assert notebook.run_folder("x") == tmp_path / "runs" / "course" / "x-smoke"
