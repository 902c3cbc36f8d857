"""Check shards: `verify(urls)`, what `python -m pipeline shards verify` runs. Every tar readable to the end,
every sample with media and a caption (grouped as the loader groups them, pipeline.data.shardformat), and
per-shard counts equal to sizes.json or, without one, each shard's *_stats.json (img2dataset).
"""

from __future__ import annotations

import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any

from pipeline.core import storage
from pipeline.core.progress import progress_bar
from pipeline.data import shardformat

# (shard url, expected count or None, where the expectation comes from)
Target = tuple[str, int | None, str]


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)


class DamagedTar(Exception):
    """A tar that cannot be read to its end; `complete` samples came before the damage."""

    def __init__(self, complete: int, error: Exception):
        super().__init__(str(error))
        self.complete = complete


def _count_tar_samples(handle) -> tuple[int, list[str]]:
    """Samples in a tar stream, grouped as the loader groups them (shardformat.iter_samples, every member
    read so truncation is caught: DamagedTar, with the samples complete before it), and their problems."""
    keys, problems = [], []
    media_fields = set(shardformat.IMAGE_FIELDS) | set(shardformat.AUDIO_FIELDS)
    try:
        for sample in shardformat.iter_samples(handle):
            keys.append(sample.key)
            if sample.problem:
                problems.append(f"sample {sample.key} {shardformat.PROBLEMS[sample.problem]} (the loader skips it)")
                continue
            files = sample.files
            if not media_fields & set(files):
                problems.append(f"sample {sample.key} has no image/audio member")
            elif "txt" not in files:
                problems.append(f"sample {sample.key} has no .txt caption")
            else:
                try:
                    files["txt"].decode("utf-8")
                except UnicodeDecodeError:
                    problems.append(f"sample {sample.key} has a .txt caption that is not UTF-8 (the loader skips it)")
    except (tarfile.TarError, EOFError) as error:
        raise DamagedTar(len(keys), error) from error
    if len(set(keys)) != len(keys):
        problems.append("samples of one key are not contiguous or a key repeats")
    return len(keys), problems[:10]


def _expected_count(url: str, sizes: dict[str, int] | None, storage_options: dict) -> tuple[int | None, str]:
    """(the shard's listed count, where it is listed): sizes.json, else its *_stats.json (img2dataset)."""
    name = storage.base_name(url)
    if sizes and name in sizes:
        return sizes[name], "sizes.json"
    stats = shardformat.read_stats(url, storage_options)
    if stats is not None:
        return stats["successes"], storage.base_name(shardformat.stats_url(url))
    return None, ""


def _read_sizes(directory: str, report: VerifyReport, storage_options: dict) -> dict[str, int] | None:
    try:
        return shardformat.read_sizes(directory, storage_options)
    except shardformat.SizesError as error:
        report.problems.append(str(error))
        return None


def verify(urls: list[str], storage_options: dict[str, Any] | None = None, progress: bool = True) -> VerifyReport:
    """Check data set directories or shard URLs: tars readable, samples complete, per-shard counts equal
    sizes.json (or, without one, each shard's *_stats.json, as img2dataset writes; with neither, the
    loader counts the tar and so does this)."""
    storage_options = storage_options or {}
    report = VerifyReport()
    targets = _targets(urls, report, storage_options)
    for url, expected, listed_in in progress_bar(targets, desc="verifying", unit="shard", disable=not progress):
        _check_shard(url, expected, listed_in, report, storage_options)
    return report


def _targets(urls: list[str], report: VerifyReport, storage_options: dict) -> list[Target]:
    """The shards that `urls` (brace patterns of shards or data set directories) name, each with its listed
    count; what is missing or not listed goes into the report's problems."""
    import braceexpand

    targets: list[Target] = []
    for pattern in urls:
        for url in braceexpand.braceexpand(pattern):
            fs, path = storage.url_to_fs(url, storage_options)
            if path.endswith(".tar"):
                if not fs.exists(path):
                    report.problems.append(f"{url}: does not exist")
                    continue
                sizes = _read_sizes(posixpath.dirname(url), report, storage_options)
                targets.append((url, *_expected_count(url, sizes, storage_options)))
                continue
            if not fs.isdir(path):
                report.problems.append(f"{url}: neither a .tar shard nor a data set directory")
                continue
            sizes = _read_sizes(url, report, storage_options)
            shard_urls = storage.list_tars(url, storage_options)
            present = {storage.base_name(u) for u in shard_urls}
            if sizes is not None:
                for name in sorted(present - set(sizes)):
                    report.problems.append(f"{url}: shard {name} is not listed in sizes.json")
                for name, expected in sizes.items():
                    if name not in present:
                        report.problems.append(f"{url}: shard {name} listed in sizes.json is missing ({expected} samples)")
            targets += [(u, *_expected_count(u, sizes, storage_options)) for u in shard_urls
                        if sizes is None or storage.base_name(u) in sizes]
    return targets


def _check_shard(url: str, expected: int | None, listed_in: str, report: VerifyReport, storage_options: dict) -> None:
    """Read one shard to its end: its samples counted into the report, its problems added."""
    report.shards += 1
    try:
        with storage.open_url(url, "rb", storage_options) as handle:
            count, problems = _count_tar_samples(handle)
    except DamagedTar as error:
        listed = f"; {listed_in} says {expected}" if expected is not None else ""
        report.problems.append(f"{url}: unreadable tar ({error}): {error.complete} complete samples before the "
                               f"damage{listed}")
        report.samples += error.complete
        return
    except OSError as error:
        report.problems.append(f"{url}: unreadable tar ({error})")
        return
    report.samples += count
    report.problems += [f"{url}: {p}" for p in problems]
    if expected is not None and count != expected:
        report.problems.append(f"{url}: holds {count} samples but {listed_in} says {expected}")
