"""An offline, seeded e-commerce world whose true click and purchase probabilities are known.

Users have features (age group, gender, region), a latent taste vector and a current *intent*
category that drifts between requests. Items have a category, a brand, a price and a latent vector.
Each request shows a user ``candidates`` items (half from the current intent, half from the whole
catalogue); each candidate is clicked, carted and purchased with probabilities that depend on

1. user and item features and their interaction (age group x category, gender x price),
2. the user-item latent match,
3. the RECENT behaviour sequence: how many of the last events share the candidate's category,
   weighted by behaviour (purchase > cart > click) and by recency, plus the hidden intent that the
   recent sequence reveals.

so a model needs both the feature track and the sequence track. Clicked candidates become history
events of type ``click``, ``cart`` or ``purchase``, interleaved on one timeline. Every candidate keeps
its true probabilities (``prob_click``, ``prob_purchase``): their AUC on the test split is the best
any model can reach (the oracle).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import DATA_PRESETS, DataConfig
from ..features import Bucketized, Categorical, HistoryStat, RequestStat, Schema, SequenceSpec, Task, TrainingStat
from .download import cache_dir
from .movielens import GAP_BOUNDARIES
from .requests import DataError, RequestData, build_requests, cached


@dataclass(frozen=True)
class SyntheticSize:
    n_users: int
    n_items: int
    n_requests: int  # per user
    candidates: int  # per request
    n_categories: int = 20
    n_brands: int = 50
    latent_dim: int = 8
    memory: int = 20  # recent events that drive the sequence effect


SIZES = {
    "tiny": SyntheticSize(n_users=64, n_items=200, n_requests=12, candidates=8, n_categories=8, n_brands=10),
    "small": SyntheticSize(n_users=400, n_items=1000, n_requests=24, candidates=16),
    "default": SyntheticSize(n_users=1000, n_items=2000, n_requests=32, candidates=16),
    # scale: about 1M and 10M interactions (the same world, more users and items)
    "1m": SyntheticSize(n_users=2000, n_items=4000, n_requests=32, candidates=16),
    "10m": SyntheticSize(n_users=20000, n_items=20000, n_requests=32, candidates=16),
}

BEHAVIOUR_WEIGHT = {"purchase": 2.0, "cart": 1.5, "click": 1.0}
PRICE_BOUNDARIES = (5.0, 10.0, 20.0, 40.0, 80.0, 160.0)

SYNTHETIC_SCHEMA = Schema(
    ns_features=(
        Categorical("user_id", "user", group="user_id", column="user"),
        Categorical("age_group", "user"),
        Categorical("gender", "user"),
        Categorical("region", "user"),
        Categorical("item_id", "item", group="item_id", column="item"),
        Categorical("category", "item"),
        Categorical("brand", "item"),
        Bucketized("price", "item", boundaries=PRICE_BOUNDARIES),
        Categorical("hour", "context"),
        Categorical("weekday", "context"),
        Bucketized("gap_since_last", "context", boundaries=GAP_BOUNDARIES, log=True),
        # statistics, without leakage (data/statistics.py): rates in the training split (out of fold for
        # training rows) and how much of the request's history shares the candidate's category
        TrainingStat("item_click_rate", key="item", mean_of="click"),
        TrainingStat("item_purchase_rate", key="item", mean_of="purchase"),
        TrainingStat("user_click_rate", key="user", mean_of="click"),
        TrainingStat("user_category_click_rate", key=("user", "category"), mean_of="click"),
        HistoryStat("category_n", match="category"),
        HistoryStat("category_recent", match="category", window=20),
        # the candidate list itself: half of it comes from the user's current intent (``generate``), which no
        # history reveals after the intent switches; a ranker knows its candidate list before scoring it
        RequestStat("request_category_share", match="category"),
    ),
    event_fields=(
        Categorical("hist_item", "event", column="item", vocab_of="item_id"),
        Categorical("hist_category", "event", column="category", vocab_of="category"),
        Bucketized("hist_price", "event", column="price", boundaries=PRICE_BOUNDARIES),
        Bucketized("hist_gap", "event", column="gap_prev", boundaries=GAP_BOUNDARIES, log=True),
    ),
    # the paper's intent order for the timestamp-agnostic merge: purchase, then cart, then click
    sequences=(SequenceSpec("purchase", ("purchase",)), SequenceSpec("cart", ("cart",)), SequenceSpec("click", ("click",))),
    tasks=(Task("click", "click"), Task("purchase", "purchase")),
)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


# the terms of the click logit, in the order they are summed (``generate(..., with_terms=True)``)
CLICK_TERMS = ("item", "age_x_category", "latent_match", "sequence", "intent")


def generate(size: SyntheticSize | str = "tiny", seed: int = 0,
             with_terms: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(interactions, users, items) of a synthetic world. Same size and seed, same tables. With
    ``with_terms`` the interactions also hold each term of the click logit (``term_<name>`` for the names
    in ``CLICK_TERMS``; their sum plus the bias -1.6 is the logit of ``prob_click``): what the signal is made of."""
    s = SIZES[size] if isinstance(size, str) else size
    rng = np.random.default_rng(seed)
    U, I, K, C, D, M = s.n_users, s.n_items, s.n_categories, s.candidates, s.latent_dim, s.memory

    # ---- the world -----------------------------------------------------------------------------
    cat_vec = rng.normal(size=(K, D))
    item_cat = rng.integers(K, size=I)
    item_vec = cat_vec[item_cat] + 0.7 * rng.normal(size=(I, D))
    item_pop = rng.normal(0.0, 0.5, size=I)
    item_brand = rng.integers(s.n_brands, size=I)
    brand_effect = rng.normal(0.0, 0.3, size=s.n_brands)
    item_price = np.round(np.exp(rng.normal(3.0, 1.0, size=I)), 2)
    price_bucket = np.searchsorted(PRICE_BOUNDARIES, item_price)
    user_age = rng.integers(6, size=U)
    user_gender = rng.integers(2, size=U)
    user_region = rng.integers(10, size=U)
    user_vec = rng.normal(size=(U, D))
    age_x_cat = rng.normal(0.0, 0.6, size=(6, K))  # user feature x item feature interaction
    gender_x_price = rng.normal(0.0, 0.4, size=(2, len(PRICE_BOUNDARIES) + 1))
    taste = user_vec @ cat_vec.T / np.sqrt(D)  # (U, K)
    pref = np.exp(1.5 * taste)
    pref /= pref.sum(1, keepdims=True)  # each user's distribution of intents
    items_by_cat = [np.flatnonzero(item_cat == k) for k in range(K)]

    def sample_intent(users):
        u = rng.random(len(users))[:, None]
        return (u > np.cumsum(pref[users], axis=1)).sum(1).clip(max=K - 1)

    intent = sample_intent(np.arange(U))
    hist_cat = np.full((U, M), -1)  # recent history ring, newest last
    hist_w = np.zeros((U, M))
    decay = 0.85 ** np.arange(M)[::-1]  # (M,) newest event weighs 1
    t = 1.6e9 + rng.uniform(0, 30 * 86400, size=U)

    rows = []
    for k in range(s.n_requests):
        switch = rng.random(U) < 0.3
        intent = np.where(switch, sample_intent(np.arange(U)), intent)
        # candidates: half from the intent category, half from the whole catalogue
        n_int = C // 2
        from_intent = np.stack([rng.choice(items_by_cat[c], size=n_int) if len(items_by_cat[c]) else rng.integers(I, size=n_int) for c in intent])
        cand = np.concatenate([from_intent, rng.integers(I, size=(U, C - n_int))], axis=1)  # (U, C)
        cc = item_cat[cand]  # (U, C)
        seq = ((hist_cat[:, None, :] == cc[:, :, None]) * (hist_w * decay)[:, None, :]).sum(-1)  # (U, C)
        latent = (user_vec[:, None, :] * item_vec[cand]).sum(-1) / np.sqrt(D)
        terms = {  # each (U, C); see CLICK_TERMS
            "item": item_pop[cand] + brand_effect[item_brand[cand]],
            "age_x_category": age_x_cat[user_age[:, None], cc],
            "latent_match": 0.6 * latent,
            "sequence": 0.5 * np.tanh(seq),
            "intent": 0.8 * (cc == intent[:, None]),
        }
        z_click = -1.6 + sum(terms[name] for name in CLICK_TERMS)
        p_click = _sigmoid(z_click)
        p_buy = _sigmoid(-1.0 + 0.6 * np.tanh(seq) + gender_x_price[user_gender[:, None], price_bucket[cand]] + 0.4 * latent)
        click = rng.random((U, C)) < p_click
        buy = click & (rng.random((U, C)) < p_buy)
        cart = click & (buy | (rng.random((U, C)) < 0.3))
        behaviour = np.where(buy, "purchase", np.where(cart, "cart", np.where(click, "click", "impression")))
        for j in range(C):
            rows.append(pd.DataFrame({
                "user": np.arange(U), "item": cand[:, j], "timestamp": np.floor(t), "click": click[:, j].astype(np.int8),
                "purchase": buy[:, j].astype(np.int8), "behaviour": behaviour[:, j],
                "prob_click": p_click[:, j], "prob_purchase": p_click[:, j] * p_buy[:, j], "_k": k, "_j": j,
                **({f"term_{name}": terms[name][:, j] for name in CLICK_TERMS} if with_terms else {}),
            }))
        # append this request's clicked items to each user's recent history (newest last)
        w_new = np.where(buy, BEHAVIOUR_WEIGHT["purchase"], np.where(cart, BEHAVIOUR_WEIGHT["cart"], np.where(click, 1.0, 0.0)))
        all_cat = np.concatenate([hist_cat, np.where(click, cc, -1)], axis=1)  # (U, M + C)
        all_w = np.concatenate([hist_w, w_new], axis=1)
        valid = all_w > 0
        order = np.argsort(~valid, axis=1, kind="stable")  # valid entries first, in time order
        n_valid = valid.sum(1)
        take = (n_valid[:, None] - M + np.arange(M)[None, :])  # the last M valid entries
        ok = take >= 0
        idx = np.take_along_axis(order, take.clip(min=0), axis=1)
        hist_cat = np.where(ok, np.take_along_axis(all_cat, idx, axis=1), -1)
        hist_w = np.where(ok, np.take_along_axis(all_w, idx, axis=1), 0.0)
        t = t + 600 + rng.exponential(8 * 3600, size=U)

    inter = pd.concat(rows, ignore_index=True).sort_values(["user", "_k", "_j"], kind="mergesort")
    inter = inter.drop(columns=["_k", "_j"]).reset_index(drop=True)
    users = pd.DataFrame({"user": np.arange(U), "age_group": user_age, "gender": np.where(user_gender == 1, "F", "M"),
                          "region": user_region})
    items = pd.DataFrame({"item": np.arange(I), "category": item_cat, "brand": item_brand, "price": item_price})
    return inter, users, items


