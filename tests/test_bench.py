"""The benchmark (``onetrans_mini.bench``) on the nano suite, in seconds.

No timing is asserted: that every row and section is there, that each variant really runs what its row
says (the model's own switches, no patches), that the fast paths compute what the slow ones do, that the
memory probe measures what it says, and that the README's table is the one the committed results give.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from unittest import mock

import pytest
import torch

from onetrans_mini import bench
from onetrans_mini.bench import (BASELINE, INFER_VARIANTS, SECTIONS, SUITES, TRAIN_VARIANTS, _models, _run,
                                 interleaved_samples, peak_memory, readme_table, request_batch, run_suite)
from onetrans_mini.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
NANO = SUITES["nano"]
V = {v.name: v for v in (*TRAIN_VARIANTS, *INFER_VARIANTS)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # nano tensors: a second thread only waits
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def result():
    return run_suite("nano", "cpu")


def test_every_section_and_row_is_there(result):
    json.dumps(result)  # JSON-ready as it is
    for sec in SECTIONS:
        assert "error" not in result[sec], result[sec].get("traceback")
    assert [r["name"] for r in result["train"]["rows"]] == [v.name for v in TRAIN_VARIANTS]
    assert [r["name"] for r in result["inference"]["rows"]] == [v.name for v in INFER_VARIANTS]
    assert [p["candidates"] for p in result["two_stage"]["points"]] == list(NANO.sweep_candidates)
    assert [p["new"] for p in result["append"]["points"]] == list(NANO.append_new)
    assert result["train"]["micro_batches"] == NANO.requests // NANO.micro_requests
    assert torch.get_num_threads() == 1  # run_suite leaves the process's threads alone
    for r in result["train"]["rows"]:  # every ratio against the first row of the same run
        assert r["delta"]["time"] == pytest.approx(r["time_s"] / result["train"]["rows"][0]["time_s"] - 1)
        assert len(r["times_s"]) == NANO.reps and r["peak_bytes"] > 0


def test_fast_paths_compute_what_the_slow_ones_do(result):
    diff = {r["name"]: r["max_abs_diff"] for r in result["inference"]["rows"]}
    assert diff["kv_cache"] < 1e-5 and diff["fused_attention"] < 1e-5  # the same function, another path
    assert 0 < diff["mixed_precision"] < 0.1  # bf16 rounding: not zero, so bf16 really ran
    assert all(p["max_abs_diff"] < 1e-5 for p in result["two_stage"]["points"])
    inf = {r["name"]: r for r in result["inference"]["rows"]}
    assert inf["kv_cache"]["peak_bytes"] < inf["baseline"]["peak_bytes"]  # no copy of the history per candidate
    assert inf["kv_cache"]["delta"]["flops"] < 0 and inf["fused_attention"]["delta"]["flops"] == 0
    for p in result["append"]["points"]:  # exact appends compute only the new rows (no moved window in nano)
        assert sum(p["computed"]) == p["new"] * sum(q > 0 for q in result["append"]["schedule"])


def test_each_variant_flips_its_own_switch():
    models = _models(NANO, "cpu", TRAIN_VARIANTS)
    batch = request_batch(2, 3, NANO.seq_len)
    for name, v in V.items():
        model = models[v.pyramid, v.recompute]
        assert model.config.pyramid == v.pyramid and model.config.activation_checkpointing == v.recompute
        seen = []
        hook = model.blocks[0].attn.register_forward_hook(lambda m, a, o: seen.append(m.explicit))
        with mock.patch.object(model, "forward_full", wraps=model.forward_full) as full:
            logits = _run(model.eval(), v, batch, "cpu")
        hook.remove()
        assert full.called != v.request_level, name  # per-candidate forward only when the row says so
        assert set(seen) == {not v.fused}, name  # the explicit softmax only when the row says so
        assert logits.dtype == (torch.bfloat16 if v.bf16 else torch.float32), name  # autocast ran
        assert model.blocks[0].attn.explicit is False  # switched back


def saved_tensors(model, v, batch) -> tuple[int, float, list]:
    """Tensors kept for backward by a training step, its loss and gradients."""
    n = []
    model.train().zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: n.append(1) or t, lambda t: t):
        logits = _run(model, v, batch, "cpu", backward_scale=1.0)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), batch.labels)
    return len(n), float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_recomputation_is_the_model_option_and_changes_only_memory():
    models = _models(NANO, "cpu", TRAIN_VARIANTS)
    plain, recomputing = models[False, False], models[False, True]
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), recomputing.state_dict().values()))
    batch = request_batch(2, 3, NANO.seq_len)
    n0, loss0, g0 = saved_tensors(plain, BASELINE, batch)
    n1, loss1, g1 = saved_tensors(recomputing, V["recompute_only"], batch)
    assert n1 < n0 / 2  # only each block's inputs are kept
    assert loss0 == loss1 and len(g0) == len(g1)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))


def test_peak_memory_follows_allocations():
    def f():
        a = torch.empty(1_000_000, dtype=torch.uint8)
        b = torch.empty(2_000_000, dtype=torch.uint8)  # peak: 3 MB
        del a
        c = torch.empty(500_000, dtype=torch.uint8)
        del b, c

    assert peak_memory(f, "cpu") == 3_000_000


def test_interleaved_runs_the_functions_in_turn():
    calls = []
    t = interleaved_samples({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=1)
    assert calls == ["a", "b"] * 4 and [len(x) for x in t.values()] == [3, 3]


def test_cli_writes_json_and_markdown_and_restores_threads(tmp_path, capsys):
    rc = main(["bench", "--suite", "nano", "--sections", "two_stage,append", "--out", str(tmp_path),
               "--sweep-candidates", "1,2", "--threads", "2", "--name", "t"])
    assert rc == 0 and torch.get_num_threads() == 1
    res = json.loads((tmp_path / "t.json").read_text())
    assert [p["candidates"] for p in res["two_stage"]["points"]] == [1, 2] and "train" not in res
    assert res["hardware"]["threads"] == 2 and res["append"]["threads"] == 1  # the CLI's threads, one for appends
    assert (tmp_path / "t.md").read_text().startswith("# onetrans-mini systems benchmark")
    assert "Two-stage" in capsys.readouterr().out


def test_cli_suite_selection_and_errors():
    p = build_parser()
    name, suite = bench.suite_from_args(p.parse_args(["bench", "--quick"]))
    assert name == "quick" and suite == SUITES["quick"]
    name, suite = bench.suite_from_args(p.parse_args(["bench", "--device", "cuda", "--seq-len", "64",
                                                      "--append-new", "1,2", "--peak-tflops", "5"]))
    assert name == "gpu" and suite.seq_len == 64 and suite.append_new == (1, 2) and suite.peak_tflops == 5.0
    assert main(["bench", "--suite", "nano", "--sections", "nope"]) == 2
    assert main(["bench", "--device", "gpu"]) == 2  # one clear line, no traceback
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda"]) == 2


def test_readme_table_is_generated_from_the_committed_results(capsys):
    committed = json.loads((ROOT / "benchmarks" / "results" / "cpu.json").read_text())
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- bench-table: start.*?-->\n(.*?)<!-- bench-table: end -->", readme, re.S)
    assert block, "README.md lacks the generated systems table"
    assert block.group(1) == readme_table(committed), "regenerate: python -m onetrans_mini.bench --readme-table"
    assert main(["bench", "--readme-table"]) == 0 and capsys.readouterr().out == readme_table(committed)
    assert committed["schema"] == bench.SCHEMA_VERSION  # the results were made by this code's suite


def test_bench_model_is_seeded_without_touching_the_global_rng():
    """The same seed gives the same weights, and the caller's random stream goes on as if nothing ran."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = bench.bench_model("nano", 16, seed=0)
    assert torch.equal(torch.rand(3), expected)
    b = bench.bench_model("nano", 16, seed=0, pyramid=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
