"""Bad input, as a table (issue 13, 'A test you keep'): the command line and the server.

CLI rows go through ``onetrans_mini.cli.main`` and must give their exit code and ONE stderr line that
names the flag, field or file and what was expected (no traceback), and write nothing: no run folder,
nothing in the cache dir or the working directory, a damaged run folder left as it was; rows marked
"early" must fail before any data is prepared.

Serving rows send a bad ``Request`` to a ``Server`` in each of the modes 'none', 'request' and 'both'
(one validation for all) after one good request of the same user, and must raise their exception type
with a one-line message naming the field and what was expected; the event log and the user cache must
be exactly as before, and the user's next good request must be a user-cache hit (mode 'both') with the
scores of a server that never saw the bad request. Malformed CSVs have their own table
(tests/test_bad_data.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from helpers_model import SCHEMA, VOCAB, make_batch, make_model, tiny_config
from helpers_model import single_thread  # noqa: F401  (autouse fixture)
from onetrans_mini import cli
from onetrans_mini.serving import Events, OutOfOrderError, Request, Server
from onetrans_mini.user_cache import UserCacheStore

TINY_RUN = ["--dataset", "synthetic-tiny", "--preset", "nano", "--epochs", "1", "--steps-per-epoch", "2",
            "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run trained by the CLI; rows that damage it work on a copy."""
    out = tmp_path_factory.mktemp("bad_input") / "run"
    assert cli.main(["train", *TINY_RUN, "--out", str(out)]) == 0
    return out


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- ways to damage a run folder (each gets a fresh copy of the trained run) ------------------------


