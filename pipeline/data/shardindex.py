"""Shard URLs and sample counts of a data set: read once, on rank 0 and in parallel, and shared with every rank.

    index = shard_index(urls, storage_options)  # every rank at the same point: a collective under a process group
    index.sources                                # [[shard URLs of the first '::' source], ...]
    index.sizes                                  # {shard URL: samples}
    index.left_out, index.absent                 # listed in a sizes.json but not there (missing_listed_shards)
    index = read_shard_index(urls, storage_options)   # this process alone, never a collective
    sizes = read_shard_sizes(urls, storage_options)   # the sizes only, this process alone

Where a count comes from: the directory's sizes.json (open_clip's form), else the shard's img2dataset
`*_stats.json` ('successes'), else a count of the samples in the tar. With sizes.json that is one read
per directory; without it, one read per shard, which for 200,000 shards read one after the other on each
of 1,024 ranks would take hours and hammer the store. So:
  - the per-shard reads run on a pool of `READ_THREADS` threads (small GETs wait on the network, not the CPU);
  - under an initialised process group of more than one rank, only rank 0 reads (the counts, the sizes.json
    files and the directory listings behind `missing_listed_shards`), and one `broadcast_object_list` hands
    the whole index to the other ranks (gloo or NCCL; NCCL needs the rank's CUDA device set, as training
    does). Every rank must therefore call `shard_index` at the same point, as `build_loader` is called;
  - the trainer's pre-flight check runs before the process group exists: it reads on rank 0 only
    (`prefetch_shard_index`), and the loader's call on rank 0 then takes that index instead of reading
    again. A kept index is taken once (a later call reads afresh, and sees shards changed in between).

`python -m pipeline shards index DIR` writes a sizes.json with the same reader (`write_sizes_json`).

A thread pool of our own rather than fsspec's batched `cat`: counts may come from three places per shard
(stats file, tar count, pipe command), on any fsspec protocol, and a failure must name its shard.
"""

from __future__ import annotations

import json
import logging
import pickle
import posixpath
import sys
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import braceexpand

from pipeline.core import storage
from pipeline.core.errors import ConfigError
from pipeline.data import shardformat

log = logging.getLogger(__name__)

READ_THREADS = 32
"""Threads reading per-shard *_stats.json files or counting tars (rank 0, or `shards index`)."""
COUNT_READ_TIMEOUT_S = 120.0  # a tar being counted that delivers nothing this long fails (DataConfig.read_timeout_s)


class ShardIndexError(RuntimeError):
    """A shard's size could not be read (not a missing file: a failing store, no permission); names the shard."""


class SourceError(ConfigError):
    """A source of the '::' list (or the entry of a data.mixture manifest) whose shards cannot be listed, all
    of whose shards are absent, or one of whose sizes cannot be read: `position` in the list, `source` as given,
    `reason` (naming the path or shard). The message is the reason; callers add the setting or manifest entry."""

    def __init__(self, position: int, source: str, reason: str):
        super().__init__(reason)
        self.position, self.source, self.reason = position, source, reason

    def __reduce__(self):  # rank 0 broadcasts it to the other ranks whole
        return type(self), (self.position, self.source, self.reason)


# ------------------------------------------------------------------------------------------ URLs


def _source_list(urls: str | list[str]) -> list[str]:
    if isinstance(urls, str):
        return [part.strip() for part in urls.split("::") if part.strip()]
    return list(urls)


def expand_source(source: str, storage_options: dict | None = None) -> list[str]:
    """One source -> its shard URLs: brace expansion, or the sorted *.tar of a directory/prefix."""
    if source.startswith("pipe:") or source.endswith(".tar") or "{" in source:
        return list(braceexpand.braceexpand(source))
    paths = storage.list_tars(source, storage_options)
    if not paths:
        raise FileNotFoundError(f"no .tar shards found at '{source}'")
    return paths


