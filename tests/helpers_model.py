"""Shared helpers for the model tests: a small hand-made schema and random request batches.

Not a conftest (that file belongs to the data tests): import explicitly, ``from helpers_model import ...``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from onetrans_mini.config import ModelConfig, get_preset
from onetrans_mini.data.batching import Batch
from onetrans_mini.features import Bucketized, Categorical, MultiCategorical, Schema, SequenceSpec, Task
from onetrans_mini.model import OneTrans

@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run a test module on one intra-op thread: the tensors here are tiny, and with 2+ threads on a busy
    machine OpenMP barriers turn milliseconds into minutes. Import it into a test module to use it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# 2 sequences, 3 event fields (one shares the candidate item table), 5 NS features in 3 groups
SCHEMA = Schema(
    ns_features=(
        Categorical("user_id", "user"),
        Categorical("gender", "user"),
        Categorical("item_id", "item"),
        MultiCategorical("genres", "item", max_len=3),
        Bucketized("hour", "context", boundaries=(6.0, 12.0, 18.0)),
    ),
    event_fields=(
        Categorical("hist_item", "event", vocab_of="item_id"),
        Categorical("hist_genre", "event"),
        Bucketized("hist_gap", "event", boundaries=(1.0, 10.0, 100.0), log=True),
    ),
    sequences=(SequenceSpec("liked", ("liked",)), SequenceSpec("disliked", ("disliked",))),
    tasks=(Task("click", "click"), Task("like", "like")),
)

VOCAB = {"user_id": 11, "gender": 4, "item_id": 23, "genres": 7, "hour": 6, "hist_item": 23, "hist_genre": 7, "hist_gap": 6}

# every combination of the config switches (the ablations)
SWITCHES = dict(
    pyramid=(True, False),
    ns_tokenizer=("auto_split", "group_wise"),
    seq_merge=("timestamp_aware", "timestamp_agnostic"),
    use_sep=(True, False),
    shared_params=(False, True),
    causal=(True, False),
    mixed_out_proj=(True, False),
)


def all_switch_combos():
    """Every distinct combination (72): use_sep only matters for the timestamp-agnostic merge, and
    mixed_out_proj only when NS-tokens have token-specific weights at all."""
    keys = list(SWITCHES)
    for values in itertools.product(*SWITCHES.values()):
        c = dict(zip(keys, values))
        if (c["seq_merge"] == "timestamp_aware" and not c["use_sep"]) or (c["shared_params"] and not c["mixed_out_proj"]):
            continue
        yield c


def tiny_config(**kw) -> ModelConfig:
    """nano with 3 layers and L_S = 16, so that the pyramid has an interior layer."""
    base = dict(n_layers=3, max_len=16, pyramid_granularity=4)
    base.update(kw)
    return get_preset("nano", **base)


def make_model(config: ModelConfig | None = None, seed: int = 0, schema: Schema = SCHEMA, vocab=VOCAB) -> OneTrans:
    torch.manual_seed(seed)
    return OneTrans(config or tiny_config(), schema, vocab).eval()


def make_batch(n_requests: int = 3, cands_per_request=(2, 1, 3), seq_len: int = 16, lengths=None,
               seed: int = 0, schema: Schema = SCHEMA, vocab=VOCAB, min_len: int = 0) -> Batch:
    """A random batch: left-padded histories of random (or given) lengths, ids within vocab sizes
    (never PAD on real positions), candidates grouped by request."""
    g = torch.Generator().manual_seed(seed)
    r = n_requests
    if lengths is None:
        lengths = torch.randint(min_len, seq_len + 1, (r,), generator=g).tolist()
    lengths = torch.as_tensor(lengths)
    pos = torch.arange(seq_len)[None, :]
    mask = pos >= (seq_len - lengths)[:, None]  # (R, L) left padding
    n_seq = len(schema.sequences)
    seq_type = torch.randint(1, n_seq + 1, (r, seq_len), generator=g) * mask
    seq = {f.name: torch.randint(2, vocab[f.name], (r, seq_len), generator=g) * mask for f in schema.event_fields}
    cpr = list(cands_per_request)[:r] if cands_per_request is not None else [1] * r
    request_index = torch.repeat_interleave(torch.arange(r), torch.as_tensor(cpr))
    b = len(request_index)
    ns = {}
    for f in schema.ns_features:
        if isinstance(f, MultiCategorical):
            ids = torch.randint(2, vocab[f.name], (b, f.max_len), generator=g)
            keep = torch.rand(b, f.max_len, generator=g) < 0.6
            keep[:, 0] = True
            ns[f.name] = ids * keep
        else:
            ns[f.name] = torch.randint(1, vocab[f.name], (b,), generator=g)
    labels = torch.randint(0, 2, (b, len(schema.tasks)), generator=g).float()
    return Batch(seq=seq, seq_type=seq_type, seq_mask=mask, ns=ns, request_index=request_index, labels=labels,
                 user=request_index.clone(), request_id=torch.arange(r))


def clone_batch(batch: Batch) -> Batch:
    return Batch(seq={k: v.clone() for k, v in batch.seq.items()}, seq_type=batch.seq_type.clone(),
                 seq_mask=batch.seq_mask.clone(), ns={k: v.clone() for k, v in batch.ns.items()},
                 request_index=batch.request_index.clone(), labels=batch.labels.clone(), user=batch.user.clone(),
                 request_id=batch.request_id.clone())