def _overwrite_middle(run: Path, name: str = "model.safetensors") -> None:
    p = run / name
    raw = bytearray(p.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(64)  # the header (at the start) stays intact: only tensor bytes change
    p.write_bytes(bytes(raw))


def _nan_with_a_fresh_digest(run: Path) -> None:
    """A NaN in one tensor, written by the project's own writer: the digest is right, the weights are not."""
    from onetrans_mini.checkpoint import load_run, save_weights

    model = load_run(run).model
    with torch.no_grad():
        model.towers[0][0].weight[0, 0] = float("nan")
    save_weights(model, run / "model.safetensors")


def _truncate(run: Path) -> None:
    p = run / "model.safetensors"
    p.write_bytes(p.read_bytes()[:100])


def _corrupt_config(run: Path) -> None:
    (run / "config.json").write_text("{not json")


# -- the CLI table ---------------------------------------------------------------------------------

# id, argv (T: the test's tmp folder, R: the damaged copy of the trained run), damage(R) or None, exit code,
# regex the single stderr line must match, "early" (must fail before any data is prepared)
CLI_ROWS = [
    # names
    ("train-unknown-dataset", ["train", "--dataset", "movielens-10k", "--out", "T/run"], None, 2,
     r"unknown dataset 'movielens-10k': expected one of", False),
    ("data-unknown-dataset", ["data", "movielens-2m"], None, 2, r"unknown dataset 'movielens-2m': expected one of", False),
    ("data-unknown-synthetic-size", ["data", "synthetic-huge"], None, 2,
     r"unknown dataset 'synthetic-huge': expected one of", False),
    ("train-unknown-preset", ["train", *TINY_RUN, "--preset", "XL", "--out", "T/run"], None, 2,
     r"unknown preset 'XL'; expected one of \['nano', 'small', 'S', 'L'\]", True),
    ("train-unknown-model", ["train", *TINY_RUN, "--model", "gpt", "--out", "T/run"], None, 2,
     r"unknown model 'gpt'; expected one of \['onetrans'", True),
    ("train-unknown-device", ["train", *TINY_RUN[:-2], "--device", "tpu", "--out", "T/run"], None, 2,
     r"device must be one of|unknown device 'tpu'", True),
    # numbers
    ("train-max-len-0", ["train", *TINY_RUN, "--max-len", "0", "--out", "T/run"], None, 2,
     r"argument --max-len: must be an integer >= 1, got '0'", True),
    ("train-max-len-negative", ["train", *TINY_RUN, "--max-len", "-4", "--out", "T/run"], None, 2,
     r"argument --max-len: must be an integer >= 1, got '-4'", True),
    ("train-max-len-not-a-number", ["train", *TINY_RUN, "--max-len", "ten", "--out", "T/run"], None, 2,
     r"argument --max-len: must be an integer >= 1, got 'ten'", True),
    ("train-epochs-0", ["train", *TINY_RUN, "--epochs", "0", "--out", "T/run"], None, 2,
     r"epochs must be an integer >= 1", True),
    ("train-ema-1", ["train", *TINY_RUN, "--ema", "1", "--out", "T/run"], None, 2,
     r"ema is a decay per step in \[0, 1\)", True),
    ("train-threads-0", ["train", *TINY_RUN, "--threads", "0", "--out", "T/run"], None, 2,
     r"argument --threads: expected 'auto' or an integer >= 1, got '0'", True),
    ("replay-threads-not-a-number", ["replay", "--dataset", "synthetic-tiny", "--threads", "many"], None, 2,
     r"argument --threads: expected 'auto' or an integer >= 1, got 'many'", True),
    # flags
    ("train-unknown-flag", ["train", *TINY_RUN, "--learning-rate", "0.1", "--out", "T/run"], None, 2,
     r"unrecognized arguments: --learning-rate 0\.1", True),
    ("train-bad-choice", ["train", *TINY_RUN, "--optimizer", "sgd", "--out", "T/run"], None, 2,
     r"argument --optimizer: invalid choice: 'sgd'", True),
    ("evaluate-bad-split", ["evaluate", "R", "--split", "tset"], None, 2, r"argument --split: invalid choice: 'tset'", True),
    ("replay-bad-split", ["replay", "--run", "R", "--split", "tset"], None, 2,
     r"argument --split: invalid choice: 'tset'", True),
    ("replay-bad-modes", ["replay", "--run", "R", "--modes", "none,fast"], None, 2,
     r"--modes: expected a comma-separated subset of none,request,both,approx, got 'none,fast'", True),
    ("replay-max-requests-0", ["replay", "--run", "R", "--max-requests", "0"], None, 2,
     r"argument --max-requests: must be an integer >= 1, got '0'", True),
    ("replay-drop-block-0", ["replay", "--run", "R", "--drop-block", "0"], None, 2,
     r"argument --drop-block: must be an integer >= 1, got '0'", True),
    ("replay-drop-block-over-max-len", ["replay", "--run", "R", "--drop-block", "99"], None, 2,
     r"--drop-block: must be at most the model's max_len=16, got 99", True),
    ("replay-cache-mb-negative", ["replay", "--run", "R", "--cache-mb", "-1"], None, 2,
     r"--cache-mb: expected a number >= 0, got -1\.0", True),
    ("no-command", [], None, 2, r"the following arguments are required: command", True),
    # output folders
    ("train-out-under-a-file", ["train", *TINY_RUN, "--out", "T/afile/run"], None, 2,
     r"--out \S+/afile/run: cannot write a run folder there: \S+/afile is a file, not a folder", True),
    ("train-out-is-a-file", ["train", *TINY_RUN, "--out", "T/afile"], None, 2,
     r"--out \S+/afile: cannot write a run folder there: \S+/afile is a file, not a folder", True),
    ("train-out-under-proc", ["train", *TINY_RUN, "--out", "/proc/onetrans-mini-test/run"], None, 2,
     r"--out /proc/onetrans-mini-test/run: cannot write a run folder there \(No such file or directory: '/proc/", True),
    ("train-out-under-sys", ["train", *TINY_RUN, "--out", "/sys/onetrans-mini-test"], None, 2,
     r"--out /sys/onetrans-mini-test: cannot write a run folder there \((Operation not permitted|Permission denied|"
     r"Read-only file system): '/sys/", True),
    ("train-out-read-only-folder", ["train", *TINY_RUN, "--out", "T/readonly/run"], None, 2,
     r"--out \S+/readonly/run: cannot write a run folder there \(Permission denied", True),
    ("train-out-holds-a-run", ["train", *TINY_RUN, "--out", "R"], None, 2,
     r"run folder \S+ already holds a run; use --resume", True),
    ("train-resume-missing", ["train", "--resume", "T/missing"], None, 2, r"run folder \S+/missing does not exist", True),
    ("bench-out-under-a-file", ["bench", "--suite", "nano", "--out", "T/afile/results"], None, 2,
     r"--out \S+/afile/results: cannot write results there: \S+/afile is a file, not a folder", True),
    ("bench-out-under-proc", ["bench", "--suite", "nano", "--out", "/proc/onetrans-mini-test"], None, 2,
     r"--out /proc/onetrans-mini-test: cannot write results there \(No such file or directory: '/proc/", True),
    ("bench-size-not-a-number", ["bench", "--suite", "nano", "--seq-len", "long"], None, 2,
     r"--seq-len must be an integer, got 'long'", True),
    ("bench-sizes-not-integers", ["bench", "--suite", "nano", "--append-new", "1,two"], None, 2,
     r"--append-new must be comma-separated integers, got '1,two'", True),
    ("bench-readme-table-missing", ["bench", "--readme-table", "T/missing.json"], None, 2,
     r"--readme-table \S+/missing\.json: cannot read it \(No such file or directory\)", True),
    ("bench-readme-table-not-results", ["bench", "--readme-table", "T/afile"], None, 2,
     r"--readme-table \S+/afile: expected the results JSON that 'bench --out DIR' writes \(JSONDecodeError", True),
    # damaged run folders
    ("evaluate-missing-run", ["evaluate", "T/missing"], None, 2, r"run folder \S+/missing does not exist", True),
    ("evaluate-corrupt-config", ["evaluate", "R"], _corrupt_config, 2, r"config\.json: corrupt run config", True),
    ("evaluate-truncated-weights", ["evaluate", "R"], _truncate, 2,
     r"model\.safetensors: not a readable safetensors checkpoint", True),
    ("evaluate-overwritten-tensor-bytes", ["evaluate", "R"], _overwrite_middle, 2,
     r"\S+/model\.safetensors: damaged: its tensor bytes do not match the sha256 digest stored when it was written", True),
    ("evaluate-nan-weights", ["evaluate", "R"], _nan_with_a_fresh_digest, 2,
     r"\S+/model\.safetensors: tensor 'towers\.0\.0\.weight' holds non-finite values \(1 NaN or inf of 1024\); "
     r"expected finite weights", True),
    ("replay-overwritten-tensor-bytes", ["replay", "--run", "R", "--max-requests", "3"], _overwrite_middle, 2,
     r"model\.safetensors: damaged: its tensor bytes do not match the sha256 digest", True),
    ("resume-overwritten-last-weights", ["train", "--resume", "R", "--no-progress"],
     lambda r: _overwrite_middle(r, "last.safetensors"), 2,
     r"last\.safetensors: damaged: its tensor bytes do not match the sha256 digest", True),
]


@pytest.mark.parametrize("row", CLI_ROWS, ids=[r[0] for r in CLI_ROWS])
def test_cli_bad_input_gives_one_clear_line_and_writes_nothing(row, trained, tmp_path, monkeypatch, capsys):
    rid, argv, damage, code, pattern, early = row
    run = tmp_path / "damaged"
    shutil.copytree(trained, run)
    if damage is not None:
        damage(run)
    (tmp_path / "afile").write_text("a regular file\n")
    if rid == "train-out-read-only-folder":
        ro = tmp_path / "readonly"
        ro.mkdir()
        ro.chmod(0o555)
        if os.access(ro, os.W_OK):  # root ignores the mode bits: the folder IS writable here
            pytest.skip("a read-only folder is writable by this user (root); /sys and /proc rows stand in")
    argv = [re.sub(r"^T/", str(tmp_path) + "/", a) for a in argv]
    argv = [str(run) if a == "R" else a for a in argv]
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("ONETRANS_CACHE_DIR", str(cache))
    monkeypatch.chdir(work)  # where a default run folder (runs/...) would go
    if early:  # the check comes first: preparing the data would be wasted work before an error
        def no_data(*a, **k):
            raise AssertionError(f"{rid}: data prepared before the bad input was refused")

        monkeypatch.setattr("onetrans_mini.distributed.load_data", no_data)
        monkeypatch.setattr("onetrans_mini.checkpoint.load_dataset", no_data)
        monkeypatch.setattr("onetrans_mini.data.load_dataset", no_data)
        monkeypatch.setattr("onetrans_mini.bench.run_suite", no_data)  # bench: refused before the suite runs
    before = _digest(run)
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == code, (rid, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    # nothing written or lost
    assert _digest(run) == before, rid
    assert not cache.exists() or not any(cache.iterdir())
    assert list(work.iterdir()) == []
    assert not (tmp_path / "run").exists() and (tmp_path / "afile").read_text() == "a regular file\n"
    assert not (tmp_path / "missing").exists()
    assert not Path("/proc/onetrans-mini-test").exists() and not Path("/sys/onetrans-mini-test").exists()


def test_an_old_run_folder_without_digests_still_loads(trained, tmp_path, capsys):
    """Run folders written before digests were stored: the weights load, with a warning that says they are
    not verified (and non-finite weights are still refused)."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "old"
    shutil.copytree(trained, run)
    for name in ("model.safetensors", "last.safetensors"):
        save_file(load_file(run / name), run / name, metadata={"format": "pt"})  # as the old writer did
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["evaluate", str(run)]) == 0
    said = [str(w.message) for w in caught]
    assert any(re.search(r"model\.safetensors has no sha256 digest \(written before digests were stored\): "
                         r"its bytes are not verified", m) for m in said), said
    assert "user+item mean" in capsys.readouterr().out


# -- the serving table -----------------------------------------------------------------------------

N_SEQ = len(SCHEMA.sequences)
EVENT_FIELDS = [f.name for f in SCHEMA.event_fields]


def _events(n: int, t0: float, seed: int) -> Events:
    g = torch.Generator().manual_seed(seed)
    return Events({f: torch.randint(1, VOCAB[f], (n,), generator=g) for f in EVENT_FIELDS},
                  torch.randint(1, N_SEQ + 1, (n,), generator=g), t0 + torch.arange(n, dtype=torch.float64))


def _candidates(n: int, seed: int) -> dict:
    return make_batch(1, (n,), seed=seed).ns


# the user's stream: a good first request (t = 0..5, request at 6), then the good second one (7..9, at 10)
FIRST = dict(user=7, request_id=1, time=6.0, new_events=_events(6, 0.0, 1), ns=_candidates(3, 1), n_candidates=3)
SECOND = dict(user=7, request_id=2, time=10.0, new_events=_events(3, 7.0, 2), ns=_candidates(4, 2), n_candidates=4)


def _with(base: dict, **over) -> dict:
    out = dict(base, **over)
    out["new_events"] = Events({k: v.clone() for k, v in out["new_events"].fields.items()},
                               out["new_events"].seq_type.clone(), out["new_events"].time.clone())
    out["ns"] = {k: v.clone() for k, v in out["ns"].items()}
    return out


def _set_event(field, value):
    def f(r):
        (r["new_events"].seq_type if field == "seq_type" else r["new_events"].fields[field])[-1] = value
    return f


def _set_candidate(name, value, row=0):
    def f(r):
        r["ns"][name][row] = value
    return f


def _edit(fn):
    def make():
        r = _with(SECOND)
        fn(r)
        return Request(**r)
    return make


def _drop_event_field(r):
    del r["new_events"].fields["hist_genre"]


def _float_event_ids(r):
    r["new_events"].fields["hist_item"] = r["new_events"].fields["hist_item"].float()


def _drop_candidate_feature(r):
    del r["ns"]["hour"]


def _float_candidate_ids(r):
    r["ns"]["item_id"] = r["ns"]["item_id"].float()


def _short_feature(r):
    r["ns"]["gender"] = r["ns"]["gender"][:3]


def _flat_multi(r):
    r["ns"]["genres"] = r["ns"]["genres"][:, 0]


def _old_events(r):
    r["new_events"] = _events(3, 2.0, 2)  # times 2..4: older than the logged 0..5's newest


def _event_after_request(r):
    r["time"] = 8.5  # its events run to t = 9


def _request_before_logged_events(r):
    r.update(time=4.0, new_events=Events.empty(EVENT_FIELDS))  # the user's newest logged event is at t = 5


def _no_candidates_field(r):
    r["ns"] = None


# id, bad request (a function: it may raise while the request is built), exception type, regex of the message
SERVING_ROWS = [
    ("event-id-out-of-range", _edit(_set_event("hist_item", VOCAB["hist_item"])), ValueError,
     r"request 2 \(user 7\): events: field 'hist_item': ids must be in \[0, 23\) \(its vocabulary size\), got range"),
    ("event-id-negative", _edit(_set_event("hist_gap", -1)), ValueError,
     r"request 2 \(user 7\): events: field 'hist_gap': ids must be in \[0, 6\)"),
    ("event-seq-type-0", _edit(_set_event("seq_type", 0)), ValueError,
     r"request 2 \(user 7\): events: seq_type must be in 1\.\.2 \(the schema's sequences\)"),
    ("event-seq-type-too-big", _edit(_set_event("seq_type", 3)), ValueError,
     r"request 2 \(user 7\): events: seq_type must be in 1\.\.2"),
    ("event-field-missing", _edit(_drop_event_field), ValueError,
     r"request 2 \(user 7\): events lack event field\(s\) \['hist_genre'\]; expected \['hist_item', 'hist_genre', 'hist_gap'\]"),
    ("event-ids-float", _edit(_float_event_ids), ValueError,
     r"request 2 \(user 7\): events: hist_item must hold integer ids, got dtype torch\.float32"),
    ("events-older-than-logged", _edit(_old_events), OutOfOrderError,
     r"request 2 \(user 7\): new event at time 2\.0 is older than the user's newest logged event \(5\.0\); "
     r"histories are append-only"),
    ("event-after-request-time", _edit(_event_after_request), OutOfOrderError,
     r"request 2 \(user 7\): its event at time 9\.0 is after the request's time 8\.5 \(events come before the request"),
    ("request-before-logged-events", _edit(_request_before_logged_events), OutOfOrderError,
     r"request 2 \(user 7\): time 4\.0 is before the user's newest logged event \(5\.0\)"),
    ("candidate-id-out-of-range", _edit(_set_candidate("item_id", VOCAB["item_id"])), ValueError,
     r"request 2 \(user 7\): request\.ns: feature 'item_id': ids must be in \[0, 23\) \(its vocabulary size\), got range"),
    ("candidate-id-negative", _edit(_set_candidate("user_id", -2, row=3)), ValueError,
     r"request 2 \(user 7\): request\.ns: feature 'user_id': ids must be in \[0, 11\)"),
    ("candidate-multi-id-out-of-range", _edit(_set_candidate("genres", 99)), ValueError,
     r"request 2 \(user 7\): request\.ns: feature 'genres': ids must be in \[0, 7\)"),
    ("candidate-feature-missing", _edit(_drop_candidate_feature), ValueError,
     r"request 2 \(user 7\): request\.ns lacks NS feature 'hour'; expected \['user_id', 'gender', 'item_id', 'genres', 'hour'\]"),
    ("candidate-ids-float", _edit(_float_candidate_ids), ValueError,
     r"request 2 \(user 7\): request\.ns\['item_id'\] must hold integer ids, got dtype torch\.float32"),
    ("candidate-rows-disagree", _edit(_short_feature), ValueError,
     r"request 2 \(user 7\): request\.ns\['gender'\] must have shape \(4,\), got \(3,\)"),
    ("candidate-multi-not-2d", _edit(_flat_multi), ValueError,
     r"request 2 \(user 7\): request\.ns\['genres'\] must have shape \(4, 3\), got \(4,\)"),
    ("n-candidates-mismatch", _edit(lambda r: r.update(n_candidates=5)), ValueError,
     r"request 2 \(user 7\): n_candidates=5, but its candidate features have 4 rows"),
    ("no-candidate-features", _edit(_no_candidates_field), ValueError,
     r"request 2 \(user 7\): ns \(the candidates' NS features\) is required"),
]


def _snapshot(server: Server, user) -> dict:
    """Everything a rejected request must leave as it was: the user's window, the log's counters, the cache."""
    w = server.log.window(user)
    snap = {"start": w.start, "time": w.events.time.clone(), "seq_type": w.events.seq_type.clone(),
            "fields": {k: v.clone() for k, v in w.events.fields.items()}, "truncations": server.log.truncations}
    if server.store is not None:
        uc = server.store._users.get(user)
        snap["stats"] = dict(server.store.stats.as_dict())
        snap["users"] = list(server.store._users)
        snap["state"] = None if uc is None else (uc.start, uc.end, uc.last_time, [
            (lay.key_start, lay.query_start, lay.k.clone(), lay.v.clone(), lay.x.clone()) for lay in uc.layers])
    return snap


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def serving_model():
    return make_model(tiny_config(n_layers=4))


@pytest.fixture(scope="module")
def reference(serving_model):
    """Scores of the second request by a server that never saw a bad request."""
    ref = Server(serving_model, "none")
    ref.score(Request(**_with(FIRST)))
    return ref.score(Request(**_with(SECOND)))


@pytest.mark.parametrize("mode", ["none", "request", "both"])
@pytest.mark.parametrize("row", SERVING_ROWS, ids=[r[0] for r in SERVING_ROWS])
def test_a_bad_request_is_refused_in_one_line_and_changes_nothing(row, mode, serving_model, reference):
    rid, make_bad, exc, pattern = row
    server = Server(serving_model, mode, drop_block=4, cache_bytes=1 << 20)
    server.score(Request(**_with(FIRST)))
    before = _snapshot(server, 7)
    with pytest.raises(exc) as info:
        server.score(make_bad())
    msg = str(info.value)
    assert "\n" not in msg and re.search(pattern, msg), msg
    assert _same(_snapshot(server, 7), before), rid  # the log, its counters and the user's cached state
    got = server.score(Request(**_with(SECOND)))  # the next good request
    assert torch.allclose(got, reference, atol=1e-5, rtol=0), float((got - reference).abs().max())
    if mode == "both":
        assert server.store.stats.hits == 1 and server.store.stats.misses == 1  # served from the cached state


def test_a_failed_append_keeps_the_users_cached_state(serving_model, reference):
    """Issue 13 item 9: when ``UserCache.advance`` raises inside ``UserCacheStore.request_cache`` (here: events
    that bypass the server's checks), the user's state stays in the store, unchanged and accounted; the
    next good window is a hit and exact."""
    server = Server(serving_model, "both", drop_block=4, cache_bytes=1 << 20)
    server.score(Request(**_with(FIRST)))
    store: UserCacheStore = server.store
    before = _snapshot(server, 7)
    window = server.log.window(7)
    bad = _with(SECOND)["new_events"]
    bad.fields["hist_item"][1] = 999
    from onetrans_mini.serving import Window

    with pytest.raises(ValueError, match=r"field 'hist_item': ids must be in \[0, 23\)"):
        store.request_cache(7, Window(Events.cat([window.events, bad]), window.start))
    assert 7 in store and _same(_snapshot(server, 7), before)
    got = server.score(Request(**_with(SECOND)))
    assert store.stats.hits == 1 and store.stats.misses == 1
    assert torch.allclose(got, reference, atol=1e-5, rtol=0)


def test_the_one_request_call_is_short():
    """``Server.score(Request(user, new_events=..., ns=...))``: no request id, time or count needed; the count
    is derived from the candidates, and the scores need no autograd."""
    model = make_model(tiny_config(n_layers=4))
    server = Server(model, "both")
    out = server.score(Request(3, new_events=_events(5, 0.0, 3), ns=_candidates(2, 3)))
    assert out.shape == (2, 2) and not out.requires_grad
    assert Request(3, ns=_candidates(6, 1)).n_candidates == 6
    again = server.score(Request(3, ns=_candidates(2, 3)))  # no new events: the same history
    assert torch.equal(out, again) and server.store.stats.hits == 1
