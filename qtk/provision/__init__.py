"""``qtk provision``: manifest-driven, idempotent pull -> quantize -> verify -> gate -> publish.

    from qtk.provision import load_manifest, provision, ProvisionOptions
    summary = provision(load_manifest("models.toml"), ProvisionOptions(keep_going=True))
    summary.exit_code   # 0 ok, 3 gate failures only, 60 errors under --keep-going, else the error's code
"""

from .manifest import Manifest, ManifestError, load_manifest
from .run import ProvisionOptions, Summary, provision
from .store import ProvisionStore

__all__ = ["Manifest", "ManifestError", "load_manifest", "ProvisionOptions", "Summary", "provision", "ProvisionStore"]