def expand_urls(urls: str | list[str], storage_options: dict | None = None) -> list[list[str]]:
    """'a::b' -> [[shards of a], [shards of b]]."""
    sources = [expand_source(source, storage_options) for source in _source_list(urls)]
    if not sources:
        raise ConfigError(f"no shard URLs given (got {urls!r})")
    return sources


# ----------------------------------------------------------------------------------- shard sizes

# samples counted in tars without a listed size, by (URL, signature of the file): a tar is counted once
# per process while it is unchanged, however often its size is asked for
_counted: dict[tuple[str, tuple], int] = {}

_Item = TypeVar("_Item")


def _parallel(read: Callable[[_Item], Any], items: list[_Item], threads: int, description: str | None) -> list:
    """[read(item) for item in items] on up to `threads` threads, in item order, with a progress bar when
    `description` is given. The first failure stops the rest: a SizesError (it names its file) as it is,
    anything else as a ShardIndexError naming the item."""
    from pipeline.core.progress import progress_bar

    def named(item):
        try:
            return read(item)
        except (shardformat.SizesError, ShardIndexError):
            raise
        except Exception as error:
            raise ShardIndexError(f"{item}: {storage.describe(error)}") from error

    bar = progress_bar(total=len(items), desc=description, unit="shard", disable=description is None or not items,
                       mininterval=1.0)
    try:
        if threads <= 1 or len(items) <= 1:
            results = []
            for item in items:
                results.append(named(item))
                bar.update(1)
            return results
        with ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix="shard-sizes") as pool:
            futures = [pool.submit(named, item) for item in items]
            try:
                results = []
                for future in futures:
                    results.append(future.result())
                    bar.update(1)
                return results
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    finally:
        bar.close()


