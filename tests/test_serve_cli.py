"""`qtk serve` as a command: --index ahead of time, the index reused by the server, refusals at start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hubtest import ALICE, write_plain_repo
from servetest import raw_request

ROOT = Path(__file__).resolve().parent.parent


def test_index_ahead_then_serve_reuses_it(qtk, tmp_path):
    store = tmp_path / "store"
    write_plain_repo(store, "acme/m", {"config.json": b"{}", "w.safetensors": os.urandom(100_000)})
    (store / "acme" / "m" / ".secret").write_bytes(b"x")
    r = qtk("serve", str(store), "--index")
    assert r.exit_code == 0, r.stderr
    assert "hashed 2 new file(s)" in r.stderr and r.stdout == ""
    assert (store / ".qtk-serve" / "hash-index.sqlite").is_file()
    assert "hashed 0 new file(s)" in qtk("serve", str(store), "--index").stderr

    access = tmp_path / "access.toml"
    access.write_text(f'[[users]]\nname = "alice"\ntoken = "{ALICE}"\n[repos."ACME/M"]\nprivate = true\nallow = ["alice"]\n')
    proc = subprocess.Popen([sys.executable, "-m", "qtk", "serve", str(store), "--port", "0", "--access", str(access)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        url = proc.stdout.readline().strip()
        port = int(url.rsplit(":", 1)[1])
        assert raw_request(port, "/acme/m/resolve/main/config.json")[0] == 401
        status, hdrs, body = raw_request(port, "/Acme/M/resolve/main/config.json",
                                         headers={"Authorization": f"Bearer {ALICE}"})
        assert (status, body) == (200, b"{}")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "hashed 0 new file(s)" in err and "Serving at" in err


@pytest.mark.parametrize("toml,words", [
    ('[repos."acme/../x"]\nprivate = true\n', "not a repo id"),
    ('[repos."acme"]\nprivate = true\n', "not a repo id"),
    ('[repos."acme/x"]\nprivate = true\n[repos."ACME/X"]\nprivate = false\n', "case-insensitive"),
    ("[[users]]\nname = 1\n", "access.toml:2: users[0].name: expected a string"),
    ("[[users]]\nname = \"a\"\n", "needs a non-empty 'name' and one of 'token' or 'token_sha256'"),
    ("not = [toml", "TOML syntax error"),
])
def test_bad_access_file_is_refused_at_start(qtk, tmp_path, toml, words):
    access = tmp_path / "access.toml"
    access.write_text(toml)
    r = qtk("serve", str(tmp_path), "--access", str(access), "--index")
    assert r.exit_code != 0 and words in r.stderr, r.stderr


@pytest.mark.parametrize("args,words", [
    (["--tls-key", "KEY"], "--tls-key needs --tls-cert"),
    (["--tls-cert", "CERT"], "Cannot load the TLS certificate"),
    (["--trusted-proxy", "not-an-ip"], "--trusted-proxy"),
])
def test_bad_tls_and_proxy_options(qtk, tmp_path, args, words):
    (tmp_path / "KEY").write_text("x")
    (tmp_path / "CERT").write_text("x")
    args = [str(tmp_path / a) if a in ("KEY", "CERT") else a for a in args]
    r = qtk("serve", str(tmp_path / "KEY").rsplit("/", 1)[0], "--port", "0", *args)
    assert r.exit_code != 0 and words in r.stderr, r.stderr


def test_exposure_warnings(qtk, tmp_path):
    write_plain_repo(tmp_path, "acme/m", {"a.txt": b"a"})
    access = tmp_path / "acme" / "m" / "access.toml"
    access.write_text('[repos."acme/m"]\nprivate = true\n')
    r = qtk("serve", str(tmp_path), "--host", "0.0.0.0", "--access", str(access), "--index")
    assert r.exit_code == 0, r.stderr
    assert "clear text" in r.stderr and "inside the served directory" in r.stderr
    r = qtk("serve", str(tmp_path), "--host", "0.0.0.0", "--index")
    assert "without --access" in r.stderr
    assert "Warning" not in qtk("serve", str(tmp_path), "--index").stderr
