"""Tiny real WebDataset shards for the loader tests: uneven sizes, sizes.json, planted bad samples,
truncated tars, img2dataset-style and open_clip-style layouts, audio shards; and ShardHttpServer, a
local HTTP store that can answer 404, fail with 503 or stall in the middle of a shard.

Every writer returns the list of shard paths; sample keys are unique across a data set and say
where the sample lives (`{prefix}{shard:02d}x{index:04d}`), so a test can check coverage by key.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(seed: int, size: int = 24) -> bytes:
    """A small JPEG whose pixels depend on `seed` (so different samples give different tensors)."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def flac_bytes(seed: int, sample_rate: int = 8000, seconds: float = 0.75) -> bytes:
    import soundfile

    rng = np.random.default_rng(seed)
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    wave = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 1000) * t).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, sample_rate, format="FLAC")
    return buffer.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as archive:
        for key, files in samples:
            for extension, data in files.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                info.mtime = 0
                archive.addfile(info, io.BytesIO(data))


def sample_files(key: str, seed: int, *, modality: str = "image", label: int | None = None,
                 captions: list[str] | None = None) -> dict[str, bytes]:
    media = {"jpg": jpeg_bytes(seed)} if modality == "image" else {"flac": flac_bytes(seed)}
    files = {**media, "txt": f"caption of {key}".encode()}
    metadata = {}
    if label is not None:
        metadata["label"] = label
    if captions:
        metadata["captions"] = captions
    if metadata:
        files["json"] = json.dumps(metadata).encode()
    return files


def write_dataset(directory: Path, sizes: list[int], *, prefix: str = "data", modality: str = "image",
                  sizes_json: bool = True, stats_json: bool = False, captions: bool = False) -> list[str]:
    """Shards `{prefix}-{i:06d}.tar` of the given sizes (+ sizes.json); labels = index mod 5."""
    directory.mkdir(parents=True, exist_ok=True)
    paths, listed = [], {}
    for shard, size in enumerate(sizes):
        samples = []
        for index in range(size):
            key = f"{prefix}{shard:02d}x{index:04d}"
            extra = [f"first caption of {key}", f"second caption of {key}"] if captions else None
            samples.append((key, sample_files(key, shard * 1000 + index, modality=modality, label=index % 5,
                                              captions=extra)))
        path = directory / f"{prefix}-{shard:06d}.tar"
        write_tar(path, samples)
        listed[path.name] = size
        if stats_json:
            (directory / f"{prefix}-{shard:06d}_stats.json").write_text(json.dumps({"count": size, "successes": size}))
        paths.append(str(path))
    if sizes_json:
        (directory / "sizes.json").write_text(json.dumps(listed))
    return paths


def all_keys(sizes: list[int], prefix: str = "data") -> set[str]:
    return {f"{prefix}{shard:02d}x{index:04d}" for shard, size in enumerate(sizes) for index in range(size)}


def write_bad_dataset(directory: Path, sizes: list[int], prefix: str = "bad") -> dict[str, object]:
    """Like write_dataset, then plants: a corrupt JPEG (shard 0, sample 1), a sample without caption
    (shard 1, sample 2), a sample without media (shard 1, sample 4) and truncates the last shard in the
    middle of its data (sizes.json still lists its full size). Returns what was planted."""
    paths = write_dataset(directory, sizes, prefix=prefix)
    corrupt, no_caption, no_media = f"{prefix}00x0001", f"{prefix}01x0002", f"{prefix}01x0004"
    rewrite = rewrite_tar
    rewrite(paths[0], lambda key, files: {**files, "jpg": b"\xff\xd8\xff\xe0 not a jpeg"} if key == corrupt else files)
    rewrite(paths[1], lambda key, files: (
        {k: v for k, v in files.items() if k != "txt"} if key == no_caption
        else {k: v for k, v in files.items() if k != "jpg"} if key == no_media else files))
    last = Path(paths[-1])
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member's data
    return {"paths": paths, "corrupt": corrupt, "no_caption": no_caption, "no_media": no_media,
            "truncated": str(last)}