def data_config(size: str = "default") -> DataConfig:
    """The DataConfig a synthetic world of this size is prepared with."""
    return DATA_PRESETS["synthetic-tiny" if size == "tiny" else "synthetic"]


def write_own_data(folder, size: str = "tiny", seed: int = 0, schema: bool = False) -> Path:
    """Write a synthetic world in the own-data layout (see ``custom.py`` and data/README.md): a folder with
    ``interactions.csv`` (two tasks, ``click`` and ``purchase``, the ``behaviour`` column and the true
    probabilities ``prob_click``, ``prob_purchase``), ``users.csv``, ``items.csv`` (plus ``tags``, a
    ``|``-joined item feature: ``cat<category>|brand<brand>``) and ``dataset.json`` (the sequences in
    the built-in schema's intent order and the built-in DataConfig). Loaded as own data
    (``onetrans-mini data FOLDER``), it gives the same requests and floors as ``synthetic-<size>``; its
    features are inferred (price in quantile buckets, ``tags`` multi-valued, no category or price per
    history event) unless ``schema=True`` also writes the built-in schema, which makes every prepared
    table the built-in one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    inter, users, items = generate(size, seed)
    items = items.assign(tags=[f"cat{c}|brand{b}" for c, b in zip(items["category"], items["brand"])])
    inter.to_csv(folder / "interactions.csv", index=False)
    users.to_csv(folder / "users.csv", index=False)
    items.to_csv(folder / "items.csv", index=False)
    settings = {"tasks": list(SYNTHETIC_SCHEMA.task_names),
                "sequences": list(SYNTHETIC_SCHEMA.behaviours),
                "data_config": asdict(data_config(size))}
    if schema:
        settings["schema"] = SYNTHETIC_SCHEMA.to_dict()
    (folder / "dataset.json").write_text(json.dumps(settings, indent=1) + "\n")
    return folder


def load_synthetic(size: str = "default", seed: int = 0, config: DataConfig | None = None, use_cache: bool = True) -> RequestData:
    """Prepared requests of a synthetic world (no network, no data dir needed)."""
    if size not in SIZES:
        raise DataError(f"unknown synthetic size {size!r}; expected one of {sorted(SIZES)}")
    config = config or data_config(size)
    if config.max_candidates < SIZES[size].candidates:
        raise DataError(
            f"synthetic {size!r} shows {SIZES[size].candidates} candidates per request; "
            f"DataConfig.max_candidates={config.max_candidates} would cut requests in two"
        )
    name = f"synthetic-{size}"

    def build():
        inter, users, items = generate(size, seed)
        return build_requests(inter, SYNTHETIC_SCHEMA, config, users=users, items=items, name=name)

    if not use_cache:
        return build()
    data = cached(cache_dir(), name, [name, seed, asdict(SIZES[size]), SYNTHETIC_SCHEMA.to_dict(), config.preprocessing_key()], build)
    data.config = config
    return data
