"""Range sizing, resume state across range sizes, Retry-After parsing, URLs shown without credentials."""

from __future__ import annotations

import hashlib
import json
import time
from email.utils import formatdate

import pytest
from hypothesis import given, settings, strategies as st

from conftest import BIG_SIZE

from qtk._proc import boot_id
from qtk.hub._fetch import ranges
from qtk.hub._fetch import state as state_file
from qtk.hub._errors import public_text, public_url
from qtk.hub._fetch import MAX_CHUNK, MIN_CHUNK, chunk_size_for, resumable_bytes
from qtk.hub._retry import RetryPolicy, parse_retry_after
from qtk.hub.download import plan_pull, pull
from qtk.settings import Settings

KiB = 1024
MiB = 1024 * KiB


# ------------------------------------------------------------------------------------ range sizing


@pytest.mark.parametrize(
    "size,connections,chunk,ranges",
    [
        (160_000_000, 16, 39 * 64 * KiB, 63),  # was 10 x 16 MiB: 6 of 16 connections idle
        (100_000_000, 16, 3 * MiB, 32),  # two full rounds
        (300_000_000, 16, 72 * 64 * KiB, 64),  # four full rounds
        (1024 * MiB, 16, 16 * MiB, 64),
        (10_000_000_000, 16, 64 * MiB, 150),  # ceiling
        (3 * MiB, 16, 2 * MiB, 2),  # floor
        (0, 16, 2 * MiB, 0),
        (160_000_000, 1, 611 * 64 * KiB, 4),
    ],
)
def test_range_size_table(size, connections, chunk, ranges):
    assert chunk_size_for(size, connections) == chunk
    assert -(-size // chunk) == ranges


@settings(max_examples=300, deadline=None)
@given(size=st.integers(0, 2**40), connections=st.integers(1, 64))
def test_every_connection_gets_work(size, connections):
    cs = chunk_size_for(size, connections)
    assert MIN_CHUNK <= cs <= MAX_CHUNK and cs % (64 * KiB) == 0
    n = -(-size // cs)
    if size >= connections * MIN_CHUNK and cs < MAX_CHUNK:
        assert n >= connections - 1  # no idle connection on one big file
        rounds = -(-n // connections)
        assert n / (rounds * connections) >= 0.9  # and the last round is (nearly) full


# ------------------------------------------------------------------------- state across range sizes


def _state(size, digest, cs, done, partial, tmp_path):
    part = tmp_path / "x.qtk-part"
    part.write_bytes(b"")
    state = {"version": 1, "size": size, "digest": list(digest), "chunk_size": cs, "boot_id": boot_id(),
             "done": done, "partial": {str(k): v for k, v in partial.items()}}
    part.with_name(part.name + ".state.json").write_text(json.dumps(state))
    return part


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 200 * MiB),
    old_cs=st.sampled_from([MiB, 2 * MiB, 3 * MiB, 16 * MiB]),
    new_cs=st.sampled_from([MiB, 2 * MiB, 5 * MiB, 16 * MiB, 64 * MiB]),
    data=st.data(),
)
def test_state_mapped_onto_other_ranges_never_claims_unwritten_bytes(size, old_cs, new_cs, data):
    n_old = -(-size // old_cs)
    done = data.draw(st.sets(st.integers(0, n_old - 1)))
    partial = {i: data.draw(st.integers(1, old_cs - 1)) for i in data.draw(st.sets(st.integers(0, n_old - 1)))
               if i not in done}
    state = {"chunk_size": old_cs, "boot_id": boot_id(), "done": sorted(done),
             "partial": {str(k): v for k, v in partial.items()}}
    written = set()
    for i in done:
        written.update(range(i * old_cs, min(size, (i + 1) * old_cs), 4096))
    for i, v in partial.items():
        written.update(range(i * old_cs, min(size, i * old_cs + v), 4096))
    spans = state_file.covered(state, size)
    for s in range(0, size, new_cs):
        e = min(s + new_cs, size)
        n = ranges.prefix_covered(spans, s, e)
        assert 0 <= n <= e - s
        assert all(b in written for b in range(s, s + n, 4096))
    # the layout a resume picks reuses every recorded byte
    chosen = ranges.resume_layout(spans, size, new_cs, old_cs)
    assert chosen in (new_cs, old_cs)
    assert ranges.layout_keeps(spans, size, chosen) == sum(e - s for s, e in spans)


@pytest.mark.parametrize(
    "recorded,done,partial,wanted,expect",
    [
        (16 * MiB, [0, 1], {2: 5 * MiB}, 2 * MiB, 2 * MiB),  # one contiguous head: the new ranges keep it all
        (16 * MiB, [0], {2: 5 * MiB}, 3 * MiB, 16 * MiB),  # a partial after a gap: only its own layout keeps it
        (2 * MiB, [0, 1, 2], {}, 16 * MiB, 16 * MiB),
        (2 * MiB, [0, 2], {}, 16 * MiB, 2 * MiB),
        (1024, [0], {}, 2 * MiB, 2 * MiB),  # a hand-made state with tiny ranges is never adopted
    ],
)
def test_resume_layout(recorded, done, partial, wanted, expect):
    size = 100 * MiB
    state = {"chunk_size": recorded, "boot_id": boot_id(), "done": done,
             "partial": {str(k): v for k, v in partial.items()}}
    assert ranges.resume_layout(state_file.covered(state, size), size, wanted, recorded) == expect


@pytest.mark.parametrize(
    "state_patch,trusted",
    [
        ({}, 4 * MiB + 100),
        ({"chunk_size": 0}, 0),
        ({"chunk_size": "16"}, 0),
        ({"size": 1}, 0),
        ({"digest": ["sha256", "f" * 64]}, 0),
        ({"version": 2}, 0),
        ({"done": "all"}, 100),  # unreadable part ignored, the rest kept
        ({"done": [0, 1, 99, -1, "2"]}, 4 * MiB + 100),
        ({"partial": ["x"]}, 4 * MiB),
        ({"partial": {"x": 1, "2": "y"}}, 4 * MiB),
        ({"partial": {"2": 10 * MiB}}, 6 * MiB),  # a partial never spills past its range
        ({"boot_id": "another-boot"}, 0),  # after a reboot only fdatasync'ed progress counts
    ],
)
def test_foreign_or_broken_state_is_never_trusted_beyond_its_bytes(tmp_path, state_patch, trusted):
    digest = ("sha256", "a" * 64)
    part = _state(10 * MiB, digest, 2 * MiB, [0, 1], {2: 100}, tmp_path)
    sp = part.with_name(part.name + ".state.json")
    doc = json.loads(sp.read_text())
    doc.update(state_patch)
    sp.write_text(json.dumps(doc))
    assert resumable_bytes(part, 10 * MiB, digest) == trusted


@pytest.mark.slow
def test_a_state_written_with_16_mib_ranges_resumes_under_the_new_sizing(hub, hub_root, cache_dir):
    """A part file left by a qtk that cut files into fixed 16 MiB ranges resumes with today's ranges."""
    src = (hub_root / "acme/big/model.safetensors").read_bytes()
    plan = plan_pull("acme/big", settings=Settings.from_env(hub_cache=cache_dir), check_access=False)
    (big,) = [p for p in plan.files if p.file.path == "model.safetensors"]
    part = plan.target.part_path(big.file)
    part.parent.mkdir(parents=True, exist_ok=True)
    old = 16 * MiB
    part.write_bytes(src[: 2 * old + 5 * MiB] + b"\0" * (BIG_SIZE - 2 * old - 5 * MiB))
    state = {"version": 1, "size": BIG_SIZE, "digest": ["sha256", hashlib.sha256(src).hexdigest()],
             "chunk_size": old, "boot_id": boot_id(), "done": [0, 1], "partial": {"2": 5 * MiB}}
    part.with_name(part.name + ".state.json").write_text(json.dumps(state))
    assert resumable_bytes(part, BIG_SIZE, big.file.digest) == 2 * old + 5 * MiB
    plan = plan_pull("acme/big", settings=Settings.from_env(hub_cache=cache_dir), check_access=False)
    result = pull(plan, connections=16)  # 2 MiB ranges for this 64 MiB file
    assert result.stats.bytes_resumed >= 2 * old + 4 * MiB
    assert result.stats.bytes_downloaded <= BIG_SIZE - 2 * old - 4 * MiB
    assert (result.path / "model.safetensors").read_bytes() == src


# ------------------------------------------------------------------------------------- Retry-After


NOW = 1_900_000_000.0


@pytest.mark.parametrize(
    "value,seconds",
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 7 ", 7.0),
        (formatdate(NOW + 30, usegmt=True), 30.0),
        (formatdate(NOW - 30, usegmt=True), 0.0),  # in the past: no wait
        (None, None),
        ("", None),
        ("-5", None),
        ("1.5", None),  # RFC 9110: delay-seconds is a non-negative integer
        ("soon", None),
        ("Wed, 99 Foo 2026 07:28:00 GMT", None),
        ("١٢", None),  # non-ASCII digits
        ("9" * 400, 1e12),  # huge but valid: stays finite, the cap decides
    ],
)
def test_parse_retry_after(value, seconds):
    assert parse_retry_after(value, now=NOW) == seconds


@settings(deadline=None)  # a loaded CI machine must not fail a test about correctness
@given(st.text(max_size=60))
def test_parse_retry_after_never_raises(value):
    got = parse_retry_after(value, now=NOW)
    assert got is None or got >= 0


@pytest.mark.parametrize(
    "retry_after,wait",
    [(None, None), (0.0, 0.0), (5.0, 5.0), (120.0, 120.0), (121.0, "error")],
)
def test_retry_policy_honours_retry_after_up_to_the_cap(retry_after, wait):
    from qtk import errors

    policy = RetryPolicy()
    if wait == "error":
        with pytest.raises(errors.NetworkError, match="121 s"):
            policy.delay(1, retry_after, "x")
    elif wait is None:
        assert 0 < policy.delay(1, retry_after, "x") <= policy.base_delay * 1.5
    else:
        assert policy.delay(3, retry_after, "x") == wait


@pytest.mark.parametrize("name,value", [("HF_HUB_ETAG_TIMEOUT", "x"), ("HF_HUB_ETAG_TIMEOUT", "0"),
                                        ("HF_HUB_DOWNLOAD_TIMEOUT", "-1")])
def test_bad_timeout_variables_are_usage_errors(monkeypatch, name, value):
    from qtk import errors

    monkeypatch.setenv(name, value)
    with pytest.raises(errors.UsageError, match=name):
        RetryPolicy.from_env()


def test_timeout_variables_are_read_when_asked(monkeypatch):
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "7")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "9")
    p = RetryPolicy.from_env()
    assert (p.read_timeout, p.download_read_timeout) == (7.0, 9.0)


