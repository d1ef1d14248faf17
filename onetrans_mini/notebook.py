"""What every notebook's first cell calls: seeds, plot style, smoke mode, and the hardware line.

Smoke mode (``ONETRANS_SMOKE=1``, or ``CI`` set) shrinks data and training so the whole course runs
under nbval in CI in about a minute per notebook; committed notebooks are executed at full size.
"""

from __future__ import annotations

import os
import platform

import torch

from .train import seed_everything  # noqa: F401  (the trainer's, re-exported for the first cell)

SMOKE = os.environ.get("ONETRANS_SMOKE", "").lower() in ("1", "true", "yes") or os.environ.get("CI", "").lower() in ("1", "true")


def pick(full, smoke):
    """``full`` normally, ``smoke`` in smoke mode: ``n_epochs = pick(5, 1)``."""
    return smoke if SMOKE else full


def hardware() -> str:
    """One line naming what this notebook's outputs were produced on."""
    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"CPU: {cpu}, {n} thread{'s' if n != 1 else ''} (torch {torch.__version__})"


def setup(seed: int = 0) -> None:
    """Seed everything, set the plot style shared by all notebooks, print hardware and mode."""
    seed_everything(seed)
    try:
        import seaborn as sns

        sns.set_theme(context="notebook", style="whitegrid", palette="deep")
    except ImportError:  # plots are optional for library users
        pass
    print(f"running on {hardware()}; smoke mode: {SMOKE}")
