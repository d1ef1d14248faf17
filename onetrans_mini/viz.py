"""Attention maps and training curves: the numbers as tidy DataFrames, the pictures in one line.

Read attention back the annotated-transformer way: the model keeps its probabilities while
``capture_attention`` is on, and the helpers here turn them into tables and figures::

    with torch.no_grad(), capture_attention(model) as maps:
        model.forward_full(batch)
    ns_to_s_grid(maps, batch)                         # NS-token -> history heatmaps, every layer and head
    table = ns_to_s_table(maps, batch)                # one row per (layer, candidate, history event)
    attention_by_recency(table)                       # NS->S mass by distance from the newest event

Two kinds of functions, kept apart so that the numbers are testable without a screen:

- **numbers** (torch / numpy / pandas only): ``ns_query_mass``, ``ns_to_s_table``, ``attention_by_recency``,
  ``attention_by_group``, ``attention_by_distance``, ``s_to_s_by_offset``, ``pyramid_kept``, ``feature_match``,
  ``id_to_value``;
- **pictures** (matplotlib, imported inside each function, so the library works without it; they return
  the ``Axes`` or ``Figure`` they drew): ``ns_to_s_heatmap``, ``ns_to_s_grid``, ``s_to_s_heatmap``,
  ``attention_mask_plot``, ``lift_heatmap``, ``pyramid_kept_plot``, ``recency_plot``, ``group_plot``,
  ``learning_curves``. Every heatmap draws its colour bar unless told ``colorbar=False``.

Conventions. ``maps`` is what ONE forward under ``capture_attention`` recorded (one ``AttentionMap`` per
layer). Its rows ``N`` are the forward's sequences: the candidates (``N = B``) in the model's full forward,
the requests (``N = R``) for a Stage I call. The helpers map S-token positions back to history events
through the batch, which holds for the default timestamp-aware merge (S-token ``i`` is event ``i`` of the
left-padded history, the newest last); the timestamp-agnostic merge regroups events and adds ``[SEP]``
tokens, and the helpers that need events say so. *Distance* counts events back from the newest one
(0 = the newest). At pyramid layer ``l`` the S keys are the ``n_s_keys`` most recent tokens, so a layer's
table holds only the events still present there.

Uniform baseline. An NS-token that spread its attention evenly over everything the mask lets it see would
give each visible key ``1 / n_visible`` (``n_visible`` = real S keys + the NS-tokens up to itself). The
*lift* of an event is the attention it gets divided by that: 1 means "no preference", 2 "twice its fair
share". Lift makes requests with short and long histories comparable.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .attention import AttentionMap, attention_mask

# default recency buckets: distance edges 1, 2, 4, ... -> buckets 0 | 1 | 2-3 | 4-7 | ... | 64-127 | 128+
RECENCY_BINS = (1, 2, 4, 8, 16, 32, 64, 128)

# ----------------------------------------------------------------------------------------------
# plumbing: which map, which rows, which keys are real


def get_map(maps: Sequence[AttentionMap], layer: int) -> AttentionMap:
    """The map of ``layer`` (negative counts from the top: -1 is the top layer)."""
    layers = sorted({m.layer for m in maps})
    if not layers:
        raise ValueError("no attention maps: run the model inside `with capture_attention(model) as maps:`")
    if layer < 0:
        layer = layers[layer] if -layer <= len(layers) else layer
    found = [m for m in maps if m.layer == layer]
    if not found:
        raise ValueError(f"no attention map of layer {layer}; the maps have layers {layers}")
    if len(found) > 1:
        raise ValueError(
            f"{len(found)} maps of layer {layer}: capture_attention recorded several forward calls; "
            f"capture one forward per list (a new `with capture_attention(...)` block)"
        )
    return found[0]


def _select(maps: Sequence[AttentionMap], layers=None) -> list[AttentionMap]:
    if layers is None:
        layers = sorted({m.layer for m in maps})
    elif isinstance(layers, int):
        layers = [layers]
    return [get_map(maps, layer) for layer in layers]


def _rows_of(batch, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row -> request index (N,), seq_mask of each row (N, L)) for maps with ``n_rows`` rows."""
    if n_rows == batch.n_candidates:
        ri = batch.request_index
    elif n_rows == batch.n_requests:
        ri = torch.arange(batch.n_requests, device=batch.seq_mask.device)
    else:
        raise ValueError(
            f"the maps have {n_rows} rows but the batch has {batch.n_candidates} candidates and {batch.n_requests} "
            f"requests: pass the batch of the forward that was captured"
        )
    return ri.cpu(), batch.seq_mask[ri].cpu()


def _s_real(batch, m: AttentionMap, n_rows: int | None = None) -> torch.Tensor:
    """(N, n_s_keys) bool: which S keys of ``m`` are real history events (the last n_s_keys positions)."""
    _, mask = _rows_of(batch, m.probs.shape[0] if n_rows is None else n_rows)
    length = mask.shape[1]
    if m.n_s_keys > length:
        raise ValueError(
            f"layer {m.layer} has {m.n_s_keys} S keys but the batch holds {length} history positions: "
            f"the maps come from another batch, or from the timestamp-agnostic merge ([SEP] tokens), "
            f"whose S-tokens are not the batch's events in order"
        )
    return mask[:, length - m.n_s_keys:]


