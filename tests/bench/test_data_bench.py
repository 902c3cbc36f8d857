"""The data benchmark harness runs end to end on a tiny set (without the open_clip venv), so it never rots: the
parallel data set build is deterministic, every row is printed as a JSON line and kept in the results file, the
epoch-boundary measurement reports its waits."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.bench.data import build_shards, default_workers_list
from pipeline.cli import main


def test_parallel_build_writes_the_same_bytes_as_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.bench.data.SHARD_SAMPLES", 10)  # 3 shards of 10, 10 and 5 samples
    one = build_shards(tmp_path / "one", 25, 32, processes=1)
    two = build_shards(tmp_path / "two", 25, 32, processes=2)
    assert [p.rsplit("/", 1)[1] for p in one] == [p.rsplit("/", 1)[1] for p in two] == [
        "bench-000000.tar", "bench-000001.tar", "bench-000002.tar"]
    for a, b in zip(one, two):
        assert open(a, "rb").read() == open(b, "rb").read()
    assert (tmp_path / "one" / "sizes.json").read_bytes() == (tmp_path / "two" / "sizes.json").read_bytes()
    assert json.loads((tmp_path / "two" / "sizes.json").read_text()) == {
        "bench-000000.tar": 10, "bench-000001.tar": 10, "bench-000002.tar": 5}
    assert not list((tmp_path / "two").glob("*.partial")) and not list((tmp_path / "two").glob(".staging-*"))
    # the shard builder's own format: each sample a JPEG with its caption, keyed in order
    from pipeline.shards.ls import list_samples

    samples = list(list_samples([str(tmp_path / "one")]))
    assert len(samples) == 25 and [s["key"] for s in samples] == sorted(s["key"] for s in samples)
    assert all({"jpg", "txt"} <= set(s["fields"]) for s in samples)
    # shards differ from each other: each has its own random stream
    assert open(one[0], "rb").read() != open(one[1], "rb").read()


def test_default_workers_list_doubles_up_to_the_cores():
    assert default_workers_list(1) == [1]
    assert default_workers_list(2) == [1, 2]
    assert default_workers_list(6) == [1, 2, 4, 6]
    assert default_workers_list(16) == [1, 2, 4, 8, 16]


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_bench_data_prints_a_json_line_per_row_and_keeps_them(tmp_path, capsys):
    results = tmp_path / "bench.json"
    argv = ["bench", "data", "--samples", "96", "--batch-size", "8", "--image-size", "32", "--source-size", "32,64",
            "--workers-list", "1,2", "--bench-dir", str(tmp_path), "--json", str(results), "--skip-open-clip",
            "--repeats", "1", "--step-ms", "20", "--decode-device", "off", "--build-workers", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = _json_lines(out)
    rows = [line for line in lines if line["kind"] == "throughput"]
    assert [(row["source_px"], row["workers"]) for row in rows] == [(32, 1), (32, 2), (64, 1), (64, 2)]
    for row in rows:
        ours, no_draft = row["runs"]["ours"], row["runs"]["ours_no_draft"]
        assert ours["samples_per_s"] > 0 and no_draft["samples_per_s"] > 0
        # 96 samples in 8-sample batches: 12 per epoch whatever the workers (1 x 12 or 2 x 6 per stream)
        assert ours["batches"] == no_draft["batches"] == 12
        assert row["draft_speedup"] == pytest.approx(ours["samples_per_s"] / no_draft["samples_per_s"])
        assert row["ours_vs_ceiling"] == pytest.approx(ours["samples_per_s"] / row["ceiling_samples_per_s"])
        assert row["ours_vs_open_clip"] is None and "open_clip" not in row["runs"]  # skipped
        assert "ours_decode_gpu" not in row["runs"]  # --decode-device off
    # the epoch boundary: 2 epochs at the largest worker count, a wait per batch
    epoch = [line for line in lines if line["kind"] == "epoch_start"]
    assert len(epoch) == 1
    epoch = epoch[0]
    assert epoch["workers"] == 2 and epoch["batches_per_epoch"] == 12 and epoch["step_ms"] == 20
    assert epoch["epoch1_first_wait_s"] > 0 and epoch["epoch_start_wait_s"] > 0 and epoch["median_wait_s"] >= 0
    assert epoch["median_step_s"] == pytest.approx(epoch["median_wait_s"] + 0.02)
    assert epoch["epoch_start_vs_median_step"] == pytest.approx(epoch["epoch_start_wait_s"] / epoch["median_step_s"])
    assert "epoch start / median step" in out
    # the results file holds every row, and the waits of both epochs
    saved = json.loads(results.read_text())
    assert saved["rows"] == rows
    assert [len(waits) for waits in saved["epoch_start"]["waits_s"]] == [12, 12]
    assert math.isclose(saved["epoch_start"]["epoch_start_wait_s"], saved["epoch_start"]["waits_s"][1][0])
    # the shards are cached: a second run reuses them
    # built by the shard builder: the shard, its *_stats.json and sizes.json, nothing left of the JPEG folder
    assert sorted(p.name for p in (tmp_path / "data-96-64px").iterdir()) == [
        "bench-000000.tar", "bench-000000_stats.json", "sizes.json"]
    assert not list(tmp_path.glob(".jpegs-*"))
    assert "cached" not in out
    # and the decode=gpu column runs its code path on the CPU when asked
    assert main([*argv[:argv.index("--source-size")], "--source-size", "64", "--workers-list", "1",
                 "--bench-dir", str(tmp_path), "--json", str(results), "--skip-open-clip", "--repeats", "1",
                 "--step-ms", "5", "--decode-device", "cpu"]) == 0
    assert "cached" in capsys.readouterr().out
    rows = json.loads(results.read_text())["rows"]
    assert [row["workers"] for row in rows] == [1]
    decoded = rows[0]["runs"]["ours_decode_gpu"]
    assert decoded["samples_per_s"] > 0 and decoded["batches"] == 12 and rows[0]["decode_device"] == "cpu"
    ours = rows[0]["runs"]["ours"]
    assert rows[0]["decode_gpu_vs_ours"] == pytest.approx(decoded["samples_per_s"] / ours["samples_per_s"])


def test_bench_data_rejects_a_bad_workers_list(tmp_path, capsys):
    for bad in ("1,x", "0"):
        assert main(["bench", "data", "--workers-list", bad, "--bench-dir", str(tmp_path), "--skip-open-clip"]) == 2
        assert "--workers-list" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before building anything
