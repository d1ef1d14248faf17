"""Shared fixtures. Tests never touch the network: real MovieLens files come from the shared copy
(``ONETRANS_DATA_DIR``, set by .ci/run) and tests that need them skip with a reason where it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"

# what each real-data fixture needs, and where it comes from (for the skip reason)
ML100K_FILES = ("u.data", "u.user", "u.item")
ML1M_SAMPLE_FILES = ("ratings.dat", "users.dat", "movies.dat")


def real_data_dir() -> Path | None:
    """The folder the real-data tests read: ``$ONETRANS_DATA_DIR`` when it is set (that folder only, as
    the user set it, relative paths from the project root like the library), else the shared copy beside
    the project, else None. Each test then needs only its own files in it (see :func:`require_data`)."""
    if os.environ.get("ONETRANS_DATA_DIR"):
        from onetrans_mini.data.download import data_dir

        return data_dir()
    return SHARED if SHARED.is_dir() else None


def require_data(folder: str, files, what: str) -> Path:
    """``<data dir>/<folder>`` when it holds every one of ``files``; otherwise skip the test, naming the
    folder looked in, the files missing and where they come from. Whatever else the data dir holds
    does not matter."""
    root = real_data_dir()
    if root is None:
        pytest.skip(f"needs {folder}/ ({what}): set ONETRANS_DATA_DIR to a folder holding it (see data/README.md)")
    missing = [f for f in files if not (root / folder / f).is_file()]
    if missing:
        pytest.skip(f"needs {folder}/ ({what}): {root / folder} lacks {', '.join(missing)} (ONETRANS_DATA_DIR={root})")
    return root / folder


@pytest.fixture(scope="session")
def ml_dir() -> Path:
    """The data dir, holding a complete ``ml-100k/`` (tests read ``ml_dir / "ml-100k"``)."""
    return require_data("ml-100k", ML100K_FILES, "MovieLens-100K from GroupLens' ml-100k.zip").parent


@pytest.fixture(scope="session")
def ml1m_sample_dir() -> Path:
    """``ml-1m-sample/``: ML-1M's users.dat and movies.dat plus 300 real rows of ratings.dat. Only the
    project's shared test copy has it (no GroupLens download produces it), so these tests skip elsewhere."""
    return require_data("ml-1m-sample", ML1M_SAMPLE_FILES,
                        "300 real ML-1M ratings + users.dat + movies.dat; only in the shared test copy, "
                        "not a GroupLens download")


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
