"""Shared fixtures: `s3_server` is a real moto S3 server on loopback (see tests/s3_server.py); `shards` is a
tiny shapes training set (64 samples in 2 shards) built once per test module (a module may define its own).

Test files holding a test marked slow run first: under pytest-xdist (`make test`: each file whole on one worker)
the files a worker takes last are then short ones, and the workers finish together."""

from pathlib import Path

import pytest

from tests.s3_server import start_s3_server


@pytest.fixture(scope="session")
def s3_server():
    server = start_s3_server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from pipeline.shards.build import build_shards
    from pipeline.shards.config import BuildConfig

    root = tmp_path_factory.mktemp("shapes") / "train"
    build_shards(BuildConfig(source="shapes", split="train", output=str(root), count=64, samples_per_shard=32),
                 progress=False)
    return root


def pytest_collection_modifyitems(config, items):
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within each group is kept
