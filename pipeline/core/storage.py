"""Storage: every fsspec access of the project in one place (leaf module: stdlib, fsspec, pipeline.core.errors).

    fs, path = url_to_fs("s3://bucket/laion", {"endpoint_url": ...})   # local paths ignore the options
    with open_url(url, "rb", storage_options) as handle: ...
    sizes = read_json(url, storage_options)                              # None when it is not there
    with open_shard(url, storage_options=..., cache_dir=..., cache_max_bytes=2**40, read_timeout_s=120,
                    allow_pipe=False) as stream:
        stream.read(...)                                                  # ShardReadTimeout when it stalls

What lives here: telling local paths from remote URLs (`is_remote`), opening and listing with
storage options, "not there" told apart from a transient failure (`is_not_found`), the bounded
exponential backoff of retries (`RetryBudget`), the local cache of remote shards (`cached_copy`,
with least-recently-used eviction past a size limit: `evict_cached`), and the shard stream read on a
helper thread with a read timeout (`TimedStream`), so that a stalled read fails naming the shard
instead of blocking a DataLoader worker.

The cache is our own code rather than fsspec's `filecache::`/`simplecache::` because those have no
size limit (only expiry by age) and keep their bookkeeping in a metadata file that each process
rewrites from its own view, while this cache is shared by every DataLoader worker of every rank on
a node: here the files themselves are the state. A reader holds a shared flock on its cached copy for as long as it reads
it, and bumps its modification time (the LRU order); eviction takes a non-blocking exclusive lock and
passes over what it cannot lock, so no process ever loses a shard it is reading.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import fsspec

from pipeline.core.errors import ConfigError

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20  # bytes per read of a shard stream (the reader thread stays at most 4 ahead)
RETRY_BACKOFF_CAP = 30.0  # seconds between two tries of a failing read, at most


# ----------------------------------------------------------------------------------- URLs and files


def is_remote(url: str) -> bool:
    """Whether `url` names something behind an fsspec protocol other than the local file system."""
    return "://" in str(url) and not str(url).startswith("file://")


def is_local(url: str) -> bool:
    return not is_remote(url)


def base_name(url: str) -> str:
    """The last part of a path or URL: 'shards/data-000001.tar' for 's3://b/shards/data-000001.tar' is 'data-000001.tar'."""
    return posixpath.basename(str(url).rstrip("/"))


def url_to_fs(url: str, storage_options: dict | None = None):
    """(file system, path) of a URL; storage options apply to remote URLs only."""
    return fsspec.core.url_to_fs(url, **((storage_options or {}) if is_remote(url) else {}))


def open_url(url: str, mode: str = "rb", storage_options: dict | None = None):
    """fsspec.open with the storage options where they apply (a context manager)."""
    return fsspec.open(url, mode, **((storage_options or {}) if is_remote(url) else {}))


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    with open_url(url, "rb", storage_options) as handle:
        return handle.read()


def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Writes and closes: a remote object really completes."""
    with open_url(url, "wb", storage_options) as handle:
        handle.write(data)


def read_json(url: str, storage_options: dict | None = None) -> Any | None:
    """The parsed JSON file at `url`, or None when there is none (other errors, bad JSON included, raise)."""
    try:
        return json.loads(read_bytes(url, storage_options))
    except FileNotFoundError:
        return None


def list_tars(url: str, storage_options: dict | None = None) -> list[str]:
    """Sorted URLs of the *.tar files directly in a directory or under a prefix (same form as `url`)."""
    fs, path = url_to_fs(url, storage_options)
    paths = sorted(fs.glob(path.rstrip("/") + "/*.tar"))
    return [path if is_local(url) else fs.unstrip_protocol(path) for path in paths]


def list_names(directory: str, storage_options: dict | None = None) -> set[str] | None:
    """Base names of the files in a directory or under a prefix; None where listing is not cheap (http)
    or fails (no permission, a store without listing)."""
    if directory.startswith(("http://", "https://")):
        return None
    try:
        if is_local(directory):
            return set(os.listdir(directory.removeprefix("file://") or "."))
        fs, path = url_to_fs(directory, storage_options)
        fs.invalidate_cache(path)  # a listing cached earlier in this process may predate a deletion
        return {posixpath.basename(entry.rstrip("/")) for entry in fs.ls(path, detail=False)}
    except Exception as error:
        log.debug("cannot list %s (%s)", directory, error)
        return None


