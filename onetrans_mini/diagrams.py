"""Pictures of OneTrans drawn by code: the course map that opens every notebook, and three close-ups.

- ``architecture(highlight=...)``: features -> tokenizers -> S- and NS-tokens -> a pyramid stack of mixed
  blocks -> final norm -> task towers, with the notebook's own part in colour and the rest greyed.
- ``request_to_batch()``: one request (a user, the history before now, the candidates) as batch tensors.
- ``two_stage()``: Stage I runs the S-tokens once per request and keeps each layer's keys and values;
  Stage II runs each candidate's NS-tokens against them.
- ``cache_append()``: the cross-request cache: new events append keys and values per layer, and the
  rows whose inputs changed are recomputed.

Only matplotlib patches and text: no data, no model. Each function returns the Figure.
"""

from __future__ import annotations

from typing import Iterable

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

PARTS = {
    "data": "features of a request (the user's history, the candidate, context)",
    "tokenizer": "the unified tokenizer: S-tokens and NS-tokens",
    "block": "the mixed-parameter block (shared S weights, token-specific NS weights)",
    "attention": "causal attention over [S ; NS]",
    "pyramid": "pyramid stacking: fewer S queries per layer",
    "towers": "final norm and the task towers",
    "loss": "one loss per task, summed",
    "stages": "Stage I / Stage II: the S-side once per request",
    "cache": "the cross-request cache of a user's S keys and values",
}

S_COLOR, NS_COLORS = "#4C72B0", ["#DD8452", "#55A868", "#C44E52", "#8172B3"]
GREY, INK = "#BBBBBB", "#222222"
N_S, LAYER_S = 8, [8, 5, 2]  # S-tokens in, and S queries kept by each of the three drawn layers


def _check(highlight) -> set[str]:
    if highlight is None:
        return set(PARTS)
    parts = {highlight} if isinstance(highlight, str) else set(highlight)
    unknown = sorted(parts - set(PARTS))
    if unknown:
        raise ValueError(f"architecture(highlight=...): unknown part(s) {unknown}; expected some of {sorted(PARTS)}")
    return parts


def _box(ax, x, y, w, h, text, on: bool, color="#F2F2F2", size=9, weight="normal"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                fc=color if on else "#FAFAFA", ec=INK if on else GREY, lw=1.6 if on else 0.8))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, weight=weight,
            color=INK if on else GREY)


def _token(ax, x, y, color, on: bool, size=0.42):
    ax.add_patch(Rectangle((x, y), size, size, fc=color if on else "#EEEEEE", ec=INK if on else GREY, lw=0.8))


def _arrow(ax, x0, y0, x1, y1, on: bool = True):
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=10, lw=1.0,
                                 color=INK if on else GREY))


def _canvas(width, height, xlim, ylim):
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_axis_off()
    return fig, ax


