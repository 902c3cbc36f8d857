"""Shard building and verification on local disk: round trip through plain webdataset, determinism
(also across worker counts), bad inputs skipped and counted, manifests of every format, resize."""

import argparse
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import webdataset as wds
from PIL import Image

from pipeline.cli import main
from pipeline.shards import synthetic
from pipeline.shards.build import build_shards
from pipeline.shards.config import BuildConfig, ShardBuildError
from pipeline.shards.verify import verify


def _build(**kwargs):
    return build_shards(BuildConfig(**kwargs), progress=False)


def _cli(argv):
    return main(argv)  # the real command line: pipeline.cli reports errors and picks the exit status


def _read_back(directory):
    """All samples of a data set through plain webdataset, in shard order."""
    sizes = json.loads((Path(directory) / "sizes.json").read_text())
    urls = [str(Path(directory) / name) for name in sizes]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False)), sizes


def _data_files(directory):
    # stats hold each shard's build duration, the one field that may differ between two builds
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if not p.name.endswith("_stats.json")}


def _jpeg(path, size=(64, 48), colour=(200, 30, 30)):
    Image.new("RGB", size, colour).save(path, format="JPEG", quality=90)


def test_shapes_round_trip_through_webdataset(tmp_path):
    summary = _build(source="shapes", split="val", count=25, samples_per_shard=10, output=str(tmp_path))
    samples, sizes = _read_back(tmp_path)
    assert sizes == {"shapes-val-000000.tar": 10, "shapes-val-000001.tar": 10, "shapes-val-000002.tar": 5}
    assert summary.samples == 25 and summary.failed_by_reason == {}
    assert [s["__key__"] for s in samples] == [synthetic.sample_key(i) for i in range(25)]
    for index, sample in enumerate(samples):
        expected = synthetic.shapes_sample(0, "val", index)
        assert sample["txt"].decode() == expected.caption
        assert sample["png"] == expected.media
        assert Image.open(io.BytesIO(sample["png"])).size == (64, 64)
        assert json.loads(sample["json"])["label"] == expected.metadata["label"]
    stats = json.loads((tmp_path / "shapes-val-000002_stats.json").read_text())
    assert stats["count"] == 5 and stats["successes"] == 5 and stats["failed_by_reason"] == {}
    assert json.loads((tmp_path / "classes.json").read_text())["classes"] == synthetic.SHAPE_CLASSES


def test_tones_round_trip_decodes(tmp_path):
    _build(source="tones", split="train", count=6, sample_rate=16000, samples_per_shard=4, output=str(tmp_path))
    samples, sizes = _read_back(tmp_path)
    assert list(sizes.values()) == [4, 2] and len(samples) == 6
    for sample in samples:
        waveform, rate = soundfile.read(io.BytesIO(sample["flac"]))
        assert rate == 16000 and 1.0 <= len(waveform) / rate <= 4.0
        assert sample["txt"].decode() in json.loads(sample["json"])["captions"]


def test_builds_are_byte_identical_also_with_two_workers(tmp_path):
    settings = dict(source="shapes", split="train", count=24, samples_per_shard=5, seed=5)
    _build(output=str(tmp_path / "a"), workers=1, **settings)
    _build(output=str(tmp_path / "b"), workers=1, **settings)
    _build(output=str(tmp_path / "c"), workers=2, **settings)
    a, b, c = (_data_files(tmp_path / name) for name in "abc")
    assert len([n for n in a if n.endswith(".tar")]) == 5
    assert a == b == c
    # the staging directory is gone, nothing else was left behind
    assert sorted(os.listdir(tmp_path / "c")) == sorted(list(c) + [n.replace(".tar", "_stats.json") for n in c
                                                                   if n.endswith(".tar")])


def test_max_shard_bytes_cuts_shards(tmp_path):
    limit = 40_000
    summary = _build(source="shapes", count=30, samples_per_shard=30, max_shard_bytes=limit, output=str(tmp_path))
    assert len(summary.shard_sizes) > 1 and summary.samples == 30
    for name in summary.shard_sizes:
        assert (tmp_path / name).stat().st_size <= limit
    samples, _ = _read_back(tmp_path)
    assert [s["__key__"] for s in samples] == [synthetic.sample_key(i) for i in range(30)]


