"""Data: raw files -> interactions -> requests -> request-level batches.

``load_dataset(name)`` is the one entry point the CLI, the notebooks and the tests use:
``synthetic`` (and ``synthetic-tiny``, ``synthetic-small``), ``movielens-100k``, ``movielens-1m``,
or a path to your own interactions (a CSV file or a folder with ``interactions.csv``).
"""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from .batching import Batch
from .custom import infer_schema, load_custom
from .download import cache_dir, data_dir
from .movielens import MOVIELENS_SCHEMA, load_movielens
from .requests import DataError, RequestData, build_requests
from .synthetic import SYNTHETIC_SCHEMA, load_synthetic

DATASETS = ("synthetic", "synthetic-tiny", "synthetic-small", "movielens-100k", "movielens-1m")


def load_dataset(name: str, config: DataConfig | None = None, seed: int = 0, **kw) -> RequestData:
    """Prepared requests of a named dataset or of your own interactions at a path."""
    if name in ("synthetic", "synthetic-default"):
        return load_synthetic("default", seed=seed, config=config, **kw)
    if name.startswith("synthetic-"):
        return load_synthetic(name.split("-", 1)[1], seed=seed, config=config, **kw)
    if name.startswith("movielens-"):
        return load_movielens(name, config=config, **kw)
    if Path(name).exists():
        return load_custom(name, config=config, **kw)
    raise DataError(f"unknown dataset {name!r}: expected one of {list(DATASETS)} or a path to your interactions (CSV file or folder)")


__all__ = [
    "Batch", "DataError", "RequestData", "build_requests", "load_dataset", "load_movielens", "load_synthetic",
    "load_custom", "infer_schema", "data_dir", "cache_dir", "MOVIELENS_SCHEMA", "SYNTHETIC_SCHEMA", "DATASETS",
]