def write_img2dataset(directory: Path, sizes: list[int]) -> set[str]:
    """img2dataset's output: 00000.tar with key.jpg/key.txt/key.json, 00000_stats.json, 00000.parquet,
    no sizes.json. Returns the keys written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    keys = set()
    for shard, size in enumerate(sizes):
        samples, rows = [], []
        for index in range(size):
            key = f"{shard:05d}{index:04d}"
            keys.add(key)
            meta = {"url": f"http://example.com/{key}.jpg", "caption": f"photo {key}", "key": key,
                    "status": "success", "width": 24, "height": 24}
            samples.append((key, {"jpg": jpeg_bytes(shard * 100 + index), "txt": f"photo {key}".encode(),
                                  "json": json.dumps(meta).encode()}))
            rows.append(meta)
        write_tar(directory / f"{shard:05d}.tar", samples)
        stats = {"count": size + 2, "successes": size, "failed_to_download": 2, "failed_to_resize": 0,
                 "status_dict": {"success": size, "404": 2}}
        (directory / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
        pq.write_table(pa.Table.from_pylist(rows), directory / f"{shard:05d}.parquet")
    return keys


def write_open_clip_style(directory: Path, sizes: list[int]) -> set[str]:
    """open_clip's layout: {00000..N}.tar with .jpg/.txt only, and sizes.json."""
    directory.mkdir(parents=True, exist_ok=True)
    keys, listed = set(), {}
    for shard, size in enumerate(sizes):
        samples = []
        for index in range(size):
            key = f"s{shard}_{index:05d}"
            keys.add(key)
            samples.append((key, {"jpg": jpeg_bytes(7000 + shard * 100 + index), "txt": f"text {key}".encode()}))
        write_tar(directory / f"{shard:05d}.tar", samples)
        listed[f"{shard:05d}.tar"] = size
    (directory / "sizes.json").write_text(json.dumps(listed))
    return keys


class ShardHttpServer:
    """A local HTTP server of the files in `root`, with faults planted per file name: the stand-in for a
    misbehaving object store (read through fsspec's http protocol, streaming: storage_options
    {"block_size": 0}).

        server = ShardHttpServer(directory)
        server.fail["data-000001.tar"] = 3       # the next 3 requests of it get 503
        server.stall["data-000002.tar"] = 2000   # sends 2000 bytes of it, then nothing until stop()
        ... fsspec.open(server.url + "/data-000001.tar", block_size=0) ...
        server.stop()

    A file absent from `root` answers 404. `requests` counts the requests per name."""

    def __init__(self, root: Path):
        import threading
        from collections import Counter
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.root = Path(root)
        self.fail: dict[str, int] = {}
        self.stall: dict[str, int] = {}
        self.requests: Counter = Counter()
        self.released = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # no access log on stderr
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                owner.requests[name] += 1
                if owner.fail.get(name, 0) > 0:
                    owner.fail[name] -= 1
                    self.send_error(503, "planted outage")
                    return
                path = owner.root / name
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if name in owner.stall:
                    self.wfile.write(data[: owner.stall[name]])
                    self.wfile.flush()
                    owner.released.wait(60)  # a stalled store: the connection stays open, nothing comes
                    return
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


def rewrite_tar(path: str, edit) -> None:
    """Rewrite a tar sample by sample: edit(key, {extension: bytes}) -> the new files of that sample."""
    with tarfile.open(path) as archive:
        members = [(m.name, archive.extractfile(m).read()) for m in archive.getmembers()]
    samples: dict[str, dict[str, bytes]] = {}
    for name, data in members:
        key, _, extension = name.partition(".")
        samples.setdefault(key, {})[extension] = data
    write_tar(Path(path), [(key, edit(key, files)) for key, files in samples.items()])
