"""The trainer: the loss goes down, checkpoints round-trip, a resumed run equals an uninterrupted one,
a loaded run scores like the original, and bad input gets one clear line (no traceback)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onetrans_mini.checkpoint import load_run, write_config
from onetrans_mini.cli import build_parser, main, train_config_from_args
from onetrans_mini.config import get_preset
from onetrans_mini.model import OneTrans
from onetrans_mini.registry import model_config_for
from onetrans_mini.train import (
    TrainConfig,
    TrainError,
    autocast,
    build_model,
    evaluate,
    lr_multiplier,
    make_optimizers,
    seed_everything,
    train,
    uses_bf16,
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


@pytest.mark.parametrize("name", ["onetrans", "din-dcnv2", "rankmixer-transformer"])
def test_bf16_on_trains_under_cpu_autocast(name, tiny_data):
    """``bf16="on"`` honours bf16 autocast on the CPU too (forward and backward of every model): the
    linear layers really run in bf16 while training, and the loss stays finite and goes down."""
    nano = get_preset("nano")
    seed_everything(0)
    model = build_model(name, model_config_for(name, nano, tiny_data.schema, tiny_data.vocab_sizes()),
                        tiny_data.schema, tiny_data.vocab_sizes())
    batch = tiny_data.collate(tiny_data.request_ids("train")[:64], max_len=nano.max_len)
    dtypes = set()
    hooks = [m.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype) if m.training else None)
             for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def loss():
        model.eval()
        with torch.no_grad():
            return float(model(batch, batch.labels)[1])

    before = loss()
    hist = train(model, tiny_data, TrainConfig(epochs=1, batch_requests=16, lr=3e-3, steps_per_epoch=10, device="cpu",
                                              patience=0, bf16="on"), progress=False)
    for h in hooks:
        h.remove()
    assert dtypes == {torch.bfloat16}
    assert math.isfinite(hist["epochs"][0]["train_loss"])
    after = loss()
    assert math.isfinite(after) and after < before - 0.01, (before, after)


def test_bf16_auto_means_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [uses_bf16(cpu, m) for m in ("auto", "on", "off")] == [False, True, False]
    assert [uses_bf16(cuda, m) for m in ("auto", "on", "off")] == [True, True, False]
    with autocast(cpu, "on"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast(cpu, "auto"):
        assert not torch.is_autocast_enabled("cpu")


def test_batches_use_the_model_max_len(tiny_data):
    """One owner of the history length: ModelConfig.max_len (capped by what the data keeps)."""
    assert "max_len" not in {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(epochs=1, batch_requests=8, steps_per_epoch=1, device="cpu")
    short = fresh_model(tiny_data, config=get_preset("nano", max_len=6))
    seen = []
    short.register_forward_pre_hook(lambda m, args: seen.append(args[0].seq_mask.shape[1]))
    assert train(short, tiny_data, cfg, progress=False)["max_len"] == 6
    assert set(seen) == {6}  # training and validation batches
    long = fresh_model(tiny_data, config=get_preset("nano", max_len=4 * tiny_data.config.max_len))
    assert train(long, tiny_data, cfg, progress=False)["max_len"] == tiny_data.config.max_len


def test_old_run_configs_still_load():
    old = dataclasses.asdict(TrainConfig()) | {"bf16": True, "max_len": 64, "activation_checkpointing": False}
    assert TrainConfig.from_dict(old) == TrainConfig()
    before_ema = {k: v for k, v in old.items() if k != "ema"}  # a run that kept no weight average resumes without
    assert TrainConfig.from_dict(before_ema) == TrainConfig(ema=0.0)
    before_pass = {k: v for k, v in old.items() if k != "val_pass"}  # nor did it make a validation pass
    assert TrainConfig.from_dict(before_pass) == TrainConfig(val_pass=False)
    assert TrainConfig.from_dict(old | {"bf16": False}).bf16 == "off"
    with pytest.raises(TrainError, match=r"unknown field\(s\) \['lr_typo'\]"):
        TrainConfig.from_dict({"lr_typo": 1})


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
# the weight average


def test_weight_average_follows_its_formula_and_applied_restores_the_weights(tiny_data):
    from onetrans_mini.train import WeightAverage

    model = fresh_model(tiny_data)
    w0 = state(model)
    avg = WeightAverage(model, decay=0.5)
    avg.updates = 100  # past the warm-up: d = decay
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    avg.update(model)
    w1 = state(model)
    for k, v in w0.items():
        if v.is_floating_point():
            torch.testing.assert_close(avg.weights[k], 0.5 * v + 0.5 * w1[k])
    with avg.applied(model):
        assert_same_state(state(model), avg.weights)
    assert_same_state(state(model), w1)
    fresh = WeightAverage(model, decay=0.999)  # warm-up: the first update keeps 1/10 of the start
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    fresh.update(model)
    k = next(k for k, v in w1.items() if v.is_floating_point())
    torch.testing.assert_close(fresh.weights[k], 0.1 * w1[k] + 0.9 * state(model)[k])


def test_training_returns_and_saves_the_average_it_validated(tiny_data, tmp_path):
    """With ema the returned (best) weights are the average, not the last step's; ema=0 returns the raw ones."""
    cfg = CFG.replace(epochs=1, val_pass=False)  # the average alone (the pass would train both further)
    raw = fresh_model(tiny_data)
    train(raw, tiny_data, cfg.replace(ema=0.0), progress=False)
    averaged = fresh_model(tiny_data)
    write_config(tmp_path, "onetrans", averaged, tiny_data, "synthetic-tiny", 0, cfg)
    train(averaged, tiny_data, cfg, run_dir=tmp_path, progress=False)
    last = load_file(tmp_path / "last.safetensors")  # the raw weights after the last step: those of the ema=0 run
    assert_same_state(last, state(raw))
    assert_same_state(load_file(tmp_path / "model.safetensors"), state(averaged))
    assert any(not torch.equal(last[k], v) for k, v in state(averaged).items())


