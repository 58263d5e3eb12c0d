import json
import os
import stat

import pytest

from hubtest import ALICE, BOB


def test_login_validates_then_stores_with_mode_0600(qtk, hub, hf_env):
    r = qtk("login", "--token", ALICE)
    assert r.exit_code == 0, r.stderr
    token_file = hf_env / "token"
    assert token_file.read_text() == ALICE
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert "alice" in r.stderr and ALICE not in r.stdout + r.stderr


def test_login_from_stdin(qtk, hub, hf_env):
    r = qtk("login", "--token", "-", input=BOB + "\n")
    assert r.exit_code == 0, r.stderr
    assert (hf_env / "token").read_text() == BOB


def test_login_without_token_and_no_tty_is_a_usage_error(qtk, hub, hf_env):
    r = qtk("login", input="")
    assert r.exit_code == 2
    assert "--token -" in r.stderr
    assert not (hf_env / "token").exists()


def test_invalid_token_is_not_stored_and_not_echoed(qtk, hub, hf_env):
    bad = "hf_notAValidTokenAtAll000000000000"
    r = qtk("--debug", "login", "--token", bad)
    assert r.exit_code == 11
    assert not (hf_env / "token").exists()
    assert bad not in r.stdout + r.stderr
    assert "qtk login" in r.stderr


def test_whoami_prints_user_and_role_never_the_token(qtk, hub):
    qtk("login", "--token", ALICE)
    r = qtk("whoami")
    assert r.exit_code == 0
    assert r.stdout.strip() == "alice"
    assert "token role: read" in r.stderr
    assert ALICE not in r.stdout + r.stderr
    doc = json.loads(qtk("whoami", "--json").stdout)
    assert doc["name"] == "alice" and doc["token_role"] == "read" and doc["orgs"] == ["acme"]
    assert ALICE not in json.dumps(doc)


def test_whoami_not_logged_in_exits_nonzero(qtk, hub):
    r = qtk("whoami")
    assert r.exit_code == 10
    assert "qtk login" in r.stderr


def test_hf_token_env_overrides_file(qtk, hub, monkeypatch):
    qtk("login", "--token", ALICE)
    monkeypatch.setenv("HF_TOKEN", BOB)
    r = qtk("whoami", "--json")
    doc = json.loads(r.stdout)
    assert doc["name"] == "bob" and doc["token_source"] == "HF_TOKEN"


def test_logout_removes_token(qtk, hub, hf_env):
    qtk("login", "--token", ALICE)
    r = qtk("logout")
    assert r.exit_code == 0
    assert not (hf_env / "token").exists()
    assert qtk("whoami").exit_code == 10


def test_token_file_is_read_by_huggingface_hub(qtk, hub, hf_env):
    """One login for qtk, `hf` and transformers: huggingface_hub finds the token qtk stored."""
    import subprocess
    import sys

    qtk("login", "--token", ALICE)
    code = "from huggingface_hub import get_token; print(get_token())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "HF_HOME": str(hf_env)}, check=True).stdout.strip()
    assert out == ALICE


def test_unreachable_endpoint_is_a_network_error(qtk, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    r = qtk("login", "--token", ALICE)
    assert r.exit_code == 30
    assert "127.0.0.1:9" in r.stderr


@pytest.mark.parametrize("cmd", [["whoami"], ["pull", "acme/gated"]])
def test_json_errors_are_machine_readable(qtk, hub, cmd):
    r = qtk(*cmd, "--json")
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == r.exit_code == 10
    assert doc["hint"]


def test_login_and_whoami_never_print_endpoint_credentials(qtk, hub, monkeypatch):
    # HF_ENDPOINT=http://user:secret@host:port: whatever the endpoint answers, the password is never shown
    qtk("login", "--token", ALICE)
    endpoint = os.environ["HF_ENDPOINT"].replace("http://", "http://ops:s3cretPass@", 1)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    for args in (("whoami",), ("whoami", "--json"), ("login", "--token", ALICE), ("--debug", "whoami")):
        r = qtk(*args)
        assert "s3cretPass" not in r.stdout + r.stderr, args
        assert "127.0.0.1" in r.stdout + r.stderr, args
