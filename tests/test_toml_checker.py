"""The TOML files users write (the mirror's access file, provision manifests) are read by one checker
(qtk.tomlcheck) that fails closed: an unknown key, a value of the wrong type or a rule that cannot hold
stops `qtk serve` with the file, the line and the field; any nesting depth gives a clean error, never a
RecursionError. Issue 19 item 10."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from qtk import errors
from qtk.mirror.app import load_auth

MAX_DEPTH = 32  # qtk.tomlcheck.MAX_DEPTH

SHA = hashlib.sha256(b"t").hexdigest()

# access file -> (line, field, words): every one of these started a mirror before (fail open)
ACCESS_REFUSED = [
    ('[repos."acme/x"]\nprivat = true\n', 2, "repos.acme/x.privat", "unknown field; did you mean 'private'?"),
    ('[repos."acme/x"]\nprivate = true\nallow = "acme"\n', 3, "repos.acme/x.allow", "expected an array of strings"),
    ('[repos."acme/x"]\nprivate = true\nallow = ["acme", 7]\n', 3, "repos.acme/x.allow",
     "expected an array of strings"),
    ('[repos."acme/x"]\nprivate = "yes"\n', 2, "repos.acme/x.private", "expected true/false"),
    ('[repos."acme/x"]\ngated = 1\n', 2, "repos.acme/x.gated", "expected true/false"),
    ('# the model\n[repos."acme/llama-3.1-8b"]\ngated = true\nalow = ["alice"]\n', 4,
     "repos.acme/llama-3.1-8b.alow", "did you mean 'allow'?"),
    ('require_token = true\n', 1, "require_token", "no token could ever be accepted"),
    ('requre_token = true\n[[users]]\nname = "a"\ntoken = "t"\n', 1, "requre_token", "did you mean 'require_token'?"),
    ('require_token = "yes"\n', 1, "require_token", "expected true/false"),
    ('[[users]]\nname = "a"\ntoken = "t"\nrole = "admin"\n', 4, "users[0].role", "must be one of read, write"),
    ('[[users]]\nname = "a"\ntoken_sha256 = "abc"\n', 3, "users[0].token_sha256", "64 hex digits"),
    ('[[users]]\nname = "a"\ntoken = "t"\norgs = "acme"\n', 4, "users[0].orgs", "expected an array of strings"),
    ('[[users]]\nname = "a"\ntoken = "t"\n\n[[users]]\nname = "b"\ntokn = "u"\n', 7, "users[1].tokn",
     "did you mean 'token'?"),
    (f'[[users]]\nname = "a"\ntoken = "t"\n[[users]]\nname = "b"\ntoken_sha256 = "{SHA}"\n', 4, "users[1]",
     "has the same token as user 'a'"),
    ('[[users]]\nname = "a"\ntoken = "t"\ntoken_sha256 = "x"\n', 1, "users[0]", "one of 'token' or 'token_sha256'"),
    ('users = [{name = "a", token = "t", admin = true}]\n', 1, "users[0].admin", "unknown field"),
    ('[repos."api/x"]\nprivate = true\n', 1, "repos.api/x", "is a route on the Hub"),
    ('[repos."acme/a..b"]\nprivate = true\n', 1, "repos.acme/a..b", "'--' and '..' are not allowed"),
    ('[repos]\n"acme/x" = { private = true, alow = ["a"] }\n', 2, "repos.acme/x.alow", "did you mean 'allow'?"),
    ('[repos."acme/x"]\nprivate = true\n[repos."acme/x".extra]\nx = 1\n', 3, "repos.acme/x.extra", "unknown field"),
]


@pytest.mark.parametrize("text, line, field, words", ACCESS_REFUSED)
def test_access_file_refuses_what_it_does_not_understand(tmp_path, text, line, field, words):
    access = tmp_path / "access.toml"
    access.write_text(text)
    with pytest.raises(errors.UsageError) as e:
        load_auth(access)
    assert f"{access}:{line}: {field}: " in e.value.message, e.value.message
    assert words in e.value.message, e.value.message
    assert e.value.exit_code == 2


def test_a_valid_access_file_still_loads(tmp_path):
    access = tmp_path / "access.toml"
    access.write_text(f'require_token = true\n[[users]]\nname = "alice"\ntoken_sha256 = "{SHA.upper()}"\n'
                      'role = "write"\norgs = ["acme"]\n[repos."acme/llama-3.1-8b"]\ngated = true\n'
                      'allow = ["acme"]\n[repos."datasets/acme/x"]\nprivate = true\n')
    auth = load_auth(access)
    assert auth.require_token and auth.user_for("t").name == "alice" and auth.user_for("t").role == "write"
    assert auth.policy("ACME/Llama-3.1-8B").gated and auth.policy("datasets/acme/x").private


def test_qtk_serve_does_not_start_on_a_typo(qtk, tmp_path):
    access = tmp_path / "access.toml"
    access.write_text('[repos."acme/x"]\nprivat = true\n')
    r = qtk("serve", str(tmp_path), "--access", str(access), "--index")
    assert r.exit_code == 2 and f"{access}:2: repos.acme/x.privat: unknown field" in r.stderr, r.stderr


N = 50_000
DEEP = [
    ("arrays", "x = " + "[" * N + "]" * N + "\n"),
    ("inline tables", "x = " + "{a = " * N + "1" + "}" * N + "\n"),
    ("arrays after a header", '[repos."acme/x"]\nallow = ' + "[" * N + "]" * N + "\n"),
]


@pytest.mark.parametrize("what, text", DEEP, ids=[d[0] for d in DEEP])
def test_deep_nesting_is_a_clean_error_for_access_files_and_manifests(qtk, tmp_path, what, text):
    """tomllib recurses per level: before, 50,000 levels were a RecursionError (exit 1, "likely a bug")."""
    access = tmp_path / "access.toml"
    access.write_text(text)
    with pytest.raises(errors.UsageError, match=f"nested deeper than {MAX_DEPTH} levels"):
        load_auth(access)
    manifest = tmp_path / "m.toml"
    manifest.write_text('store = "s"\n' + text)
    r = qtk("provision", "run", str(manifest), "--dry-run")
    assert r.exit_code == 2 and f"{manifest}:" in r.stderr and "nested deeper than" in r.stderr, r.stderr


@pytest.mark.parametrize("text, words", [
    ("x" + ".x" * N + " = 1\n", "1: a dotted key of more than 32 parts"),  # tomllib: quadratic, a minute
    ("a = {" + "x" + ".x" * N + " = 1}\n", "1: a dotted key of more than 32 parts"),
    ("[" + ".".join(["t"] * N) + "]\nx = 1\n", "1: a dotted key of more than 32 parts"),
    ("".join(f"[{'.'.join(['t'] * k)}]\n" for k in (20, 30)) + "x" + ".x" * 20 + " = 1\n",
     "tables nested deeper than 32 levels"),  # headers + dotted keys: each short, together too deep
])
def test_long_dotted_keys_are_refused_before_parsing(tmp_path, text, words):
    access = tmp_path / "access.toml"
    access.write_text(text)
    with pytest.raises(errors.UsageError, match=words):
        load_auth(access)


HUGE = "9" * 5000  # past Python's int() digit limit: tomllib raised a bare ValueError (exit 1, "likely a bug")


@pytest.mark.parametrize("text, line", [
    (f'[repos."acme/x"]\nprivate = {HUGE}\n', 2),
    (f'[[users]]\nname = "a"\ntoken = "t"\norgs = [{HUGE}]\n', 4),
    (f"x = {HUGE[:2000]}_{HUGE[:2500]}\n", 1),
])
def test_an_integer_too_long_to_read_is_a_clean_error(qtk, tmp_path, text, line):
    access = tmp_path / "access.toml"
    access.write_text(text)
    with pytest.raises(errors.UsageError, match=f"{access}:{line}: an integer too long to read"):
        load_auth(access)
    manifest = tmp_path / "m.toml"
    manifest.write_text('store = "s"\n' + text)
    r = qtk("provision", "run", str(manifest), "--dry-run")
    assert r.exit_code == 2 and f"{manifest}:{line + 1}: an integer too long" in r.stderr, r.stderr


def test_brackets_in_strings_and_comments_do_not_count(tmp_path):
    from qtk.provision.manifest import load_manifest

    m = tmp_path / "m.toml"
    m.write_text(f'store = "s"  # {"[" * N}\n[defaults.verify]\ntext = "{"{" * N}"\n'
                 f"text_field = '''\n{'[' * N}\n'''\n"
                 '[[models]]\nrepo = "acme/x"\n[[models.recipes]]\nmethod = "nf4"\n')
    assert load_manifest(m).models[0].verify["text"] == "{" * N


def test_a_large_file_is_refused_before_it_is_parsed(tmp_path):
    access = tmp_path / "access.toml"
    access.write_bytes(b"# " + b"x" * (5 * 1024 * 1024) + b"\n")
    with pytest.raises(errors.UsageError, match="larger than 4 MiB"):
        load_auth(access)


LOCATED = [  # text, path, line
    ('a = 1\n[t]\nb = 2\n', ("t", "b"), 3),
    ('[[m]]\nx = 1\n[[m]]\nx = 2\n[[m.r]]\ny = 3\n', ("m", 1, "r", 0, "y"), 6),
    ('[r."acme/llama-3.1-8b"]\nprivate = true\n', ("r", "acme/llama-3.1-8b", "private"), 2),
    ("[r.'lit.eral']\nk = 1\n", ("r", "lit.eral", "k"), 2),
    ('inc = [\n  "x = 1",\n  "[fake]",\n]\nk = 1\n', ("k",), 5),
    ('s = """\n[fake]\nk = 2\n"""\nk = 1\n', ("k",), 5),
    ('t.u.v = 1\n', ("t", "u", "v"), 1),
    ('"quoted key" = 1\n', ("quoted key",), 1),
]


@pytest.mark.parametrize("text, path, line", LOCATED)
def test_locator_finds_the_line(text, path, line):
    from qtk.tomlcheck import Locator, _nesting

    _, inner = _nesting(text, MAX_DEPTH)
    assert Locator(text, inner).line(path) == line


def test_the_limit_is_the_modules():
    from qtk import tomlcheck

    assert tomlcheck.MAX_DEPTH == MAX_DEPTH


def test_the_mirror_does_not_import_provision():
    """The shared checker sits below both: loading the mirror's access file pulls in no provision code."""
    code = "import sys, qtk.mirror.app; print([m for m in sys.modules if m.startswith('qtk.provision')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
