"""Numbers quoted in the course's prose must come from the outputs committed under them.

nbval re-executes the notebooks small (smoke mode), so it cannot see a stale sentence such as "test AUC
0.7905" above an output that now prints 0.7912. This test reads the committed notebooks instead: every
decimal number in a markdown cell must appear in the text outputs of the same notebook, written the same
way or as the rounding of a longer output number. Two kinds of prose are exempt: lines quoted with ">"
(the paper's words and figures, which no cell of ours computes) and code (inline or fenced).
A number a cell cannot print belongs in a blockquote citing its source, or nowhere.
"""

from __future__ import annotations

import copy
import json
import re
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
# 0.7912, 4.5, 1.75 (not 1e-3, not v1.2.3) and counts written with thousands separators: 22,147
DECIMAL = re.compile(r"(?<![\w.,])(?:\d+\.\d+|\d{1,3}(?:,\d{3})+)(?![\w.,]*\d)")
FENCED = re.compile(r"```.*?```", re.S)
SPANS = re.compile(r"`[^`]*`|\$[^$]*\$|\]\([^)]*\)|https?://\S+|arXiv:? ?\d+\.\d+", re.I)  # code, maths, links


def prose_numbers(markdown: str) -> list[tuple[str, str]]:
    """The decimal numbers a reader takes as our results: (number, the line it sits on)."""
    found = []
    for line in FENCED.sub("", markdown).splitlines():
        if line.lstrip().startswith(">"):
            continue  # quoted: the paper's words
        for m in DECIMAL.finditer(SPANS.sub(" ", line)):
            found.append((m.group(), line.strip()))
    return found


def output_text(nb: dict) -> str:
    parts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
            if "text" in out:
                parts.append("".join(out["text"]))
            for kind in ("text/plain", "text/markdown", "text/html"):
                if kind in out.get("data", {}):
                    parts.append("".join(out["data"][kind]))
    return "\n".join(parts)


def _rounds_to(value: str, printed: set[str]) -> bool:
    if "." not in value:
        return False  # a count is quoted exactly
    places = Decimal(1).scaleb(-len(value.split(".")[1]))
    target = Decimal(value)
    for p in printed:
        if "." in p and len(p.split(".")[1]) > len(value.split(".")[1]):
            d = Decimal(p)
            if target in (d.quantize(places, ROUND_HALF_EVEN), d.quantize(places, ROUND_HALF_UP)):
                return True
    return False


def unbacked_numbers(nb: dict) -> list[str]:
    """Every prose number no committed output of ``nb`` prints, as 'cell N: number | line'."""
    text = output_text(nb)
    printed = set(DECIMAL.findall(text))
    missing = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        for number, line in prose_numbers("".join(cell["source"])):
            if number not in printed and not _rounds_to(number, printed):
                missing.append(f"cell {i}: {number} | {line[:120]}")
    return missing


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_number_in_the_prose_is_printed_by_the_notebook(path):
    missing = unbacked_numbers(json.loads(path.read_text()))
    assert not missing, f"{path.name}: prose quotes numbers no committed output prints:\n" + "\n".join(missing)


def test_the_rules_of_the_check():
    md = "AUC 0.7912 beats 0.77 on 2,153 rows.\n> The paper reports 8.08 TFLOPs.\n`lr=0.001` and [link](https://x.org/1.5)\n```\n2.5\n```"
    assert [n for n, _ in prose_numbers(md)] == ["0.7912", "0.77", "2,153"]
    nb = {"cells": [{"cell_type": "markdown", "source": [md]},
                    {"cell_type": "code", "source": [], "outputs": [{"output_type": "stream", "text": ["auc 0.79118, floor 0.7703, 2,153 rows\n"]}]}]}
    assert unbacked_numbers(nb) == []  # 0.7912 is 0.79118 rounded; 0.77 is 0.7703 rounded
    nb["cells"][1]["outputs"][0]["text"] = ["auc 0.79118, floor 0.7803, 2,153 rows\n"]
    assert unbacked_numbers(nb) == ["cell 0: 0.77 | AUC 0.7912 beats 0.77 on 2,153 rows."]


def test_tampering_with_a_quoted_result_in_a_committed_output_is_caught():
    """The issue's tampering check, on the course itself: notebook 05 quotes its test AUC; change the
    committed output that prints it, and the check must name the sentence that now has no source."""
    path = next(p for p in NOTEBOOKS if p.name.startswith("05_"))
    nb = json.loads(path.read_text())
    assert unbacked_numbers(nb) == []
    quoted = [n for c in nb["cells"] if c["cell_type"] == "markdown" for n, _ in prose_numbers("".join(c["source"]))]
    result = next(n for n in quoted if n.startswith("0.") and len(n) >= 5)  # an AUC-like figure, e.g. 0.7963
    tampered = copy.deepcopy(nb)
    for cell in tampered["cells"]:
        for out in cell.get("outputs", []):
            for key, holder in [("text", out)] + [(k, out["data"]) for k in ("text/plain", "text/html") if k in out.get("data", {})]:
                if key in holder:
                    text = "".join(holder[key])
                    holder[key] = [re.sub(r"\b" + re.escape(result[:-1]) + r"\d*", "0.9999", text)]
    missing = unbacked_numbers(tampered)
    assert any(f": {result} |" in m for m in missing), (result, missing)
