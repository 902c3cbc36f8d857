"""Startup costs O(1) requests per rank: on a real S3 endpoint (moto on loopback) whose every request is
counted, real gloo ranks build their loaders as training does (pipeline.train.loop.validate, then the loaders),
and the shard sizes are read once in all, on rank 0: one GET of sizes.json, or without it one GET of each
shard's *_stats.json, whatever the number of ranks. `shards index` writes the sizes.json that makes the
second case the first."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import s3fs

from pipeline.cli import main
from pipeline.data import shardindex
from tests.data_fixtures import write_dataset
from tests.distributed_helpers import run_ranks
from tests.s3_server import start_s3_server

SIZES = [7, 13, 3, 21, 10, 5]  # 59 samples
RANKS = 3
BUCKET = "startup"


def _cli(argv):
    return main(argv)  # the real command line: pipeline.cli reports errors and picks the exit status


def _upload(server, local: Path, prefix: str) -> None:
    fs = s3fs.S3FileSystem(**server.storage_options)
    for path in sorted(local.iterdir()):
        fs.put_file(str(path), f"{BUCKET}/{prefix}/{path.name}")


@pytest.fixture(scope="module")
def counted_s3(tmp_path_factory):
    """A moto server of our own that counts requests, holding: `with-sizes` (sizes.json), `stats-only` and
    `stats-train` (img2dataset-like: a *_stats.json per shard, no sizes.json)."""
    server = start_s3_server(count_requests=True)
    server.make_bucket(BUCKET)
    root = tmp_path_factory.mktemp("startup")
    write_dataset(root / "with-sizes", SIZES)
    write_dataset(root / "stats", SIZES, sizes_json=False, stats_json=True)
    _upload(server, root / "with-sizes", "with-sizes")
    _upload(server, root / "stats", "stats-only")
    _upload(server, root / "stats", "stats-train")
    try:
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------------------ on every rank


def build_on_every_rank(rank, world_size, jobs, storage_options, output_dir):
    """On each rank, in order: ("loader", URL) builds a loader with pipeline.data.dataset.build_loader;
    ("train", URL) runs the trainer's pre-flight check and builds its loaders (pipeline.train.loop);
    ("error", URL) expects building to fail. Returns len(loader) per job, or the error's text."""
    from pipeline.data.config import DataConfig
    from pipeline.data.loader import build_loader
    from pipeline.train.config import RunConfig, load_config
    from pipeline.train.loop import build_loaders, validate

    results = []
    for kind, url in jobs:
        if kind == "train":
            cfg = load_config(RunConfig, None, [f"data.train_urls={url}", "data.workers=0",
                                                f"train.global_batch_size={2 * world_size}",
                                                f"train.output_dir={output_dir}/rank{rank}"])
            cfg.data.storage_options = storage_options
            micro = validate(cfg, world_size)  # before the loaders, as pipeline.train.loop.train does
            dist = SimpleNamespace(rank=rank, world_size=world_size, device="cpu", is_main=rank == 0)
            loader = build_loaders(cfg, dist, micro)[0]
            results.append(len(loader))
            continue
        cfg = DataConfig(train_urls=url, batch_size=2, workers=0, storage_options=storage_options)
        try:
            loader = build_loader(cfg, url, rank=rank, world_size=world_size, seed=0,
                                  media_transform=lambda media: media, tokenizer=lambda texts: texts)
        except Exception as error:
            assert kind == "error", f"building the loader of {url} failed: {error}"
            results.append(f"{type(error).__name__}: {error}")
            continue
        assert kind == "loader", f"building the loader of {url} should have failed"
        results.append(len(loader))
    return results


