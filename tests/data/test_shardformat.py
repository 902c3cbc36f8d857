"""The WebDataset format, implemented once (pipeline.data.shardformat): keys and fields exactly as webdataset
1.0.2 makes them, read by webdataset itself over the same tars; the loader, `shards verify`, the shard
counter and `shards ls` all see the same samples."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline.data import loader as data
from pipeline.data import shardformat, shardindex
from pipeline.shards.verify import verify
from tests.data_fixtures import jpeg_bytes, write_dataset, write_img2dataset

ROOT = Path(__file__).resolve().parents[2]


def write_members(path: Path, members: list[tuple[str, bytes]]) -> str:
    """A tar with exactly these member names, in this order."""
    with tarfile.open(path, "w") as archive:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(payload), 0
            archive.addfile(info, io.BytesIO(payload))
    return str(path)


def odd_names(tmp_path: Path) -> str:
    """Every naming case in one tar (each sample with an image and a caption where it has any)."""
    jpg = jpeg_bytes(0)
    return write_members(tmp_path / "odd-000000.tar", [
        ("x/1.jpg", jpg), ("x/1.txt", b"x one"),            # same base name, two directories: two samples
        ("y/1.jpg", jpg), ("y/1.txt", b"y one"),
        ("a.b.c.jpg", jpg), ("a.txt", b"several dots"),     # key a: fields b.c.jpg and txt
        ("__k.jpg", jpg), ("__k.txt", b"dunder prefix"),    # an ordinary sample for webdataset
        ("__meta__", b"{}"),                                # webdataset metadata: skipped
        ("__k2__.jpg", jpg), ("__k2__.txt", b"dunder both sides"),
        ("UPPER.JPG", jpg), ("UPPER.TXT", b"upper-case extensions"),
        ("._UPPER.JPG", b"macOS resource fork"),            # no key: skipped, never a sample keyed ""
        (".hidden.jpg", jpg),                               # leading dot: skipped
        ("README", b"no extension"),                        # no dot: skipped
        ("z/._2.jpg", b"macOS fork in a directory"),         # webdataset: key "z/", field "_2.jpg"
        ("s.jpg", jpg), ("s.txt", b"last"),
    ])


def webdataset_samples(url: str) -> list[tuple[str, dict[str, bytes]]]:
    import webdataset as wds

    return [(sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")})
            for sample in wds.WebDataset(url, shardshuffle=False)]


def our_samples(url: str) -> list[tuple[str, dict[str, bytes]]]:
    with open(url, "rb") as stream:
        return [(sample.key, sample.files) for sample in shardformat.iter_samples(stream)]


def test_keys_and_fields_are_webdatasets(tmp_path):
    url = odd_names(tmp_path)
    ours = our_samples(url)
    assert ours == webdataset_samples(url)
    keys = [key for key, _ in ours]
    assert keys == ["x/1", "y/1", "a", "__k", "__k2__", "UPPER", "z/", "s"]
    assert set(dict(ours)["a"]) == {"b.c.jpg", "txt"} and set(dict(ours)["UPPER"]) == {"jpg", "txt"}
    assert "" not in keys


def test_img2dataset_output_reads_as_webdataset_reads_it(tmp_path):
    write_img2dataset(tmp_path, [3])
    url = str(tmp_path / "00000.tar")
    assert our_samples(url) == webdataset_samples(url)
    assert shardformat.read_stats(url)["successes"] == 3
    assert not (tmp_path / "sizes.json").exists()


def test_a_duplicated_member_skips_that_sample_where_webdataset_raises(tmp_path):
    jpg = jpeg_bytes(1)
    url = write_members(tmp_path / "dup-000000.tar", [
        ("a.jpg", jpg), ("a.txt", b"first"),
        ("b.jpg", jpg), ("b.txt", b"second"), ("b.jpg", jpg),   # b.jpg twice
        ("c.jpg", jpg), ("c.txt", b"third"),
    ])
    with pytest.raises(ValueError, match="duplicate"):
        webdataset_samples(url)
    with open(url, "rb") as stream:
        samples = list(shardformat.iter_samples(stream))
    assert [(s.key, s.problem, s.files is None) for s in samples] == [
        ("a", "", False), ("b", "duplicate_member", True), ("c", "", False)]

    # the loader: the sample is skipped and counted, its slot marked invalid; the others are read
    cfg = data.DataConfig(train_urls=url, batch_size=3, workers=0, shuffle_buffer=0)
    loader = data.build_loader(cfg, url, rank=0, world_size=1, seed=0, media_transform=lambda image: _tensor(),
                               tokenizer=_tokens, train=True)
    (batch,) = list(loader)
    assert sorted(batch.keys) == ["", "a", "c"] and batch.valid.tolist().count(False) == 1
    assert loader.stats["skipped_duplicate_member"] == 1
    # verify names it
    assert any("sample b has a member name twice" in p for p in verify([url], progress=False).problems)


@pytest.mark.parametrize("member", ["s1.__key__", "s1.__URL__", "s1.__local_path__"])
def test_a_member_named_like_webdatasets_own_entries_skips_that_sample_where_webdataset_raises(tmp_path, member):
    jpg = jpeg_bytes(3)
    url = write_members(tmp_path / "reserved-000000.tar", [
        ("s0.jpg", jpg), ("s0.txt", b"first"),
        ("s1.jpg", jpg), ("s1.txt", b"second"), (member, b"not a field"),
        ("s2.jpg", jpg), ("s2.txt", b"third"), ("s2.__key__.jpg", jpg), ("s2.__foo__", b"x"),  # ordinary fields
    ])
    with pytest.raises(ValueError, match="duplicate file name"):
        webdataset_samples(url)
    with open(url, "rb") as stream:
        samples = list(shardformat.iter_samples(stream))
    assert [(s.key, s.problem, s.files is None) for s in samples] == [
        ("s0", "", False), ("s1", "reserved_field", True), ("s2", "", False)]
    assert set(samples[2].files) == {"jpg", "txt", "__key__.jpg", "__foo__"}
    # webdataset reads the same tar without s1 as we read it: s2 keeps its odd fields
    clean = write_members(tmp_path / "clean-000000.tar", [("s0.jpg", jpg), ("s0.txt", b"first"), ("s2.jpg", jpg),
                                                          ("s2.txt", b"third"), ("s2.__key__.jpg", jpg),
                                                          ("s2.__foo__", b"x")])
    import webdataset as wds

    theirs = [(sample["__key__"], {k: v for k, v in sample.items() if k not in shardformat.RESERVED_FIELDS})
              for sample in wds.WebDataset(clean, shardshuffle=False)]
    assert theirs == [(s.key, s.files) for s in samples if not s.problem]

    # the loader: skipped and counted under its own reason, its slot marked invalid
    cfg = data.DataConfig(train_urls=url, batch_size=3, workers=0, shuffle_buffer=0)
    loader = data.build_loader(cfg, url, rank=0, world_size=1, seed=0, media_transform=lambda image: _tensor(),
                               tokenizer=_tokens, train=True)
    (batch,) = list(loader)
    assert sorted(batch.keys) == ["", "s0", "s2"] and batch.valid.tolist().count(False) == 1
    assert loader.stats["skipped_reserved_field"] == 1 and loader.stats["skipped_duplicate_member"] == 0
    # verify names it; ls shows the sample as the loader skips it
    assert any("sample s1 has a member named like webdataset's own sample entries" in p
               for p in verify([url], progress=False).problems)
    records = [json.loads(line) for line in subprocess.run(
        [sys.executable, "-m", "pipeline", "shards", "ls", "--json", url], capture_output=True, text=True, cwd=ROOT,
        check=True, timeout=120).stdout.splitlines()]
    assert [(r["key"], r.get("skipped")) for r in records] == [("s0", None), ("s1", "reserved_field"), ("s2", None)]


def test_loader_sees_what_webdataset_sees_and_never_a_sample_keyed_empty(tmp_path):
    url = odd_names(tmp_path)
    expected = [key for key, files in webdataset_samples(url) if "txt" in files and ("jpg" in files)]
    cfg = data.DataConfig(train_urls=url, batch_size=1, workers=0, shuffle_buffer=0)
    loader = data.build_loader(cfg, url, rank=0, world_size=1, seed=0, media_transform=lambda image: _tensor(),
                               tokenizer=_tokens, train=False)
    keys = [key for batch in loader for key in batch.keys]
    # a.b.c.jpg has field b.c.jpg, not jpg; z/ has only _2.jpg: both lack media -> skipped (counted)
    assert [k for k in keys if k] == expected == ["x/1", "y/1", "__k", "__k2__", "UPPER", "s"]
    assert loader.stats["skipped_missing_media"] == 2
    assert data.read_shard_sizes(url) == {url: 8}


def test_verify_accepts_img2dataset_and_upper_case_and_tells_directories_apart(tmp_path):
    write_img2dataset(tmp_path / "i2d", [3, 2])
    report = verify([str(tmp_path / "i2d")], progress=False)
    assert report.problems == [] and (report.shards, report.samples) == (2, 5)
    # a *_stats.json that disagrees with the tar is named
    (tmp_path / "i2d" / "00001_stats.json").write_text(json.dumps({"count": 4, "successes": 4}))
    assert any("holds 2 samples but 00001_stats.json says 4" in p
               for p in verify([str(tmp_path / "i2d")], progress=False).problems)

    jpg = jpeg_bytes(2)
    url = write_members(tmp_path / "mixed.tar", [("x/1.jpg", jpg), ("x/1.txt", b"x"), ("y/1.jpg", jpg),
                                                 ("y/1.txt", b"y"), ("UPPER.JPG", jpg), ("UPPER.TXT", b"u")])
    report = verify([url], progress=False)
    assert report.problems == [] and report.samples == 3


def test_a_tar_without_listed_size_is_counted_once(tmp_path, monkeypatch):
    paths = write_dataset(tmp_path, [3, 4], sizes_json=False)
    counted = []
    count = shardindex._count_samples
    monkeypatch.setattr(shardindex, "_count_samples", lambda url, *a: counted.append(url) or count(url, *a))
    assert list(data.read_shard_sizes(str(tmp_path)).values()) == [3, 4]
    assert list(data.read_shard_sizes(str(tmp_path)).values()) == [3, 4]  # the trainer's check, then the plan
    assert sorted(counted) == paths  # counted on a thread pool: in any order
    write_dataset(tmp_path, [3, 2], sizes_json=False)  # a changed file is counted again
    assert list(data.read_shard_sizes(str(tmp_path)).values()) == [3, 2]
    assert sorted(counted[:2]) == paths and paths[1] in counted[2:]


def test_writer_reads_back_and_refuses_keys_that_would_not(tmp_path):
    path = tmp_path / "w.tar"
    with shardformat.TarSampleWriter(str(path)) as writer:
        writer.write("dir/k1", {"txt": b"t", "jpg": b"j"})
        with pytest.raises(ValueError, match="read back"):
            writer.write("a.b", {"txt": b"t"})
    assert our_samples(str(path)) == webdataset_samples(str(path)) == [("dir/k1", {"jpg": b"j", "txt": b"t"})]
    first = path.read_bytes()
    with shardformat.TarSampleWriter(str(path)) as writer:
        writer.write("dir/k1", {"jpg": b"j", "txt": b"t"})
    assert path.read_bytes() == first  # fixed member metadata: the same bytes every time


def test_shards_ls_prints_what_the_loader_sees(tmp_path):
    url = odd_names(tmp_path)
    run = [sys.executable, "-m", "pipeline", "shards", "ls", url]
    text = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, check=True, timeout=120).stdout
    lines = text.splitlines()
    assert lines[0] == f"x/1  jpg={len(jpeg_bytes(0))}  txt=5" and lines[2].startswith("a  b.c.jpg=")
    records = [json.loads(line) for line in
               subprocess.run([*run, "--json", "--limit", "3"], capture_output=True, text=True, cwd=ROOT,
                              check=True, timeout=120).stdout.splitlines()]
    assert [r["key"] for r in records] == ["x/1", "y/1", "a"]
    assert records[1]["fields"] == {"jpg": len(jpeg_bytes(0)), "txt": 5} and records[1]["shard"] == url
    helped = subprocess.run([*run[:-1], "--help"], capture_output=True, text=True, cwd=ROOT, check=True,
                            timeout=120).stdout
    assert "--limit" in helped and "--json" in helped and "as the loader" in helped


def _tensor():
    import torch

    return torch.zeros(3, 4, 4, dtype=torch.uint8)


def _tokens(captions):
    import torch

    return torch.zeros(len(captions), 4, dtype=torch.long)