def _check_layer0(maps: Sequence[AttentionMap], batch) -> None:
    for m in maps:
        if m.layer == 0 and m.n_s_keys != batch.seq_len:
            raise ValueError(
                f"layer 0 has {m.n_s_keys} S-tokens but the batch {batch.seq_len} events: the timestamp-agnostic "
                f"merge adds [SEP] tokens and regroups events, so S positions are not events; these helpers "
                f"need the timestamp-aware merge (the default)"
            )


def _n_visible(s_real: torch.Tensor, n_ns: int, causal: bool = True) -> torch.Tensor:
    """(N, n_ns): keys NS query j may see: the real S keys and NS-tokens 0..j (all of them if not causal)."""
    n_real = s_real.sum(1, keepdim=True)  # (N, 1)
    ns_seen = torch.arange(1, n_ns + 1) if causal else torch.full((n_ns,), n_ns)
    return (n_real + ns_seen[None, :]).float()


# ----------------------------------------------------------------------------------------------
# numbers: where the NS-tokens look


def ns_query_mass(maps: Sequence[AttentionMap], batch, layers=None) -> pd.DataFrame:
    """How each NS query splits its attention: real history events, NS-tokens, padding.

    One row per (layer, head, row, NS query) with ``s_mass`` + ``ns_mass`` + ``pad_mass`` = 1 (``pad_mass``
    is 0 when the mask works). ``row`` is the candidate (full forward).
    """
    out = []
    for m in _select(maps, layers):
        real = _s_real(batch, m)  # (N, Ls)
        p = m.probs[:, :, m.n_s_queries:].float().cpu()  # (N, H, n_ns, Ls + n_ns)
        p_s = p[..., : m.n_s_keys]
        s_mass = (p_s * real[:, None, None, :]).sum(-1)  # (N, H, n_ns)
        pad_mass = (p_s * ~real[:, None, None, :]).sum(-1)
        ns_mass = p[..., m.n_s_keys:].sum(-1)
        n, h, q = s_mass.shape
        idx = np.indices((n, h, q)).reshape(3, -1)
        out.append(pd.DataFrame({
            "layer": m.layer, "head": idx[1], "row": idx[0], "ns_query": idx[2],
            "s_mass": s_mass.reshape(-1).numpy(), "ns_mass": ns_mass.reshape(-1).numpy(),
            "pad_mass": pad_mass.reshape(-1).numpy(),
        }))
    return pd.concat(out, ignore_index=True)


def ns_to_s_table(maps: Sequence[AttentionMap], batch, *, layers=None, by_head: bool = False, match=None,
                  schema=None, causal: bool = True) -> pd.DataFrame:
    """One row per (layer, [head,] candidate, real history event that is a key at that layer).

    Columns:

    - ``layer``, ``head`` (with ``by_head``), ``row`` (the candidate, a row of the maps), ``request`` (its row
      in the batch's requests), ``request_id`` (the dataset's id: unique across batches);
    - ``position`` (S-token index at layer 0), ``distance`` (events back from the newest; 0 = newest),
      ``n_events`` (real S keys of the row at this layer);
    - ``behaviour``: the event's sequence (``seq_type``; the schema's sequence names when ``schema`` is given),
      then every event field of ``batch.seq`` (ids), and ``match`` when a ``(N, L)`` bool tensor is given
      (e.g. ``feature_match``);
    - ``mass``: the attention probability of this key, averaged over the NS queries (and over heads unless
      ``by_head``): the share of an average NS-token's attention that this event receives;
    - ``uniform``: what an evenly spread NS query would give it (mean over NS queries of ``1 / n_visible``);
      ``lift = mass / uniform``.

    Over the events of one row, ``mass`` sums to the NS->S share of ``ns_query_mass`` (averaged over queries).
    """
    _check_layer0(maps, batch)
    out = []
    for m in _select(maps, layers):
        n_rows = m.probs.shape[0]
        ri, mask = _rows_of(batch, n_rows)
        length = mask.shape[1]
        real = _s_real(batch, m)  # (N, Ls)
        ls = m.n_s_keys
        p = m.probs[:, :, m.n_s_queries:, :ls].float().cpu()  # (N, H, n_ns, Ls): NS queries -> S keys
        mass = p.mean(2)  # (N, H, Ls)
        if not by_head:
            mass = mass.mean(1, keepdim=True)  # (N, 1, Ls)
        uniform = (1.0 / _n_visible(real, m.n_ns, causal)).mean(1)  # (N,)
        rows, cols = real.nonzero(as_tuple=True)  # real events, (E,) each
        pos = cols + (length - ls)  # layer-0 positions
        base = {
            "layer": m.layer,
            "row": rows.numpy().astype(np.int32),
            "request": ri[rows].numpy().astype(np.int32),
            "request_id": batch.request_id.cpu()[ri[rows]].numpy(),
            "position": pos.numpy().astype(np.int32),
            "distance": (length - 1 - pos).numpy().astype(np.int32),
            "n_events": real.sum(1)[rows].numpy().astype(np.int32),
        }
        st = batch.seq_type.cpu()[ri][:, length - ls:][rows, cols].numpy()
        if schema is not None:
            names = np.array(["(padding)"] + [s.name for s in schema.sequences], dtype=object)
            base["behaviour"] = pd.Categorical(names[st], categories=list(names[1:]))
        else:
            base["behaviour"] = st.astype(np.int16)
        for name, ids in batch.seq.items():
            base[name] = ids.cpu()[ri][:, length - ls:][rows, cols].numpy()
        if match is not None:
            mt = torch.as_tensor(match).cpu()
            if tuple(mt.shape) != (n_rows, length):
                raise ValueError(f"match must be (N, L) = {(n_rows, length)} like the maps' rows, "
                                 f"got {tuple(mt.shape)}")
            base["match"] = mt[:, length - ls:][rows, cols].numpy().astype(bool)
        u = uniform[rows].numpy()
        heads = range(mass.shape[1])
        for h in heads:
            d = dict(base)
            if by_head:
                d = {"layer": d.pop("layer"), "head": h, **d}
            mh = mass[:, h][rows, cols].numpy()
            d.update(mass=mh, uniform=u, lift=mh / u)
            out.append(pd.DataFrame(d))
    return pd.concat(out, ignore_index=True)


