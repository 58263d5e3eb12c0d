"""qtk/hub/_fetch/session.py and qtk/hub/_origin.py: where the token may go, what each answer on the byte
path means, and the Retry-After every connection to an origin shares."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from qtk import errors
from qtk.hub._errors import HubContext
from qtk.hub._fetch.job import FetchJob
from qtk.hub._fetch.session import Expired, Retryable, Session, Stop
from qtk.hub._origin import origin
from qtk.hub._rate import MinRate

ENDPOINT = "https://hub.example"


@pytest.mark.parametrize(
    "url,expect",
    [
        ("https://hub.example/x", ("https", "hub.example", 443)),
        ("https://HUB.example:443/x", ("https", "hub.example", 443)),
        ("HTTPS://hub.example", ("https", "hub.example", 443)),
        ("http://hub.example/x", ("http", "hub.example", 80)),
        ("http://user:pw@127.0.0.1:8080/p?q", ("http", "127.0.0.1", 8080)),
        ("http://[::1]:9/p", ("http", "::1", 9)),
        ("https://hub.example:notaport/x", ("https", "\0invalid", None)),  # matches no real origin
        ("ftp://hub.example/x", ("ftp", "hub.example", None)),
    ],
)
def test_origin(url, expect):
    assert origin(url) == expect


@pytest.fixture
def session():
    s = Session(token="hf_secret", endpoint=ENDPOINT, user_agent="qtk/test", connections=2, timeout=(1.0, 1.0),
                min_rate=MinRate(), stop=threading.Event())
    yield s
    s.close()


@pytest.mark.parametrize(
    "url,gets_token",
    [
        ("https://hub.example/acme/m/resolve/abc/w.bin", True),
        ("https://hub.example:443/other/path", True),
        ("https://HUB.EXAMPLE/x", True),
        ("http://hub.example/x", False),  # another scheme
        ("https://hub.example:8443/x", False),  # another port
        ("https://cdn.example/x?sig=1", False),  # the CDN's signed URL
        ("https://hub.example.evil.com/x", False),
        ("https://evil.com/hub.example", False),
        ("https://hub.example:bad/x", False),
    ],
)
def test_the_token_goes_to_the_endpoint_origin_only(session, url, gets_token):
    h = session.headers(url, {"Range": "bytes=0-9"})
    assert ("Authorization" in h) == gets_token
    assert h["Range"] == "bytes=0-9" and h["Accept-Encoding"] == "identity"


class Answer:
    def __init__(self, status: int, headers: dict | None = None) -> None:
        self.status = status
        self.headers = headers or {}


JOB = FetchJob(key="w.bin", url=f"{ENDPOINT}/acme/m/resolve/abc/w.bin", size=10, digest=("sha256", "0" * 64),
               part_path=Path("/nonexistent"), lock_path=Path("/nonexistent.lock"),
               ctx=HubContext(ENDPOINT, "acme/m", "a" * 40, filename="w.bin", has_token=True),
               on_complete=lambda p: None)
CDN = "https://cdn.example/blob?sig=secret"


@pytest.mark.parametrize(
    "status,url,headers,expect",
    [
        (503, CDN, {}, Retryable),
        (500, f"{ENDPOINT}/x", {}, Retryable),
        (429, CDN, {"Retry-After": "7"}, Retryable),
        (403, CDN, {}, Expired),  # a signed URL that expired
        (401, CDN, {}, Expired),
        (410, CDN, {}, Expired),
        (404, CDN, {}, errors.NetworkError),  # the file is in the repo: the storage server failed
        (302, CDN, {}, errors.NetworkError),  # a redirect on the byte path
        (403, f"{ENDPOINT}/x", {"X-Error-Code": "GatedRepo"}, errors.AccessDeniedError),
        (401, f"{ENDPOINT}/x", {"X-Error-Code": "GatedRepo"}, errors.NotLoggedInError),
        (404, f"{ENDPOINT}/x", {"X-Error-Code": "EntryNotFound"}, errors.EntryNotFoundError),
    ],
)
def test_what_an_answer_means(session, status, url, headers, expect):
    with pytest.raises(expect) as exc:
        session.raise_for(JOB, Answer(status, headers), url, version=3)
    assert "secret" not in str(exc.value)
    if expect is Expired:
        assert exc.value.version == 3
    if status == 429:
        assert exc.value.retry_after == 7.0 and exc.value.origin == origin(CDN)
    if expect is errors.NetworkError and url == CDN:
        assert "https://cdn.example" in str(exc.value) and "w.bin" in str(exc.value)


def test_retry_after_holds_every_request_to_that_origin_and_a_stop_ends_the_wait(session):
    session.hold(origin(CDN), 60.0)
    threading.Timer(0.2, session.stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(Stop):
        session.request("GET", CDN, {})
    assert 0.1 < time.monotonic() - t0 < 10


def test_nothing_is_sent_once_the_pull_is_stopping(session):
    session.stop.set()
    with pytest.raises(Stop):
        session.request("GET", "http://127.0.0.1:9/never", {})


def test_a_connection_error_is_retryable_and_names_no_credentials(session):
    with pytest.raises(Retryable) as exc:
        session.request("GET", "http://user:pw@127.0.0.1:9/x", {})
    assert "pw" not in str(exc.value)


def _sockets_to(port: int) -> int:
    """This process's established TCP connections to ``port`` (fd -> socket inode -> /proc/self/net/tcp)."""
    import os

    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    rows = [line.split() for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]]
    return sum(1 for r in rows if int(r[2].rsplit(":", 1)[1], 16) == port and r[3] == "01" and r[9] in inodes)


@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="reads /proc")
def test_a_pull_closes_its_connections_and_stops_its_threads(hub, cache_dir):
    """The byte path's keep-alive connections are closed when the pull returns, not whenever the garbage
    collector gets to the fetcher (its threads' callbacks make it a cycle): a provision run pulls many
    models in one process. No rate-guard thread outlives the pull either."""
    import gc

    from qtk.hub.download import plan_pull, pull
    from qtk.settings import Settings

    port = hub.server_address[1]
    gc.collect()
    gc.disable()  # what the pull leaves open must be closed by the pull, not by a collection
    try:
        plan = plan_pull("acme/big", settings=Settings.from_env(), check_access=False)
        metadata = _sockets_to(port)  # the metadata client's (huggingface_hub's shared one): not the byte path's
        pull(plan, connections=4)
        assert _sockets_to(port) == metadata
    finally:
        gc.enable()
    assert not [t for t in threading.enumerate() if t.name == "qtk-rate-guard" and t.is_alive()]
