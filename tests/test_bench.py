"""The benchmark suite's machinery (``onetrans_mini.bench``) on the nano suite, in a few seconds.

No timing is asserted: only that every row and section is there, that ratios are taken between figures of
the same run, that the memory probe measures what it says, and that the switches change speed, not results.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from onetrans_mini import bench
from onetrans_mini.bench import (
    INFER_VARIANTS,
    PAPER_TABLE4,
    SECTIONS,
    SUITES,
    TRAIN_VARIANTS,
    autocast,
    build_model,
    peak_memory,
    percentile,
    recompute_activations,
    request_batch,
    run_suite,
    to_markdown,
    write_results,
)
from onetrans_mini.cli import build_parser, main


@pytest.fixture(scope="module")
def result():
    return run_suite("nano", "cpu", progress=None)


def test_every_section_and_row_is_there(result):
    json.dumps(result)  # JSON-ready as it is
    assert result["schema"] == bench.SCHEMA_VERSION and result["suite_name"] == "nano"
    for sec in SECTIONS:
        assert "error" not in result[sec], result[sec].get("traceback")
    assert [r["name"] for r in result["train"]["rows"]] == [v.name for v in TRAIN_VARIANTS]
    assert [r["name"] for r in result["inference"]["rows"]] == [v.name for v in INFER_VARIANTS]
    suite = SUITES["nano"]
    assert [p["candidates"] for p in result["two_stage"]["points"]] == list(suite.sweep_candidates)
    assert [p["new"] for p in result["append"]["points"]] == list(suite.append_new)
    assert result["train"]["batch"]["micro_batches"] == suite.requests // suite.micro_requests
    hw = result["hardware"]
    assert hw["device"] == "cpu" and hw["description"].startswith("CPU:") and hw["threads"] == suite.threads


def test_ratios_come_from_the_same_run(result):
    tr = result["train"]["rows"]
    base = tr[0]
    for r in tr:
        assert len(r["times_s"]) == SUITES["nano"].reps
        assert r["time_s"] == statistics.median(r["times_s"])
        assert r["delta"]["time"] == pytest.approx(r["time_s"] / base["time_s"] - 1)
        assert r["delta"]["memory"] == pytest.approx(r["peak_bytes"] / base["peak_bytes"] - 1)
        assert r["delta"]["flops"] == pytest.approx(r["hardware_flops"] / base["hardware_flops"] - 1)
        assert r["achieved_flops_per_s"] == pytest.approx(r["model_flops"] / r["time_s"])
        assert r["mfu"] is None  # CPU: no agreed peak
    inf = result["inference"]["rows"]
    for r in inf:
        assert len(r["times_s"]) == SUITES["nano"].latency_reps
        assert r["p50_s"] <= r["p99_s"] <= max(r["times_s"])
        assert r["delta"]["p99"] == pytest.approx(r["p99_s"] / inf[0]["p99_s"] - 1)
    for p in result["two_stage"]["points"]:
        assert p["speedup"] == pytest.approx(p["full_s"] / p["two_stage_s"])
        assert p["flops_ratio"] == pytest.approx(p["flops_full"] / p["flops_two_stage"])
    for p in result["append"]["points"]:
        assert p["ratio"] == pytest.approx(p["append_s"] / p["fresh_s"])
        assert 0 < p["computed_share"] <= 1


def test_paper_figures_sit_beside_ours(result):
    for rows, keys in ((result["train"]["rows"], ("time", "memory")), (result["inference"]["rows"], ("p99", "memory"))):
        named = {r["paper"] for r in rows if r["paper"]}
        assert named == set(PAPER_TABLE4)  # every row of the paper's Table 4, training and inference
        for r in rows:
            assert (r["paper_delta"] is None) == (r["paper"] is None)
            if r["paper"]:
                assert set(r["paper_delta"]) == set(keys)
    md = to_markdown(result)
    for r in result["train"]["rows"] + result["inference"]["rows"]:
        assert r["label"] in md
    assert "-28.7%" in md and "-58.9%" in md and "-69.1%" in md  # paper's train/inference figures printed


def test_fast_paths_are_exact_and_memory_is_measured(result):
    diff = {r["name"]: r["max_abs_diff_vs_baseline"] for r in result["inference"]["rows"]}
    assert diff["kv_cache"] < 1e-5 and diff["fused_attention"] < 1e-5  # same function, another path
    assert diff["mixed_precision"] < 0.1  # bf16 rounding
    for p in result["two_stage"]["points"]:
        assert p["max_abs_diff"] < 1e-5
    for r in result["train"]["rows"] + result["inference"]["rows"]:
        assert r["peak_bytes"] is not None and r["peak_bytes"] > 0
    # the two-stage forward never copies the history per candidate: less memory than the full forward
    inf = {r["name"]: r for r in result["inference"]["rows"]}
    assert inf["kv_cache"]["peak_bytes"] < inf["baseline"]["peak_bytes"]


def test_peak_memory_follows_allocations():
    def f():
        a = torch.empty(1_000_000, dtype=torch.uint8)
        b = torch.empty(2_000_000, dtype=torch.uint8)  # peak: 3 MB
        del a
        c = torch.empty(500_000, dtype=torch.uint8)
        del b, c

    assert peak_memory(f, torch.device("cpu")) == 3_000_000


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # nano tensors: a second thread only waits (and spins on a busy machine)
    yield
    torch.set_num_threads(before)


def test_recompute_and_bf16_switches_change_speed_not_results(one_thread):
    suite = SUITES["nano"]
    model = build_model(suite, torch.device("cpu")).train()
    batch = request_batch(2, 3, suite.seq_len)

    def grads(**kw):
        model.zero_grad(set_to_none=True)
        with recompute_activations(model, kw.get("recompute", False)):
            with autocast(model, torch.device("cpu"), kw.get("bf16", False)):
                _, loss = model(batch, batch.labels)
            loss.backward()
        return loss.detach().float(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss0, g0 = grads()
    loss1, g1 = grads(recompute=True)
    assert torch.equal(loss0, loss1) and len(g0) == len(g1)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))
    loss2, _ = grads(bf16=True)  # runs (the sequence tokenizer stays fp32 inside) and is close
    assert abs(float(loss2) - float(loss0)) < 0.05
    # both switches leave the model as they found it
    assert all("forward" not in b.__dict__ and "forward_s" not in b.__dict__ for b in model.blocks)
    assert "forward" not in model.tokenizer.seq.__dict__


def test_percentile():
    xs = [float(i) for i in range(101)]
    assert percentile(xs, 50) == 50 and percentile(xs, 99) == 99 and percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0], 50) == 1.5


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    rc = main(["bench", "--suite", "nano", "--sections", "two_stage,append", "--out", str(tmp_path),
               "--sweep-candidates", "1,2", "--name", "t"])
    assert rc == 0
    res = json.loads((tmp_path / "t.json").read_text())
    assert [p["candidates"] for p in res["two_stage"]["points"]] == [1, 2]
    assert "train" not in res
    assert (tmp_path / "t.md").read_text().startswith("# onetrans-mini systems benchmark")
    assert "(c) Two-stage speed-up" in capsys.readouterr().out


def test_cli_suite_selection():
    p = build_parser()
    name, suite = bench.suite_from_args(p.parse_args(["bench", "--quick"]))
    assert name == "quick" and suite == SUITES["quick"]
    args = p.parse_args(["bench", "--device", "cuda", "--seq-len", "64", "--append-new", "1,2"])
    name, suite = bench.suite_from_args(args)
    assert name == "gpu" and suite.seq_len == 64 and suite.append_new == (1, 2) and suite.preset == "S"
    assert main(["bench", "--suite", "nano", "--sections", "nope"]) == 2
    assert main(["bench", "--device", "gpu"]) == 2  # one clear line, no traceback
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda"]) == 2


def test_a_modified_suite_is_named_after_the_closest_named_one():
    assert bench.suite_name(SUITES["quick"]) == "quick"
    assert bench.suite_name(SUITES["quick"].replace(threads=1)) == "quick (threads=1)"
    far = SUITES["cpu"].replace(preset="nano", seq_len=3, reps=1, threads=5, warmup=9)
    assert bench.suite_name(far) == "custom"


def test_write_results_round_trip(result, tmp_path):
    pj, pm = write_results(result, tmp_path)
    assert pj.name == "nano.json" and pm.name == "nano.md"
    assert json.loads(pj.read_text())["train"]["rows"][0]["name"] == "baseline"


def test_bench_cache_shares_the_timer():
    from onetrans_mini import bench_cache

    assert bench_cache.interleaved is bench.interleaved
    calls = []
    t = bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=1)
    assert set(t) == {"a", "b"} and calls == ["a", "b"] * 4  # in turn, warm-up included
