"""Shards on S3 through a real moto server on loopback: build to s3://, read back with plain
webdataset, verify remotely, and build from a manifest whose table and media live on S3."""

import io
import json

import fsspec
import s3fs
import webdataset as wds
from PIL import Image

from pipeline.cli import main
from pipeline.shards import synthetic
from pipeline.shards.build import build_shards
from pipeline.shards.config import BuildConfig
from pipeline.shards.verify import verify


def _cli(argv):
    return main(argv)  # the real command line: pipeline.cli reports errors and picks the exit status


def test_build_to_s3_and_read_back(s3_server, tmp_path, capsys):
    s3_server.make_bucket("shards-out")
    url = "s3://shards-out/shapes/val"
    assert _cli(["shards", "build", "--source", "shapes", "--split", "val", "--count", "9", "--samples-per-shard",
                 "4", "--output", url, "--workers", "1", "--quiet", *s3_server.cli_storage_options()]) == 0
    assert "9 samples in 3 shards" in capsys.readouterr().out

    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("shards-out/shapes/val"))
    assert names == ["classes.json", "shapes-val-000000.tar", "shapes-val-000000_stats.json",
                     "shapes-val-000001.tar", "shapes-val-000001_stats.json", "shapes-val-000002.tar",
                     "shapes-val-000002_stats.json", "sizes.json"]
    sizes = json.loads(fs.cat("shards-out/shapes/val/sizes.json"))
    assert sizes == {"shapes-val-000000.tar": 4, "shapes-val-000001.tar": 4, "shapes-val-000002.tar": 1}

    # download the objects and read them with plain webdataset: the uploads are complete tars
    fs.get("shards-out/shapes/val/", str(tmp_path / "copy"), recursive=True)
    local = [str(tmp_path / "copy" / name) for name in sizes]
    samples = list(wds.WebDataset(local, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [synthetic.sample_key(i) for i in range(9)]
    for index, sample in enumerate(samples):
        expected = synthetic.shapes_sample(0, "val", index)
        assert sample["txt"].decode() == expected.caption
        assert Image.open(io.BytesIO(sample["png"])).size == (64, 64)

    # and stream one straight from S3 through fsspec into webdataset's tar reader
    with fsspec.open(url + "/shapes-val-000001.tar", "rb", **s3_server.storage_options) as stream:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
        streamed = list(wds.tariterators.group_by_keys(files))
    assert [s["__key__"] for s in streamed] == [synthetic.sample_key(i) for i in range(4, 8)]

    assert verify([url], s3_server.storage_options, progress=False).problems == []
    fs.pipe("shards-out/shapes/val/shapes-val-000002.tar", fs.cat("shards-out/shapes/val/shapes-val-000002.tar")[:700])
    assert _cli(["shards", "verify", url, "--quiet", *s3_server.cli_storage_options()]) == 1
    assert "shapes-val-000002.tar" in capsys.readouterr().out


def test_manifest_and_media_on_s3(s3_server, tmp_path):
    s3_server.make_bucket("raw-media")
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    for name, colour in (("red", (220, 0, 0)), ("green", (0, 200, 0))):
        buffer = io.BytesIO()
        Image.new("RGB", (400, 300), colour).save(buffer, format="JPEG")
        fs.pipe(f"raw-media/img/{name}.jpg", buffer.getvalue())
    rows = [
        {"url": "img/red.jpg", "caption": "a red picture"},  # relative to the manifest's location
        {"url": "s3://raw-media/img/green.jpg", "caption": "a green picture"},
        {"url": "s3://raw-media/img/blue.jpg", "caption": "not uploaded"},
    ]
    fs.pipe("raw-media/pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    summary = build_shards(BuildConfig(source="manifest", input="s3://raw-media/pairs.jsonl", path_column="url",
                                       output=str(tmp_path / "out"), resize=128,
                                       storage_options=s3_server.storage_options), progress=False)
    assert summary.samples == 2 and summary.failed_by_reason == {"missing_file": 1}
    samples = list(wds.WebDataset(str(tmp_path / "out" / "pairs-000000.tar"), shardshuffle=False,
                                  empty_check=False))
    assert [(s["txt"].decode(), Image.open(io.BytesIO(s["jpg"])).size) for s in samples] == [
        ("a red picture", (171, 128)), ("a green picture", (171, 128))]


def test_folder_on_s3(s3_server, tmp_path):
    s3_server.make_bucket("raw-folder")
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (0, 0, 200)).save(buffer, format="PNG")
    fs.pipe({"raw-folder/set/a.png": buffer.getvalue(), "raw-folder/set/a.txt": b"a blue png",
             "raw-folder/set/b.png": buffer.getvalue()})  # b has no caption
    summary = build_shards(BuildConfig(source="folder", input="s3://raw-folder/set", output=str(tmp_path / "out"),
                                       storage_options=s3_server.storage_options), progress=False)
    assert summary.failed_by_reason == {"missing_caption": 1}
    samples = list(wds.WebDataset(str(tmp_path / "out" / "set-000000.tar"), shardshuffle=False, empty_check=False))
    assert [(s["txt"], s["png"]) for s in samples] == [(b"a blue png", buffer.getvalue())]
    assert json.loads(samples[0]["json"])["source_path"] == "s3://raw-folder/set/a.png"