def signature(url: str, storage_options: dict | None = None) -> tuple | None:
    """What changes when the file at `url` changes (size and modification time or ETag), for caches of
    what was read from it; None when it cannot be told (a 'pipe:' URL, a failing probe)."""
    if url.startswith("pipe:"):
        return None
    try:
        if is_local(url):
            stat = os.stat(url.removeprefix("file://"))
            return stat.st_size, stat.st_mtime_ns
        fs, path = url_to_fs(url, storage_options)
        info = fs.info(path)
    except Exception:
        return None
    stamp = next((str(info[k]) for k in ("ETag", "etag", "LastModified", "mtime", "last_modified") if k in info), None)
    return (info.get("size"), stamp) if stamp is not None else None


def is_not_found(error: BaseException) -> bool:
    """Whether an error says the file is not there. S3's NoSuchKey and HTTP's 404 arrive as
    FileNotFoundError; but fsspec's http also turns any failure of its size probe (a 503, a refused
    connection) into a FileNotFoundError raised from the real error, which is transient."""
    if not isinstance(error, FileNotFoundError):
        return False
    cause = error.__cause__
    if cause is None or isinstance(cause, FileNotFoundError):
        return True
    status = getattr(cause, "status", None)  # aiohttp's ClientResponseError
    if isinstance(status, int):
        return status in (404, 410)
    response = getattr(cause, "response", None)  # botocore's ClientError
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code")) in ("NoSuchKey", "NoSuchBucket", "NotFound", "404")
    return False


def describe(error: BaseException) -> str:
    """An error as a log line shows it, next to the URL."""
    if isinstance(error, ShardReadTimeout):
        return f"no data for {error.timeout:g} s (data.read_timeout_s)"
    if isinstance(error, FileNotFoundError) and error.__cause__ is not None:
        error = error.__cause__  # fsspec's http wraps the real failure (a 503, a refused connection)
    return f"{type(error).__name__}: {error}"


