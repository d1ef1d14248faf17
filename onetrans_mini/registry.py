"""The models ``onetrans-mini train`` knows by name, and how each is sized for a comparison.

Every registered model has the same contract: ``Model(config: ModelConfig, schema, vocab_sizes)`` and
``logits, loss = model(batch, targets)`` with logits (B, n_tasks), so training, evaluation and run
folders (``checkpoint.load_run``) need nothing model-specific.
"""

from __future__ import annotations

import importlib

import torch.nn as nn

from .config import ModelConfig, TrainError
from .features import Schema

# name -> (module, class): imported on first use, so a model that is not there yet fails with a clear
# line while every other model still works
MODELS: dict[str, tuple[str, str]] = {
    "onetrans": ("onetrans_mini.model", "OneTrans"),
    "din-dcnv2": ("onetrans_mini.baselines", "DinDcnV2"),
    "rankmixer-transformer": ("onetrans_mini.baselines", "RankMixerTransformer"),
}


def model_class(name: str) -> type[nn.Module]:
    if name not in MODELS:
        raise TrainError(f"unknown model {name!r}; expected one of {list(MODELS)}")
    module, cls = MODELS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise TrainError(f"model {name!r} needs module {module} ({e}); it is not available in this installation") from e
    if not hasattr(mod, cls):
        raise TrainError(f"model {name!r}: module {module} has no class {cls}")
    return getattr(mod, cls)


def build_model(name: str, model_cfg: ModelConfig, schema: Schema, vocab_sizes) -> nn.Module:
    """``MODELS[name](model_cfg, schema, vocab_sizes)``, by its registered name."""
    return model_class(name)(model_cfg, schema, vocab_sizes)


def model_config_for(name: str, model_cfg: ModelConfig, schema: Schema, vocab_sizes) -> ModelConfig:
    """The config to build ``name`` with at the budget of OneTrans at ``model_cfg``.

    OneTrans takes ``model_cfg`` as is; a baseline gets the width that matches OneTrans's dense parameter
    count (``baselines.matched_config``), so that a comparison at one preset is at one budget.
    """
    if name == "onetrans":
        return model_cfg
    model_class(name)  # a clear error first if the module is missing
    from . import baselines

    return baselines.matched_config(name, model_cfg, schema, vocab_sizes).config


def count_params(model: nn.Module) -> dict[str, int]:
    """Parameter counts of a built model: ``model.num_params()`` when it has it (dense / embedding /
    total), else the total."""
    if hasattr(model, "num_params"):
        return {k: int(v) for k, v in model.num_params().items()}
    return {"total": sum(p.numel() for p in model.parameters())}
