"""Storage: every fsspec access of the project in one place (leaf module: stdlib, fsspec, pipeline.errors).

    fs, path = url_to_fs("s3://bucket/laion", {"endpoint_url": ...})   # local paths ignore the options
    with open_url(url, "rb", storage_options) as handle: ...
    sizes = read_json(url, storage_options)                              # None when it is not there
    with open_shard(url, storage_options=..., cache_dir=..., read_timeout_s=120, allow_pipe=False) as stream:
        stream.read(...)                                                  # ShardReadTimeout when it stalls

What lives here: telling local paths from remote URLs (`is_remote`), opening and listing with
storage options, "not there" told apart from a transient failure (`is_not_found`), the bounded
exponential backoff of retries (`RetryBudget`), the local cache of remote shards (`cached_copy`),
and the shard stream read on a helper thread with a read timeout (`TimedStream`), so that a stalled
read fails naming the shard instead of blocking a DataLoader worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import fsspec

from pipeline.errors import ConfigError

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
               read_timeout_s: float = 0.0, allow_pipe: bool = False):
    """Binary stream of a shard on any fsspec protocol, a 'pipe:' command (when allowed), or the local
    cache copy (in `cache_dir`) of a remote shard; with read_timeout_s > 0 a read that stalls that long
    raises ShardReadTimeout naming the shard."""
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
            url = _drain(cached_copy(url, cache_dir, storage_options))
        with open_url(url, "rb", storage_options) as handle:
            yield handle
        return
    stream = TimedStream(url, lambda: _file_chunks(url, cache_dir, storage_options), timeout)
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


def _file_chunks(url: str, cache_dir: str | None, storage_options: dict) -> Iterator[bytes | None]:
    if cache_dir and is_remote(url):
        url = yield from cached_copy(url, cache_dir, storage_options)
    with open_url(url, "rb", storage_options) as handle:
        while chunk := handle.read(READ_CHUNK):
            yield chunk


def _drain(steps: Iterator[None]):
    """Run a generator to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def cached_copy(url: str, cache_dir: str, storage_options: dict | None = None) -> Iterator[None]:
    """Generator: downloads a remote file into `cache_dir` (unless there already), yielding None per
    chunk as a sign of progress; returns the local path."""
    os.makedirs(cache_dir, exist_ok=True)
    digest = hashlib.sha1(url.encode()).hexdigest()[:12]
    local = os.path.join(cache_dir, f"{digest}-{base_name(url)}")
    if not os.path.exists(local):
        partial = f"{local}.{os.getpid()}.{threading.get_ident()}.partial"
        try:
            with open_url(url, "rb", storage_options) as source, open(partial, "wb") as target:
                while chunk := source.read(READ_CHUNK):
                    target.write(chunk)
                    yield None
            os.replace(partial, local)  # atomic: another worker never sees half a shard
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)
    return local