def recency_bucket(distance, bins: Sequence[int] = RECENCY_BINS) -> pd.Categorical:
    """Label each distance with its bucket: edges ``bins`` give ``[0, b0) [b0, b1) ... [b_last, inf)``.

    >>> list(recency_bucket([0, 1, 2, 3, 4, 200], (1, 2, 4)))
    ['0', '1', '2-3', '2-3', '4+', '4+']
    """
    edges = [0, *bins]
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"recency bins must be increasing positive integers, got {tuple(bins)}")
    labels = [str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:])] + [f"{edges[-1]}+"]
    idx = np.searchsorted(np.asarray(bins), np.asarray(distance), side="right")
    return pd.Categorical(np.asarray(labels, dtype=object)[idx], categories=labels, ordered=True)


def _group_keys(table: pd.DataFrame, by) -> list[str]:
    by = [by] if isinstance(by, str) else list(by or [])
    missing = [c for c in by if c not in table.columns]
    if missing:
        raise ValueError(f"columns {missing} are not in the table (columns: {list(table.columns)})")
    return by + ["layer"] + (["head"] if "head" in table.columns else [])


def _summarize(table: pd.DataFrame, outer: list[str], column: str) -> pd.DataFrame:
    t = table.assign(_uw=table["uniform"])
    g = t.groupby(outer + [column], observed=True)
    out = g.agg(events=("mass", "size"), mass_per_event=("mass", "mean"), lift=("lift", "mean"),
                _mass=("mass", "sum"), _uniform=("_uw", "sum")).reset_index()
    tot = t.groupby(outer, observed=True).agg(_mt=("mass", "sum"), _ut=("_uw", "sum")).reset_index()
    out = out.merge(tot, on=outer, how="left")
    out["share"] = out["_mass"] / out["_mt"]
    out["uniform_share"] = out["_uniform"] / out["_ut"]
    return out.drop(columns=["_mass", "_uniform", "_mt", "_ut"])


def attention_by_recency(table_or_maps, batch=None, bins: Sequence[int] = RECENCY_BINS, by=None,
                         **table_kw) -> pd.DataFrame:
    """NS->S attention by distance from the newest event, per layer (and head, and ``by`` columns).

    Takes an ``ns_to_s_table`` (several batches' tables may be concatenated, e.g. with a ``model`` column
    passed as ``by="model"``) or ``(maps, batch)``. One row per (by..., layer, [head,] bucket) with

    - ``events``: events in the bucket; ``mass_per_event``: their mean ``mass``;
    - ``share``: the bucket's share of all NS->S attention mass of the group (sum over events and rows);
    - ``uniform_share``: the same share if every NS query attended uniformly (the length-only baseline);
    - ``lift``: mean lift of the bucket's events (1 = uniform).
    """
    if isinstance(table_or_maps, pd.DataFrame):
        table = table_or_maps
    else:
        table = ns_to_s_table(table_or_maps, batch, **table_kw)
    outer = _group_keys(table, by)
    t = table.assign(bucket=recency_bucket(table["distance"], bins))
    out = _summarize(t, outer, "bucket")
    edges = np.array([0, *bins, np.inf])
    code = out["bucket"].cat.codes.to_numpy()
    out.insert(out.columns.get_loc("bucket") + 1, "lo", edges[code].astype(int))
    out.insert(out.columns.get_loc("lo") + 1, "hi", edges[code + 1])  # exclusive; inf for the last bucket
    return out


def attention_by_group(table: pd.DataFrame, column: str, by=None) -> pd.DataFrame:
    """NS->S attention by an event attribute (``behaviour``, ``match``, a field id...), per layer.

    Same columns as ``attention_by_recency`` with ``column`` in place of the bucket.
    """
    if column not in table.columns:
        raise ValueError(f"column {column!r} is not in the table (columns: {list(table.columns)})")
    return _summarize(table, _group_keys(table, by), column)


