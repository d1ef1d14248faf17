"""The trainer: the loss goes down, checkpoints round-trip, a resumed run equals an uninterrupted one,
a loaded run scores like the original, and bad input gets one clear line (no traceback)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from onetrans_mini.checkpoint import load_run, write_config
from onetrans_mini.cli import main
from onetrans_mini.config import get_preset
from onetrans_mini.model import OneTrans
from onetrans_mini.train import (
    TrainConfig,
    TrainError,
    build_model,
    evaluate,
    lr_multiplier,
    make_optimizers,
    seed_everything,
    train,
)

NANO = get_preset("nano", dropout=0.1)  # dropout on: the resume test then also checks the RNG state
CFG = TrainConfig(epochs=2, batch_requests=32, steps_per_epoch=5, patience=0, device="cpu")


def fresh_model(data, seed=0, config=NANO):
    seed_everything(seed)
    return build_model("onetrans", config, data.schema, data.vocab_sizes())


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------
# training


def test_a_few_steps_lower_the_loss(tiny_data):
    model = fresh_model(tiny_data, config=get_preset("nano"))
    batch = tiny_data.collate(tiny_data.request_ids("train")[:64], max_len=NANO.max_len)

    def loss():
        model.eval()
        with torch.no_grad():
            return float(model(batch, batch.labels)[1])

    before = loss()
    hist = train(model, tiny_data, TrainConfig(epochs=1, batch_requests=16, lr=3e-3, steps_per_epoch=15, device="cpu",
                                              patience=0), progress=False)
    assert loss() < before - 0.02
    rec = hist["epochs"][0]
    assert rec["steps"] == 15 and rec["train_samples"] > 0 and math.isfinite(rec["train_loss"])
    assert set(rec["val"]) == set(tiny_data.schema.task_names)
    assert hist["max_len"] == min(NANO.max_len, tiny_data.config.max_len)


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(warmup=0.1, min_lr=0.1, schedule="cosine")
    f = lr_multiplier(cfg, 100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)  # linear warm-up over 10 steps
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))
    lin = lr_multiplier(cfg.replace(schedule="linear"), 100)
    assert lin(55) == pytest.approx(1 - 0.9 * 0.5)
    assert lr_multiplier(cfg.replace(schedule="constant", warmup=0.0), 100)(70) == 1.0


def test_paper_optimizer_splits_embeddings_from_dense(tiny_data):
    model = fresh_model(tiny_data)
    opts = make_optimizers(model, TrainConfig(optimizer="paper"), lr=1e-3)
    kinds = {name: type(opt).__name__ for name, opt, _ in opts.parts}
    assert kinds == {"dense": "RMSprop", "embedding": "Adagrad"}
    emb = {id(p) for p in model.embedding_parameters()}
    (_, dense_opt, _), (_, emb_opt, _) = opts.parts
    assert {id(p) for g in emb_opt.param_groups for p in g["params"]} == emb
    assert not emb & {id(p) for g in dense_opt.param_groups for p in g["params"]}
    hist = train(model, tiny_data, CFG.replace(optimizer="paper", epochs=1, steps_per_epoch=2), progress=False)
    assert math.isfinite(hist["epochs"][0]["train_loss"])


def test_registry_builds_onetrans_and_names_what_exists(tiny_data):
    assert isinstance(build_model("onetrans", NANO, tiny_data.schema, tiny_data.vocab_sizes()), OneTrans)
    with pytest.raises(TrainError, match=r"unknown model 'gpt'; expected one of \['onetrans', 'din-dcnv2'"):
        build_model("gpt", NANO, tiny_data.schema, tiny_data.vocab_sizes())


# ---------------------------------------------------------------------------------------------
# checkpoints: save / load / resume


@pytest.fixture(scope="module")
def straight_run(tiny_data, tmp_path_factory):
    """2 epochs without interruption, saved with its config (shared by the tests below)."""
    run = tmp_path_factory.mktemp("straight")
    model = fresh_model(tiny_data)
    write_config(run, "onetrans", model, tiny_data, "synthetic-tiny", 0, CFG)
    hist = train(model, tiny_data, CFG, run_dir=run, progress=False)
    return run, model, hist


def test_resume_equals_an_uninterrupted_run(tiny_data, straight_run, tmp_path):
    run_a, model_a, hist_a = straight_run
    model_b = fresh_model(tiny_data)
    write_config(tmp_path, "onetrans", model_b, tiny_data, "synthetic-tiny", 0, CFG)
    hist_1 = train(model_b, tiny_data, CFG, run_dir=tmp_path, progress=False, stop_after=1)  # "interrupted"
    assert len(hist_1["epochs"]) == 1
    model_c = fresh_model(tiny_data, seed=123)  # any weights: resume loads the saved ones
    hist_b = train(model_c, tiny_data, CFG, run_dir=tmp_path, progress=False, resume=True)
    # exact on CPU: weights (last and best), optimizer moments and the epochs' losses and metrics
    assert_same_state(load_file(run_a / "last.safetensors"), load_file(tmp_path / "last.safetensors"))
    assert_same_state(load_file(run_a / "model.safetensors"), load_file(tmp_path / "model.safetensors"))
    assert_same_state(state(model_a), state(model_c))
    for ra, rb in zip(hist_a["epochs"], hist_b["epochs"], strict=True):
        assert ra["train_loss"] == rb["train_loss"] and ra["val"] == rb["val"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


def test_cli_resume_finishes_an_interrupted_run(tiny_data, straight_run, tmp_path, capsys):
    model = fresh_model(tiny_data)
    write_config(tmp_path, "onetrans", model, tiny_data, "synthetic-tiny", 0, CFG)
    train(model, tiny_data, CFG, run_dir=tmp_path, progress=False, stop_after=1)
    assert main(["train", "--resume", str(tmp_path), "--no-progress"]) == 0
    assert "user+item mean" in capsys.readouterr().out
    assert_same_state(load_file(straight_run[0] / "last.safetensors"), load_file(tmp_path / "last.safetensors"))
    assert json.loads((tmp_path / "results.json").read_text())["epochs_run"] == 2


def test_saved_run_loads_and_scores_like_the_original(tiny_data, straight_run):
    run_dir, model, hist = straight_run
    for name in ("config.json", "metrics.jsonl", "model.safetensors", "last.safetensors", "train_state.pt"):
        assert (run_dir / name).is_file(), name
    conf = json.loads((run_dir / "config.json").read_text())
    assert conf["model"] == "onetrans" and conf["data"]["name"] == "synthetic-tiny"
    assert conf["vocab_sizes"] == tiny_data.vocab_sizes() and conf["train_config"]["epochs"] == 2
    run = load_run(run_dir)  # rebuilds the data from its name and config
    assert run.data.vocab_sizes() == tiny_data.vocab_sizes()
    assert_same_state(state(model), state(run.model))  # the best epoch's weights
    assert evaluate(run.model, run.data, "test") == evaluate(model, tiny_data, "test")


# ---------------------------------------------------------------------------------------------
# the CLI


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_train_then_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "synthetic-tiny", "--preset", "nano", "--epochs", "1", "--steps-per-epoch", "3",
               "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("config.json", "metrics.jsonl", "model.safetensors", "results.json", "results.md"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert set(res["test"]) == {"click", "purchase"} and res["params"]["dense"] > 0
    assert "user_item_mean" in res["floors"]["click"] and "oracle" in res["floors"]["click"]
    assert f"{res['test']['click']['auc']:.4f}" in printed and "user+item mean" in printed
    assert main(["evaluate", str(out)]) == 0
    again = capsys.readouterr().out
    assert f"{res['test']['click']['auc']:.4f}" in again and f"{res['test']['purchase']['uauc']:.4f}" in again
    # a second train into the same folder is refused
    assert main(["train", "--dataset", "synthetic-tiny", "--preset", "nano", "--out", str(out)]) == 2
    assert "already holds a run" in _one_error_line(capsys)


@pytest.mark.parametrize("args, expected", [
    (["--dataset", "nope"], "unknown dataset 'nope': expected one of"),
    (["--dataset", "synthetic-tiny", "--preset", "XL"], "unknown preset 'XL'; expected one of ['nano', 'small', 'S', 'L']"),
    (["--dataset", "synthetic-tiny", "--model", "gpt"], "unknown model 'gpt'; expected one of ['onetrans'"),
    (["--dataset", "synthetic-tiny", "--device", "tpu"], "device must be one of"),
    (["--dataset", "synthetic-tiny", "--epochs", "0"], "epochs must be an integer >= 1"),
])
def test_cli_train_bad_input_one_line(args, expected, capsys, tmp_path):
    assert main(["train", *args, "--out", str(tmp_path / "r")]) == 2
    assert expected in _one_error_line(capsys)


def test_cli_evaluate_bad_run_folders(tmp_path, capsys, straight_run):
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "does not exist" in _one_error_line(capsys)
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "no config.json" in _one_error_line(capsys)
    src = straight_run[0]
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "no model.safetensors" in _one_error_line(capsys)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "not a readable safetensors checkpoint" in _one_error_line(capsys)
    (tmp_path / "config.json").write_text("{not json")
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "corrupt run config" in _one_error_line(capsys)
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert "does not exist" in _one_error_line(capsys)
