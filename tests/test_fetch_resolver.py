"""qtk/hub/_fetch/resolver.py: a file's signed URL, resolved again once per expiry however many connections
saw it expire, and given up on when fresh URLs keep being refused."""

from __future__ import annotations

import threading

import pytest

from qtk import errors
from qtk.hub._fetch import resolver
from qtk.hub._fetch.resolver import URLResolver
from qtk.hub._fetch.session import Stop


class Endpoint:
    """Counts resolves; each returns a new signed URL."""

    def __init__(self) -> None:
        self.calls = 0
        self.mu = threading.Lock()

    def __call__(self, version: int) -> str:
        with self.mu:
            self.calls += 1
            return f"https://cdn.example/blob?sig={self.calls}"


def _urls(endpoint, stop=None):
    return URLResolver("weights.bin", endpoint, stop=stop or threading.Event(), backoff=lambda n: 0.0)


@pytest.mark.parametrize("workers", [1, 16])
def test_one_resolve_per_expiry_however_many_workers_saw_it(workers):
    ep = Endpoint()
    urls = _urls(ep)
    for expiry in range(1, 4):
        seen = [None] * workers
        barrier = threading.Barrier(workers)

        def worker(k):
            url, version = urls.current()
            urls.served(version)
            barrier.wait()  # every worker holds the same URL when it expires
            urls.refused(version)
            seen[k] = urls.current()

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert ep.calls == expiry + 1  # the first resolve, then one per expiry
        assert len(set(seen)) == 1 and seen[0] == (f"https://cdn.example/blob?sig={expiry + 1}", expiry + 1)
    assert urls.resolves == 4


def test_a_refusal_of_an_older_url_resolves_nothing():
    ep = Endpoint()
    urls = _urls(ep)
    _, v1 = urls.current()
    urls.refused(v1)
    urls.refused(v1)  # a slower worker reporting the same expiry
    assert ep.calls == 2 and urls.current()[1] == v1 + 1


def test_fresh_urls_refused_before_serving_a_byte_end_the_pull(monkeypatch):
    monkeypatch.setattr(resolver, "MAX_REFUSED_URLS", 2)
    ep = Endpoint()
    urls = _urls(ep)
    _, v = urls.current()
    urls.served(v)
    urls.refused(v)  # it had worked: an expiry, not a refusal
    for _ in range(2):
        urls.refused(urls.current()[1])
    with pytest.raises(errors.AccessDeniedError, match="keep being refused by https://cdn.example") as exc:
        urls.refused(urls.current()[1])
    assert "sig=" not in str(exc.value)  # the signature is never printed
    assert ep.calls == 4


def test_urls_that_serve_bytes_are_resolved_again_as_often_as_needed(monkeypatch):
    monkeypatch.setattr(resolver, "MAX_REFUSED_URLS", 1)
    ep = Endpoint()
    urls = _urls(ep)
    for _ in range(20):
        _, v = urls.current()
        urls.served(v)
        urls.refused(v)
    assert ep.calls == 21


def test_resolves_per_file_are_bounded(monkeypatch):
    monkeypatch.setattr(resolver, "MAX_RESOLVES", 3)
    urls = _urls(Endpoint())
    for _ in range(2):
        _, v = urls.current()
        urls.served(v)
        urls.refused(v)
    _, v = urls.current()
    urls.served(v)
    with pytest.raises(errors.AccessDeniedError, match="3 resolved"):
        urls.refused(v)


def test_a_stop_during_the_backoff_ends_the_wait():
    import time

    stop = threading.Event()
    urls = URLResolver("w", Endpoint(), stop=stop, backoff=lambda n: 60.0)
    _, v = urls.current()  # refused before serving a byte: the next resolve waits for the backoff first
    threading.Timer(0.1, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(Stop):
        urls.refused(v)
    assert time.monotonic() - t0 < 10


def test_forget_resolves_again_on_the_next_request():
    ep = Endpoint()
    urls = _urls(ep)
    urls.current()
    urls.current()
    assert ep.calls == 1
    urls.forget()
    assert urls.current()[1] == 2 and ep.calls == 2