def attention_by_distance(table: pd.DataFrame, column: str | None = None, by=None,
                          max_distance: int | None = None) -> pd.DataFrame:
    """NS->S attention per single distance from the newest event (0, 1, 2, ...), per layer, optionally split
    by an event attribute ``column`` (e.g. ``match``): the numbers behind ``lift_heatmap``.

    Same columns as ``attention_by_group`` with ``distance`` as the group (``share`` and ``uniform_share`` are
    shares within each (by..., column, layer) group); ``max_distance`` keeps distances up to it (inclusive).
    """
    outer = [column] if column is not None else []
    if column is not None and column not in table.columns:
        raise ValueError(f"column {column!r} is not in the table (columns: {list(table.columns)})")
    t = table if max_distance is None else table[table["distance"] <= max_distance]
    return _summarize(t, outer + _group_keys(t, by), "distance")


def recent_share(table: pd.DataFrame, k: int = 16, by=None) -> pd.DataFrame:
    """Per layer: the share of NS->S attention mass on the ``k`` most recent events (``share``) and what
    uniform attention would give (``uniform_share``)."""
    df = attention_by_recency(table, bins=(k,), by=by)
    return df[df["lo"] == 0].drop(columns=["bucket", "lo", "hi"]).reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# numbers: S-to-S


def s_to_s_by_offset(maps: Sequence[AttentionMap], batch, layers=None, max_offset: int | None = 32) -> pd.DataFrame:
    """Causal S->S attention by offset (query position - key position; 0 = itself, 1 = the event before).

    Real S queries and real keys only, heads averaged. One row per (layer, offset) with ``prob`` (mean
    probability), ``lift`` (mean of prob x n_visible, where n_visible = real keys up to the query) and
    ``pairs`` (how many (query, key) pairs). Layers without S queries (the top) are skipped.
    """
    _check_layer0(maps, batch)
    out = []
    for m in _select(maps, layers):
        nq, ls = m.n_s_queries, m.n_s_keys
        if nq == 0:
            continue
        real = _s_real(batch, m)  # (N, Ls)
        p = m.probs[:, :, :nq, :ls].float().cpu().mean(1)  # (N, nq, Ls), heads averaged
        q_pos = torch.arange(ls - nq, ls)
        off = q_pos[:, None] - torch.arange(ls)[None, :]  # (nq, Ls)
        real_q = real[:, ls - nq:]  # (N, nq)
        n_vis = (real.cumsum(1)[:, ls - nq:]).float()  # (N, nq): real keys at or before the query
        valid = real_q[:, :, None] & real[:, None, :] & (off >= 0)[None]  # (N, nq, Ls)
        if max_offset is not None:
            valid &= (off <= max_offset)[None]
        o = off.expand_as(valid)[valid].numpy()
        pv = p[valid].numpy()
        lift = (p * n_vis[:, :, None])[valid].numpy()
        df = pd.DataFrame({"offset": o, "prob": pv, "lift": lift})
        g = df.groupby("offset").agg(prob=("prob", "mean"), lift=("lift", "mean"), pairs=("prob", "size")).reset_index()
        g.insert(0, "layer", m.layer)
        out.append(g)
    if not out:
        return pd.DataFrame(columns=["layer", "offset", "prob", "lift", "pairs"])
    return pd.concat(out, ignore_index=True)


# ----------------------------------------------------------------------------------------------
# numbers: the pyramid, and event attributes


@torch.no_grad()
def pyramid_kept(model, batch) -> pd.DataFrame:
    """What the pyramid keeps, layer by layer, for this batch's requests.

    One row per layer: ``s_keys`` (S-tokens in the layer's input: keys and values), ``s_queries`` (the most
    recent of them that issue queries and are kept for the next layer), ``ns_tokens``, and over the batch's
    requests the mean ``real_keys`` / ``real_kept`` (real events among them) and ``padding_kept`` (padding
    tokens kept because a history is shorter than the layer's count).
    """
    _, s_real, _ = model.tokenizer(batch)  # (R, L_S) bool, [SEP]s included
    s_real = s_real.cpu()
    ls = s_real.shape[1]
    rows, keys = [], ls
    for layer, n_q in enumerate(model.schedule(ls)):
        k_real = s_real[:, ls - keys:]
        q_real = s_real[:, ls - n_q:]
        rows.append({
            "layer": layer, "s_keys": keys, "s_queries": n_q, "ns_tokens": model.n_ns,
            "real_keys": float(k_real.sum(1).float().mean()), "real_kept": float(q_real.sum(1).float().mean()),
            "padding_kept": float((~q_real).sum(1).float().mean()),
        })
        keys = n_q
    return pd.DataFrame(rows)


def id_to_value(vocabs, name: str) -> np.ndarray:
    """``values[id]`` for a categorical feature: PAD -> None, OOV -> "(OOV)", then the fitted values.

    ``vocabs`` is ``RequestData.vocabs``; e.g. ``id_to_value(data.vocabs, "hist_rating")[ids]``.
    """
    voc = vocabs.by_name[name]
    if not hasattr(voc, "values"):
        raise ValueError(f"feature {name!r} is bucketized, not categorical: its ids are buckets, not values")
    return np.array([None, "(OOV)", *voc.values], dtype=object)


