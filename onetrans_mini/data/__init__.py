"""Data: raw files -> interactions -> requests -> request-level batches.

``load_dataset(name)`` is the one entry point the CLI, the notebooks and the tests use:
``synthetic`` (and ``-tiny``, ``-small``, ``-1m``, ``-10m``), ``movielens-100k``, ``-1m``, ``-20m``, ``-32m``,
or a path to your own interactions (a CSV file or a folder with ``interactions.csv``).
"""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from .batching import Batch
from .custom import DataWarning, check_splits, infer_schema, infer_tasks, load_custom
from .download import cache_dir, data_dir
from .movielens import MOVIELENS_SCHEMA, load_movielens
from .requests import DataError, RequestData, build_requests
from .synthetic import SYNTHETIC_SCHEMA, load_synthetic, write_own_data

DATASETS = ("synthetic", "synthetic-tiny", "synthetic-small", "synthetic-1m", "synthetic-10m", "movielens-100k",
            "movielens-1m", "movielens-20m", "movielens-32m")
_ALIASES = {"synthetic-default": "synthetic"}
_OWN_DATA = "a path to your interactions (a CSV file, or a folder holding interactions.csv)"


def _looks_like_path(name: str) -> bool:
    return any(sep in name for sep in ("/", "\\")) or name.startswith(("~", ".")) or \
        Path(name).suffix.lower() in (".csv", ".tsv", ".txt", ".json")


def load_dataset(name: str, config: DataConfig | None = None, seed: int = 0, **kw) -> RequestData:
    """Prepared requests of a named dataset (see ``DATASETS``) or of your own interactions at a path.
    A name that is neither raises a :class:`DataError` naming the valid choices (or, for a path that
    does not exist, saying so)."""
    name = str(name)
    key = _ALIASES.get(name, name)
    if key in DATASETS:
        if key.startswith("synthetic"):
            return load_synthetic(key.split("-", 1)[1] if "-" in key else "default", seed=seed, config=config, **kw)
        return load_movielens(key, config=config, **kw)
    path = Path(name).expanduser()
    if path.exists():
        return check_splits(load_custom(path, config=config, **kw), str(path))
    if _looks_like_path(name):
        raise DataError(f"own data {name!r}: no such file or folder ({path.resolve()} does not exist; was it moved "
                        f"or renamed?); expected {_OWN_DATA}")
    raise DataError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}, or {_OWN_DATA}")


__all__ = [
    "Batch", "DataError", "RequestData", "build_requests", "load_dataset", "load_movielens", "load_synthetic",
    "load_custom", "infer_schema", "infer_tasks", "DataWarning", "data_dir", "cache_dir", "MOVIELENS_SCHEMA", "SYNTHETIC_SCHEMA", "DATASETS", "write_own_data",
]