class RetryBudget:
    """Retries of one failing read: exponential backoff (`backoff` seconds, doubled per retry, at most
    RETRY_BACKOFF_CAP), bounded by `retries` and by `max_s` seconds from the first failing attempt;
    progress between two failures starts a fresh budget.

        budget = RetryBudget(retries, max_s, backoff)
        while True:
            started = time.monotonic()
            try: ...; break
            except Exception:
                delay = budget.next_delay(started, progressed)
                if delay is None: give up
                time.sleep(delay)
    """

    def __init__(self, retries: int, max_s: float, backoff: float):
        self.retries, self.max_s, self.backoff = retries, max_s, backoff
        self.attempt, self.since = 0, None

    def next_delay(self, attempt_start: float, progressed: bool = False) -> float | None:
        """Seconds to wait before the next try, or None when the budget is spent (then `attempt` tries
        were retries, over `spent` seconds)."""
        if progressed:
            self.attempt, self.since = 0, None
        self.since = attempt_start if self.since is None else self.since
        delay = min(self.backoff * 2**self.attempt, RETRY_BACKOFF_CAP)
        if self.attempt >= self.retries or self.spent + delay > self.max_s:
            return None
        self.attempt += 1
        return delay

    @property
    def spent(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since


# ------------------------------------------------------------------------------ shard streams


class ShardReadTimeout(TimeoutError):
    """A shard's stream delivered no byte for data.read_timeout_s (a stalled store or connection)."""

    def __init__(self, url: str, timeout: float):
        super().__init__(f"shard {url} delivered no data for {timeout:g} s (data.read_timeout_s)")
        self.timeout = timeout


class TimedStream:
    """Reads a shard's chunks on a helper thread and hands them to `read()`, which fails with
    ShardReadTimeout naming the shard when nothing arrives for `timeout` seconds: a stalled read
    cannot block a worker until the DataLoader's own timeout, which names nothing. The thread also
    reads ahead while the caller decodes. `chunks()` yields bytes, or None to say it is still busy
    (downloading to the cache); its exceptions reach the caller unchanged."""

    _END = object()

    def __init__(self, url: str, chunks: Callable[[], Iterator[bytes | None]], timeout: float):
        self.url, self.timeout = url, timeout
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.stopped = threading.Event()
        self.buffer, self.offset, self.ended = b"", 0, False
        self.thread = threading.Thread(target=self._pump, args=(chunks,), daemon=True, name=f"read {url}")
        self.thread.start()

    def _pump(self, chunks) -> None:
        source = chunks()
        try:
            for chunk in source:
                if not self._put(chunk):
                    return
            self._put(self._END)
        except BaseException as error:  # handed to the reader, which raises it
            self._put(error)
        finally:
            with contextlib.suppress(Exception):  # closing after a failure may fail too: nobody to tell
                source.close()

    def _put(self, item) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _next_chunk(self) -> bytes | None:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                item = self.queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                self.ended = True
                raise ShardReadTimeout(self.url, self.timeout) from None
            if item is None:  # still busy, not stalled
                deadline = time.monotonic() + self.timeout
                continue
            if item is self._END:
                self.ended = True
                return None
            if isinstance(item, BaseException):
                self.ended = True
                raise item
            return item

    def read(self, size: int = -1) -> bytes:
        parts, wanted = [], size
        while size < 0 or wanted > 0:
            if self.offset >= len(self.buffer):
                chunk = None if self.ended else self._next_chunk()
                if chunk is None:
                    break
                self.buffer, self.offset = chunk, 0
            stop = len(self.buffer) if size < 0 else min(len(self.buffer), self.offset + wanted)
            parts.append(self.buffer[self.offset : stop])
            wanted -= stop - self.offset
            self.offset = stop
        return b"".join(parts)

    def close(self) -> None:
        """Stop the thread and wait for it (so that no reader thread outlives its shard, e.g. into a fork),
        unless it is blocked in a stalled read: that one is left to end when the read fails."""
        self.stopped.set()
        with contextlib.suppress(queue.Empty):
            while True:  # a thread waiting to hand over a chunk sees the stop at once
                self.queue.get_nowait()
        self.thread.join(timeout=1.0)


@contextlib.contextmanager
def open_shard(url: str, *, storage_options: dict | None = None, cache_dir: str | None = None,
               cache_max_bytes: int = 0, read_timeout_s: float = 0.0, allow_pipe: bool = False):
    """Binary stream of a shard on any fsspec protocol, a 'pipe:' command (when allowed), or the local
    cache copy (in `cache_dir`) of a remote shard; with cache_max_bytes > 0 the cache is kept to that
    size after each download (least recently used first, never a shard being read: `evict_cached`);
    with read_timeout_s > 0 a read that stalls that long raises ShardReadTimeout naming the shard."""
    storage_options = storage_options or {}
    timeout = read_timeout_s
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise ConfigError(f"shard URL '{url}' runs a shell command; set data.allow_pipe=true to allow it")
        # its own process group: stopping early kills the shell's children too, which hold the pipe open
        process = subprocess.Popen(url[len("pipe:") :], shell=True, stdout=subprocess.PIPE, start_new_session=True)
        stream = TimedStream(url, lambda: _pipe_chunks(process.stdout), timeout) if timeout else process.stdout
        try:
            yield stream
        finally:
            if process.poll() is None:  # we stopped reading early (or it stalled): the command has no more use
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            if timeout:
                stream.close()  # its thread reads to the end of the pipe, now closed, and closes it
            else:
                process.stdout.close()
            code = process.wait(timeout=60)
            if code not in (0, -signal.SIGKILL, -signal.SIGPIPE):
                raise OSError(f"'{url}' exited with status {code}")
        return
    if not timeout:
        if cache_dir and is_remote(url):
            opened = _drain(cached_copy(url, cache_dir, storage_options, cache_max_bytes))
        else:
            opened = open_url(url, "rb", storage_options)
        with opened as handle:
            yield handle
        return
    stream = TimedStream(url, lambda: _file_chunks(url, cache_dir, storage_options, cache_max_bytes), timeout)
    try:
        yield stream
    finally:
        stream.close()


def _pipe_chunks(stdout) -> Iterator[bytes]:
    try:
        while chunk := stdout.read1(READ_CHUNK):
            yield chunk
    finally:
        stdout.close()


def _file_chunks(url: str, cache_dir: str | None, storage_options: dict,
                 cache_max_bytes: int = 0) -> Iterator[bytes | None]:
    if cache_dir and is_remote(url):
        opened = yield from cached_copy(url, cache_dir, storage_options, cache_max_bytes)
    else:
        opened = open_url(url, "rb", storage_options)
    with opened as handle:  # a cached copy stays share-locked (not evictable) until this closes it
        while chunk := handle.read(READ_CHUNK):
            yield chunk


def _drain(steps: Iterator[None]):
    """Run a generator to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


# ------------------------------------------------------------------------- cache of remote shards

_CACHED_NAME = re.compile(r"[0-9a-f]{12}-.+")  # what cache_path names; other files in cache_dir are not ours


def cache_path(url: str, cache_dir: str) -> str:
    """Where `cached_copy` keeps the copy of `url`: its base name behind a digest of the whole URL."""
    digest = hashlib.sha1(url.encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"{digest}-{base_name(url)}")


def cached_copy(url: str, cache_dir: str, storage_options: dict | None = None,
                max_bytes: int = 0) -> Iterator[None]:
    """Generator: downloads a remote file into `cache_dir` (unless there already), yielding None per
    chunk as a sign of progress; returns the local copy opened for reading, which holds a shared lock
    (so no eviction takes it) until the caller closes it. With max_bytes > 0, a download is followed by
    an eviction pass (`evict_cached`)."""
    os.makedirs(cache_dir, exist_ok=True)
    local = cache_path(url, cache_dir)
    handle = _open_cached(local)
    if handle is not None:
        return handle
    partial = f"{local}.{os.getpid()}.{threading.get_ident()}.partial"
    try:
        with open_url(url, "rb", storage_options) as source, open(partial, "wb") as target:
            while chunk := source.read(READ_CHUNK):
                target.write(chunk)
                yield None
        handle = open(partial, "rb")
        try:
            # locked before it has its name: an eviction pass cannot take it between the rename and the read
            fcntl.flock(handle, fcntl.LOCK_SH)
            _touch(handle)
            os.replace(partial, local)  # atomic: another worker never sees half a shard
        except BaseException:
            handle.close()
            raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
    if max_bytes > 0:
        evict_cached(cache_dir, max_bytes)
    return handle


def _open_cached(local: str):
    """The cached copy opened, share-locked and touched (its use is the LRU order); None when not there."""
    try:
        handle = open(local, "rb")
    except FileNotFoundError:
        return None
    try:
        # blocks only while an eviction pass holds the file, for one unlink; if that pass deleted it,
        # this handle still reads the whole intact file (an unlinked file lives on while open)
        fcntl.flock(handle, fcntl.LOCK_SH)
        _touch(handle)
    except BaseException:
        handle.close()
        raise
    return handle


def _touch(handle) -> None:
    # an explicit time: the clock file systems stamp with is coarse (a few ms), too coarse for the order
    now = time.time_ns()
    with contextlib.suppress(OSError):  # a copy another user owns: its order just is not refreshed
        os.utime(handle.fileno(), ns=(now, now))


def evict_cached(cache_dir: str, max_bytes: int) -> tuple[int, int]:
    """When the cached copies in `cache_dir` (downloads in progress, *.partial, do not count) total more
    than `max_bytes`, deletes the least recently used first until they fit. A copy that a reader (of
    any process) holds is passed over, as is one used since it was listed; so a shard larger than the
    limit stays while it is read, and goes at the next pass after. Several processes may run passes
    at once: each file is deleted by whoever locks it first. Returns (files, bytes) deleted."""
    entries = []
    with contextlib.suppress(FileNotFoundError), os.scandir(cache_dir) as listing:
        for entry in listing:
            if not _CACHED_NAME.fullmatch(entry.name) or entry.name.endswith(".partial"):
                continue
            with contextlib.suppress(FileNotFoundError):  # deleted meanwhile by another pass
                stat = entry.stat(follow_symlinks=False)
                if entry.is_file(follow_symlinks=False):
                    entries.append((stat.st_mtime_ns, entry.path, stat.st_size, stat.st_ino))
    total = sum(size for _, _, size, _ in entries)
    if total <= max_bytes:
        return 0, 0
    evicted = freed = busy = 0
    for used, path, size, inode in sorted(entries):
        if total <= max_bytes:
            break
        try:
            handle = open(path, "rb")
        except FileNotFoundError:  # another pass took it
            total -= size
            continue
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # being read
                busy += 1
                continue
            try:
                now = os.stat(path)
            except FileNotFoundError:
                total -= size
                continue
            held = os.fstat(handle.fileno())
            if (now.st_ino, held.st_ino, held.st_mtime_ns) != (inode, inode, used):
                busy += 1  # replaced or used since listed: no longer the least recently used
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                evicted, freed = evicted + 1, freed + size
            total -= size
    if total > max_bytes:
        log.info("cache %s: evicted %d shards (%d bytes); still %d bytes over its limit of %d (data.cache_max_gb) "
                 "in %d shards in use, which stay until their readers close them", cache_dir, evicted, freed,
                 total - max_bytes, max_bytes, busy)
    else:
        log.info("cache %s: evicted %d least recently used shards (%d bytes), passing over %d in use; %d of %d "
                 "bytes (data.cache_max_gb) held now", cache_dir, evicted, freed, busy, total, max_bytes)
    return evicted, freed