def feature_match(batch, vocabs, event_field: str = "hist_genre", ns_feature: str = "genres") -> torch.Tensor:
    """(B, L) bool: does history event ``l`` of the candidate's request have a value of ``event_field`` that
    is among the candidate's ``ns_feature`` values? Matched by VALUE (the two vocabularies differ), padding,
    PAD and OOV never match. E.g. on MovieLens: is the event's (first) genre one of the candidate's genres?
    Rows are the candidates, aligned with the full forward's attention maps (``ns_to_s_table(match=...)``).
    """
    ev_vals = id_to_value(vocabs, event_field)
    ns_vals = id_to_value(vocabs, ns_feature)
    ns_index = {v: i for i, v in enumerate(ns_vals) if i >= 2}
    # event id -> the ns feature's id of the same value (-1: no such value, PAD, OOV)
    lut = torch.tensor([ns_index.get(v, -1) if i >= 2 else -1 for i, v in enumerate(ev_vals)], dtype=torch.long)
    ri = batch.request_index.cpu()
    ev = lut[batch.seq[event_field].cpu()[ri].clamp(0, len(lut) - 1)]  # (B, L)
    cand = batch.ns[ns_feature].cpu()
    if cand.dim() == 1:
        cand = cand[:, None]  # (B, 1)
    cand = torch.where(cand >= 2, cand, torch.full_like(cand, -2))  # PAD/OOV values never match
    hit = (ev[:, :, None] == cand[:, None, :]).any(-1)  # (B, L)
    return hit & batch.seq_mask.cpu()[ri] & (ev >= 0)


# ----------------------------------------------------------------------------------------------
# pictures


def _axes(ax, figsize):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _row_probs(m: AttentionMap, row: int, head: int | None) -> np.ndarray:
    n, h = m.probs.shape[:2]
    if not 0 <= row < n:
        raise ValueError(f"row {row} out of range: the maps have {n} rows")
    if head is not None and not 0 <= head < h:
        raise ValueError(f"head {head} out of range: the maps have {h} heads")
    p = m.probs[row].float().cpu()  # (H, Q, K)
    return (p.mean(0) if head is None else p[head]).numpy()


LIFT_MAX = 3.0  # lift colour scales saturate here


def _color(scale: str, cmap: str | None, vmax: float | None, vmin: float | None = None):
    """(colormap, norm) of a heatmap: probabilities from 0 (sequential), or lift around 1 (diverging: blue =
    less than uniform, white = uniform, red = more; from ``vmin`` (default 0) to ``vmax`` (default LIFT_MAX))."""
    import matplotlib.colors as mcolors

    if scale == "lift":
        return _cmap(cmap or "RdBu_r"), mcolors.TwoSlopeNorm(vmin=vmin or 0.0, vcenter=1.0, vmax=vmax or LIFT_MAX)
    if scale in ("prob", "log"):
        return _cmap(cmap or "rocket_r"), None
    raise ValueError(f"scale must be 'prob', 'lift' (or 'log' for S->S), got {scale!r}")


def ns_to_s_heatmap(maps, layer: int, head: int | None = None, candidate: int = 0, batch=None, ax=None,
                    scale: str = "lift", cmap: str | None = None, vmax: float | None = None, xlim: int | None = None,
                    colorbar: bool = True, causal: bool = True):
    """Heatmap of one candidate's NS queries (rows) over the S keys of ``layer`` (columns, newest at the
    right, x = events back from the newest). ``head=None`` averages the heads. With ``batch``, padding keys are
    left out.

    ``scale="lift"`` (default) colours probability x n_visible (1 = what uniform attention gives, the same
    white in every layer and model, so panels compare); ``scale="prob"`` the raw probabilities. Returns the Axes.
    """
    m = get_map(maps, layer)
    p = _row_probs(m, candidate, head)[m.n_s_queries:, : m.n_s_keys]  # (n_ns, Ls)
    real = np.ones(m.n_s_keys, bool) if batch is None else _s_real(batch, m)[candidate].numpy()
    p = p[:, real]
    if scale == "lift":
        n_vis = _n_visible(torch.from_numpy(real)[None], m.n_ns, causal)[0].numpy()  # (n_ns,)
        p = p * n_vis[:, None]
    colors, norm = _color(scale, cmap, vmax)
    n_keys = p.shape[1]
    ax = _axes(ax, (8, 2.6))
    im = ax.imshow(p, aspect="auto", interpolation="nearest", cmap=colors, norm=norm,
                   vmin=None if norm else 0, vmax=None if norm else vmax,
                   extent=(-n_keys + 0.5, 0.5, m.n_ns - 0.5, -0.5))
    ax.set_xlim(-(xlim or n_keys) + 0.5, 0.5)
    ax.grid(False)
    _integer_ticks(ax.xaxis, nbins=5)
    ax.set_yticks(range(m.n_ns))
    ax.set_yticklabels([f"NS{j}" for j in range(m.n_ns)], fontsize=7)
    ax.set_xlabel("history event (0 = newest)")
    ax.set_title(f"layer {m.layer}, " + ("mean of heads" if head is None else f"head {head}"), fontsize=10)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.04, pad=0.01, label="lift" if scale == "lift" else "probability")
    return ax


