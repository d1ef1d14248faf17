"""The course's pictures: the parts a notebook highlights are the ones drawn in colour, and the cache
picture is drawn from the cache's own plan."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from onetrans_mini import diagrams  # noqa: E402
from onetrans_mini.user_cache import plan  # noqa: E402


def _count(fig, color) -> int:
    return sum(isinstance(p, Rectangle) and to_hex(p.get_facecolor()) == to_hex(color) for p in fig.axes[0].patches)


def test_the_highlighted_part_is_the_one_in_colour():
    # tokenizer: the 8 S-tokens it outputs are blue; blocks greyed. block: 8 + 5 + 2 S queries in the stack
    tok = diagrams.architecture(highlight="tokenizer")
    block = diagrams.architecture(highlight="block")
    towers = diagrams.architecture(highlight="towers")
    assert _count(tok, diagrams.S_COLOR) == diagrams.N_S
    assert _count(block, diagrams.S_COLOR) == sum(diagrams.LAYER_S)
    assert _count(towers, diagrams.S_COLOR) == 0
    mask_s_cells = 1 + 2 + 3 + 4  # everything in colour adds the causal mask: its 4 S rows see 1..4 columns
    assert _count(diagrams.architecture(), diagrams.S_COLOR) == diagrams.N_S + sum(diagrams.LAYER_S) + mask_s_cells
    assert "this notebook: block" in block.axes[0].get_title(loc="left")
    plt.close("all")


def test_an_unknown_part_is_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['decoder'\].*expected some of"):
        diagrams.architecture(highlight=("block", "decoder"))


@pytest.mark.parametrize("n_cached, n_new", [(6, 2), (5, 1), (4, 4)])
def test_the_cache_picture_follows_the_plan(n_cached, n_new):
    lq = (6, 4, 0)
    fig = diagrams.cache_append(n_cached, n_new, lq)
    before = plan(list(lq), 0, n_cached, n_cached, None)
    after = plan(list(lq), 0, n_cached + n_new, n_cached, [p.key_start for p in before])
    recomputed = sum(max(0, n_cached - max(p.inputs_from, p.key_start)) for p in after)
    assert _count(fig, diagrams.NS_COLORS[0]) == recomputed + 1  # + the legend's swatch
    assert _count(fig, diagrams.NS_COLORS[1]) == n_new * len(lq) + 1
    plt.close("all")


def test_the_close_ups_draw():
    for fig in (diagrams.request_to_batch(), diagrams.two_stage(), diagrams.cache_append()):
        assert fig.axes[0].patches
    plt.close("all")
