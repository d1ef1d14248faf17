"""A notebook that builds on an earlier one's hand-written code carries it verbatim (comments aside).

04a and 04b start from notebook 03's block (a collapsed cell, "as 03 wrote them"); if 03's code changes,
the copies must change with it, or the course teaches two different blocks under one name.
"""

import ast
import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
MARK = "# Notebook 03's parts, as 03 wrote them"


def definitions(sources) -> dict[str, str]:
    """Top-level functions and classes of some cells' code: name -> its AST dump (no comments, no layout)."""
    out = {}
    for src in sources:
        try:
            tree = ast.parse(src)
        except SyntaxError:  # a cell with IPython syntax defines nothing we compare
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                out[node.name] = ast.dump(node)
    return out


def code_cells(name: str) -> list[str]:
    nb = json.loads((NOTEBOOKS / name).read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_the_rule_sees_a_changed_body_and_not_a_changed_comment():
    a = definitions(["def f(x):\n    return x + 1  # one\n"])
    assert a == definitions(["def f(x):\n    # a comment\n    return x + 1\n"])
    assert a != definitions(["def f(x):\n    return x + 2\n"])


@pytest.mark.parametrize("name", ["04a_two_stage_scoring.ipynb", "04b_cross_request_cache.ipynb"])
def test_notebook_03s_code_is_carried_verbatim(name):
    ours = definitions(code_cells("03_mixed_block_causal_attention_pyramid.ipynb"))
    carried = [src for src in code_cells(name) if src.startswith(MARK)]
    assert len(carried) == 1, f"{name}: expected one cell starting with {MARK!r}"
    theirs = definitions(carried)
    shared = sorted(set(theirs) & set(ours))
    assert {"MyBlock", "MyMixedLinear", "MyMixedAttention", "my_mask"} <= set(shared), shared
    changed = [n for n in shared if theirs[n] != ours[n]]
    assert not changed, f"{name} carries a different {changed} than notebook 03 defines"