def ns_to_s_grid(maps, batch=None, candidate: int = 0, layers=None, heads: bool = True, scale: str = "lift",
                 cmap: str | None = None, vmax: float | None = None, panel=(3.6, 2.0), colorbar: bool = True):
    """NS->S heatmaps of one candidate for every layer (rows) and head (columns, then their mean).
    All panels share the x axis (events back from the newest), so the pyramid's shrinking key window shows.
    With ``scale="lift"`` (default) all panels share one colour scale (and one colour bar, at the right); with
    ``scale="prob"`` each panel has its own scale and its own colour bar. Returns the Figure."""
    import matplotlib.pyplot as plt

    sel = _select(maps, layers)
    n_heads = sel[0].probs.shape[1]
    cols = [*range(n_heads), None] if heads else [None]
    widest = max(m.n_s_keys if batch is None else int(_s_real(batch, m)[candidate].sum()) for m in sel)
    fig, axes = plt.subplots(len(sel), len(cols), figsize=(panel[0] * len(cols) + 0.8, panel[1] * len(sel)),
                             squeeze=False, sharex=True)
    for i, m in enumerate(sel):
        for j, h in enumerate(cols):
            ax = axes[i, j]
            ns_to_s_heatmap(maps, m.layer, h, candidate, batch, ax=ax, scale=scale, cmap=cmap, vmax=vmax,
                            xlim=max(widest, 1), colorbar=colorbar and scale != "lift")
            if j:
                ax.set_yticklabels([])
            if i < len(sel) - 1:
                ax.set_xlabel("")
    fig.tight_layout(rect=(0, 0, 1 - 0.6 / fig.get_figwidth(), 1))
    if colorbar and scale == "lift":
        cax = fig.add_axes((1 - 0.5 / fig.get_figwidth(), 0.15, 0.12 / fig.get_figwidth(), 0.7))
        fig.colorbar(axes[0, 0].images[0], cax=cax, label="lift (1 = uniform)")
    return fig


def s_to_s_heatmap(maps, layer: int, head: int | None = None, candidate: int = 0, batch=None, ax=None,
                   scale: str = "lift", cmap: str | None = None, vmax: float | None = None, colorbar: bool = True):
    """Heatmap of the S queries of ``layer`` over its S keys for one row (lower-triangular: causal).
    With ``batch``, padding queries and keys are left out. ``scale``: "lift" (default: probability x the
    number of real keys the query sees; 1 = uniform), "prob", or "log" (log10 probability). Returns the Axes."""
    m = get_map(maps, layer)
    if m.n_s_queries == 0:
        raise ValueError(f"layer {m.layer} has no S queries (the top layer keeps only the NS-tokens)")
    p = _row_probs(m, candidate, head)[: m.n_s_queries, : m.n_s_keys]  # (nq, Ls)
    ls, nq = m.n_s_keys, m.n_s_queries
    k_real = np.ones(ls, bool) if batch is None else _s_real(batch, m)[candidate].numpy()
    if scale == "lift":
        p = p * np.cumsum(k_real)[ls - nq:][:, None]  # x real keys at or before each query
    q_real = k_real[ls - nq:]
    p = p[q_real][:, k_real]
    colors, norm = _color(scale, cmap, vmax)
    ax = _axes(ax, (5, 4.5))
    causal = np.tril(np.ones(p.shape, bool), k=p.shape[1] - p.shape[0])  # real keys at or before each real query
    shown = np.where(causal, p, np.nan)
    if scale == "log":
        shown = np.log10(np.where(shown > 0, shown, np.nan))
    im = ax.imshow(shown, interpolation="nearest", cmap=colors, norm=norm, aspect="auto",
                   vmax=None if norm else vmax)
    ax.grid(False)
    _integer_ticks(ax.xaxis, ax.yaxis)
    n_k, n_q = p.shape[1], p.shape[0]
    ax.set_xlabel(f"S keys ({n_k} real events, oldest left)")
    ax.set_ylabel(f"S queries ({n_q}, the most recent)")
    what = {"lift": "lift", "prob": "probability", "log": "log10 probability"}[scale]
    ax.set_title(f"S->S, layer {m.layer}, " + ("mean of heads" if head is None else f"head {head}") + f" ({what})",
                 fontsize=10)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.04, pad=0.01, label=what)
    return ax


def attention_mask_plot(maps, layer: int = 0, candidate: int = 0, batch=None, ax=None, probs: bool = True,
                        causal: bool = True, cmap: str = "rocket_r", colorbar: bool = True):
    """The whole (Q, K) picture of one row at ``layer``: cells the mask forbids in light grey, allowed cells
    coloured by the probability (heads averaged, with a colour bar; ``probs=False``: one colour, no bar), lines
    between S and NS. Without ``batch`` every S key counts as real. Returns the Axes."""
    import matplotlib.colors as mcolors

    m = get_map(maps, layer)
    real = (torch.ones(1, m.n_s_keys, dtype=torch.bool) if batch is None
            else _s_real(batch, m)[candidate: candidate + 1])
    allowed = attention_mask(real, m.n_s_queries, m.n_ns, causal=causal)[0, 0].numpy()  # (Q, K)
    ax = _axes(ax, (6, 5))
    ax.imshow(np.where(allowed, np.nan, 1.0), cmap=mcolors.ListedColormap(["0.9"]), interpolation="nearest",
              aspect="auto", vmin=0, vmax=1)
    val = _row_probs(m, candidate, None) if probs else np.ones_like(allowed, dtype=float)
    # colour scale: up to the 99th percentile of the allowed cells, so that the few queries that see one key only
    # (padding, the first real event: probability 1 on themselves) do not wash out everything else
    vmax = float(np.quantile(val[allowed], 0.99)) if probs else 1.0
    im = ax.imshow(np.where(allowed, val, np.nan), cmap=_cmap(cmap) if probs else mcolors.ListedColormap(["tab:blue"]),
                   interpolation="nearest", aspect="auto", vmin=0, vmax=vmax)
    ax.grid(False)
    _integer_ticks(ax.xaxis, ax.yaxis)
    ax.axvline(m.n_s_keys - 0.5, color="k", lw=1)
    ax.axhline(m.n_s_queries - 0.5, color="k", lw=1)
    ax.set_xlabel(f"keys: {m.n_s_keys} S | {m.n_ns} NS")
    ax.set_ylabel(f"queries: {m.n_s_queries} S | {m.n_ns} NS")
    ax.set_title(f"layer {m.layer}: mask (grey = forbidden)" + (" and probabilities" if probs else ""), fontsize=10)
    if colorbar and probs:
        # the arrow (extend="max"): the scale is capped at the 99th percentile of the allowed cells
        ax.figure.colorbar(im, ax=ax, fraction=0.04, pad=0.01, label="probability", extend="max")
    return ax


