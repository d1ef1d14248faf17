"""Data parallel training: 2 processes (gloo, CPU) stay in lockstep and equal 1 process on the same
global batch (the epochs and the validation pass), through DDP around the model's own request-level forward; ``torchrun ... -m onetrans_mini
train`` works end to end, rank 0 writing the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from onetrans_mini.config import get_preset
from onetrans_mini.train import TrainConfig, build_model, seed_everything, train

WORLD = 2
PER_RANK = 8  # requests per step and rank: the global batch is 16 requests
CFG = TrainConfig(epochs=2, batch_requests=PER_RANK, steps_per_epoch=4, patience=0, device="cpu")


def _model(data):
    seed_everything(0)
    return build_model("onetrans", get_preset("nano"), data.schema, data.vocab_sizes())


def _counting(model, name: str, counts: dict) -> None:
    """Count calls of ``model.<name>`` (the bound method, wrapped on the instance), split by train/eval mode."""
    fn = getattr(model, name)

    def wrapped(*args, **kw):
        key = f"{name}:{'train' if model.training else 'eval'}"
        counts[key] = counts.get(key, 0) + 1
        return fn(*args, **kw)

    setattr(model, name, wrapped)


def _worker(rank: int, init_file: str, out_dir: str):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from onetrans_mini.data import load_synthetic

    torch.set_num_threads(1)  # 2 processes on 2 cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        data = load_synthetic("tiny", seed=0)  # the parent prepared the cache: this only reads it
        model = _model(data)
        counts: dict = {}
        for name in ("stage_one", "forward_full"):  # which forward runs under DDP
            if hasattr(model, name):
                _counting(model, name, counts)
        ddp_forward = DDP.forward

        def counted_ddp_forward(self, *args, **kw):
            counts["ddp"] = counts.get("ddp", 0) + 1
            return ddp_forward(self, *args, **kw)

        DDP.forward = counted_ddp_forward  # this spawned process only
        hist = train(model, data, CFG, progress=False)
        last = hist["epochs"][-1]
        steps = sum(r["steps"] for r in hist["epochs"]) + hist["val_pass"]["steps"]  # the epochs, then the pass
        torch.save({"state": model.state_dict(), "val": last["val"], "train_loss": last["train_loss"],
                    "samples": last["train_samples"], "steps": steps, "counts": counts, "val_pass": hist["val_pass"]},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(tiny_data, tmp_path_factory):
    """CFG trained by WORLD gloo processes; each rank's final state, metrics and call counts."""
    out = tmp_path_factory.mktemp("ddp")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, str(out / "init"), str(out))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_ddp_runs_the_request_level_forward(ddp_run):
    """Under DDP each training step runs Stage I once (the history encoded once per request), through the
    DDP wrapper, and never the per-candidate full forward."""
    for r in ddp_run:
        c = r["counts"]
        assert r["steps"] == CFG.epochs * CFG.steps_per_epoch + r["val_pass"]["steps"] and r["val_pass"]["steps"] > 0
        assert c.get("ddp") == r["steps"], c  # every step through DDP (gradient all-reduce)
        assert c.get("stage_one:train") == r["steps"], c  # one Stage I per step: the request-level path
        assert not c.get("forward_full:train") and not c.get("forward_full:eval"), c
        assert c.get("stage_one:eval", 0) > 0, c  # evaluation runs the same forward


def test_two_ranks_stay_identical_and_equal_one_process(tiny_data, ddp_run):
    r0, r1 = ddp_run
    for k in r0["state"]:  # DDP: bit-identical replicas
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["val"] == r1["val"] and r0["train_loss"] == r1["train_loss"]  # gathered metrics, same on both

    # one process, same seed, WORLD x the batch: the same requests per step (DistributedSampler order),
    # the same gradient (each rank's loss weighted by its share of the step's candidates)
    single = _model(tiny_data)
    hist = train(single, tiny_data, CFG.replace(batch_requests=WORLD * PER_RANK), progress=False)
    assert hist["epochs"][-1]["train_samples"] == r0["samples"]
    assert hist["epochs"][-1]["train_loss"] == pytest.approx(r0["train_loss"], rel=1e-5)
    # the validation pass too: the same requests per step, all of them once (64 requests, even: none dropped)
    assert hist["val_pass"]["candidates"] == r0["val_pass"]["candidates"] == len(tiny_data.candidate_rows("val"))
    assert hist["val_pass"]["train_loss"] == pytest.approx(r0["val_pass"]["train_loss"], rel=1e-5)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    for t, m in hist["epochs"][-1]["val"].items():
        assert m["auc"] == pytest.approx(r0["val"][t]["auc"], abs=1e-4)
        assert m["n"] == r0["val"][t]["n"]  # the sharded evaluation saw the whole split once


def _torchrun_train(dataset: str, out: Path, timeout: int) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 -m onetrans_mini train`` (gloo, nano, 3 steps) into ``out``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "onetrans_mini",
           "train", "--dataset", dataset, "--preset", "nano", "--epochs", "1", "--steps-per-epoch", "3",
           "--out", str(out), "--no-progress", "--device", "cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_torchrun_cli_trains_and_rank0_writes_the_run(tiny_data, tmp_path):
    out = tmp_path / "run"
    p = _torchrun_train("synthetic-tiny", out, timeout=120)
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and set(res["test"]) == {"click", "purchase"}
    assert p.stdout.count("user+item mean") == 2  # one table (two tasks), printed by rank 0 only
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert not list(out.glob("*.tmp"))


def test_torchrun_on_the_1m_synthetic_world(tmp_path, monkeypatch):
    """Issue 15's multi-process check at scale: 2 gloo processes on 1.02M interactions. Rank 0 prepares the
    memory-mapped cache while rank 1 waits, both train on their shards, the sharded evaluation covers the
    whole test split (as many candidates as the dataset's test split holds)."""
    from onetrans_mini.data import load_synthetic

    monkeypatch.setenv("ONETRANS_CACHE_DIR", str(tmp_path / "cache"))  # empty: the run itself prepares the world
    out = tmp_path / "run"
    _torchrun_train("synthetic-1m", out, timeout=600)
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == "synthetic-1m" and res["world_size"] == 2
    assert len(list((tmp_path / "cache").iterdir())) == 1  # prepared once, not once per rank
    data = load_synthetic("1m")  # from that cache
    assert data.info["n_interactions"] == 1_024_000
    n_test = len(data.candidate_rows("test"))
    assert res["test"]["click"]["n"] == res["test"]["purchase"]["n"] == n_test