def _with_labels(data, split: str, fn):
    """A shallow copy of ``data`` whose labels of ``split`` are replaced by ``fn(labels)``."""
    import copy

    rows = data.candidate_rows(split)
    out = copy.copy(data)
    out.candidates = dict(data.candidates)
    for t in data.schema.task_names:
        y = data.candidates[f"label:{t}"].copy()
        y[rows] = fn(y[rows])
        out.candidates[f"label:{t}"] = y
    return out


def test_the_validation_pass_trains_the_kept_weights_on_the_validation_requests_only(tiny_data):
    """``val_pass``: the epochs (and their validation metrics) are those of a run without it; then one pass
    over every validation request at the lr where the best epoch ended moves the weights. Validation labels
    steer it; test labels reach nothing."""
    cfg = CFG.replace(epochs=2)
    without = fresh_model(tiny_data)
    hist0 = train(without, tiny_data, cfg.replace(val_pass=False), progress=False)
    model = fresh_model(tiny_data)
    hist = train(model, tiny_data, cfg, progress=False)
    assert [e["val"] for e in hist["epochs"]] == [e["val"] for e in hist0["epochs"]] and "val_pass" not in hist0
    vp = hist["val_pass"]
    n_val = len(tiny_data.request_ids("val"))
    assert vp["steps"] == math.ceil(n_val / cfg.batch_requests)
    assert vp["candidates"] == len(tiny_data.candidate_rows("val"))
    capped = train(fresh_model(tiny_data), tiny_data, cfg.replace(steps_per_epoch=1, batch_requests=8), progress=False)
    assert capped["val_pass"]["steps"] == 1 < n_val / 8  # a smoke run's cap holds for the pass too
    peak = 1e-3  # the default lr of adamw
    total = cfg.epochs * cfg.steps_per_epoch
    assert vp["lr"] == pytest.approx(peak * lr_multiplier(cfg, total)(hist["best_epoch"] * cfg.steps_per_epoch))
    moved = [k for k, v in state(model).items() if not torch.equal(v, state(without)[k])]
    assert moved  # the pass trained the kept weights
    flipped_val = fresh_model(tiny_data)
    train(flipped_val, _with_labels(tiny_data, "val", lambda y: 1 - y), cfg.replace(patience=0, epochs=1), progress=False)
    reference = fresh_model(tiny_data)
    train(reference, tiny_data, cfg.replace(patience=0, epochs=1), progress=False)
    assert any(not torch.equal(v, state(reference)[k]) for k, v in state(flipped_val).items())
    shuffled_test = fresh_model(tiny_data)
    train(shuffled_test, _with_labels(tiny_data, "test", lambda y: y[::-1].copy()), cfg, progress=False)
    assert_same_state(state(shuffled_test), state(model))


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
    # the threads of the straight run: float sums in another order would differ in the last bits
    assert main(["train", "--resume", str(tmp_path), "--no-progress", "--threads", str(torch.get_num_threads())]) == 0
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
    threads = torch.get_num_threads()
    rc = main(["train", "--dataset", "synthetic-tiny", "--preset", "nano", "--epochs", "1", "--steps-per-epoch", "3",
               "--out", str(out), "--no-progress", "--device", "cpu", "--threads", "2"])
    assert rc == 0
    printed, err = capsys.readouterr()
    assert ", threads 2 (--threads); " in err.splitlines()[0]  # the first line says which threads were used
    assert torch.get_num_threads() == threads  # and the command put the caller's back
    for name in ("config.json", "metrics.jsonl", "model.safetensors", "results.json", "results.md"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert set(res["test"]) == {"click", "purchase"} and res["params"]["dense"] > 0
    assert "user_item_mean" in res["floors"]["click"] and "oracle" in res["floors"]["click"]
    assert f"{res['test']['click']['auc']:.4f}" in printed and "user+item mean" in printed
    assert res["val_pass"]["steps"] > 0 and "then a pass over the validation requests" in printed
    assert res["threads"] == "2 (--threads)"
    assert main(["evaluate", str(out)]) == 0
    again = capsys.readouterr().out
    assert "; threads " in again.splitlines()[0] and "(auto: " in again.splitlines()[0]
    assert f"{res['test']['click']['auc']:.4f}" in again and f"{res['test']['purchase']['uauc']:.4f}" in again
    # a second train into the same folder is refused
    assert main(["train", "--dataset", "synthetic-tiny", "--preset", "nano", "--out", str(out)]) == 2
    assert "already holds a run" in _one_error_line(capsys)


# every TrainConfig field: (flags, the value they set); each value differs from the default
TRAIN_FLAGS = {
    "epochs": (["--epochs", "3"], 3),
    "batch_requests": (["--batch-requests", "7"], 7),
    "lr": (["--lr", "0.002"], 0.002),
    "weight_decay": (["--weight-decay", "0"], 0.0),
    "ema": (["--ema", "0"], 0.0),
    "optimizer": (["--optimizer", "paper"], "paper"),
    "embedding_lr": (["--embedding-lr", "0.5"], 0.5),
    "grad_clip": (["--grad-clip", "0"], None),
    "grad_clip_embedding": (["--grad-clip-embedding", "120"], 120.0),
    "warmup": (["--warmup", "0.2"], 0.2),
    "schedule": (["--schedule", "linear"], "linear"),
    "min_lr": (["--min-lr", "0.5"], 0.5),
    "patience": (["--patience", "0"], 0),
    "seed": (["--seed", "3"], 3),
    "device": (["--device", "cpu"], "cpu"),
    "bf16": (["--bf16", "on"], "on"),
    "compile": (["--compile"], True),
    "eval_batch_requests": (["--eval-batch-requests", "5"], 5),
    "steps_per_epoch": (["--steps-per-epoch", "2"], 2),
    "val_pass": (["--no-val-pass"], False),
}


def test_every_train_config_field_has_a_flag():
    assert set(TRAIN_FLAGS) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert train_config_from_args(build_parser().parse_args(["train"])) == TrainConfig()  # no flag: the defaults


@pytest.mark.parametrize("field", sorted(TRAIN_FLAGS))
def test_train_flag_sets_its_field(field):
    argv, want = TRAIN_FLAGS[field]
    default = getattr(TrainConfig(), field)
    assert want != default
    cfg = train_config_from_args(build_parser().parse_args(["train", *argv]))
    assert getattr(cfg, field) == want
    assert cfg.replace(**{field: default}) == TrainConfig()  # and nothing else changed


def test_no_bf16_flag_and_help_texts():
    assert train_config_from_args(build_parser().parse_args(["train", "--no-bf16"])).bf16 == "off"
    sub = build_parser()._subparsers._group_actions[0].choices["train"]
    assert not [a.option_strings for a in sub._actions if a.option_strings and not a.help]


def test_cli_train_with_many_flags(tmp_path, capsys):
    """A real run: the flags reach the saved configs and the schedule (model flags go to ModelConfig)."""
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "synthetic-tiny", "--preset", "nano", "--epochs", "2", "--steps-per-epoch", "2",
               "--batch-requests", "8", "--lr", "0.003", "--schedule", "linear", "--warmup", "0.25", "--min-lr", "0.5",
               "--weight-decay", "0", "--grad-clip", "0", "--patience", "1", "--eval-batch-requests", "7",
               "--no-bf16", "--max-len", "8", "--activation-checkpointing", "--dropout", "0.1", "--no-val-pass",
               "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert "val_pass" not in res and "validation requests" not in (out / "results.md").read_text()  # no pass made
    conf = json.loads((out / "config.json").read_text())
    tc, mc = conf["train_config"], conf["model_config"]
    assert {k: tc[k] for k in ("epochs", "steps_per_epoch", "batch_requests", "lr", "schedule", "warmup", "min_lr",
                               "weight_decay", "grad_clip", "patience", "eval_batch_requests", "bf16", "device")} == {
        "epochs": 2, "steps_per_epoch": 2, "batch_requests": 8, "lr": 0.003, "schedule": "linear", "warmup": 0.25,
        "min_lr": 0.5, "weight_decay": 0.0, "grad_clip": None, "patience": 1, "eval_batch_requests": 7, "bf16": "off",
        "device": "cpu"}
    assert tc["val_pass"] is False
    assert mc["max_len"] == 8 and mc["activation_checkpointing"] is True and mc["dropout"] == 0.1
    assert "max_len" not in tc and "activation_checkpointing" not in tc
    # 4 steps, 1 of warm-up, linear decay to 0.5 x lr: after epoch 1 (2 steps) the lr is 1 - 0.5 * 1/3 of the peak
    epochs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs[0]["lr"] == pytest.approx(0.003 * (1 - 0.5 / 3))
    assert load_run(out).model.config.max_len == 8


def test_cli_resume_refuses_new_train_flags(straight_run, capsys):
    assert main(["train", "--resume", str(straight_run[0]), "--lr", "0.1"]) == 2
    assert "drop --lr" in _one_error_line(capsys)


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


# ---------------------------------------------------------------------------------------------
# threads: chosen by the CLI only, said in the first output line


@pytest.mark.parametrize("cpus, load, procs, want", [
    (16, 0.2, 1, 4),   # an idle many-core machine: capped
    (16, 30.0, 1, 1),  # a busy shared machine: one thread, not 16 that wait on each other
    (16, 13.5, 1, 2),  # 2.5 CPUs idle
    (2, 0.0, 1, 2),
    (16, 0.0, 8, 2),   # torchrun with 8 local processes: 2 CPUs each
    (1, 0.0, 4, 1),
])
def test_auto_threads_for_train_and_evaluate(cpus, load, procs, want, monkeypatch):
    from onetrans_mini.cli import auto_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    n, why = auto_threads("batch", cpus=cpus, load=load, local_procs=procs)
    assert n == want and why.startswith(f"auto: {cpus} CPU") and f"load {load:.1f}" in why


def test_auto_threads_serving_is_one_and_omp_num_threads_wins(monkeypatch):
    from onetrans_mini.cli import auto_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert auto_threads("serving") == (1, "auto: one request at a time")
    assert auto_threads("batch", cpus=16, load=0.0) == (3, "auto: OMP_NUM_THREADS=3")


def test_replay_names_its_threads_in_the_first_line(capsys):
    before = torch.get_num_threads()
    argv = ["replay", "--dataset", "synthetic-tiny", "--preset", "nano", "--max-requests", "3", "--modes", "none"]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("replay of 3 requests with 1 thread (auto: one request at a time)")
    assert main([*argv, "--threads", "2", "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)["_meta"]
    assert meta["threads"] == 2 and meta["threads_how"] == "--threads"
    assert torch.get_num_threads() == before


def test_only_the_command_line_sets_threads():
    """Thread counts are the application's: no library module calls torch.set_num_threads (bench.py's
    ``cli_bench`` is the bench command's entry point)."""
    import onetrans_mini

    root = Path(onetrans_mini.__file__).parent
    setters = sorted(str(f.relative_to(root)) for f in root.rglob("*.py") if "set_num_threads(" in f.read_text())
    assert set(setters) <= {"cli.py", "bench.py"}, setters
    assert "set_num_threads(" not in (root / "serving.py").read_text()


# ---------------------------------------------------------------------------------------------
# weights carry a digest of their bytes


def test_weights_carry_their_digest_and_damage_is_refused(straight_run, tiny_data, tmp_path):
    import hashlib

    from safetensors import safe_open

    from onetrans_mini.checkpoint import load_weights, save_weights, verify_weights

    model = straight_run[1]
    path = tmp_path / "w.safetensors"
    save_weights(model, path)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    with safe_open(str(path), "pt") as f:  # safetensors reads it as usual; the digest is in its metadata
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["sha256"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert n % 8 == 0
    copy = fresh_model(tiny_data, seed=5)
    load_weights(copy, path)
    assert_same_state(state(copy), state(model))
    damaged = bytearray(raw)
    damaged[-3] ^= 0x01  # one bit of the last tensor
    path.write_bytes(bytes(damaged))
    with pytest.raises(TrainError, match=r"w\.safetensors: damaged: its tensor bytes do not match the sha256 digest"):
        verify_weights(path)
    with pytest.raises(TrainError, match=r"w\.safetensors: damaged"):
        load_weights(copy, path)
    assert_same_state(state(copy), state(model))  # refused before anything was loaded