def architecture(highlight: str | Iterable[str] | None = None, title: str | None = None):
    """The course map: OneTrans bottom (features) to top (scores); ``highlight``: one or several of ``PARTS``
    drawn in colour, the rest greyed (None: everything in colour)."""
    on = _check(highlight)
    fig, ax = _canvas(9.5, 6.4, (0, 14.5), (-0.3, 10.6))
    x_s, x_ns, step = 0.6, 5.6, 0.55  # left edges of the S and NS token rows

    # features -> tokenizers -> tokens
    _box(ax, 0.2, 0.0, 4.8, 0.8, "behaviour sequences\n(the user's history before now)", "data" in on)
    _box(ax, 5.3, 0.0, 3.6, 0.8, "user, item, context\nfeatures and statistics", "data" in on)
    _box(ax, 0.2, 1.3, 4.8, 0.7, "sequential tokenizer (+[SEP])", "tokenizer" in on, "#DCE6F2")
    _box(ax, 5.3, 1.3, 3.6, 0.7, "NS tokenizer (auto-split)", "tokenizer" in on, "#F6E3D6")
    for x in (2.6, 7.1):
        _arrow(ax, x, 0.85, x, 1.28, "tokenizer" in on)
        _arrow(ax, x, 2.05, x, 2.45, "tokenizer" in on)
    for i in range(N_S):
        _token(ax, x_s + i * step, 2.5, S_COLOR, "tokenizer" in on)
    for j, c in enumerate(NS_COLORS):
        _token(ax, x_ns + j * step, 2.5, c, "tokenizer" in on)
    ax.text(x_s, 3.05, "S-tokens", fontsize=8, color=INK if "tokenizer" in on else GREY)
    ax.text(x_ns, 3.05, "NS-tokens", fontsize=8, color=INK if "tokenizer" in on else GREY)

    # the pyramid stack: each layer keeps the most recent S queries; the NS-tokens go all the way up
    block_on = "block" in on or "attention" in on
    token_on = block_on or "stages" in on or "cache" in on
    for layer, kept in enumerate(LAYER_S):
        y = 3.6 + 1.55 * layer
        _box(ax, 0.2, y, 8.7, 1.25, "", block_on, "#F4F4F4")
        ax.text(0.35, y + 1.02, f"OneTrans block {layer + 1}: mixed causal attention, then mixed FFN", fontsize=8,
                color=INK if block_on else GREY)
        first = N_S - kept  # queries of this layer: the last `kept` S positions
        for i in range(N_S):
            if i >= first:
                _token(ax, x_s + i * step, y + 0.3, S_COLOR, "pyramid" in on or token_on)
            elif "pyramid" in on:
                ax.add_patch(Rectangle((x_s + i * step, y + 0.3), 0.42, 0.42, fill=False, ec=GREY, ls=":", lw=0.8))
        for j, c in enumerate(NS_COLORS):
            _token(ax, x_ns + j * step, y + 0.3, c, token_on)
    if "pyramid" in on:
        ax.text(0.3, 9.3, "pyramid: fewer S queries per layer,\nthe newest kept (dotted: dropped)",
                fontsize=8, color=S_COLOR)

    # top: final norm and towers, on the NS-tokens only
    _box(ax, 5.3, 8.4, 3.6, 0.55, "final RMSNorm", "towers" in on, "#E8E8E8")
    _box(ax, 5.3, 9.25, 1.7, 0.7, "tower:\ntask 1", "towers" in on, "#E2F0E2")
    _box(ax, 7.2, 9.25, 1.7, 0.7, "tower:\ntask 2", "towers" in on, "#E2F0E2")
    _arrow(ax, 7.1, 8.0, 7.1, 8.38, "towers" in on)
    if "loss" in on:
        _box(ax, 9.4, 9.25, 2.6, 0.7, "loss = sum of\nper-task BCE", True, "#FBE5E5")
        _arrow(ax, 8.95, 9.6, 9.38, 9.6)

    # right margin, one slot per part: block notes, the causal mask, the two stages and the cache
    if "block" in on:
        ax.text(9.4, 7.55, "S-tokens: ONE shared set of\nweights (Q, K, V, O, FFN)", fontsize=8, color=S_COLOR)
        ax.text(9.4, 6.75, "NS-tokens: each its OWN\nweights (token-specific)", fontsize=8, color=NS_COLORS[0])
    if "attention" in on:
        _mask(ax, 9.6, 3.7, 1.8)
    if "stages" in on or "cache" in on:
        ax.add_patch(Rectangle((x_s - 0.2, 3.5), N_S * step + 0.1, 4.7, fill=False, ec=S_COLOR, lw=1.5, ls="--"))
        ax.add_patch(Rectangle((x_ns - 0.2, 3.5), len(NS_COLORS) * step + 0.1, 4.7, fill=False, ec=NS_COLORS[0], lw=1.5, ls="--"))
        ax.text(9.4, 2.75, "Stage I (blue box): S-side once\nper request, keys/values kept", fontsize=8, color=S_COLOR)
        ax.text(9.4, 1.95, "Stage II (orange box): NS-side\nonce per candidate, reads them", fontsize=8, color=NS_COLORS[0])
    if "cache" in on:
        ax.text(9.4, 0.3, "cross-request cache: a user's\nkeys/values kept between requests;\nnew events append, changed\nrows are recomputed",
                fontsize=8, color=INK)
    ax.set_title(title or ("OneTrans" + ("" if highlight is None else "  -  this notebook: " + ", ".join(sorted(on)))),
                 fontsize=10, loc="left")
    return fig


def _mask(ax, x, y, size):
    """A 6x6 causal mask over [S ; NS] (4 S, 2 NS): row i attends to columns <= i."""
    n, n_s = 6, 4
    cell = size / n
    for i in range(n):  # row i is drawn from the top
        for j in range(n):
            fc = (S_COLOR if i < n_s else NS_COLORS[0]) if j <= i else "white"
            ax.add_patch(Rectangle((x + j * cell, y + (n - 1 - i) * cell), cell, cell, fc=fc, ec=GREY, lw=0.5))
    ax.text(x + size / 2, y + size + 0.15, "causal mask over [S ; NS]\n(a token sees itself and earlier)",
            fontsize=8, ha="center", va="bottom")