@pytest.fixture(scope="module")
def rank_results(counted_s3, tmp_path_factory):
    """Every job on RANKS real ranks in one spawn (starting processes is the expensive part); the counter
    is read per data set prefix afterwards."""
    counted_s3.requests.clear()
    jobs = [("loader", f"s3://{BUCKET}/with-sizes"), ("loader", f"s3://{BUCKET}/stats-only"),
            ("train", f"s3://{BUCKET}/stats-train"), ("error", f"s3://{BUCKET}/nothing-here")]
    results = run_ranks(build_on_every_rank, RANKS, jobs, counted_s3.storage_options,
                        str(tmp_path_factory.mktemp("runs")))
    return results, counted_s3.requests


def _requests_under(log, prefix: str) -> dict[tuple[str, str], int]:
    return {(m, p): n for (m, p), n in log._counts.items() if p.startswith(f"/{BUCKET}/{prefix}/")
            or p == f"/{BUCKET}?prefix={prefix}/" or p == f"/{BUCKET}?prefix={prefix}"}


def test_every_rank_gets_the_same_plan(rank_results):
    results, _ = rank_results
    # 59 samples, 3 ranks x 1 stream x batch 2: 9 batches per rank (the remainder of 5 not read)
    assert [r[:3] for r in results] == [[9, 9, 9]] * RANKS
    # an error on rank 0 reaches every rank (none waits for a broadcast that never comes)
    assert all("no .tar shards found" in r[3] and "nothing-here" in r[3] for r in results)


def test_sizes_json_is_read_once_in_all(rank_results):
    _, log = rank_results
    requests = _requests_under(log, "with-sizes")
    assert log.count("GET", f"/{BUCKET}/with-sizes/sizes.json") == 1
    assert not [p for (_, p) in requests if p.endswith(("_stats.json", ".tar"))]
    # listing the prefix: a constant number of times (the shard list, the check for absent shards), on rank 0
    assert sum(n for (_, p), n in requests.items() if "?prefix=" in p) <= 2


@pytest.mark.parametrize("prefix", ["stats-only", "stats-train"])
def test_each_stats_json_is_read_once_in_all_not_once_per_rank(rank_results, prefix):
    _, log = rank_results
    stats = {p: n for (m, p), n in _requests_under(log, prefix).items() if m == "GET" and p.endswith("_stats.json")}
    assert stats == {f"/{BUCKET}/{prefix}/data-{i:06d}_stats.json": 1 for i in range(len(SIZES))}
    assert log.count(suffix=f"/{prefix}/sizes.json") <= 1  # the probe for a sizes.json that is not there
    assert not [p for (_, p) in _requests_under(log, prefix) if p.endswith(".tar")]  # nothing counted
    assert sum(n for (_, p), n in _requests_under(log, prefix).items() if "?prefix=" in p) <= 2


# ------------------------------------------------------------------------------ shards index


def test_index_on_s3_writes_the_true_counts_and_the_loader_then_reads_only_it(counted_s3, tmp_path, capsys, caplog):
    write_dataset(tmp_path / "i2d", SIZES, sizes_json=False, stats_json=True)
    _upload(counted_s3, tmp_path / "i2d", "index-me")
    url = f"s3://{BUCKET}/index-me"
    assert _cli(["shards", "index", url, "--workers", "4", "--quiet", *counted_s3.cli_storage_options()]) == 0
    assert f"{len(SIZES)} shards, {sum(SIZES)} samples ({len(SIZES)} counts from *_stats.json, 0 counted" in \
        capsys.readouterr().out
    fs = s3fs.S3FileSystem(**counted_s3.storage_options)
    assert json.loads(fs.cat(f"{BUCKET}/index-me/sizes.json")) == {f"data-{i:06d}.tar": n for i, n in enumerate(SIZES)}

    # the loader's startup now reads sizes.json and nothing per shard
    counted_s3.requests.clear()
    index = shardindex.shard_index(url, counted_s3.storage_options)
    assert sum(index.sizes.values()) == sum(SIZES)
    assert counted_s3.requests.count("GET", f"/{BUCKET}/index-me/sizes.json") == 1
    assert counted_s3.requests.count(suffix="_stats.json") == counted_s3.requests.count(suffix=".tar") == 0

    # an existing sizes.json is not replaced without --force
    assert _cli(["shards", "index", url, "--quiet", *counted_s3.cli_storage_options()]) == 2
    assert f"s3://{BUCKET}/index-me/sizes.json exists; pass --force" in capsys.readouterr().err

    # tars only (no *_stats.json): counted; a damaged tar counts the samples before the damage, named
    fs.rm([f"{BUCKET}/index-me/data-{i:06d}_stats.json" for i in range(len(SIZES))])
    data = (tmp_path / "i2d" / "data-000003.tar").read_bytes()
    fs.pipe_file(f"{BUCKET}/index-me/data-000003.tar", _cut_in_sample(data, 5))
    with caplog.at_level(logging.WARNING):
        assert _cli(["shards", "index", url, "--force", "--quiet", *counted_s3.cli_storage_options()]) == 0
    assert f"0 counts from *_stats.json, {len(SIZES)} counted in the tar" in capsys.readouterr().out
    assert any("data-000003.tar is damaged after 5 complete samples" in r.getMessage() for r in caplog.records)
    expected = dict(enumerate(SIZES)) | {3: 5}
    assert json.loads(fs.cat(f"{BUCKET}/index-me/sizes.json")) == {f"data-{i:06d}.tar": n for i, n in expected.items()}


