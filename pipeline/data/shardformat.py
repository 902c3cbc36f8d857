"""The WebDataset shard format, implemented once (leaf module: stdlib, pipeline.core.storage, pipeline.core.errors).

    split_member("x/a.b.JPG")          # ("x/a", "b.jpg"): key and field exactly as webdataset 1.0.2 has them
    for sample in iter_samples(stream, wanted=lambda index: True):
        sample.index, sample.key, sample.files, sample.problem   # files: {field: bytes}, None when not wanted
    with TarSampleWriter(path) as writer: writer.write(key, {"jpg": ..., "txt": ...})
    read_sizes(directory_url) / sizes_json(sizes) / stats_url(tar_url) / read_stats(tar_url) / stats_json(...)

Members and keys, as webdataset keys them (`tariterators.tar_file_iterator`, `base_plus_ext` and
`group_by_keys`, with its default lower-casing of the field): only regular files count; a top-level name
`__*__` and a name matching `__[^/]*__($|/)` are webdataset's metadata and skipped; the key is the path up
to the first dot of the base name (directory included, so `x/1.jpg` and `y/1.jpg` are two samples), the
field the rest, lower-cased (`a.b.c.JPG` -> key `a`, field `b.c.jpg`); a name without such a dot (`README`,
`.hidden.jpg`, macOS `._1.jpg`) is skipped. Consecutive members with the same key form one sample. Where
webdataset's `group_by_keys` raises ("duplicate file name"), the sample is yielded with a `problem` (PROBLEMS)
and no files: readers skip and count it, and it keeps its index so that counts and resume positions agree.
It raises on a field twice in one sample (`duplicate_member`), and on a field named like the entries it puts
in every sample itself, `__key__`, `__url__` and (shards on local disk) `__local_path__` (`reserved_field`:
`s1.__key__`, `s1.__URL__`); where `__local_path__` is a sample's first member, webdataset does not raise but
replaces the member by the shard's path: here such a sample is skipped all the same. A field that merely
starts and ends with `__` (`s1.__foo__`, `s1.__key__.jpg`) is an ordinary field, as in webdataset.
tests/data/test_shardformat.py compares all of this with `webdataset.WebDataset` over the same tars.

Why the member loop is ours and not webdataset's `tar_file_iterator`: resume and the loader's own stream
skip samples without reading their bytes into Python objects (`wanted`), a duplicated field must skip one
sample rather than end the shard (webdataset's handlers can only drop the rest of the shard or re-raise),
and a tar cut at a block boundary must be told (webdataset ends quietly there, losing samples unnoticed).
Speed is not the reason: over an in-memory tar of 2000 samples (256-px JPEG, .txt, .json), one core,
`iter_samples` takes 129 us a sample read and 99 us skipped, webdataset's tar_file_expander +
group_by_keys 136 us (it cannot skip), the loader's former loop 132 / 101 us.

The writer is webdataset's `TarWriter` (encoder off, fixed mtime/mode/owner, fields in sorted order): the
bytes of a sample are the same on any machine, at any time. Its file is one we open and close ourselves
(a local staging file; remote output is uploaded whole afterwards), since `ShardWriter(opener=...)` never
closes what its opener returns. webdataset 1.0.2 ignores TarWriter's `format` argument, so the tars are
tarfile's default (POSIX pax: plain ustar headers, a pax header only for a name over 100 bytes or not ASCII).
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.core import storage

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
"""Fields the loader decodes as images, in order of preference."""
AUDIO_FIELDS = ("flac", "wav", "ogg", "mp3")
"""Fields the loader decodes as audio, in order of preference."""
SIZES_FILE = "sizes.json"
# member metadata fixed so that the same samples give the same bytes on any machine, at any time
TAR_MTIME, TAR_MODE, TAR_OWNER = 0, 0o444, "bigdata"

# webdataset 1.0.2, tariterators.py: base_plus_ext and the metadata skipped by tar_file_iterator
_KEY_AND_FIELD = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")
RESERVED_FIELDS = ("__key__", "__url__", "__local_path__")
"""The entries webdataset's group_by_keys puts in a sample itself: a member with such a field makes it raise."""
PROBLEMS = {
    "duplicate_member": "has a member name twice",
    "reserved_field": "has a member named like webdataset's own sample entries (.__key__, .__url__, .__local_path__)",
}
"""TarSample.problem -> what is wrong with the sample, for messages (`shards verify`)."""


def split_member(name: str) -> tuple[str, str] | None:
    """(key, field) of a tar member name as webdataset groups it, or None for a member webdataset skips."""
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return None
    if _META.match(name):
        return None
    match = _KEY_AND_FIELD.match(name)
    if not match:
        return None
    return match.group(1), match.group(2).lower()