@pytest.fixture
def messy_folder(tmp_path):
    """A folder with good samples and every kind of bad one."""
    folder = tmp_path / "raw"
    (folder / "sub").mkdir(parents=True)
    for name in ("a", "b", "sub/c"):
        _jpeg(folder / f"{name}.jpg")
        (folder / f"{name}.txt").write_text(f"caption of {name}\n")
    _jpeg(folder / "from_json.jpg")
    (folder / "from_json.json").write_text(json.dumps({"captions": ["first caption", "second"], "label": 3}))
    Image.new("RGB", (20, 20), "blue").save(folder / "pic.png")
    (folder / "pic.txt").write_text("a blue png")
    wave = (np.sin(np.arange(8000) / 5) * 8000).astype(np.int16)
    soundfile.write(folder / "beep.wav", wave, 8000, subtype="PCM_16")
    (folder / "beep.txt").write_text("a beep")
    # the bad ones
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (folder / "corrupt.txt").write_text("never written")
    (folder / "broken.flac").write_bytes(b"fLaC\x00\x00garbage")
    (folder / "broken.txt").write_text("never written")
    _jpeg(folder / "empty.jpg")
    (folder / "empty.txt").write_text("   \n")
    _jpeg(folder / "latin.jpg")
    (folder / "latin.txt").write_bytes(b"caf\xe9 \xff\xfe")
    _jpeg(folder / "a.png")  # same stem as a.jpg: a duplicate key (they would share a.txt)
    _jpeg(folder / "nocaption.jpg")
    (folder / "notes.md").write_text("not a sample")
    return folder


