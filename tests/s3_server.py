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
"""

from __future__ import annotations

import socket
import urllib.request
from dataclasses import dataclass
from typing import Any

ACCESS_KEY = "testing"
SECRET_KEY = "testing"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    """http://127.0.0.1:PORT"""
    server: Any
    """the moto ThreadedMotoServer"""

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


def start_s3_server(timeout: float = 20.0) -> S3Server:
    """Start moto's S3 server on loopback and wait until it answers."""
    import logging
    import time

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request drowns test output
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
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
    return S3Server(endpoint, server)
