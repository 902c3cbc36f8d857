"""Shared fixtures: `s3_server` is a real moto S3 server on loopback (see tests/s3_server.py)."""

import pytest

from tests.s3_server import start_s3_server


@pytest.fixture(scope="session")
def s3_server():
    server = start_s3_server()
    yield server
    server.stop()