def test_bad_folder_inputs_are_skipped_and_counted(messy_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli(["shards", "build", "--source", "folder", "--input", str(messy_folder), "--output", str(out),
                 "--samples-per-shard", "4", "--workers", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    samples, sizes = _read_back(out)
    captions = sorted(s["txt"].decode() for s in samples)
    assert captions == sorted(["caption of a", "caption of b", "caption of sub/c", "first caption", "a blue png",
                               "a beep"])
    expected_skips = {"duplicate_key": 1, "empty_caption": 1, "failed_to_decode": 2, "missing_caption": 1,
                      "undecodable_caption": 1}
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    counted = {}
    for shard_stats in stats:
        for reason, number in shard_stats["failed_by_reason"].items():
            counted[reason] = counted.get(reason, 0) + number
    assert counted == expected_skips
    assert sum(s["count"] for s in stats) == 12 and sum(s["successes"] for s in stats) == 6
    assert "6 samples" in printed and "skipped 2 x failed_to_decode" in printed
    beep = next(s for s in samples if s["txt"] == b"a beep")
    assert "flac" in beep and "wav" not in beep  # wav re-encoded to flac, same samples
    assert soundfile.read(io.BytesIO(beep["flac"]))[0].shape == (8000,)
    from_json = next(s for s in samples if s["txt"] == b"first caption")
    assert json.loads(from_json["json"])["label"] == 3
    original = (messy_folder / "b.jpg").read_bytes()
    assert any(s.get("jpg") == original for s in samples)  # not resized: bytes kept as they are
    assert all("." not in s["__key__"] for s in samples)


def _write_manifest(path, fmt, rows):
    if fmt == "parquet":
        import pyarrow
        import pyarrow.parquet

        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        import csv

        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_every_manifest_format(tmp_path, fmt):
    media = tmp_path / "media"
    media.mkdir()
    for name in ("x", "y"):
        _jpeg(media / f"{name}.jpg")
    rows = [
        {"image": "media/x.jpg", "text": "an x", "label": "1"},
        {"image": str(media / "y.jpg"), "text": "a y", "label": "2"},  # absolute path
        {"image": "media/missing.jpg", "text": "gone", "label": "3"},
        {"image": "media/x.jpg", "text": "x again", "label": "4"},  # the same input twice
        {"image": "media/y.jpg", "text": "", "label": "5"},
    ]
    manifest = tmp_path / f"pairs.{fmt}"
    _write_manifest(manifest, fmt, rows)
    summary = _build(source="manifest", input=str(manifest), path_column="image", caption_column="text",
                     output=str(tmp_path / "out"))
    samples, sizes = _read_back(tmp_path / "out")
    assert list(sizes) == ["pairs-000000.tar"]
    assert [(s["__key__"], s["txt"].decode()) for s in samples] == [("000000000", "an x"), ("000000001", "a y")]
    assert json.loads(samples[1]["json"])["label"] == "2"
    assert summary.failed_by_reason == {"duplicate_key": 1, "empty_caption": 1, "missing_file": 1}


def test_manifest_without_the_column_fails_naming_it(tmp_path, capsys):
    manifest = tmp_path / "pairs.csv"
    _write_manifest(manifest, "csv", [{"path": "a.jpg", "text": "a"}])
    with pytest.raises(ShardBuildError, match="caption column 'caption'"):
        _build(source="manifest", input=str(manifest), output=str(tmp_path / "out"))
    assert _cli(["shards", "build", "--source", "manifest", "--input", str(manifest), "--output",
                 str(tmp_path / "out2"), "--path-column", "url", "--quiet"]) == 2
    assert "path column 'url'" in capsys.readouterr().err
    # a refused build leaves no output behind: not even the directory it created
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
    # an output directory that was there before stays, as it was
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(ShardBuildError, match="caption column"):
        _build(source="manifest", input=str(manifest), output=str(tmp_path / "mine"))
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_a_manifest_build_whose_every_input_is_skipped_fails_and_writes_nothing(tmp_path, capsys):
    manifest = tmp_path / "pairs.csv"
    _write_manifest(manifest, "csv", [{"path": "gone.jpg", "caption": "a"}, {"path": "also-gone.jpg", "caption": "b"},
                                      {"path": "", "caption": "c"}])
    out = tmp_path / "out"
    assert _cli(["shards", "build", "--source", "manifest", "--input", str(manifest), "--output", str(out),
                 "--quiet"]) == 2
    line = _one_error_line(capsys)
    assert f"all 3 inputs of manifest '{manifest}' were skipped (2 x missing_file, 1 x missing_path)" in line
    assert not out.exists()  # no sizes.json = {}, no directory
    # into an earlier build: it stays whole (its shards are not taken for stale ones)
    _build(source="shapes", count=4, samples_per_shard=2, output=str(out), prefix="pairs")
    before = _data_files(out)
    with pytest.raises(ShardBuildError, match="no samples written"):
        _build(source="manifest", input=str(manifest), output=str(out))
    assert _data_files(out) == before and verify([str(out)], progress=False).problems == []


def test_a_build_with_no_input_fails(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no media here")
    with pytest.raises(ShardBuildError, match=f"folder '{tmp_path / 'empty'}' holds no media files"):
        _build(source="folder", input=str(tmp_path / "empty"), output=str(tmp_path / "out"))
    assert _cli(["shards", "build", "--source", "shapes", "--count", "0", "--output", str(tmp_path / "out"),
                 "--quiet"]) == 2
    assert "no samples written: count is 0" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_unwritable_output_fails_at_once(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ShardBuildError, match=f"output '{blocker}/shards' is not writable"):
        _build(source="shapes", count=3, output=str(blocker / "shards"))


def test_resize_never_upscales(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    _jpeg(folder / "big.jpg", size=(640, 480))
    _jpeg(folder / "small.jpg", size=(100, 80))
    for name in ("big", "small"):
        (folder / f"{name}.txt").write_text(name)
    expected = {"keep_ratio": {"big": (341, 256), "small": (100, 80)},
                "center_crop": {"big": (256, 256), "small": (80, 80)},
                "border": {"big": (256, 256), "small": (256, 256)}}
    for mode, sizes in expected.items():
        out = tmp_path / mode
        _build(source="folder", input=str(folder), output=str(out), resize=256, resize_mode=mode, jpeg_quality=80)
        samples, _ = _read_back(out)
        got = {s["txt"].decode(): Image.open(io.BytesIO(s["jpg"])).size for s in samples}
        assert got == sizes, mode
    samples, _ = _read_back(tmp_path / "keep_ratio")
    small = next(s for s in samples if s["txt"] == b"small")
    assert small["jpg"] == (folder / "small.jpg").read_bytes()  # untouched: not even re-encoded
    # border pads the small image; its content stays 100x80 (no upscale)
    samples, _ = _read_back(tmp_path / "border")
    padded = np.asarray(Image.open(io.BytesIO(next(s for s in samples if s["txt"] == b"small")["jpg"])))
    content = (padded.astype(int).sum(axis=2) > 60).sum(axis=(0, 1))
    assert content == pytest.approx(100 * 80, rel=0.1)


def test_verify_catches_truncated_tar_and_wrong_count(tmp_path, capsys):
    _build(source="shapes", count=12, samples_per_shard=4, output=str(tmp_path))
    assert verify([str(tmp_path)], progress=False).problems == []
    assert _cli(["shards", "verify", str(tmp_path), "--quiet"]) == 0
    assert "3 shards, 12 samples, 0 problems" in capsys.readouterr().out

    shard = tmp_path / "shapes-train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])  # cut in the middle of a member
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    sizes["shapes-train-000002.tar"] = 5
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    report = verify([str(tmp_path)], progress=False)
    assert len(report.problems) == 2
    assert "shapes-train-000001.tar: unreadable tar" in report.problems[0]
    # the damaged shard is named with both counts: what is readable, what sizes.json lists
    assert "complete samples before the damage; sizes.json says 4" in report.problems[0]
    assert "shapes-train-000002.tar: holds 4 samples but sizes.json says 5" in report.problems[1]
    assert _cli(["shards", "verify", str(tmp_path), "--quiet"]) == 1
    assert "problem:" in capsys.readouterr().out
    # a single shard URL is checked against the sizes.json beside it
    assert len(verify([str(tmp_path / "shapes-train-{000000..000002}.tar")], progress=False).problems) == 2


def test_verify_with_nothing_to_check_fails(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no shards here")
    assert _cli(["shards", "verify", str(tmp_path), "--quiet"]) == 2
    line = _one_error_line(capsys)
    assert f"no .tar shards found at '{tmp_path}': nothing to verify" in line
    assert "0 shards" not in capsys.readouterr().out


def test_ls_errors_end_in_one_line(tmp_path, capsys):
    _build(source="shapes", count=4, samples_per_shard=4, output=str(tmp_path))
    assert _cli(["shards", "ls", str(tmp_path), "--limit", "-1"]) == 2
    assert "--limit must be >= 0, got -1" in _one_error_line(capsys)
    shard = tmp_path / "shapes-train-000000.tar"
    assert _cli(["shards", "ls", str(tmp_path / "missing.tar")]) == 2
    assert "not found" in _one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert _cli(["shards", "ls", str(tmp_path / "empty")]) == 2  # nothing to list: said, not an empty success
    assert f"no samples found at '{tmp_path / 'empty'}': nothing to list" in _one_error_line(capsys)
    shard.write_bytes(shard.read_bytes()[:1000])  # cut inside the first member
    assert _cli(["shards", "ls", str(shard)]) == 1  # a damaged shard: 1, as a problem verify finds
    assert "damaged tar" in _one_error_line(capsys)


def test_verify_catches_a_tar_cut_at_a_block_boundary_and_bad_captions(tmp_path):
    _build(source="shapes", count=8, samples_per_shard=4, output=str(tmp_path))
    shard = tmp_path / "shapes-train-000000.tar"
    data = shard.read_bytes()
    # cut after a member, where tarfile itself sees nothing wrong: only the end-of-archive marker is missing
    with tarfile.open(shard) as archive:
        members = archive.getmembers()
    cut = members[5].offset
    shard.write_bytes(data[:cut])
    other = tmp_path / "shapes-train-000001.tar"
    with tarfile.open(other) as archive:
        entries = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    with tarfile.open(other, "w") as archive:
        for member, payload in entries:
            if member.name.endswith(".txt") and member.name.startswith(entries[0][0].name.split(".")[0]):
                payload = b"caf\xe9"  # latin-1, not UTF-8
                member.size = len(payload)
            archive.addfile(member, io.BytesIO(payload))
    problems = verify([str(tmp_path)], progress=False).problems
    assert any("shapes-train-000000.tar: unreadable tar" in p and "end-of-archive marker" in p
               and "sizes.json says 4" in p for p in problems), problems
    assert any("shapes-train-000001.tar" in p and "not UTF-8" in p for p in problems), problems


def test_verify_catches_shards_missing_from_sizes(tmp_path):
    _build(source="shapes", count=4, samples_per_shard=2, output=str(tmp_path))
    (tmp_path / "shapes-train-000001.tar").rename(tmp_path / "other-000000.tar")
    problems = verify([str(tmp_path)], progress=False).problems
    assert any("other-000000.tar is not listed" in p for p in problems)
    assert any("shapes-train-000001.tar listed in sizes.json is missing (2 samples)" in p for p in problems)


def test_rebuild_with_fewer_shards_removes_stale_ones(tmp_path):
    _build(source="shapes", count=6, samples_per_shard=2, output=str(tmp_path))
    _build(source="shapes", count=2, samples_per_shard=2, output=str(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shapes-train-000000.tar"]
    assert verify([str(tmp_path)], progress=False).problems == []


def test_build_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        _cli(["shards", "build", "--help"])
    text = capsys.readouterr().out
    for option in ("--source", "--split", "--count", "--seed", "--image-size", "--sample-rate", "--input",
                   "--path-column", "--caption-column", "--format", "--output", "--prefix", "--samples-per-shard",
                   "--max-shard-bytes", "--resize", "--resize-mode", "--jpeg-quality", "--workers",
                   "--storage-option"):
        assert f"  {option} " in text, option
    with tarfile.open(os.devnull, "w"):  # tarfile stays importable in the test env (used by verify)
        pass


def test_bench_shards_harness_runs(tmp_path, capsys):
    from pipeline.bench import shards as bench_shards

    parser = argparse.ArgumentParser()
    bench_shards.add_arguments(parser)
    args = parser.parse_args(["--count", "6", "--samples-per-shard", "4", "--workers", "1",
                              "--cache-dir", str(tmp_path)])
    figures = bench_shards.measure(args)
    assert figures["plain"] > 0 and figures["ours_1"] > 0 and figures["ratio_per_worker_1"] > 0
    assert "samples/s" in capsys.readouterr().out
    assert len(list((tmp_path / "jpeg-640x480-6").glob("*.jpg"))) == 6


def test_bad_settings_name_the_setting(tmp_path, capsys):
    for argv, setting in ((["--source", "shapes", "--image-size", "300"], "image_size"),
                          (["--source", "tones", "--sample-rate", "8000"], "sample_rate"),
                          (["--source", "folder"], "input"),
                          (["--source", "shapes", "--resize", "-1"], "resize")):
        assert _cli(["shards", "build", *argv, "--output", str(tmp_path), "--quiet"]) == 2
        assert setting in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_manifest_key_column_names_samples(tmp_path):
    _jpeg(tmp_path / "x.jpg")
    rows = [{"key": "cat.001", "path": "x.jpg", "caption": "one"}, {"key": "dog", "path": "x.jpg", "caption": "two"},
            {"key": "cat_001", "path": "x.jpg", "caption": "clash after removing the dot"}]
    _write_manifest(tmp_path / "m.csv", "csv", rows)
    summary = _build(source="manifest", input=str(tmp_path / "m.csv"), output=str(tmp_path / "out"))
    samples, _ = _read_back(tmp_path / "out")
    assert [s["__key__"] for s in samples] == ["cat_001", "dog"]
    assert summary.failed_by_reason == {"duplicate_key": 1}