def request_to_batch():
    """One request as the batch sees it: a left-padded history row (the newest event last) and candidate rows
    that point back at their request through ``request_index``."""
    fig, ax = _canvas(9.5, 3.4, (0, 14), (0, 5.0))
    ax.text(0.1, 4.6, "a request: one user, the history strictly before now, the candidates shown now", fontsize=9)
    ax.text(0.1, 3.9, "seq (R, L_S), left-padded", fontsize=9, color=S_COLOR)
    for r, n_real in enumerate((5, 3)):
        y = 3.1 - 0.7 * r
        ax.text(0.1, y + 0.12, f"request {r}", fontsize=8)
        for i in range(8):
            ax.add_patch(Rectangle((1.5 + i * 0.55, y), 0.48, 0.48, fc=S_COLOR if i >= 8 - n_real else "white", ec=GREY, lw=0.8))
    ax.text(1.5, 1.6, "PAD = 0 on the left: the newest\nevent is always the last S-token", fontsize=8, color=S_COLOR)
    ax.text(7.2, 3.9, "request_index", fontsize=9)
    ax.text(9.3, 3.9, "candidates (B, NS features)", fontsize=9, color=NS_COLORS[0])
    for b, r in enumerate((0, 0, 0, 1, 1)):
        y = 3.2 - 0.62 * b
        ax.text(8.0, y + 0.1, f"{r}", fontsize=9)
        _arrow(ax, 7.8, y + 0.22, 6.0, 3.35 - 0.7 * r)
        for j, c in enumerate(NS_COLORS):
            ax.add_patch(Rectangle((9.3 + j * 0.5, y), 0.44, 0.44, fc=c, ec=GREY, lw=0.8))
    ax.text(9.3, 0.1, "labels (B, tasks), user (B,):\none row per candidate", fontsize=8)
    return fig


def two_stage(n_candidates: int = 3):
    """Stage I (once per request: S-tokens through every layer, keys/values kept; the pyramid drops the
    oldest queries) and Stage II (each candidate's NS-tokens attend to those keys/values and to their own)."""
    fig, ax = _canvas(9.5, 3.6, (0, 14), (0, 4.6))
    ax.text(0.1, 4.1, "Stage I: once per request", fontsize=10, color=S_COLOR, weight="bold")
    ax.text(7.6, 4.1, f"Stage II: once per candidate (x{n_candidates})", fontsize=10, color=NS_COLORS[0], weight="bold")
    for layer, kept in enumerate(LAYER_S):
        y = 0.5 + 1.1 * layer
        for i in range(N_S):
            if i >= N_S - kept:
                _token(ax, 0.3 + i * 0.55, y, S_COLOR, True)
        _box(ax, 5.0, y - 0.05, 1.8, 0.55, f"K, V of layer {layer + 1}", True, "#DCE6F2", size=8)
        _arrow(ax, 4.75, y + 0.2, 4.98, y + 0.2)
        _arrow(ax, 6.85, y + 0.2, 7.55, y + 0.2)
        for c in range(n_candidates):
            for j in range(2):
                _token(ax, 7.6 + c * 2.0 + j * 0.5, y, NS_COLORS[c % len(NS_COLORS)], True)
    ax.text(7.6, 0.0, "each NS query reads [the request's S keys ; its own NS keys]", fontsize=8)
    ax.text(0.3, 0.0, "layer inputs: S-tokens (the pyramid keeps the newest)", fontsize=8)
    return fig


def cache_append(n_cached: int = 6, n_new: int = 2, layer_queries=(6, 4, 0)):
    """The cross-request cache, drawn from ``user_cache.plan`` itself: per layer (rows) and history position
    (columns), which keys/values are reused from the last request, recomputed because their input changed
    (the pyramid moved the layer's window), or new. ``layer_queries``: S queries per layer, 0 at the top."""
    from .user_cache import plan

    n = n_cached + n_new
    before = plan(list(layer_queries), 0, n_cached, n_cached, None)
    after = plan(list(layer_queries), 0, n, n_cached, [p.key_start for p in before])
    fig, ax = _canvas(9.5, 3.4, (0, 14), (0, len(layer_queries) + 1.7))
    ax.text(0.1, len(layer_queries) + 1.2, f"a user's next request: {n_cached} cached events, {n_new} new ones", fontsize=10)
    fills = {"reused": "#DCE6F2", "recomputed": NS_COLORS[0], "new": NS_COLORS[1]}
    for layer, p in enumerate(after):
        y = 0.3 + layer
        for i in range(n):
            kind = "new" if i >= n_cached else "recomputed" if i >= p.inputs_from else "reused"
            inside = i >= p.key_start
            ax.add_patch(Rectangle((0.3 + i * 0.6, y), 0.5, 0.5, fc=fills[kind] if inside else "white", ec=GREY, lw=0.8,
                                   hatch="//" if kind == "new" and inside else None))
        ax.text(0.4 + n * 0.6, y + 0.12, f"layer {layer + 1}: keys from {p.key_start}", fontsize=8)
    for k, (kind, fc) in enumerate(fills.items()):
        ax.add_patch(Rectangle((9.2, 2.4 - 0.6 * k), 0.4, 0.4, fc=fc, ec=GREY, hatch="//" if kind == "new" else None))
        ax.text(9.8, 2.48 - 0.6 * k, {"reused": "keys/values reused from the cache",
                                       "recomputed": "recomputed: the layer's input changed",
                                       "new": "appended: the new events"}[kind], fontsize=8)
    ax.text(9.2, 0.3, "white: outside the layer's key window", fontsize=8)
    return fig