def lift_heatmap(df: pd.DataFrame, column: str, layer: int = 0, ax=None, cmap: str | None = None,
                 vmin: float | None = None, vmax: float | None = None, colorbar: bool = True, label=None):
    """``attention_by_distance(table, column)`` drawn for one layer: one row per value of ``column`` (e.g.
    ``match`` False / True), one column per distance from the newest event (0 at the left), coloured by the mean
    lift (white = uniform attention, red = more, blue = less; ``vmin`` < 1 < ``vmax`` narrow the scale to show
    small effects, values beyond them take the end colours). ``label`` maps row values to names. Returns the
    Axes."""
    if "head" in df.columns:
        df = df.groupby([column, "layer", "distance"], observed=True)[["lift"]].mean().reset_index()
    g = df[df["layer"] == layer]
    if g.empty:
        raise ValueError(f"no rows of layer {layer} (layers: {sorted(df['layer'].unique())})")
    grid = g.pivot_table(index=column, columns="distance", values="lift", observed=True)
    grid = grid.reindex(columns=range(int(g["distance"].max()) + 1))  # distances no event had: blank
    colors, norm = _color("lift", cmap, vmax, vmin)
    ax = _axes(ax, (8, 0.5 * len(grid) + 1.2))
    im = ax.imshow(grid.to_numpy(), aspect="auto", interpolation="nearest", cmap=colors, norm=norm)
    ax.grid(False)
    ax.set_yticks(range(len(grid)))
    ax.set_yticklabels([str(label(v) if callable(label) else (label or {}).get(v, v)) for v in grid.index], fontsize=8)
    _integer_ticks(ax.xaxis)
    ax.set_xlabel("history event (0 = newest)")
    ax.set_title(f"layer {layer}: mean lift by distance and {column}", fontsize=10)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.04, pad=0.01, label="lift",
                           extend="both" if vmin is not None or vmax is not None else "neither")
    return ax


def pyramid_kept_plot(model, batch, request: int = 0, ax=None):
    """What the pyramid keeps for one request: layers bottom to top (rows) over the token positions
    (columns, oldest left, NS-tokens at the right). Colours: kept (issues a query, passed up), key only
    (read by the layer's queries, then dropped), gone; paler where the token is padding. Returns the Axes."""
    import matplotlib.colors as mcolors
    from matplotlib.patches import Patch

    with torch.no_grad():
        _, s_real, _ = model.tokenizer(batch)
    real = s_real[request].cpu().numpy()  # (L_S,)
    ls, n_ns = len(real), model.n_ns
    sched = model.schedule(ls)
    grid = np.zeros((len(sched), ls + n_ns), dtype=int)  # 0 gone, 1 key only, 2 kept; +3 on padding
    keys = ls
    for layer, n_q in enumerate(sched):
        grid[layer, ls - keys: ls] = 1
        grid[layer, ls - n_q: ls] = 2
        grid[layer, ls:] = 2
        keys = n_q
    pad = np.r_[~real, np.zeros(n_ns, bool)]
    grid = np.where(pad[None, :] & (grid > 0), grid + 2, grid)  # 3 key-only padding, 4 kept padding
    colors = ["white", "tab:orange", "tab:blue", "#f6d5b5", "#bcd4ea"]
    ax = _axes(ax, (10, 0.6 * len(sched) + 1.4))
    ax.imshow(grid, cmap=mcolors.ListedColormap(colors), vmin=-0.5, vmax=4.5, aspect="auto", interpolation="nearest",
              origin="lower")
    ax.axvline(ls - 0.5, color="k", lw=1)
    _integer_ticks(ax.xaxis)
    ax.set_yticks(range(len(sched)))
    ax.set_yticklabels([f"layer {i}: {q} S + {n_ns} NS queries" for i, q in enumerate(sched)], fontsize=8)
    ax.set_xlabel(f"token position: {ls} S (oldest left, {int(real.sum())} real) | {n_ns} NS")
    handles = [Patch(color=c, label=lab) for c, lab in zip(colors[1:], ["key only (dropped after)", "kept (query)",
                                                                         "padding, key only", "padding, kept"])]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.5), ncol=4, frameon=False, fontsize=8)
    ax.grid(False)
    ax.set_title(f"what the pyramid keeps (request {request})", fontsize=10)
    return ax