# ------------------------------------------------------------------------------ URLs as printed


@pytest.mark.parametrize(
    "url,shown,origin",
    [
        ("http://user:pass@127.0.0.1:8080/x/y?sig=abc#f", "http://127.0.0.1:8080/x/y", "http://127.0.0.1:8080"),
        ("https://huggingface.co", "https://huggingface.co", "https://huggingface.co"),
        ("https://tok@hub.example/api", "https://hub.example/api", "https://hub.example"),
        ("http://[::1]:9/p?q", "http://[::1]:9/p", "http://[::1]:9"),
        ("https://cdn.example/abc?X-Amz-Signature=deadbeef", "https://cdn.example/abc", "https://cdn.example"),
    ],
)
def test_public_url(url, shown, origin):
    assert public_url(url) == shown
    assert public_url(url, path=False) == origin


@settings(deadline=None)
@given(user=st.from_regex(r"[A-Za-z0-9._~-]{1,12}", fullmatch=True),
       pw=st.from_regex(r"[A-Za-z0-9._~!$&'()*+,;=-]{6,20}", fullmatch=True),
       port=st.integers(1, 65535))
def test_credentials_never_survive(user, pw, port):
    url = f"http://{user}:{pw}@127.0.0.1:{port}/api/models/a/b"
    clean = f"http://127.0.0.1:{port}/api/models/a/b"
    assert public_url(url) == clean
    text = f"Could not reach {url}: refused; see {url}?x=1"
    assert public_text(text) == f"Could not reach {clean}: refused; see {clean}?x=1"


def test_time_is_not_frozen():
    """parse_retry_after reads the clock when called (an HTTP date is relative to now)."""
    later = formatdate(time.time() + 100, usegmt=True)
    assert 90 <= parse_retry_after(later) <= 100
