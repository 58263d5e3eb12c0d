"""``qtk provision``: manifest-driven, idempotent pull -> quantize -> verify -> gate -> publish.

    from qtk.provision import load_manifest, provision, ProvisionOptions
    summary = provision(load_manifest("models.toml"), ProvisionOptions(keep_going=True))
    summary.exit_code   # 0 ok, 3 gate failures only, 60 errors under --keep-going, else the error's code

The modules, each importing only the ones below it (no cycle; tests/test_layering.py):
``run`` (:class:`~qtk.provision.run.Provisioner`: the public steps, and the local executor),
``ray_executor`` (the same steps as Ray tasks), ``store`` (the layout, locks, atomic publish and the
kept-versions policy, which ``qtk serve`` reads through its :class:`~qtk.mirror.store.PublishedVersions`
view), ``manifest``, ``keys``, ``lease``, ``shard``.
"""

from .manifest import Manifest, ManifestError, load_manifest
from .run import ProvisionOptions, Provisioner, Summary, run_local
from .store import ProvisionStore

__all__ = ["Manifest", "ManifestError", "load_manifest", "ProvisionOptions", "Summary", "provision", "ProvisionStore"]


def provision(manifest: Manifest, opts: ProvisionOptions | None = None, **kw) -> Summary:
    """Provision ``manifest`` with the executor ``opts.executor`` names ("local" or "ray"); ``kw`` go to
    :class:`~qtk.provision.run.Provisioner` (settings, on_event, log, warn)."""
    opts = opts or ProvisionOptions()
    if opts.executor == "ray":
        from .ray_executor import run_on_ray as execute
    else:
        execute = run_local
    return Provisioner(manifest, opts, **kw).run(execute)
