"""Reading a stream's samples from its tar shards: in order, only those still needed, with retries, timeouts and
every loss told once and counted (a lost sample comes out as an entry without files and with the reason)."""

from __future__ import annotations

import logging
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from pipeline.core import storage
from pipeline.core.errors import ConfigError
from pipeline.data import shardformat
from pipeline.data.config import DataConfig
from pipeline.data.plan import Segment

log = logging.getLogger("pipeline.data")

GB = 10**9  # data.cache_max_gb counts decimal gigabytes, as its name says (not GiB)


def open_shard(url: str, cfg: DataConfig):
    """storage.open_shard with the loader's settings (storage options, cache, read timeout, pipes)."""
    return storage.open_shard(url, storage_options=cfg.storage_options, cache_dir=cfg.cache_dir,
                              cache_max_bytes=round(cfg.cache_max_gb * GB), read_timeout_s=cfg.read_timeout_s,
                              allow_pipe=cfg.allow_pipe)


class Entry(NamedTuple):
    index: int  # in the stream
    url: str
    key: str
    files: dict[str, bytes] | None  # None: lost, see reason
    reason: str

_warned: set[tuple[str, str]] = set()  # (what, shard) already told in this process


def _warn_once(what: str, url: str, message: str, *args) -> None:
    """A shard's problem is logged once per process, however many streams or epochs meet it."""
    if (what, url) not in _warned:
        _warned.add((what, url))
        log.warning(message, *args)


class StreamReader:
    """Reads the needed samples of a stream's segments in order, with retries; yields one Entry for
    every needed index, a lost sample as an entry without files and with the reason."""

    def __init__(self, cfg: DataConfig, counts: Counter, missing: frozenset[str] | set[str] = frozenset()):
        self.cfg = cfg
        self.counts = counts
        self.missing = missing  # shards known absent since the start: not opened, their samples lost
        self.quiet = False  # no log lines (a second read of the same shards)

    def _warn(self, what: str, url: str, message: str, *args) -> None:
        if not self.quiet:
            _warn_once(what, url, message, *args)

    def _log(self, message: str, *args) -> None:
        if not self.quiet:
            log.warning(message, *args)

    def read(self, segments: list[Segment], needed: np.ndarray) -> Iterator[Entry]:
        for segment in segments:
            window = needed[segment.offset : segment.offset + segment.end - segment.first]
            if not window.any():
                continue  # whole shard already consumed: skipped by its count, never opened
            yield from self._read_segment(segment, needed)

    def _read_segment(self, segment: Segment, needed: np.ndarray) -> Iterator[Entry]:
        next_index = segment.first  # first shard index not yet handled
        retry = storage.RetryBudget(self.cfg.retries, self.cfg.retry_max_s, self.cfg.retry_backoff)
        reason = "shard_not_found" if segment.url in self.missing else ""  # told at start: not again
        while next_index < segment.end and not reason:
            attempt_start, progress_from = time.monotonic(), next_index
            intact = 0  # samples of the tar got through in this read, from its start (read or skipped unread)
            try:
                with open_shard(segment.url, self.cfg) as stream:
                    def wanted(i, start=next_index):
                        return start <= i < segment.end and bool(needed[segment.offset + i - segment.first])

                    for sample in shardformat.iter_samples(stream, wanted):
                        intact = sample.index + 1
                        if sample.index < next_index:
                            continue
                        next_index = sample.index + 1
                        if sample.problem and wanted(sample.index):  # webdataset raises here: we skip the sample
                            yield Entry(segment.offset + sample.index - segment.first, segment.url, sample.key,
                                         None, sample.problem)
                        elif sample.files is not None:
                            yield Entry(segment.offset + sample.index - segment.first, segment.url, sample.key,
                                         sample.files, "")
                        if next_index >= segment.end:
                            break  # the segment is done: not a byte more of this shard
                if next_index < segment.end:
                    reason = "missing_from_shard"  # the tar holds fewer samples than sizes.json says
                    self.counts["shards_short"] += 1
                    self._warn("short", segment.url, "shard %s holds %d samples, but its listed size (sizes.json) "
                               "is %d: the %d missing ones are skipped", segment.url, next_index, segment.size,
                               segment.size - next_index)
            except (tarfile.TarError, EOFError) as error:
                # a damaged archive reads the same way every time: no retry
                reason = "truncated_shard"
                self.counts["shards_truncated"] += 1
                # `intact` counts from the tar's start; this stream's part of the shard may begin further on
                self._warn("damaged", segment.url, "shard %s is damaged after %d complete samples (%s): this stream "
                           "reads samples %d-%d of it (listed size %d), and skips %d-%d", segment.url, intact, error,
                           segment.first, segment.end - 1, segment.size, next_index, segment.end - 1)
            except ConfigError:
                raise
            except Exception as error:
                if storage.is_not_found(error):  # retrying will not bring it back
                    reason = "shard_not_found"
                    self.counts["shards_not_found"] += 1
                    self._warn("not found", segment.url, "shard %s not found (%s): its samples are skipped",
                               segment.url, error)
                    break
                # network, server, a stalled read: worth retrying
                if isinstance(error, storage.ShardReadTimeout):
                    self.counts["shard_timeouts"] += 1
                delay = retry.next_delay(attempt_start, progressed=next_index > progress_from)
                if delay is None:
                    reason = "shard_failed"
                    self.counts["shards_failed"] += 1
                    self._log("shard %s failed %d times in %.0f s (%s): skipped", segment.url, retry.attempt + 1,
                              retry.spent, storage.describe(error))
                    break
                self.counts["shard_retries"] += 1
                self._log("shard %s failed (%s); retry %d in %.1f s", segment.url, storage.describe(error),
                          retry.attempt, delay)
                time.sleep(delay)
        for index in range(next_index, segment.end):
            stream_index = segment.offset + index - segment.first
            if needed[stream_index]:
                yield Entry(stream_index, segment.url, f"#{index}", None, reason)
