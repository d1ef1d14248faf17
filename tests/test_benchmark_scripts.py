"""The benchmark scripts behind committed results run end to end (small) and write what they promise."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_model_scaling_writes_its_table_and_figure(tmp_path):
    out = tmp_path / "res"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "model_scaling.py"), "--dataset", "synthetic-tiny",
           "--candidates", "1500", "--sizes", "d16-L2,d32-L2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "model_scaling.json").read_text())
    assert [r["size"] for r in res["rows"]] == ["d16-L2", "d32-L2"]
    small, big = res["rows"]
    assert big["dense_params"] > small["dense_params"] and big["flops_per_candidate"] > small["flops_per_candidate"]
    assert all(r["train_candidates"] <= 1500 * 1.2 for r in res["rows"])  # the same budget, less than an epoch
    assert res["reference"]["click"]["oracle"] > res["reference"]["click"]["floor"]
    assert (out / "model_scaling.png").stat().st_size > 10_000
    assert "| d32-L2 |" in (out / "model_scaling.md").read_text()


def test_model_scaling_refuses_a_budget_beyond_one_epoch(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "model_scaling.py"), "--dataset", "synthetic-tiny",
           "--candidates", "10000000", "--sizes", "d16-L2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "more than one epoch" in proc.stderr


def test_the_sweep_measures_how_far_the_id_tables_moved():
    """recipe.py --sweep reports the id tables' movement: scaling one table by 1.5 moves it by 0.5, every
    row alike; the untouched table did not move."""
    import importlib.util

    import torch

    from onetrans_mini.config import get_preset
    from onetrans_mini.data import load_dataset
    from onetrans_mini.model import OneTrans

    spec = importlib.util.spec_from_file_location("recipe", ROOT / "benchmarks" / "recipe.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    data = load_dataset("synthetic-tiny")
    model = OneTrans(get_preset("nano"), data.schema, data.vocab_sizes())
    tables = model.tokenizer.embeddings.tables
    before = {n: tables[n].weight.detach().clone() for n in ("user_id", "item_id")}
    with torch.no_grad():
        tables["item_id"].weight.mul_(1.5)
    moved = recipe.embedding_movement(model, before, data)
    assert moved["user_id"]["relative_change"] == 0.0
    item = moved["item_id"]
    assert abs(item["relative_change"] - 0.5) < 1e-6
    assert abs(item["rare_quarter_median"] - 0.5) < 1e-6 and abs(item["frequent_quarter_median"] - 0.5) < 1e-6
    assert 0 < item["ids_seen"] <= len(before["item_id"])
    assert set(recipe.SWEEP) >= {"default", "history 256", "width 128", "depth 4", "requests: a day, up to 64"}


def test_model_scaling_without_statistics_drops_them_and_says_so(tmp_path):
    out = tmp_path / "res"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "model_scaling.py"), "--dataset", "synthetic-tiny",
           "--candidates", "1500", "--sizes", "d16-L2", "--no-statistics", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "model_scaling-no-statistics.json").read_text())
    assert res["statistics"] is False and not (out / "model_scaling.json").exists()
    assert "without the statistic features" in (out / "model_scaling-no-statistics.md").read_text()


def test_the_ceiling_probe_recovers_the_oracle_from_the_true_terms_and_less_from_ids(tmp_path):
    """ceiling.py: given the generator's own terms, its logistic model is the oracle (the form is learnable);
    learning the terms from what a ranker sees reaches less, and less again without the candidate list."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ceiling.py"), "--size", "tiny", "--seeds", "0", "--steps", "100",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "ceiling-synthetic-tiny.json").read_text())
    (w,) = res["worlds"]
    share = {name: r["oracle_lift_share"] for name, r in w["rungs"].items()}
    assert abs(w["rungs"]["the true terms"]["test_auc"] - w["oracle"]) < 0.003
    assert share["all learned"] < share["latent match learned"] < 0.95
    assert share["all learned, no list"] < share["all learned"] - 0.05
    assert "| all learned |" in (tmp_path / "ceiling-synthetic-tiny.md").read_text()