def recency_plot(df: pd.DataFrame, y: str = "lift", hue: str | None = None, uniform: bool = True, panel=(4.2, 3.2)):
    """``attention_by_recency`` output drawn per layer (one panel each): ``y`` against the recency bucket,
    one line per ``hue`` value (e.g. a ``model`` column). For ``y="share"`` the uniform share is drawn dashed;
    for ``y="lift"`` a line at 1. Returns the Figure."""
    import matplotlib.pyplot as plt

    if "head" in df.columns:
        df = df.groupby([c for c in df.columns if c in (hue, "layer", "bucket")], observed=True)[
            ["share", "uniform_share", "lift"]].mean().reset_index()
    layers = sorted(df["layer"].unique())
    fig, axes = plt.subplots(1, len(layers), figsize=(panel[0] * len(layers), panel[1]), squeeze=False, sharey=True)
    groups = [(None, df)] if hue is None else list(df.groupby(hue, sort=False, observed=True))
    for ax, layer in zip(axes[0], layers):
        for k, (name, g) in enumerate(groups):
            g = g[g["layer"] == layer].sort_values("bucket")
            x = g["bucket"].astype(str).to_numpy()
            ax.plot(x, g[y], marker="o", label=None if name is None else str(name), color=f"C{k}")
            if uniform and y == "share":
                ax.plot(x, g["uniform_share"], ls="--", color=f"C{k}", alpha=0.6)
        if uniform and y == "lift":
            ax.axhline(1.0, color="0.4", lw=1, ls="--")
        ax.set(title=f"layer {layer}", xlabel="events back from the newest")
        ax.tick_params(axis="x", labelrotation=45)
    axes[0, 0].set_ylabel({"lift": "lift (1 = uniform)", "share": "share of NS->S mass"}.get(y, y))
    if hue is not None:
        axes[0, -1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def group_plot(df: pd.DataFrame, column: str, y: str = "lift", hue: str | None = None, panel=(3.2, 3.0)):
    """``attention_by_group`` output as bars per layer (one panel each): ``y`` per value of ``column``, one
    bar colour per ``hue`` value. Returns the Figure."""
    import matplotlib.pyplot as plt

    if "head" in df.columns:
        df = df.groupby([c for c in df.columns if c in (hue, "layer", column)], observed=True)[[y]].mean().reset_index()
    layers = sorted(df["layer"].unique())
    fig, axes = plt.subplots(1, len(layers), figsize=(panel[0] * len(layers), panel[1]), squeeze=False, sharey=True)
    values = list(pd.unique(df[column]))
    hues = [None] if hue is None else list(pd.unique(df[hue]))
    width = 0.8 / len(hues)
    for ax, layer in zip(axes[0], layers):
        for k, hv in enumerate(hues):
            g = df[df["layer"] == layer] if hv is None else df[(df["layer"] == layer) & (df[hue] == hv)]
            ys = [g.loc[g[column] == v, y].mean() for v in values]
            ax.bar(np.arange(len(values)) + (k - (len(hues) - 1) / 2) * width, ys, width, color=f"C{k}",
                   label=None if hv is None else str(hv))
        if y == "lift":
            ax.axhline(1.0, color="0.4", lw=1, ls="--")
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels([str(v) for v in values])
        ax.set(title=f"layer {layer}", xlabel=column)
    axes[0, 0].set_ylabel({"lift": "lift (1 = uniform)"}.get(y, y))
    if hue is not None:
        axes[0, -1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def learning_curves(history: dict, task: str | None = None, metric: str = "auc"):
    """Training loss and a validation metric per epoch from ``train()``'s history. Returns the Figure."""
    import matplotlib.pyplot as plt

    eps = history.get("epochs", [])
    if not eps:
        raise ValueError("the history has no epochs (train() returns {'epochs': [...], ...})")
    x = [e["epoch"] for e in eps]
    task = task or next(iter(eps[0].get("val", {}) or {"": None}))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    axes[0].plot(x, [e["train_loss"] for e in eps], marker="o")
    axes[0].set(xlabel="epoch", ylabel="train loss", title="training loss")
    vals = [e.get("val", {}).get(task, {}).get(metric, np.nan) for e in eps]
    axes[1].plot(x, vals, marker="o", color="C1")
    best = history.get("best_epoch")
    if best:
        axes[1].axvline(best, color="0.5", ls="--", lw=1)
    axes[1].set(xlabel="epoch", ylabel=f"validation {metric.upper()}", title=f"validation {task} {metric.upper()}")
    for ax in axes:
        ax.set_xticks(x)
    fig.tight_layout()
    return fig


def _integer_ticks(*axes, nbins="auto") -> None:
    from matplotlib.ticker import MaxNLocator

    for a in axes:
        a.set_major_locator(MaxNLocator(nbins=nbins, integer=True))


def _cmap(name: str):
    """A matplotlib colormap; seaborn's names (e.g. "rocket_r") when seaborn is installed, else viridis."""
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        try:
            import seaborn as sns

            return sns.color_palette(name, as_cmap=True)
        except (ImportError, ValueError):
            return matplotlib.colormaps["viridis"]
