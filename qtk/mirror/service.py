"""Assembling ``qtk serve`` from its parts: the store with its persistent hash index, the access file,
TLS, and the server's limits. The CLI command (``qtk/cli/hub.py``) is a thin wrapper over these."""

from __future__ import annotations

import logging
import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import errors
from .app import MirrorAuth, MirrorServer, load_auth
from .hashindex import HashIndex, IndexNotTrusted, default_index_dir
from .server import MAX_PER_CLIENT
from .store import MirrorStore, PublishedVersions

__all__ = ["ServeOptions", "exposure_warnings", "open_store", "tls_context", "make_server", "log_to_stderr", "read_access"]

INDEX_FILE = "hash-index.sqlite"


@dataclass(frozen=True)
class ServeOptions:
    workers: int = 32
    max_connections: int = 2048
    max_pending: int = 1024
    header_timeout: float = 20.0
    idle_timeout: float = 60.0
    io_timeout: float = 60.0
    max_per_client: int = MAX_PER_CLIENT


def log_to_stderr() -> None:
    """The mirror's warnings (skipped files, internal errors) and access log go to stderr."""
    logger = logging.getLogger("qtk.mirror")
    if not logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("qtk serve: %(levelname)s %(message)s"))
        logger.addHandler(h)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def open_store(directory: Path, *, index_dir: Path | None = None, access: MirrorAuth | None = None,
               versions: PublishedVersions | None = None) -> MirrorStore:
    """The store over ``directory`` with its hash index (``DIR/.qtk-serve`` if writable, else under the
    user's cache, or ``index_dir``); ``versions``: the publisher that manages repos there (the CLI passes
    ``qtk provision``'s store view, :class:`~qtk.mirror.store.PublishedVersions`)."""
    where = index_dir or default_index_dir(directory)
    try:
        index = HashIndex(where / INDEX_FILE)  # the directory is created 0700, the database 0600
    except (OSError, Exception) as exc:  # sqlite3.Error included
        if index_dir is not None:
            hint = ("Pick an --index-dir that you own: the index holds the hashes the mirror announces, so "
                    "only the serving user may write it." if isinstance(exc, IndexNotTrusted)
                    else "Pick a writable --index-dir.")
            raise errors.NotWritableError(f"Cannot open the hash index in {where}: {exc}.", hint=hint) from exc
        logging.getLogger("qtk.mirror").warning("hash index kept in memory only (%s not writable: %s)", where, exc)
        index = HashIndex(None)
    return MirrorStore(directory, index=index, exclude=[access.source] if access and access.source else (),
                       versions=versions)


def tls_context(cert: Path, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        raise errors.UsageError(f"Cannot load the TLS certificate {cert} / key {key}: {exc}.",
                                hint="--tls-cert takes a PEM certificate (chain), --tls-key its PEM private key.") from exc
    return ctx


def make_server(store: MirrorStore, host: str, port: int, *, access: MirrorAuth | None, access_log: bool,
                tls: ssl.SSLContext | None, trusted_proxies, options: ServeOptions) -> MirrorServer:
    try:
        return MirrorServer((host, port), store, auth=access, access_log=access_log, ssl_context=tls,
                            trusted_proxies=trusted_proxies, workers=options.workers,
                            max_connections=options.max_connections, max_pending=options.max_pending,
                            header_timeout=options.header_timeout, idle_timeout=options.idle_timeout,
                            io_timeout=options.io_timeout, max_per_client=options.max_per_client)
    except OSError as exc:
        raise errors.UsageError(f"Cannot listen on {host}:{port}: {exc.strerror}.",
                                hint="Pick another --port (or 0 for a free one).") from exc


def exposure_warnings(directory: Path, host: str, access_file: Path | None, tls: bool) -> list[str]:
    """What an operator should hear before the mirror goes on a network."""
    out = []
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    if not loopback and access_file is None:
        out.append(f"Listening on {host} without --access: every repo in {directory} is public to anyone who "
                   "can reach this port.")
    if not loopback and access_file is not None and not tls:
        out.append("Tokens travel in clear text over plain HTTP: use --tls-cert/--tls-key, or a TLS proxy "
                   "(--trusted-proxy).")
    if access_file is not None:
        real, root = os.path.realpath(access_file), os.path.realpath(directory)
        if real.startswith(root.rstrip(os.sep) + os.sep):
            out.append(f"The access file {access_file} is inside the served directory: it is never listed or "
                       "served, but keep it elsewhere.")
    return out


def read_access(path: Path | None) -> MirrorAuth | None:
    return load_auth(path) if path else None