@dataclass
class TarSample:
    index: int
    """Position of the sample in its shard (0, 1, ...), the same whether its files were read or not."""
    key: str
    files: dict[str, bytes] | None
    """field -> bytes; None when the sample was not wanted, or has a problem."""
    problem: str = ""
    """'' or a key of PROBLEMS: 'duplicate_member' (a field twice in the sample), 'reserved_field' (a field of
    RESERVED_FIELDS). webdataset raises on both; readers skip the sample."""
    sizes: dict[str, int] | None = None
    """field -> bytes of the member (every sample, wanted or not)."""


def iter_samples(stream, wanted: Callable[[int], bool] = lambda index: True) -> Iterator[TarSample]:
    """Group a tar stream's members into samples (see the module docstring); the files of samples not
    `wanted` (by index) are never read into memory. Raises tarfile.ReadError when the tar ends without
    its end-of-archive marker (cut at a block boundary: its last sample may lack members)."""
    archive = tarfile.open(fileobj=stream, mode="r|*")
    current: TarSample | None = None
    index = -1
    for member in archive:
        if not member.isreg():
            continue
        split = split_member(member.name)
        if split is None:
            continue
        key, field = split
        if current is None or key != current.key:
            if current is not None:
                yield _finished(current)
            index += 1
            current = TarSample(index, key, {} if wanted(index) else None, "", {})
        if current.problem:
            pass  # the first problem found names the sample's
        elif field in current.sizes:
            current.problem = "duplicate_member"
        elif field in RESERVED_FIELDS:
            current.problem = "reserved_field"
        current.sizes[field] = member.size
        if current.files is not None and not current.problem:
            data = archive.extractfile(member).read()
            if len(data) != member.size:
                raise tarfile.ReadError(f"member {member.name} is cut short ({len(data)} of {member.size} bytes)")
            current.files[field] = data
        archive.members = []  # stream mode: keep no list of every member seen
    if not ends_cleanly(archive):
        raise tarfile.ReadError(f"the tar ends at byte {archive.offset} without its end-of-archive marker")
    if current is not None:
        yield _finished(current)


def _finished(sample: TarSample) -> TarSample:
    if sample.problem:
        sample.files = None
    return sample


def ends_cleanly(archive: tarfile.TarFile) -> bool:
    """After iterating a stream-mode ('r|') archive to its end: whether it ended with the end-of-archive
    (zero) block. tarfile stops as quietly when the data simply runs out at a block boundary, where its
    stream position is short of the block it tried to read as the next header."""
    return archive.fileobj.tell() >= archive.offset + tarfile.BLOCKSIZE


class TarSampleWriter:
    """Writes samples into one tar with fixed member metadata (deterministic bytes): webdataset's
    TarWriter, encoder off (fields are bytes), members `{key}.{field}` in sorted field order."""

    def __init__(self, path: str):
        # imported here: webdataset takes seconds to import, and only writers need it
        from webdataset.writer import TarWriter

        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._writer = TarWriter(self._file, user=TAR_OWNER, group=TAR_OWNER, mode=TAR_MODE, encoder=False,
                                 mtime=TAR_MTIME)
        self.samples = 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if split_member(f"{key}.x") != (key, "x"):
            raise ValueError(f"sample key {key!r} would not read back as itself (no dots, no leading dot)")
        self._writer.write({"__key__": key, **files})
        self.samples += 1

    def close(self) -> None:
        self._writer.close()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------- sizes.json, *_stats.json


class SizesError(ValueError):
    """A sizes.json that is not JSON or does not map shard names to counts."""


def read_sizes(directory: str, storage_options: dict | None = None) -> dict[str, int] | None:
    """The sizes.json of a data set directory (shard name -> samples, open_clip's form); None when absent.
    Raises SizesError naming the file when it is not a valid one."""
    url = posixpath.join(directory.rstrip("/"), SIZES_FILE)
    try:
        sizes = storage.read_json(url, storage_options)
    except ValueError as error:
        raise SizesError(f"{url}: not valid JSON ({error})") from None
    if sizes is None:
        return None
    if not isinstance(sizes, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in sizes.values()):
        raise SizesError(f"{url}: must map shard names to sample counts")
    return sizes


def sizes_json(sizes: dict[str, int]) -> str:
    return json.dumps(sizes, indent=1) + "\n"


def stats_url(tar_url: str) -> str | None:
    """`{shard}_stats.json` beside `{shard}.tar` (img2dataset's name); None for a URL not ending in .tar."""
    return tar_url[: -len(".tar")] + "_stats.json" if tar_url.endswith(".tar") else None


def read_stats(tar_url: str, storage_options: dict | None = None) -> dict[str, Any] | None:
    """The shard's *_stats.json when there is a readable one with a 'successes' count, else None."""
    url = stats_url(tar_url)
    if url is None:
        return None
    try:
        stats = storage.read_json(url, storage_options)
    except ValueError:
        return None
    if isinstance(stats, dict) and isinstance(stats.get("successes"), int):
        return stats
    return None


def stats_json(shard_name: str, stats: dict[str, Any]) -> str:
    return json.dumps({"shard": shard_name, **stats}, indent=1) + "\n"
