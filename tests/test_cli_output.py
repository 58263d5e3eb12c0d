"""What a command prints: its result on stdout (a listing, a report table, a path, a name, or one JSON
document with --json), progress and diagnostics on stderr, so that `qtk ... | tool` gets the result and
nothing else. And `qtk login` / `qtk whoami` give up on a server that never answers. Issue 19 item 18."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from hubtest import ALICE

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
          "max_position_embeddings": 128, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def _provision_store(tmp_path) -> list[str]:
    from qtk.provision.store import ProvisionStore

    store = ProvisionStore(tmp_path / "store")
    store.init()
    store.write_json(store.record_path("qtk/smol-nf4"), {
        "repo_id": "qtk/smol-nf4", "model": "smol", "method": "nf4", "source": "acme/smol@0123456789ab",
        "last_run": {"result": "gate_failed", "gate_failures": ["mean KLD 0.2 > 0.1"]}})
    return ["provision", "status", str(tmp_path / "store")]


def _cached(qtk, tmp_path) -> list[str]:
    assert qtk("pull", "acme/tiny", "--include", "config.json").exit_code == 0
    return ["cache", "ls"]


def _prunable(qtk, tmp_path) -> list[str]:
    import os

    assert qtk("pull", "acme/tiny", "--include", "config.json").exit_code == 0
    lock = tmp_path / "hf" / "hub" / ".locks" / "models--acme--tiny" / ("6" * 40 + ".qtk.lock")
    lock.write_text("")  # a lock file no process holds
    os.utime(lock, (1, 1))
    return ["cache", "prune", "--dry-run"]


def _plan(qtk, tmp_path) -> list[str]:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    return ["plan", str(tmp_path / "config.json")]


# (name, setup(qtk, tmp_path) -> args, what the result holds, a diagnostic that must stay on stderr or None)
LISTINGS = [
    ("exit-codes", lambda q, t: ["exit-codes"], "GateFailedError", None),
    ("calibration list", lambda q, t: ["calibration", "list"], "prose-heldout", None),
    ("cache ls", _cached, "acme/tiny", "repo(s)"),
    ("cache prune --dry-run", _prunable, "6666666666", "Would remove"),
    ("pull --dry-run", lambda q, t: ["pull", "acme/tiny", "--dry-run"], "sub/deeper/weights.bin", "free disk"),
    ("whoami", lambda q, t: ["whoami"], "alice", "token role"),
    ("provision status", lambda q, t: _provision_store(t), "qtk/smol-nf4", "Serve it"),
    ("plan", _plan, "KV cache", None),
]


@pytest.mark.parametrize("name, setup, result, note", LISTINGS, ids=[x[0] for x in LISTINGS])
def test_listing_commands_print_their_result_on_stdout(qtk, hub, monkeypatch, tmp_path, name, setup, result, note):
    monkeypatch.setenv("HF_TOKEN", ALICE)
    args = setup(qtk, tmp_path)
    r = qtk(*args)
    assert r.exit_code == 0, r.stderr
    assert result in r.stdout, (name, r.stdout, r.stderr)
    assert result not in r.stderr, (name, r.stderr)
    if note:
        assert note in r.stderr and note not in r.stdout, (name, r.stdout, r.stderr)
    assert "\x1b[" not in r.stdout  # not a terminal: no colour codes in what a pipe gets


@pytest.mark.parametrize("name, setup, result, note", [x for x in LISTINGS if x[0] not in ("exit-codes",)],
                         ids=[x[0] for x in LISTINGS if x[0] not in ("exit-codes",)])
def test_listing_commands_with_json_print_one_document(qtk, hub, monkeypatch, tmp_path, name, setup, result, note):
    monkeypatch.setenv("HF_TOKEN", ALICE)
    args = setup(qtk, tmp_path)
    args = args[:1] + ["--json"] + args[1:] if args[0] == "plan" else [*args, "--json"]
    r = qtk(*args)
    assert r.exit_code == 0, r.stderr
    assert result in json.dumps(json.loads(r.stdout)), (name, r.stdout)


def _silent_server() -> socket.socket:
    """Accepts connections (the kernel completes the handshake) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


@pytest.mark.parametrize("args", [["whoami"], ["login", "--token", "-"]], ids=["whoami", "login"])
def test_login_and_whoami_give_up_on_a_server_that_never_answers(tmp_path, args):
    """Before: no timeout on the whoami call, the command waited forever. Now HF_HUB_ETAG_TIMEOUT (here
    1 s) bounds each of the two attempts, then a NetworkError (exit 30) names the endpoint."""
    with _silent_server() as srv:
        port = srv.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
        env |= {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_ETAG_TIMEOUT": "1",
                "HF_HOME": str(tmp_path / "hf")}
        if args[0] == "whoami":
            env["HF_TOKEN"] = ALICE
        t0 = time.monotonic()
        try:
            r = subprocess.run([sys.executable, "-m", "qtk", *args], input=ALICE + "\n", env=env, capture_output=True,
                               text=True, timeout=45)
        except subprocess.TimeoutExpired:
            pytest.fail(f"qtk {args[0]} was still waiting for the server after 45 s")
    assert r.returncode == 30, r.stderr
    assert f"127.0.0.1:{port} did not answer within 1 s (2 tries)" in r.stderr, r.stderr
    assert "HF_HUB_ETAG_TIMEOUT" in r.stderr and ALICE not in r.stderr + r.stdout
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "hf" / "token").exists()  # login stores a token only once it was checked
