"""Shared fixtures. Tests never touch the network: real MovieLens files come from the shared copy
(``ONETRANS_DATA_DIR``, set by .ci/run) and tests that need them skip with a reason where it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def real_data_dir() -> Path | None:
    """The folder holding ml-100k/ and ml-1m-sample/, or None."""
    for cand in (os.environ.get("ONETRANS_DATA_DIR"), SHARED):
        if cand and (Path(cand) / "ml-100k" / "u.data").is_file():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def ml_dir() -> Path:
    d = real_data_dir()
    if d is None:
        pytest.skip("needs the real MovieLens files: set ONETRANS_DATA_DIR to a folder holding ml-100k/ (see data/README.md)")
    return d


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Every test session prepares datasets into its own cache dir (never beside the raw files)."""
    old = os.environ.get("ONETRANS_CACHE_DIR")
    os.environ["ONETRANS_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("ONETRANS_CACHE_DIR", None)
    else:
        os.environ["ONETRANS_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_data():
    """The tiny synthetic world (64 users, 8 candidates per request), prepared once per session."""
    from onetrans_mini.data import load_synthetic

    return load_synthetic("tiny", seed=0)


@pytest.fixture(scope="session")
def ml100k(ml_dir):
    from onetrans_mini.data import load_movielens

    return load_movielens("movielens-100k", root=ml_dir, progress=False)
