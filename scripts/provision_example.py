"""Driver of scripts/provision-example.sh: upstream mirror -> scripts/provision.sh -> store served -> node.

Work lives in .qtk-provision-example/ (upstream mirror, HF_HOME of the provisioner, the store, a node's
HF_HOME). The manifest is scripts/provision-example.toml; nothing here is specific to SmolLM2 except
staging the upstream mirror, which on a real deployment is the Hub itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import stage_mirror  # noqa: E402  (the same upstream staging as the demo)

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("QTK_EXAMPLE_DIR", ROOT / ".qtk-provision-example"))


def serve(store: Path) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-m", "qtk", "serve", str(store), "--port", "0"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    return p, p.stdout.readline().strip()


def main() -> int:
    upstream, store = WORK / "upstream", WORK / "store"
    stage_mirror(upstream)
    server, endpoint = serve(upstream)
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(WORK / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "QTK_STORE": str(store), "QTK_SUMMARY": str(WORK / "last-run.json"),
           "QTK": str(Path(sys.executable).parent / "qtk")}
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE"):
        env.pop(var, None)
    print(f"1. upstream: local Hub mirror at {endpoint}\n2. bash scripts/provision.sh  (store {store})", flush=True)
    try:
        code = subprocess.run(["bash", str(ROOT / "scripts" / "provision.sh")], env=env).returncode
    finally:
        server.terminate()
        server.wait()
    if code not in (0, 3):
        return code
    subprocess.run([env["QTK"], "provision", "status", str(store)], env=env)
    summary = json.loads((WORK / "last-run.json").read_text())
    published = [a["repo_id"] for a in summary["artifacts"] if a["outcome"] == "ok"]
    if not published:
        return code
    # 3. a cluster node: pull from the store through `qtk serve`, load with transformers, generate
    server, endpoint = serve(store)
    try:
        node = {**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(WORK / "node-hf-home")}
        repo = published[0]
        print(f"3. node: HF_ENDPOINT={endpoint} qtk pull {repo} && from_pretrained + qtk chat", flush=True)
        subprocess.run([env["QTK"], "pull", repo, "--quiet"], env=node, check=True, stdout=subprocess.DEVNULL)
        r = subprocess.run([env["QTK"], "chat", repo, "--max-new-tokens", "24", "--device", "cpu"], env=node,
                           text=True, input="What is the capital of France?\n", stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL)
        print(f"   {repo} answers: {r.stdout.strip()!r}")
    finally:
        server.terminate()
        server.wait()
    return code


if __name__ == "__main__":
    sys.exit(main())
