"""qtk as users install it: a wheel (not the checkout) with its package data, and install commands
that keep the pinned torch.

``scripts/test.sh`` (what CI runs) builds the wheel once and exports QTK_WHEEL; run alone, these tests
build their own. QTK_TEST_PROFILE tells what the environment is supposed to hold: ``full`` (every
backend: a missing one would silently skip whole test files) or ``base`` (no torch: the torch-free
commands must work without it).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import qtk

ROOT = Path(__file__).resolve().parents[1]  # the checkout the tests came from
BACKENDS = ("torch", "transformers", "gptqmodel", "optimum", "bitsandbytes", "compressed_tensors", "llama_cpp",
            "matplotlib")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    given = os.environ.get("QTK_WHEEL")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)], check=True)
    return next(out.glob("qtk-*.whl"))


def test_the_suite_runs_against_the_installed_wheel():
    """Under scripts/test.sh the tests must import the installed qtk, never the checkout."""
    if os.environ.get("QTK_TEST_INSTALLED") != "1":
        pytest.skip("not run by scripts/test.sh (QTK_TEST_INSTALLED unset)")
    here = Path(qtk.__file__).resolve()
    assert "site-packages" in here.parts, here
    assert not here.is_relative_to(ROOT / "qtk"), f"qtk imported from the checkout: {here}"


def test_environment_holds_what_its_profile_promises():
    import importlib.util

    profile = os.environ.get("QTK_TEST_PROFILE")
    present = {m: importlib.util.find_spec(m) is not None for m in BACKENDS}
    if profile == "full":
        assert all(present.values()), f"missing in the full test environment: {[m for m, p in present.items() if not p]}"
    elif profile == "base":
        assert not present["torch"], "the base environment must not hold torch"
    else:
        pytest.skip("QTK_TEST_PROFILE unset")


@pytest.mark.slow
def test_wheel_has_its_data_and_runs_from_any_directory(wheel, tmp_path):
    """pip install --no-deps the wheel into a bare target, then run the installed `qtk` from a
    directory that is not the checkout: the named texts come from the package data."""
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True)
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONSAFEPATH": "1"}
    r = subprocess.run([sys.executable, "-c", "import qtk; print(qtk.__file__)"], cwd=elsewhere, env=env,
                       capture_output=True, text=True, check=True)
    assert Path(r.stdout.strip()).is_relative_to(target)
    r = subprocess.run([str(target / "bin" / "qtk"), "calibration", "list", "--json"], cwd=elsewhere, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {"prose", "prose-heldout", "chat", "code"} <= {s["name"] for s in json.loads(r.stdout)}
    # a set that reads a shipped file (the chat seed), and the evaluation text, assembled from the wheel
    code = ("from qtk.texts import load_texts, joined_text; c = load_texts('chat'); t, _ = joined_text('prose-heldout');"
            "print(c.kind, len(c.documents), len(t) > 10000)")
    r = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    kind, n, long_enough = r.stdout.split()
    assert kind == "chat" and int(n) > 12 and long_enough == "True"


@pytest.mark.slow
def test_the_wheel_ships_the_named_texts_from_the_calibration_folder(wheel):
    """The repository keeps the named texts in its top-level calibration/ folder; the wheel carries them as
    qtk/calibration/ (byte for byte), qtk verify --tasks' own tasks as qtk/data/tasks/, and nothing else
    under qtk/data (a stale copy of a moved file would be a second source)."""
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for name in ("texts.json", "chat-seed.jsonl"):
            assert z.read(f"qtk/calibration/{name}") == (ROOT / "calibration" / name).read_bytes()
    assert {"qtk/data/tasks/qtk_cloze.yaml", "qtk/data/tasks/qtk_cloze.jsonl"} <= names
    assert not [n for n in names if n.startswith("qtk/data/") and not n.startswith("qtk/data/tasks/")]


def test_provision_manifest_parses_on_this_python():
    """tomllib on 3.11+, tomli on 3.10: the example manifest loads without torch."""
    from qtk.provision.manifest import load_manifest

    m = load_manifest(ROOT / "scripts" / "provision-example.toml", store=ROOT / "unused-store")
    assert m.models and all(r.method for spec in m.models for r in spec.recipes)


# ------------------------------------------------------------------ install commands (README) keep torch


def _readme_install_commands() -> dict[str, list[str]]:
    """README's `pip install 'torch==…' …` lines, by the target named in the comment above each."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Install", 1)[1].split("\n## ", 1)[0]
    cmds, target = {}, None
    for line in block.splitlines():
        if m := re.match(r"#\s*(CPU|CUDA)\b", line.strip()):
            target = m.group(1).lower()
        elif line.startswith("pip install") and "torch==" in line and target:
            cmds[target] = shlex.split(line.split("  #")[0])
            target = None
    return cmds


def test_readme_has_one_pinned_install_command_per_target():
    cmds = _readme_install_commands()
    assert set(cmds) == {"cpu", "cuda"}
    for argv in cmds.values():
        torch_pins = [a for a in argv if a.startswith("torch==")]
        assert len(torch_pins) == 1 and any(a.startswith(".[") for a in argv), argv


@pytest.mark.slow
@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_install_command_resolves_to_the_pinned_torch(wheel, tmp_path, target):
    """pip's resolver, asked with README's exact command (the checkout replaced by the wheel; the
    PyTorch CPU index, unreachable here, left out), plans the pinned torch and nothing newer: a
    separate `pip install '.[quantize]'` would plan gptqmodel 7.7 and torch 2.14.1+cu130."""
    if sys.version_info[:2] != (3, 11):
        pytest.skip("the pinned torch build is resolvable on this machine for Python 3.11 only")
    argv = _readme_install_commands()[target]
    pin = next(a for a in argv if a.startswith("torch=="))
    args, skip = [], False
    for a in argv[2:]:  # drop "pip install"
        if skip:
            skip = False
            continue
        if a in ("--extra-index-url", "--index-url"):
            skip = True
            continue
        args.append(f"qtk{a[1:]} @ {wheel.as_uri()}" if a.startswith(".[") else a)
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                        "--report", str(report), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    planned = {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert planned["torch"].split("+")[0] == pin.split("==")[1], planned["torch"]
    assert {"gptqmodel", "bitsandbytes", "llama-cpp-python", "transformers"} <= set(planned), sorted(planned)
    assert planned["gptqmodel"].startswith("7.6"), planned["gptqmodel"]  # 7.7+ would need torch >= 2.14.1
