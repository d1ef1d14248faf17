"""Run folders: checkpoints, exact resume, ``load_run``, and the results table.

A run folder (written by ``train.train`` and the ``onetrans-mini train`` command)::

    config.json        model name and config, data name/config/seed, train config, schema, vocab sizes
    metrics.jsonl      one JSON line per epoch: train loss, validation metrics, lr, speed
    model.safetensors  the BEST weights so far (validation AUC of the first task)
    last.safetensors   the latest weights                                   } what --resume continues
    train_state.pt     optimizer + schedule, every rank's RNG, early-stopping } from, exactly
                       counters, history
    results.json/.md   test metrics next to the floors, parameter counts, wall time, device (CLI)

Weights are safetensors (no pickle: a run folder from elsewhere cannot run code when loaded); the
training state is a ``torch.save`` file read back with ``weights_only=True`` for the same reason.
Each weights file carries the sha256 of its tensor bytes in its own metadata, checked on load with
finiteness: a damaged checkpoint is refused with one line naming the file (or the tensor), instead of
evaluating to a NaN logloss. Files written before digests were stored load with a warning.
Every file is written to a temporary name and renamed, so an interrupted run never leaves a
half-written checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import random
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .config import DataConfig, ModelConfig, TrainConfig, TrainError
from .data import RequestData, load_dataset
from .distributed import DistInfo, all_gather_object, device_description, dist_info, model_device
from .features import Schema
from .registry import build_model, count_params


def json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


DIGEST_KEY = "sha256"  # safetensors metadata: sha256 of the file's tensor bytes (everything after the header)


def save_weights(model: nn.Module, path: Path) -> None:
    """Model weights as safetensors (tensors shared between modules are stored once), with the sha256 of
    the tensor bytes in the file's own metadata: written in one atomic rename with the bytes it
    describes, so a crash can never leave weights and digest out of step (a separate digest file could)."""
    from safetensors.torch import save_model

    def write(tmp: Path) -> None:
        save_model(model, str(tmp), metadata={"format": "pt"})
        header, data = _split_safetensors(tmp.read_bytes(), tmp)
        header.setdefault("__metadata__", {})[DIGEST_KEY] = hashlib.sha256(data).hexdigest()
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the header is padded to 8 bytes, as safetensors writes it
        tmp.write_bytes(len(text).to_bytes(8, "little") + text + data)

    atomic_write(Path(path), write)


def _split_safetensors(raw: bytes, path: Path) -> tuple[dict, bytes]:
    """(header dict, tensor bytes) of a safetensors file: 8 bytes of header length, the JSON header, the data."""
    try:
        n = int.from_bytes(raw[:8], "little")
        if len(raw) < 8 or n > len(raw) - 8:
            raise ValueError(f"header length {n} runs past the end of the file ({len(raw)} bytes)")
        header = json.loads(raw[8:8 + n])
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise TrainError(f"{path}: not a readable safetensors checkpoint ({type(e).__name__}: {e})") from e
    return header, raw[8 + n:]


def verify_weights(path: Path) -> None:
    """Refuse a damaged weights file with a clear TrainError naming it: tensor bytes that do not match
    the digest ``save_weights`` stored, or a tensor holding NaN or inf (named). A file written before
    digests were stored (no digest in its metadata) is checked for non-finite values only, with a warning."""
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path.parent}: no {path.name} (expected the weights a training run writes)")
    raw = path.read_bytes()
    header, data = _split_safetensors(raw, path)
    want = (header.get("__metadata__") or {}).get(DIGEST_KEY)
    if want is None:
        warnings.warn(f"{path} has no sha256 digest (written before digests were stored): its bytes are not "
                      f"verified", stacklevel=2)
    elif hashlib.sha256(data).hexdigest() != want:
        raise TrainError(f"{path}: damaged: its tensor bytes do not match the sha256 digest stored when it was "
                         f"written (expected {want[:12]}..., got {hashlib.sha256(data).hexdigest()[:12]}...)")
    try:
        tensors = load(raw)
    except Exception as e:  # a truncated or foreign file
        raise TrainError(f"{path}: not a readable safetensors checkpoint ({type(e).__name__}: {e})") from e
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise TrainError(f"{path}: tensor {name!r} holds non-finite values ({bad} NaN or inf of {t.numel()}); "
                             f"expected finite weights (did the training diverge?)")


def load_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights into ``model`` (on its device), verified first (``verify_weights``); a
    clear TrainError if missing, damaged, non-finite or foreign."""
    from safetensors.torch import load_model

    path = Path(path)
    verify_weights(path)
    try:
        missing, unexpected = load_model(model, str(path), strict=False, device=str(model_device(model)))
    except Exception as e:  # a truncated or foreign file
        raise TrainError(f"{path}: not a readable safetensors checkpoint ({type(e).__name__}: {e})") from e
    if missing or unexpected:
        raise TrainError(f"{path}: weights do not match the model of config.json (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states, as plain tensors and tuples (``weights_only`` loads)."""
    st = {
        "torch": torch.get_rng_state(),
        "numpy": _np_state_to_plain(np.random.get_state()),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(_np_state_from_plain(st["numpy"]))
    random.setstate(_tuplify(st["python"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _np_state_to_plain(s):
    return (s[0], torch.from_numpy(np.asarray(s[1], dtype=np.int64)), int(s[2]), int(s[3]), float(s[4]))


def _np_state_from_plain(s):
    return (s[0], np.asarray(s[1].numpy(), dtype=np.uint32), int(s[2]), int(s[3]), float(s[4]))


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_train_state(run_dir: Path, model, opts, hist: dict, epochs_done: int, bad_epochs: int, info: DistInfo,
                     average: dict | None = None) -> None:
    """End of an epoch: the last weights and everything an exact resume needs (the optimizer, every rank's
    RNG, the weight average ``average`` if training keeps one). The best weights are written by ``train``
    when they improve. Called on every rank (the RNG states are gathered); rank 0 writes."""
    rngs = all_gather_object(rng_state())  # every rank's RNG (its dropout stream): a resume is exact per rank
    if not info.is_main:
        return
    save_weights(model, run_dir / "last.safetensors")
    state = {"epochs_done": epochs_done, "bad_epochs": bad_epochs, "optim": opts.state_dict(), "rng": rngs,
             "history": json.loads(json.dumps(hist, default=json_default)), "average": average}
    atomic_write(run_dir / "train_state.pt", lambda p: torch.save(state, p))


def load_train_state(run_dir: Path, model, opts, info: DistInfo):
    """Restore a run's last epoch into ``model`` and ``opts`` and this rank's RNG; returns
    ``(epochs_done, bad_epochs, best_state, history, average)`` (``average``: the weight average's state
    dict, None when the run keeps none)."""
    try:
        state = torch.load(run_dir / "train_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainError(f"{run_dir / 'train_state.pt'}: unreadable ({type(e).__name__}: {e}); cannot resume") from e
    load_weights(model, run_dir / "last.safetensors")
    try:
        opts.load_state_dict(state["optim"])
        rngs = state["rng"]
        if len(rngs) != info.world_size:
            warnings.warn(f"resuming a {len(rngs)}-process run with {info.world_size} processes: "
                          f"the continuation is not bit-exact")
        set_rng_state(rngs[info.rank % len(rngs)])
        hist = state["history"]
        epochs_done, bad_epochs = int(state["epochs_done"]), int(state["bad_epochs"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise TrainError(f"{run_dir / 'train_state.pt'}: does not match this run ({type(e).__name__}: {e})") from e
    best_state = None
    if (run_dir / "model.safetensors").is_file():  # the best weights so far, to end on them
        best = copy.deepcopy(model)
        load_weights(best, run_dir / "model.safetensors")
        best_state = best.state_dict()
    hist["epochs"] = hist["epochs"][:epochs_done]
    return epochs_done, bad_epochs, best_state, hist, state.get("average")


def write_metrics(run_dir: Path, records: list[dict]) -> None:
    """metrics.jsonl holding exactly ``records`` (one JSON line per epoch)."""
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r, default=json_default) + "\n" for r in records))


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record, default=json_default) + "\n")


# ----------------------------------------------------------------------------------------------
# run folders


def write_config(run_dir, model_name: str, model: nn.Module, data: RequestData, data_name: str, data_seed: int,
                 cfg: TrainConfig, **extra) -> dict:
    """Write ``config.json``: everything ``load_run`` needs to rebuild the model and the data."""
    run_dir = Path(run_dir)
    mcfg = getattr(model, "config", None)
    conf = {
        "model": model_name,
        "model_config": asdict(mcfg) if mcfg is not None else None,
        "data": {"name": data_name, "config": asdict(data.config), "seed": data_seed},
        "train_config": asdict(cfg),
        "schema": data.schema.to_dict(),
        "vocab_sizes": data.vocab_sizes(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        **extra,
    }
    if dist_info().is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(run_dir / "config.json", lambda p: p.write_text(json.dumps(conf, indent=2, default=json_default)))
        except OSError as e:
            raise TrainError(f"run folder {run_dir}: cannot write config.json ({e.strerror}: {e.filename!r})") from e
    return conf


@dataclass
class Run:
    """A saved run, rebuilt: its model (best weights, on the CPU), its data and its configs."""

    path: Path
    model: nn.Module
    data: RequestData
    model_name: str
    train_config: TrainConfig
    config: dict = field(repr=False)

    def results(self) -> dict | None:
        p = self.path / "results.json"
        return json.loads(p.read_text()) if p.is_file() else None


def read_config(run_dir) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TrainError(f"run folder {run_dir} does not exist (expected a folder written by 'onetrans-mini train')")
    path = run_dir / "config.json"
    if not path.is_file():
        raise TrainError(f"{run_dir}: no config.json (expected a folder written by 'onetrans-mini train')")
    try:
        conf = json.loads(path.read_text())
        for key in ("model", "model_config", "data", "train_config", "schema", "vocab_sizes"):
            conf[key]  # noqa: B018 - presence check
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise TrainError(f"{path}: corrupt run config ({type(e).__name__}: {e})") from e
    return conf


def data_of(conf: dict, run_dir) -> tuple[str, DataConfig, int]:
    """(name, DataConfig, seed) of a run's dataset, from its config.json."""
    try:
        d = conf["data"]
        return str(d["name"]), DataConfig(**d["config"]), int(d.get("seed", 0))
    except (TypeError, ValueError, KeyError) as e:
        raise TrainError(f"{Path(run_dir) / 'config.json'}: corrupt data entry ({type(e).__name__}: {e})") from e


def load_run(run_dir, data: RequestData | None = None, weights: str = "model.safetensors") -> Run:
    """Rebuild a saved run: its model with the saved ``weights`` (the best by default;
    ``last.safetensors`` for the latest), loaded and verified first, then its data (prepared again from
    its name and config, or ``data``): a damaged run folder is refused before any data is prepared."""
    run_dir = Path(run_dir)
    conf = read_config(run_dir)
    try:
        mc = dict(conf["model_config"])
        mc["pyramid_schedule"] = tuple(mc.get("pyramid_schedule", ()))
        model_cfg = ModelConfig(**mc)
        cfg = TrainConfig.from_dict(conf["train_config"])
        schema = Schema.from_dict(conf["schema"])
    except TrainError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        raise TrainError(f"{run_dir / 'config.json'}: corrupt run config ({type(e).__name__}: {e})") from e
    model = build_model(conf["model"], model_cfg, schema, conf["vocab_sizes"])
    load_weights(model, run_dir / weights)
    model.eval()
    if data is None:
        name, data_conf, seed = data_of(conf, run_dir)
        data = load_dataset(name, config=data_conf, seed=seed)
    if data.schema.to_dict() != schema.to_dict() or data.vocab_sizes() != conf["vocab_sizes"]:
        raise TrainError(f"{run_dir}: the dataset {conf['data']['name']!r} prepared now differs from the one the run "
                         f"was trained on (schema or vocabulary sizes changed)")
    return Run(run_dir, model, data, conf["model"], cfg, conf)


def check_run_dir(run_dir, flag: str = "--out", what: str = "a run folder") -> None:
    """A clear TrainError unless ``what`` can be written at the folder ``run_dir`` (checked before any
    work): every existing part of the path must be a folder, and the deepest existing one must let us
    create a folder in it (tried: permission bits say nothing for root, read-only mounts or /proc).
    Leaves nothing behind. (``bench --out`` can use it too: ``what="results"``.)"""
    run_dir = Path(run_dir)
    where = f"{flag} {run_dir}: cannot write {what} there"
    parent = run_dir
    while not parent.exists() and parent != parent.parent:  # the deepest part of the path that exists
        parent = parent.parent
    if not parent.is_dir():
        raise TrainError(f"{where}: {parent} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".onetrans-write-check-", dir=parent)
    except OSError as e:
        raise TrainError(f"{where} ({e.strerror}: {e.filename!r})") from e
    os.rmdir(probe)
# -- results ------------------------------------------------------------------------------------


def results_of(model: nn.Module, data: RequestData, test: dict, model_name: str, device: torch.device,
               wall_seconds: float, hist: dict | None = None, **extra) -> dict:
    from .floors import floors

    out = {
        "dataset": data.info.get("name"),
        "model": model_name,
        "test": test,
        "floors": floors(data),
        "params": count_params(model),
        "device": device_description(device),
        "wall_seconds": wall_seconds,
        **extra,
    }
    if hist is not None:
        out["best_epoch"] = hist["best_epoch"]
        out["epochs_run"] = len(hist["epochs"])
        out["stopped_early"] = hist["stopped_early"]
        out["train_seconds"] = hist["train_seconds"]
        if "val_pass" in hist:
            out["val_pass"] = hist["val_pass"]
    return out


FLOOR_NAMES = {"user_item_mean": "user+item mean", "item_mean": "item mean", "oracle": "oracle (true p)"}


def format_results(res: dict, markdown: bool = False) -> str:
    """The results table: AUC / UAUC / GAUC / logloss per task, the model next to the floors (which are
    always fitted on train + val and scored on the test split)."""
    rows = []
    floors = res.get("floors", {}) if res.get("split", "test") == "test" else {}  # floors are test-split numbers
    for task, m in res["test"].items():
        rows.append((task, res["model"], m))
        for fname, fm in floors.get(task, {}).items():
            rows.append((task, FLOOR_NAMES.get(fname, fname), fm))
    p = res.get("params", {})
    params = ", ".join(f"{k} {v:,}" for k, v in p.items() if k in ("dense", "embedding", "total")) or "?"
    head = (f"{res.get('split', 'test')} split of {res.get('dataset')}: {res['model']}"
            f"{' (preset ' + res['preset'] + ')' if res.get('preset') else ''}; parameters: {params}; "
            f"device {res.get('device')}{'; threads ' + res['threads'] if res.get('threads') else ''}; "
            f"wall time {res.get('wall_seconds', float('nan')):.1f} s")
    if res.get("best_epoch"):
        head += f"; best epoch {res['best_epoch']} of {res.get('epochs_run')}"
    if res.get("val_pass"):
        head += f", then a pass over the validation requests ({res['val_pass']['steps']} steps)"
    if markdown:
        lines = [head, "", "| task | predictor | AUC | UAUC | GAUC | logloss |", "|---|---|---|---|---|---|"]
        lines += [f"| {t} | {n} | {m['auc']:.4f} | {m['uauc']:.4f} | {m['gauc']:.4f} | {m['logloss']:.4f} |" for t, n, m in rows]
        return "\n".join(lines) + "\n"
    lines = [head, "", f"{'task':<10} {'predictor':<24} {'AUC':>7} {'UAUC':>7} {'GAUC':>7} {'logloss':>8}"]
    prev = None
    for t, n, m in rows:
        lines.append(f"{t if t != prev else '':<10} {n:<24} {m['auc']:7.4f} {m['uauc']:7.4f} {m['gauc']:7.4f} {m['logloss']:8.4f}")
        prev = t
    return "\n".join(lines)


def write_results(run_dir, res: dict) -> None:
    run_dir = Path(run_dir)
    atomic_write(run_dir / "results.json", lambda p: p.write_text(json.dumps(res, indent=2, default=json_default)))
    atomic_write(run_dir / "results.md", lambda p: p.write_text(format_results(res, markdown=True)))