def _cut_in_sample(tar_bytes: bytes, sample: int) -> bytes:
    """The tar cut in the middle of the last member of sample number `sample` (0-based, samples keyed by
    the member name up to its first dot): the samples before it are complete."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
        members = archive.getmembers()
    keys = list(dict.fromkeys(m.name.split(".")[0] for m in members))
    member = [m for m in members if m.name.split(".")[0] == keys[sample]][-1]
    return tar_bytes[: member.offset_data + max(member.size // 2, 1)]


def test_index_of_a_local_build_equals_what_build_wrote(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert _cli(["shards", "build", "--source", "shapes", "--count", "23", "--samples-per-shard", "5",
                 "--output", str(out), "--workers", "1", "--quiet"]) == 0
    built = json.loads((out / "sizes.json").read_text())
    (out / "sizes.json").unlink()
    for stats in out.glob("*_stats.json"):  # counted from the tars, not taken from the stats files
        stats.unlink()
    assert _cli(["shards", "index", str(out), "--quiet"]) == 0
    assert json.loads((out / "sizes.json").read_text()) == built == {f"shapes-train-{i:06d}.tar": n
                                                                      for i, n in enumerate([5, 5, 5, 5, 3])}
    assert "5 shards, 23 samples" in capsys.readouterr().out
    assert _cli(["shards", "index", str(tmp_path / "empty"), "--quiet"]) == 2
    assert "no .tar shards found" in capsys.readouterr().err


def test_index_names_the_shard_it_cannot_read(tmp_path, capsys):
    write_dataset(tmp_path, [3, 4], sizes_json=False)
    (tmp_path / "data-000002.tar").mkdir()  # a directory named like a shard: unreadable, not missing, not damaged
    assert _cli(["shards", "index", str(tmp_path), "--quiet"]) == 1
    assert "cannot read shard " + str(tmp_path / "data-000002.tar") in capsys.readouterr().err
    assert not (tmp_path / "sizes.json").exists()


def test_a_prefetched_index_is_taken_once(tmp_path):
    write_dataset(tmp_path, [3, 4])
    first = shardindex.prefetch_shard_index(str(tmp_path))
    (tmp_path / "sizes.json").write_text(json.dumps({"data-000000.tar": 3, "data-000001.tar": 2}))
    assert shardindex.shard_index(str(tmp_path)) is first  # the trainer's check, then its loader: one reading
    assert sum(shardindex.shard_index(str(tmp_path)).sizes.values()) == 5  # then read afresh
    assert dataclasses.asdict(first)["sizes"] == {str(tmp_path / "data-000000.tar"): 3,
                                                  str(tmp_path / "data-000001.tar"): 4}
