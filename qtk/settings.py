"""Settings read from the environment when asked for, never frozen at import time.

The variables and defaults are huggingface_hub's, so that qtk, the ``hf`` CLI and transformers
share one login, one cache and one endpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = ["Settings", "DEFAULT_ENDPOINT"]

DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "true", "yes", "on"}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


@dataclass(frozen=True)
class Settings:
    endpoint: str
    hf_home: Path
    hub_cache: Path
    token_path: Path
    env_token: str | None
    offline: bool

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """Read ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN``, ``HF_TOKEN_PATH`` and
        ``HF_HUB_OFFLINE`` now; keyword overrides win (``None`` overrides are ignored)."""
        xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
        hf_home = Path(os.path.expanduser(os.environ.get("HF_HOME", os.path.join(xdg, "huggingface"))))
        hub_cache = Path(
            os.path.expanduser(
                os.environ.get("HF_HUB_CACHE")
                or os.environ.get("HUGGINGFACE_HUB_CACHE")
                or str(hf_home / "hub")
            )
        )
        token_path = Path(os.path.expanduser(os.environ.get("HF_TOKEN_PATH", str(hf_home / "token"))))
        env_token = (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or "").strip()
        endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        settings = cls(
            endpoint=endpoint,
            hf_home=hf_home,
            hub_cache=hub_cache,
            token_path=token_path,
            env_token=env_token or None,
            offline=_env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE"),
        )
        clean = {k: v for k, v in overrides.items() if v is not None}
        if "endpoint" in clean:
            clean["endpoint"] = clean["endpoint"].rstrip("/")
        return replace(settings, **clean) if clean else settings
