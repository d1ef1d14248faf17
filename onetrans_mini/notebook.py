"""What every notebook's first cell calls: seeds, plot style, smoke mode, and where the computation runs.

Smoke mode (``ONETRANS_SMOKE=1``, or ``CI`` set) shrinks data and training so the whole course runs
under nbval in CI in about a minute per notebook; committed notebooks are executed at full size.
On a machine with a GPU a notebook computes there and, where it says so with ``pick(..., gpu=...)``,
runs a larger size by itself.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from .train import seed_everything  # noqa: F401  (the trainer's, re-exported for the first cell)

SMOKE = os.environ.get("ONETRANS_SMOKE", "").lower() in ("1", "true", "yes") or os.environ.get("CI", "").lower() in ("1", "true")
GPU = torch.cuda.is_available()


def pick(full, smoke, gpu=None):
    """``smoke`` in smoke mode; else ``gpu`` when given and a GPU is present; else ``full``.

    ``n_epochs = pick(3, 1)``; ``max_len = pick(128, 16, gpu=512)`` (a size the CPU run could not afford).
    """
    if SMOKE:
        return smoke
    return gpu if gpu is not None and GPU else full


def run_folder(name: str) -> Path:
    """Where a notebook saves a run that a later notebook loads: ``<project>/runs/course/<name>``.

    ``ONETRANS_RUNS_DIR`` replaces ``<project>/runs``. Smoke runs get their own folder (``<name>-smoke``),
    so a quick CI pass never replaces the full run a reader's later notebook loads.
    """
    root = os.environ.get("ONETRANS_RUNS_DIR")
    if root is None:
        here = Path.cwd().resolve()
        project = next((d for d in (here, *here.parents) if (d / "pyproject.toml").is_file()), here)
        root = project / "runs"
    return Path(root) / "course" / (f"{name}-smoke" if SMOKE else name)


def _cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def hardware(device: torch.device | str | None = None) -> str:
    """One line naming what a computation on ``device`` runs on (default: the GPU when there is one)."""
    device = torch.device(device if device is not None else ("cuda" if GPU else "cpu"))
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    n = torch.get_num_threads()
    return f"CPU: {_cpu_name()}, {n} thread{'s' if n != 1 else ''} (torch {torch.__version__})"


def setup(seed: int = 0, device: str = "auto") -> torch.device:
    """Seed everything, set the plot style shared by all notebooks, and say where this notebook computes.

    ``device="auto"`` is the GPU when one is present, else the CPU; ``device="cpu"`` is for notebooks that
    only make sense on a CPU (they say why). Returns the device, for the notebook to use.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"setup(device={device!r}): expected 'auto', 'cpu' or 'cuda'")
    if device == "cuda" and not GPU:
        raise ValueError(f"setup(device='cuda'): no GPU visible to torch {torch.__version__}; use device='auto'")
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and GPU) else "cpu")
    seed_everything(seed)
    try:
        import seaborn as sns

        sns.set_theme(context="notebook", style="whitegrid", palette="deep")
    except ImportError:  # plots are optional for library users
        pass
    note = "" if dev.type == "cuda" or not GPU else " (a GPU is present, but this notebook computes on the CPU)"
    print(f"computing on {hardware(dev)}{note}; smoke mode: {SMOKE}")
    return dev
