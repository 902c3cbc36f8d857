"""A real S3 endpoint for tests: moto's server on 127.0.0.1 on a free port (no pytest needed).

    server = start_s3_server()
    try:
        fs = s3fs.S3FileSystem(**server.storage_options)
        fs.mkdir("my-bucket")
        build_shards(BuildConfig(..., output="s3://my-bucket/data", storage_options=server.storage_options))
    finally:
        server.stop()

`storage_options` is what fsspec/s3fs take (`fsspec.open(url, **storage_options)`); the same
values as CLI flags are `cli_storage_options()`.

    server = start_s3_server(count_requests=True)
    server.requests.clear()
    ...                                           # whatever reads from it, in any process
    server.requests.count("GET", "/bucket/data/sizes.json")   # requests of that method and path

The count is a WSGI middleware around moto's own application (werkzeug's server calls `server.app`
for every request), so it sees every request the server answers, from this process or another one.

    with uploads_cut_after_first_file(fs):        # a connection that drops after one file of a save reached S3
        manager.save(...)                         # raises ConnectionError from the second put_file on
"""

from __future__ import annotations

import contextlib
import socket
import threading
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from typing import Any

ACCESS_KEY = "testing"
SECRET_KEY = "testing"


@contextlib.contextmanager
def uploads_cut_after_first_file(fs):
    """Inside the block, the first `fs.put_file` uploads and every later one raises ConnectionError; the
    block must raise it (a save that did not notice the drop is a failure). `fs` is the fsspec instance the
    code under test uses (fsspec caches instances, so `url_to_fs` with the same URL and options returns it)."""
    real_put_file, uploads = fs.put_file, []

    def flaky_put_file(local, remote, *args, **kwargs):
        if uploads:
            raise ConnectionError("connection reset by peer (injected)")
        uploads.append(remote)
        return real_put_file(local, remote, *args, **kwargs)

    fs.put_file = flaky_put_file
    try:
        yield uploads
    except ConnectionError:
        return
    finally:
        fs.put_file = real_put_file
    raise AssertionError("the save did not fail although its uploads were cut after the first file")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RequestLog:
    """WSGI middleware: counts the requests (method, path) its application answers; thread-safe."""

    def __init__(self, app):
        self.app = app
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()

    def __call__(self, environ, start_response):
        path = urllib.parse.unquote(environ.get("PATH_INFO", ""))
        prefix = urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).get("prefix")
        if prefix:  # a listing: which prefix it lists tells whose it is
            path += f"?prefix={prefix[0]}"
        with self._lock:
            self._counts[(environ["REQUEST_METHOD"], path)] += 1
        return self.app(environ, start_response)

    def clear(self) -> None:
        with self._lock:
            self._counts.clear()

    def count(self, method: str | None = None, path: str | None = None, *, suffix: str | None = None) -> int:
        """Requests with this method (None: any) and this path (None: any), or a path ending in `suffix`."""
        with self._lock:
            return sum(n for (m, p), n in self._counts.items() if (method is None or m == method)
                       and (path is None or p == path) and (suffix is None or p.endswith(suffix)))

    def paths(self, method: str | None = None) -> Counter[str]:
        """Requests per path (of one method, or all)."""
        with self._lock:
            result: Counter[str] = Counter()
            for (m, p), n in self._counts.items():
                if method is None or m == method:
                    result[p] += n
            return result


@dataclass
class S3Server:
    endpoint: str
    """http://127.0.0.1:PORT"""
    server: Any
    """the moto ThreadedMotoServer"""
    requests: RequestLog | None = None
    """the requests answered, when started with count_requests=True"""

    @property
    def storage_options(self) -> dict[str, Any]:
        # a fresh dict per call: a caller may add to it without touching other tests
        return {
            "key": ACCESS_KEY, "secret": SECRET_KEY,
            # no region_name: s3fs would send it as a LocationConstraint on bucket creation, which
            # S3 (and moto) reject for us-east-1, the region botocore assumes for S3 without one
            "client_kwargs": {"endpoint_url": self.endpoint},
        }

    def cli_storage_options(self) -> list[str]:
        """The same options as `--storage-option KEY=VALUE` arguments."""
        return [
            "--storage-option", f"key={ACCESS_KEY}", "--storage-option", f"secret={SECRET_KEY}",
            "--storage-option", f"client_kwargs.endpoint_url={self.endpoint}",
        ]

    def make_bucket(self, name: str) -> None:
        import s3fs

        s3fs.S3FileSystem(**self.storage_options).mkdir(name)

    def stop(self) -> None:
        self.server.stop()


def start_s3_server(timeout: float = 20.0, count_requests: bool = False) -> S3Server:
    """Start moto's S3 server on loopback and wait until it answers; with `count_requests`, every request
    it answers is counted in `S3Server.requests`."""
    import logging
    import time

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request drowns test output
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    requests = None
    if count_requests:  # werkzeug's server hands every request to its `app`: wrap moto's application
        requests = server._server.app = RequestLog(server._server.app)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise TimeoutError(f"moto S3 server on {endpoint} did not answer in {timeout:.0f} s") from None
            time.sleep(0.1)
    return S3Server(endpoint, server, requests)
