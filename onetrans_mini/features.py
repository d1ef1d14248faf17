"""Declarative feature schema and deterministic vocabularies.

The schema is data: one list of feature specs that the data pipeline (which columns to encode and
how), the tokenizers (how many embedding tables, of which size, grouped how) and the notebooks (what
a request looks like) all read. Nothing else in the package hard-codes a feature name.

The kinds of feature (FuxiCTR's vocabulary, simplified):

- ``Categorical``: one id per row (user id, gender, occupation, item id, hour of day).
- ``Bucketized``: a number cut into buckets by boundaries fitted on the training split (quantiles)
  or given explicitly (release year, age).
- ``MultiCategorical``: several ids per row, padded to ``max_len`` (movie genres); embedded as the
  mean of its ids.
- ``TrainingStat`` / ``HistoryStat`` / ``RequestStat``: numbers an industrial ranker feeds next to the
  ids (an item's popularity and positive rate in the training split; the user's rates, and how often
  the history matches the candidate's genre, from the request's own history; how much of the request's
  candidate list shares the candidate's category), computed without leakage by ``data/statistics.py``
  and then bucketized like ``Bucketized``.
- ``SequenceSpec``: a behaviour sequence: which event types belong to it (e.g. ``liked``) and which
  per-event fields each S-token carries (item id, side info, behaviour type, time gap).

Every id space reserves ``PAD = 0`` (padding, embeds to the zero vector) and ``OOV = 1`` (seen at
test time but not in the training split, or rarer than ``min_count``). Vocabularies are fitted on the
training split only, sorted by frequency (descending), ties broken by value, so two runs on the same
data always give the same ids.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar, Iterable, Literal, Sequence

import numpy as np

PAD = 0
OOV = 1
N_RESERVED = 2  # PAD and OOV

Source = Literal["user", "item", "context", "event"]


@dataclass(frozen=True)
class Categorical:
    """One id per row, looked up in a vocabulary fitted on the training split."""

    name: str
    source: Source  # which table holds the column: user, item, context (per request) or event
    group: str = ""  # feature group for the group-wise NS tokenizer (defaults to ``source``)
    min_count: int = 1
    column: str = ""  # column in the source table (defaults to ``name``)
    vocab_of: str = ""  # share the vocabulary and embedding table of this feature (e.g. history item ids)
    kind: str = "categorical"


@dataclass(frozen=True)
class Bucketized:
    """A numeric column cut into buckets. Ids: PAD=0, missing/NaN=OOV=1, bucket k -> k + 2."""

    name: str
    source: Source
    group: str = ""
    boundaries: tuple[float, ...] = ()  # empty: fitted as quantiles of the training split
    n_buckets: int = 10  # used only when boundaries are fitted
    log: bool = False  # bucketize log1p(x) (for heavy-tailed gaps and counts)
    column: str = ""
    kind: str = "bucketized"


@dataclass(frozen=True)
class MultiCategorical:
    """Several ids per row (a ``|``-joined string or a list), padded with PAD to ``max_len``."""

    name: str
    source: Source
    group: str = ""
    max_len: int = 6
    min_count: int = 1
    column: str = ""
    kind: str = "multi_categorical"


@dataclass(frozen=True)
class TrainingStat:
    """A statistic of the TRAINING split's candidates that share this candidate's ``key`` column: their count
    (``mean_of`` empty: popularity) or the mean of a column (``mean_of="like"``: the key's positive rate),
    smoothed with ``alpha`` pseudo-rows at the training mean. Training candidates get it out of fold (requests
    dealt into ``folds`` folds; a row's statistic comes from the other folds), so no candidate's own label
    reaches its features; test candidates' rates also count the validation split (see ``data/statistics.py``).
    Quantile-bucketized on the training split (log scale for counts)."""

    name: str
    # column(s) of the candidate table (after the items table is joined): "item", "user", or a tuple such as
    # ("user", "category"): one statistic per combination (the user's rate in each category)
    key: str | tuple[str, ...] = "item"
    mean_of: str = ""  # "" = count; else a numeric column of the interactions (a label)
    alpha: float = 20.0
    folds: int = 5
    n_buckets: int = 16
    group: str = ""
    kind: str = "training_stat"
    source: ClassVar[str] = "item"  # one value per candidate


@dataclass(frozen=True)
class HistoryStat:
    """A statistic of the request's own history (events strictly before it, so never a candidate's label):
    how many events (``mean_of`` empty) or the mean of an event column (``mean_of="like"``: the user's like
    rate so far), smoothed with ``alpha`` pseudo-events at the training mean (out of fold). With ``match``, only the events
    whose ``match`` column equals the candidate's (``match="genre1"``: the user's history in this genre);
    with ``window``, only the newest ``window`` events. Quantile-bucketized on the training split."""

    name: str
    mean_of: str = ""  # "" = count; else a numeric column of the history events
    match: str = ""  # "" = per request; else a column of both the candidate and the events
    window: int = 0  # 0 = the whole history
    alpha: float = 5.0
    folds: int = 5  # the prior (training mean) of a training request leaves out its fold, as in TrainingStat
    n_buckets: int = 16
    group: str = ""
    kind: str = "history_stat"

    @property
    def source(self) -> str:
        return "item" if self.match else "user"  # per candidate with a match, else per request


@dataclass(frozen=True)
class RequestStat:
    """A statistic of the request's own candidate list (what the ranker is asked to order, known before any
    label): the share of the request's candidates whose ``match`` column equals this candidate's, the
    candidate itself included (``match="category"``: 0.5 when half the list shares its category, as when a
    retrieval stage fetched by the user's current intent). It reads no label, so it cannot leak one; the
    model still scores each candidate on its own. Quantile-bucketized on the training split."""

    name: str
    match: str = "category"  # a column of the candidates (after the items table is joined)
    n_buckets: int = 8
    group: str = ""
    kind: str = "request_stat"
    source: ClassVar[str] = "item"  # one value per candidate


NSFeature = Categorical | Bucketized | MultiCategorical | TrainingStat | HistoryStat | RequestStat
STATISTICS = (TrainingStat, HistoryStat, RequestStat)  # the computed features (``data/statistics.py``)


@dataclass(frozen=True)
class SequenceSpec:
    """One behaviour sequence of the user (e.g. ``liked`` events), in intent order.

    ``behaviours`` lists the event behaviour names that belong to this sequence. Every sequence's
    S-tokens are built from the schema's ``event_fields`` (one embedding table per field, shared across
    sequences), while each sequence has its own MLP (paper §2).
    """

    name: str
    behaviours: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    """A binary label column of the interactions table, with a head of its own in the model."""

    name: str
    column: str


@dataclass(frozen=True)
class Schema:
    """All features of a dataset: NS features, sequences and their per-event fields, tasks.

    ``event_fields`` are the per-event features of S-tokens (shared by all sequences). They must be
    prefix-stable: a field of an event may depend on that event and the ones before it, never on the
    request (no "time since the event measured at request time"), so that a cached S-token state stays
    valid when newer events are appended (see ``user_cache.py``).
    """

    ns_features: tuple[NSFeature, ...]
    event_fields: tuple[NSFeature, ...]
    sequences: tuple[SequenceSpec, ...]
    tasks: tuple[Task, ...]

    def __post_init__(self):
        names = [f.name for f in self.ns_features] + [f.name for f in self.event_fields]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"schema: feature names must be unique, repeated: {dup}")
        for f in self.event_fields:
            if f.source != "event":
                raise ValueError(f"schema: event field {f.name!r} must have source='event', got {f.source!r}")
            if isinstance(f, MultiCategorical):
                raise ValueError(f"schema: event field {f.name!r} cannot be multi-valued (one id per S-token field)")
        for f in self.ns_features:
            if f.source == "event":
                raise ValueError(f"schema: NS feature {f.name!r} cannot have source='event'")
            if isinstance(f, (TrainingStat, HistoryStat)) and f.alpha < 0:
                raise ValueError(f"schema: statistic {f.name!r} needs alpha >= 0")
            if isinstance(f, STATISTICS) and f.n_buckets < 1:
                raise ValueError(f"schema: statistic {f.name!r} needs n_buckets >= 1")
            if isinstance(f, RequestStat) and not f.match:
                raise ValueError(f"schema: statistic {f.name!r} needs a match column (the candidates' column to compare)")
            if isinstance(f, (TrainingStat, HistoryStat)) and f.folds < 2:
                raise ValueError(f"schema: statistic {f.name!r} needs folds >= 2 (out-of-fold rates)")
            if isinstance(f, HistoryStat) and f.window < 0:
                raise ValueError(f"schema: statistic {f.name!r} needs window >= 0 (0 = the whole history)")
        for f in self.event_fields:
            if isinstance(f, STATISTICS):
                raise ValueError(f"schema: event field {f.name!r} cannot be a statistic (S-tokens read event columns)")
        behaviours = [b for s in self.sequences for b in s.behaviours]
        if len(set(behaviours)) != len(behaviours):
            raise ValueError("schema: a behaviour may belong to one sequence only")
        if not self.sequences:
            raise ValueError("schema: at least one behaviour sequence is required")
        if not self.tasks:
            raise ValueError("schema: at least one task is required")

    @property
    def behaviours(self) -> tuple[str, ...]:
        """Behaviour names that enter the history, in sequence (intent) order."""
        return tuple(b for s in self.sequences for b in s.behaviours)

    def without_statistics(self) -> "Schema":
        """The same schema without its statistic features (``STATISTICS``): what a model must then learn from
        ids and histories (the first version's features; issue 14's ablations)."""
        return replace(self, ns_features=tuple(f for f in self.ns_features if not isinstance(f, STATISTICS)))

    def sequence_of_behaviour(self) -> dict[str, int]:
        """Behaviour name -> sequence index (1-based; 0 is padding), the S-token's type indicator."""
        return {b: i + 1 for i, s in enumerate(self.sequences) for b in s.behaviours}

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def groups(self) -> tuple[str, ...]:
        """NS feature groups in first-appearance order (the group-wise tokenizer's tokens)."""
        seen: dict[str, None] = {}
        for f in self.ns_features:
            seen.setdefault(group_of(f), None)
        return tuple(seen)

    def to_dict(self) -> dict:
        return {
            "ns_features": [asdict(f) for f in self.ns_features],
            "event_fields": [asdict(f) for f in self.event_fields],
            "sequences": [asdict(s) for s in self.sequences],
            "tasks": [asdict(t) for t in self.tasks],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Schema":
        kinds = {"categorical": Categorical, "bucketized": Bucketized, "multi_categorical": MultiCategorical,
                 "training_stat": TrainingStat, "history_stat": HistoryStat, "request_stat": RequestStat}

        def feat(x):
            x = dict(x)
            k = kinds[x["kind"]]
            for name in ("boundaries", "key"):  # JSON lists back to tuples
                if isinstance(x.get(name), list):
                    x[name] = tuple(x[name])
            return k(**x)

        return cls(
            ns_features=tuple(feat(x) for x in d["ns_features"]),
            event_fields=tuple(feat(x) for x in d["event_fields"]),
            sequences=tuple(SequenceSpec(s["name"], tuple(s["behaviours"])) for s in d["sequences"]),
            tasks=tuple(Task(**t) for t in d["tasks"]),
        )


def column_of(f: NSFeature) -> str:
    return getattr(f, "column", "") or f.name


def bucketized(f: NSFeature) -> NSFeature:
    """How a feature is fitted and encoded: a statistic is a ``Bucketized`` of its computed column (quantile
    buckets, log scale for counts); every other feature is itself."""
    if isinstance(f, STATISTICS):  # counts (no ``mean_of``) on a log scale; rates and a list's share as they are
        count = isinstance(f, (TrainingStat, HistoryStat)) and not f.mean_of
        return Bucketized(f.name, f.source, group=f.group, n_buckets=f.n_buckets, log=count)
    return f


def group_of(f: NSFeature) -> str:
    return f.group or f.source


# ----------------------------------------------------------------------------------------------
# Vocabularies (fitted on the training split only)


@dataclass
class Vocab:
    """Value -> id for one categorical feature. PAD=0, OOV=1, then values by frequency."""

    values: list  # values in id order, starting at id 2
    index: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.index = {v: i + N_RESERVED for i, v in enumerate(self.values)}

    @classmethod
    def fit(cls, values: Iterable, min_count: int = 1) -> "Vocab":
        counts = Counter(v for v in values if not _missing(v))
        kept = [v for v, c in counts.items() if c >= min_count]
        # frequency descending, ties by value (as strings, so mixed types still sort deterministically)
        kept.sort(key=lambda v: (-counts[v], str(v)))
        return cls(kept)

    def __len__(self) -> int:
        """Size of the id space, reserved ids included (the embedding table's rows)."""
        return len(self.values) + N_RESERVED

    def encode(self, values: Sequence) -> np.ndarray:
        """Ids of ``values``; unseen or missing values map to OOV (PAD is only ever padding)."""
        get = self.index.get
        return np.fromiter((get(v, OOV) for v in values), dtype=np.int64, count=len(values))


@dataclass
class Buckets:
    """Boundaries of a bucketized feature. Ids: PAD=0 unused, missing=OOV=1, bucket k -> k + 2."""

    boundaries: list[float]
    log: bool = False

    @classmethod
    def fit(cls, values: np.ndarray, n_buckets: int, log: bool = False) -> "Buckets":
        x = np.asarray(values, dtype=np.float64)
        x = x[~np.isnan(x)]
        if log:
            x = np.log1p(np.maximum(x, 0))
        if len(x) == 0:
            return cls([], log)
        qs = np.quantile(x, np.linspace(0, 1, n_buckets + 1)[1:-1])
        return cls(sorted(set(float(q) for q in qs)), log)

    def __len__(self) -> int:
        return len(self.boundaries) + 1 + N_RESERVED

    def encode(self, values) -> np.ndarray:
        x = np.asarray(values, dtype=np.float64)
        missing = np.isnan(x)
        if self.log:
            x = np.log1p(np.maximum(np.nan_to_num(x), 0))
        ids = np.searchsorted(np.asarray(self.boundaries, dtype=np.float64), x, side="right") + N_RESERVED
        ids[missing] = OOV
        return ids.astype(np.int64)


def _missing(v) -> bool:
    """None, NaN, or pandas' NA (the missing value of ``dtype="string"`` columns)."""
    return v is None or (isinstance(v, float) and np.isnan(v)) or type(v).__name__ == "NAType"


def split_multi(value, sep: str = "|") -> list:
    """A multi-valued cell: a ``sep``-joined string, a list, or missing."""
    if _missing(value):
        return []
    if isinstance(value, str):
        return [v for v in value.split(sep) if v != ""]
    return list(value)


@dataclass
class Vocabularies:
    """The fitted vocabulary (or buckets) of every feature of a schema, by feature name."""

    by_name: dict[str, Vocab | Buckets]

    def size(self, name: str) -> int:
        return len(self.by_name[name])

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.by_name.items()}

    def to_json(self) -> str:
        out = {}
        for k, v in self.by_name.items():
            if isinstance(v, Vocab):
                out[k] = {"type": "vocab", "values": [_jsonable(x) for x in v.values]}
            else:
                out[k] = {"type": "buckets", "boundaries": v.boundaries, "log": v.log}
        return json.dumps(out)

    @classmethod
    def from_json(cls, s: str) -> "Vocabularies":
        d = json.loads(s)
        by = {}
        for k, v in d.items():
            by[k] = Vocab(v["values"]) if v["type"] == "vocab" else Buckets(v["boundaries"], v["log"])
        return cls(by)


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    return x


def fit_feature(f: NSFeature, train_values) -> Vocab | Buckets:
    """Fit one feature's vocabulary or buckets on its training-split values."""
    f = bucketized(f)
    if isinstance(f, Categorical):
        return Vocab.fit(list(train_values), f.min_count)
    if isinstance(f, MultiCategorical):
        return Vocab.fit([v for cell in train_values for v in split_multi(cell)], f.min_count)
    if f.boundaries:
        return Buckets(list(f.boundaries), f.log)
    return Buckets.fit(np.asarray(train_values, dtype=np.float64), f.n_buckets, f.log)


def encode_feature(f: NSFeature, vocab: Vocab | Buckets, values) -> np.ndarray:
    """Encode a column: (N,) ids, or (N, max_len) ids PAD-padded for multi-valued features."""
    f = bucketized(f)
    if isinstance(f, MultiCategorical):
        out = np.zeros((len(values), f.max_len), dtype=np.int64)
        for i, cell in enumerate(values):
            ids = vocab.encode(split_multi(cell)[: f.max_len])
            out[i, : len(ids)] = ids
        return out
    if isinstance(f, Bucketized):
        return vocab.encode(np.asarray(values, dtype=np.float64))
    return vocab.encode(list(values))