def _sizes(shard_urls: list[str], storage_options: dict, threads: int,
           sizes_files: dict[str, dict[str, int] | None], not_found: list[str],
           progress: bool | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """({shard URL: samples}, how many counts came from each place): sizes.json files are read into
    `sizes_files` (by directory) unless already there; shards that turn out not to exist go to `not_found`.
    Progress bars: True both, False none, None the loader's (reading 100 *_stats.json or more; counting)."""
    directories = sorted({posixpath.dirname(url) for url in shard_urls if not url.startswith("pipe:")}
                         - set(sizes_files))
    for directory, listed in zip(directories, _parallel(lambda d: shardformat.read_sizes(d, storage_options),
                                                        directories, threads, None)):
        sizes_files[directory] = listed
    sizes: dict[str, int] = {}
    unlisted = []
    for url in shard_urls:
        listed = {} if url.startswith("pipe:") else sizes_files[posixpath.dirname(url)] or {}
        if storage.base_name(url) in listed:
            sizes[url] = int(listed[storage.base_name(url)])
        else:
            unlisted.append(url)
    with_stats = [url for url in unlisted if shardformat.stats_url(url) is not None and not url.startswith("pipe:")]
    show_stats = progress if progress is not None else len(with_stats) >= 100
    stats = _parallel(lambda url: shardformat.read_stats(url, storage_options), with_stats, threads,
                      "reading *_stats.json of shards without sizes.json" if show_stats else None)
    for url, shard_stats in zip(with_stats, stats):
        if shard_stats is not None:
            sizes[url] = int(shard_stats["successes"])
    uncounted = [url for url in unlisted if url not in sizes]
    counts = _parallel(lambda url: _known_count(url, storage_options), uncounted, threads,
                       "counting samples in shards without sizes.json" if progress is not False else None)
    for url, (count, signature) in zip(uncounted, counts):
        sizes[url] = count
        if count is None:
            sizes[url] = 0
            not_found.append(url)
        elif signature is not None:
            _counted[(url, signature)] = count
    origin = {"sizes.json": len(shard_urls) - len(unlisted), "*_stats.json": len(unlisted) - len(uncounted),
              "counted": sum(count is not None for count, _ in counts)}
    return sizes, origin


def _known_count(url: str, storage_options: dict) -> tuple[int | None, tuple | None]:
    """(samples of a tar without listed size, its signature): remembered while the file is unchanged;
    None samples when the tar is not there."""
    signature = storage.signature(url, storage_options)
    if signature is not None and (url, signature) in _counted:
        return _counted[(url, signature)], signature
    not_found: list[str] = []
    count = _count_samples(url, storage_options, not_found)
    return (None if not_found else count), signature


def _count_samples(url: str, storage_options: dict, not_found: list[str]) -> int:
    """Samples of a tar without listed size; reading tolerates damage (the samples before it count)."""
    count = 0
    try:
        with storage.open_shard(url, storage_options=storage_options, read_timeout_s=COUNT_READ_TIMEOUT_S,
                                allow_pipe=True) as stream:
            # every member read (not skipped): tarfile notices a member cut short only when reading it
            for _ in shardformat.iter_samples(stream):
                count += 1
    except (tarfile.TarError, EOFError) as error:
        log.warning("shard %s is damaged after %d complete samples (%s): counted as %d samples", url, count,
                    error, count)
    except FileNotFoundError as error:
        if not storage.is_not_found(error):
            raise
        not_found.append(url)
        log.warning("shard %s not found (%s): left out", url, error)
        return 0
    return count


def read_shard_sizes(urls: str | list[str], storage_options: dict | None = None, *,
                     threads: int = READ_THREADS) -> dict[str, int]:
    """Sample count of every shard, read by this process: from the directory's sizes.json (open_clip's
    form), else the shard's img2dataset-style *_stats.json ('successes'), else by counting the samples in
    the tar (once per process while the file is unchanged; a 'pipe:' URL runs its command for that, every
    time). Per-shard reads run on `threads` threads. A counted tar that is damaged counts the samples
    before the damage, and one that is not there counts 0, each with a warning naming it. A source that
    cannot be listed, none of whose shards exists, or one of whose sizes cannot be read raises SourceError."""
    return _read_sources(urls, storage_options or {}, threads, {})[1]


def _read_sources(urls, storage_options: dict, threads: int,
                  sizes_files: dict[str, dict[str, int] | None]) -> tuple[list[list[str]], dict[str, int]]:
    """([shard URLs of each source], {shard URL: samples}), source by source, so that a failure names its source
    (SourceError: a data.mixture error names the manifest entry from its position)."""
    given = _source_list(urls)
    if not given:
        raise ConfigError(f"no shard URLs given (got {urls!r})")
    sources: list[list[str]] = []
    sizes: dict[str, int] = {}
    for position, source in enumerate(given):
        not_found: list[str] = []
        try:
            shard_urls = expand_source(source, storage_options)
            source_sizes, _ = _sizes(shard_urls, storage_options, threads, sizes_files, not_found)
        except (FileNotFoundError, ShardIndexError, shardformat.SizesError) as error:  # each names its path
            raise SourceError(position, source, str(error)) from error
        except ConfigError:
            raise
        except Exception as error:  # the listing failed (a failing store, no permission)
            raise SourceError(position, source, f"'{source}' cannot be listed: {storage.describe(error)}") from error
        if shard_urls and len(not_found) == len(shard_urls):
            raise SourceError(position, source, f"none of the {len(shard_urls)} shards of '{source}' exists "
                                                f"(first: {not_found[0]})")
        sources.append(shard_urls)
        sizes.update((url, source_sizes[url]) for url in shard_urls)
    return sources, sizes


def missing_listed_shards(urls: str | list[str], storage_options: dict | None = None,
                          sizes: dict[str, int] | None = None) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Shards listed in a sizes.json but absent, found by one listing per directory (local, or remote
    where listing is cheap: object stores, not http; a listing that fails checks nothing):

    (left_out, absent): `left_out`, (url, listed size) of shards in the sizes.json of a data set
    directory given as a source but not in the directory, so not part of the data set; `absent`,
    (url, size) of URLs of the given list (brace form) whose shard is not there."""
    return _missing(urls, storage_options or {}, sizes or {}, {})


def _missing(urls, storage_options: dict, sizes: dict[str, int],
             sizes_files: dict[str, dict[str, int] | None]) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """missing_listed_shards, reusing the sizes.json files already read (`sizes_files`, by directory)."""
    left_out: list[tuple[str, int]] = []
    absent: list[tuple[str, int]] = []
    listings: dict[str, set[str] | None] = {}

    def names_in(directory: str) -> set[str] | None:
        if directory not in listings:
            listings[directory] = storage.list_names(directory, storage_options)
        return listings[directory]

    for source in _source_list(urls):
        if source.startswith("pipe:"):
            continue
        if source.endswith(".tar") or "{" in source:  # a URL list: check those the listing lacks
            for url in braceexpand.braceexpand(source):
                present = names_in(posixpath.dirname(url))
                if present is not None and storage.base_name(url) not in present:
                    absent.append((url, sizes.get(url, 0)))
            continue
        directory = source.rstrip("/")
        if directory not in sizes_files:
            sizes_files[directory] = shardformat.read_sizes(source, storage_options)
        listed = sizes_files[directory] or {}
        present = names_in(directory)
        if present is None:
            continue
        left_out += [(posixpath.join(directory, name), int(size)) for name, size in sorted(listed.items())
                     if name not in present]
    return left_out, absent


def _warn_missing(left_out: list[tuple[str, int]], absent: list[tuple[str, int]]) -> None:
    for shards, what in ((left_out, "are not in their directory: left out of the data set"),
                         (absent, "are not there: their samples are skipped every epoch (slots marked invalid)")):
        if shards:
            names = ", ".join(url for url, _ in shards[:10]) + (f" and {len(shards) - 10} more" if len(shards) > 10 else "")
            log.warning("%d shards listed in sizes.json holding %d samples %s: %s", len(shards),
                        sum(size for _, size in shards), what, names)


# --------------------------------------------------------------------------- the shared index


@dataclass(frozen=True)
class ShardIndex:
    """What a data set holds, as every rank must see it alike."""

    sources: list[list[str]]
    """Shard URLs per '::' source, in order."""
    sizes: dict[str, int]
    """Samples per shard URL."""
    left_out: list[tuple[str, int]] = field(default_factory=list)
    """(url, listed size): in a directory's sizes.json but not in the directory (missing_listed_shards)."""
    absent: list[tuple[str, int]] = field(default_factory=list)
    """(url, size): of a given URL list, but not there (missing_listed_shards)."""


@dataclass(frozen=True)
class _Failed:
    """What rank 0 broadcasts when it could not read the index: every rank raises the same error."""

    error: BaseException


# indexes read by the trainer's check (prefetch_shard_index) for its loader's call, by (URLs, storage options)
_kept: dict[str, ShardIndex] = {}


def read_shard_index(urls: str | list[str], storage_options: dict | None = None, *,
                 threads: int = READ_THREADS) -> ShardIndex:
    """The ShardIndex of `urls`, read by this process (each sizes.json and directory listing once)."""
    storage_options = storage_options or {}
    sizes_files: dict[str, dict[str, int] | None] = {}
    sources, sizes = _read_sources(urls, storage_options, threads, sizes_files)
    left_out, absent = _missing(urls, storage_options, sizes, sizes_files)
    return ShardIndex(sources, sizes, left_out, absent)


def _key(urls: str | list[str], storage_options: dict | None) -> str:
    return json.dumps([urls, storage_options or {}], sort_keys=True, default=repr)


def _sharing(world_size: int | None) -> bool:
    """Whether this call is a collective: a process group of more than one rank, the caller's world."""
    if "torch.distributed" not in sys.modules:  # never imported, so no process group: `shards` runs without torch
        return False
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return False
    return world_size is None or world_size == dist.get_world_size()


def shard_index(urls: str | list[str], storage_options: dict | None = None, *, world_size: int | None = None,
                threads: int = READ_THREADS) -> ShardIndex:
    """The ShardIndex of `urls`, read once for all ranks.

    Under an initialised process group of more than one rank (and `world_size`, when given, equal to
    its size) this is a collective: rank 0 reads and broadcasts the index (or the error it met, which
    every rank then raises), the other ranks read nothing. Otherwise this process reads it. An index
    kept by `prefetch_shard_index` for the same URLs and options is taken instead of reading (once)."""
    sharing = _sharing(world_size)
    if sharing:
        import torch.distributed as dist
    if sharing and dist.get_rank() != 0:
        holder: list[Any] = [None]
        dist.broadcast_object_list(holder, src=0)
        if isinstance(holder[0], _Failed):
            raise holder[0].error
        return holder[0]
    try:
        index = _kept.pop(_key(urls, storage_options), None) or read_shard_index(urls, storage_options, threads=threads)
    except Exception as error:
        if sharing:
            dist.broadcast_object_list([_Failed(_portable(error))], src=0)
        raise
    if sharing:
        dist.broadcast_object_list([index], src=0)
    return index


def prefetch_shard_index(urls: str | list[str], storage_options: dict | None = None, *,
                         threads: int = READ_THREADS) -> ShardIndex:
    """The ShardIndex of `urls` read now by this process alone (never a collective), and kept: the next
    `shard_index` call in this process with the same URLs and options takes it instead of reading. For
    the trainer's check on rank 0, before the process group exists."""
    index = _kept[_key(urls, storage_options)] = read_shard_index(urls, storage_options, threads=threads)
    return index


def _portable(error: BaseException) -> BaseException:
    """`error`, or a RuntimeError with its text where it would not survive pickling to the other ranks."""
    try:
        copy = pickle.loads(pickle.dumps(error))
        if type(copy) is type(error) and str(copy) == str(error):
            return error
    except Exception:
        pass
    return RuntimeError(f"{type(error).__name__}: {error}")


# ------------------------------------------------------------------------ sizes.json of a directory


@dataclass
class IndexSummary:
    """What `write_sizes_json` wrote."""

    url: str
    sizes: dict[str, int]
    origin: dict[str, int]
    """How many counts came from each place: sizes.json (never, when rewriting), *_stats.json, counted."""
    not_found: list[str]

    @property
    def samples(self) -> int:
        return sum(self.sizes.values())

    def describe(self) -> str:
        text = (f"wrote {self.url}: {len(self.sizes)} shards, {self.samples} samples ({self.origin['*_stats.json']} "
                f"counts from *_stats.json, {self.origin['counted']} counted in the tar)")
        if self.not_found:
            text += f"; {len(self.not_found)} shards vanished while being read and are not listed"
        return text


def write_sizes_json(directory: str, storage_options: dict | None = None, *, threads: int = READ_THREADS,
                     force: bool = False, progress: bool = True) -> IndexSummary:
    """Write `directory`/sizes.json (shard name -> samples) for the *.tar in it: each count from the
    shard's *_stats.json ('successes', img2dataset), else counted in the tar (a damaged tar: the samples
    before the damage, with a warning naming it). An existing sizes.json is refused (ConfigError naming
    it) unless `force`, and then not read: every count comes from the shards."""
    storage_options = storage_options or {}
    directory = directory.rstrip("/")
    target = posixpath.join(directory, shardformat.SIZES_FILE)
    fs, path = storage.url_to_fs(target, storage_options)
    if fs.exists(path) and not force:
        raise ConfigError(f"{target} exists; pass --force to replace it")
    shard_urls = storage.list_tars(directory, storage_options)
    if not shard_urls:
        raise ConfigError(f"no .tar shards found at '{directory}'")
    not_found: list[str] = []
    # sizes.json files taken as absent: an existing one is what is being replaced
    sizes, origin = _sizes(shard_urls, storage_options, threads, dict.fromkeys(map(posixpath.dirname, shard_urls)),
                           not_found, progress)
    listed = {storage.base_name(url): sizes[url] for url in shard_urls if url not in not_found}
    storage.write_bytes(target, shardformat.sizes_json(listed).encode("utf-8"), storage_options)
    return IndexSummary(target, listed, origin, not_found)
