"""redact(): credentials disappear, nothing else changes (paths, JSON keys, package names)."""

import json
import string
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from hubtest import ALICE

from qtk import errors
from qtk.errors import redact

TOKEN = "hf_" + "Ab1" * 12  # token-shaped: hf_ + 36 letters/digits


@pytest.mark.parametrize(
    "text",
    [
        "/tmp/hf_cache/hub/models--acme--tiny/snapshots/abc",
        "/mnt/hf_cache",
        '{"removed": false, "hf_token_env_set": true}',
        "pip install hf_transfer hf_xet huggingface_hub",
        "hf_" + "a" * 29,  # 29: one short of a token
        "Bearer of bad news",
        "the Authorization header was refused",
        "http://mirror:8080/api/models/acme/tiny",
        "https://huggingface.co/acme/tiny@main",
        "user@host:/srv/models",
    ],
)
def test_ordinary_text_is_left_alone(text):
    assert redact(text) == text


@pytest.mark.parametrize(
    "text,secret,shown",
    [
        (f"token {TOKEN} leaked", TOKEN, "token hf_*** leaked"),
        (f"x{TOKEN}", TOKEN, "xhf_***"),
        (f"Authorization: Bearer abc.def-ghi", "abc.def-ghi", "Authorization: Bearer ***"),
        ("{'authorization': 'Basic dXNlcjpwYXNzd29yZA=='}", "dXNlcjpwYXNzd29yZA==", "{'authorization': 'Basic ***'}"),
        ('"Authorization": "tok_123"', "tok_123", '"Authorization": "***"'),
        ("header Bearer sk-live-0123456789", "sk-live-0123456789", "header Bearer ***"),
        ("GET http://alice:s3cr3t@mirror:8080/x failed", "s3cr3t", "GET http://alice:***@mirror:8080/x failed"),
        ("see https://:p4ss@host/", "p4ss", "see https://:***@host/"),
    ],
)
def test_credentials_are_hidden(text, secret, shown):
    out = redact(text)
    assert secret not in out
    assert out == shown


def test_registered_secret_of_any_shape_is_hidden():
    errors.register_secret("plain-Secret_value:42")
    assert redact("a plain-Secret_value:42 b") == "a *** b"


def test_short_values_are_not_registered():
    errors.register_secret("abc")  # would blank every "abc" in every message
    assert redact("abcdef") == "abcdef"


_PATHISH = st.text(alphabet=string.ascii_letters + string.digits + "/._-: {}\"'", max_size=80)


@settings(max_examples=300, deadline=None)
@given(_PATHISH)
def test_text_without_credentials_is_unchanged(text):
    """Paths, keys and words survive whole: only token shapes (hf_ + 30 alnum), Authorization/Bearer values
    and URL passwords are touched, and this alphabet forms none of them without the markers below."""
    if "hf_" in text or "uthorization" in text.lower() or "Bearer" in text or "@" in text:
        return
    assert redact(text) == text


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.text(alphabet=string.ascii_letters + string.digits, min_size=30, max_size=60),
       st.text(max_size=40))
def test_token_shaped_values_never_survive(before, body, after):
    out = redact(before + "hf_" + body + after)
    assert "hf_" + body not in out


# ------------------------------------------------------------------------------------- through the CLI


def test_pull_prints_a_cache_path_with_hf_in_it_intact(qtk, hub, tmp_path, monkeypatch):
    home = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_HOME", str(home))
    r = qtk("pull", "acme/tiny", "--include", "*.json")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip().startswith(str(home / "hub" / "models--acme--tiny" / "snapshots"))
    assert Path(r.stdout.strip()).is_dir()
    doc = json.loads(qtk("pull", "acme/tiny", "--include", "*.json", "--json").stdout)
    assert doc["path"].startswith(str(home))


def test_logout_json_keys_are_intact(qtk, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ALICE)
    doc = json.loads(qtk("logout", "--json").stdout)
    assert doc["hf_token_env_set"] is True and "removed" in doc


@pytest.mark.parametrize("debug", [[], ["--debug"]])
def test_tokens_never_printed(qtk, hub, monkeypatch, debug):
    bad = "hf_NotAValidTokenButShapedLikeOne1234567"
    monkeypatch.setenv("HF_TOKEN", bad)
    r = qtk(*debug, "pull", "acme/tiny", "--json")
    assert r.exit_code == 11
    assert bad not in r.stdout and bad not in r.stderr
    monkeypatch.setenv("HF_TOKEN", ALICE)
    r = qtk(*debug, "pull", "acme/nope")
    assert r.exit_code == 13
    assert ALICE not in r.stdout + r.stderr
