"""Streaming loader: WebDataset tar shards -> equal, deterministic, resumable batches on every rank.

    loader = build_loader(cfg.data, cfg.data.train_urls, rank=rank, world_size=world_size, seed=cfg.seed,
                          media_transform=media_transform(cfg.model, True), tokenizer=get_tokenizer(cfg.model),
                          global_batch=cfg.train.global_batch_size)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:          # Batch(media, tokens, keys, labels, valid)
            ...                       # rows with valid False hold no real sample: outputs["valid"] = batch.valid
        state = loader.state_dict()   # (epoch, samples each canonical stream emitted, ...): saved with the checkpoint
        stats = sum_stats_across_ranks(loader.stats)  # counters of every rank (a collective: all ranks call it)

The epoch plan is pipeline.data.plan (canonical streams: the same global batches on any fitting layout), the
workers' side pipeline.data.dataset, shard reading pipeline.data.reader, a sample's decoding
pipeline.data.samples. Here: the DataLoader over the workers, joining each step's parts into the rank's
micro-batch in worker order (the DataLoader's round-robin), the position and its resume, device decoding
(`data.decode=gpu`), and `build_loader`.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing
from torch.utils.data import DataLoader

from pipeline.core import storage
from pipeline.core.errors import ConfigError, ignore_stop_signals
from pipeline.data import mixture
from pipeline.data.config import Batch, DataConfig
from pipeline.data.dataset import StreamingDataset
from pipeline.data.stats import STAT_KEYS, STAT_MEANINGS, sum_stats_across_ranks  # noqa: F401
from pipeline.media import imagedecode

log = logging.getLogger("pipeline.data")

# ----------------------------------------------------------------------------------------- URLs
# shard URLs and sizes: pipeline.data.shardindex (read once on rank 0, in parallel, and shared with every rank);
# the names stay importable from here
from pipeline.data.shardindex import (  # noqa: E402, F401
    SourceError,
    _warn_missing,
    expand_source,
    expand_urls,
    missing_listed_shards,
    prefetch_shard_index,
    read_shard_sizes,
    shard_index,
)


def source_error(cfg: DataConfig, setting: str, urls: str, error: Exception) -> ConfigError:
    """A failure to read the shards of data.<setting> (`urls`) as the user is told it: the setting and its
    value; for data.mixture the manifest file and, where one source is at fault (SourceError), its entry."""
    if setting == "mixture" and isinstance(error, SourceError):
        entry = mixture.read_manifest(cfg.mixture, cfg.storage_options)[error.position]
        return ConfigError(f"{entry.where} cannot be read: {error.reason}")
    if setting == "mixture":
        return ConfigError(f"data.mixture '{cfg.mixture}': its sources cannot be read: {error}")
    hint = ""
    if urls.startswith("shards/") and not Path(urls.split("::")[0]).exists():  # the configs' embedded sets
        hint = (f" (a path relative to the current directory, {Path.cwd()}: `make shards` writes the embedded data "
                "sets, shapes and tones, into the repository's shards/)")
    return ConfigError(f"data.{setting} '{urls}' cannot be read: {error}{hint}")


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # one core per worker: decoding is parallel across workers, not inside one
    # a stop signal sent to the job's whole process tree must not kill a worker while its rank finishes the
    # step and saves (deepspeed's launch.py signals every descendant); the rank stops its workers itself
    ignore_stop_signals()


_open_loaders: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    """At exit multiprocessing ends daemon children with SIGTERM and waits for them: our workers ignore it, so
    stop them in order first (a loader that an exception's traceback keeps alive is still open here), then
    kill what is left. Registered after multiprocessing's own exit hook, so it runs before it."""
    for loader in list(_open_loaders):
        loader.close()
    for child in torch.multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


class StreamingLoader:
    """Iterable of Batch; `len()` batches per epoch on every rank; position (epoch, batches consumed).

    Iterating yields the rest of the current epoch and then moves the loader to the next epoch, so
    `while True: yield from loader` streams epoch after epoch. `stats` holds this rank's counters, every
    one of STAT_KEYS (0 until it happens); `sum_stats_across_ranks(loader.stats)` adds up all ranks'.
    """

    def __init__(self, dataset: StreamingDataset, cfg: DataConfig, fingerprint: str,
                 device: torch.device | str | None = None):
        self.dataset, self.cfg, self.fingerprint = dataset, cfg, fingerprint
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.epoch, self.batches_consumed = 0, 0
        # the DataLoader iterator in use and the position (epoch, batch) it yields next: a training stream
        # runs on into the next epoch (StreamingDataset.__iter__), so the next epoch continues it
        self._live: Iterator | None = None
        self._live_next: tuple[int, int] | None = None
        # data.decode=gpu: hand out batches with their images still encoded (DeferredImages), decoded by
        # `materialize` when a pass needs them; GradCache sets it, so a step of k micro-batches holds k
        # batches of JPEG bytes rather than k batches of pixels (a million 224-px images: 147 GiB of pixels)
        self.defer_decode = False
        self.stats: dict[str, int] = Counter(dict.fromkeys(STAT_KEYS, 0))
        self._loader = self._data_loader()
        _open_loaders.add(self)

    def _data_loader(self) -> DataLoader:
        """A DataLoader over the dataset as it is now (its workers get a copy of it when they start)."""
        cfg = self.cfg
        return DataLoader(
            self.dataset, batch_size=None, num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
            pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init if cfg.workers else None,
            timeout=cfg.worker_timeout if cfg.workers else 0,
            # its own generator: otherwise every new iterator draws from the global torch RNG, and a resumed
            # run (which restores that RNG before its first iterator) would continue it from another position
            generator=torch.Generator(),
        )

    def __len__(self) -> int:
        """Batches (micro-batches) of an epoch on this rank, the same every epoch."""
        return self.dataset.steps if self.dataset.train else self.dataset.steps * self.dataset.workers

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning, unless it is the epoch the loader is already in (resume)."""
        if epoch != self.epoch:
            self.epoch, self.batches_consumed = epoch, 0

    def __iter__(self) -> Iterator[Batch]:
        total = len(self)
        if self.batches_consumed < total:
            if self.batches_consumed == 0 and self.dataset.rank == 0:  # counted once over the ranks
                self.stats["samples_remainder"] += self.dataset.remainder_of(self.epoch)
            if self._live is None or self._live_next != (self.epoch, self.batches_consumed):
                self.dataset.position[0] = self.epoch  # read by the workers when the iterator (re)starts
                self.dataset.position[1] = self.batches_consumed
                self._live = iter(self._loader)
            batches = self._live
            # training: a micro-batch is one part from each worker, in the DataLoader's round-robin order
            parts = self.dataset.workers if self.dataset.train else 1
            while True:
                try:
                    received = [next(batches) for _ in range(parts)]
                except StopIteration:
                    break
                except RuntimeError as error:
                    if "timed out" not in str(error):
                        raise
                    raise RuntimeError(f"{error}: {self._waited_on()}; raise data.worker_timeout if the "
                                       "storage is only slow") from error
                for _, delta in received:
                    self.stats.update(delta)
                batch = join_parts([part for part, _ in received])
                if isinstance(batch.media, imagedecode.EncodedImages):
                    batch = (batch._replace(media=DeferredImages(batch.media, self)) if self.defer_decode
                             else self._decode_on_device(batch))
                self.batches_consumed += 1  # before yielding: a state taken now counts this batch
                self._live_next = (self.epoch, self.batches_consumed)
                yield batch
                if self.batches_consumed >= total:
                    break
        self.epoch, self.batches_consumed = self.epoch + 1, 0
        if self.dataset.train:
            self._live_next = (self.epoch, 0)
        else:  # an eval stream ends with its range: the next pass starts a new iterator
            self._live = self._live_next = None

    def _decode_on_device(self, batch: Batch, count: bool = True) -> Batch:
        """data.decode=gpu: the batch's JPEGs decoded, cropped and resized on `self.device`. A row no
        decoder reads loses its sample like a corrupt one in a worker: marked invalid, counted, filled.
        The same every time for the same batch (`count`: whether this time counts in the stats)."""
        media, failed, on_cpu = imagedecode.decode(batch.media, self.dataset.samples.device_crop, self.device)
        if count:
            self.stats["decoded_on_cpu"] += on_cpu
        if not failed:
            return batch._replace(media=media)
        keys, labels, valid = list(batch.keys), batch.labels.clone(), batch.valid.clone()
        for row in failed:
            if count:
                log.warning("skipped sample %s: corrupt_media (no decoder reads its JPEG)", keys[row])
            keys[row], labels[row], valid[row] = "", -1, False
        good = valid.nonzero().flatten().tolist()
        for index, row in enumerate(failed):
            if good:  # a real sample's pixels (fixed shapes); the slot is marked invalid
                media[row] = media[good[index % len(good)]]
        if count:
            self.stats["skipped_corrupt_media"] += len(failed)
            self.stats["samples_read"] -= len(failed)
            self.stats["samples_filled"] += len(failed)
        return Batch(media, batch.tokens, keys, labels, valid)

    def _waited_on(self) -> str:
        """Which shards the batch that did not come was to be read from (for the DataLoader's timeout)."""
        dataset, batch = self.dataset, self.batches_consumed
        if dataset.train:
            streams, index, size = [s for w in range(dataset.workers) for s in dataset.streams_of(w)], batch, \
                dataset.per_step
        else:
            streams, index, size = dataset.streams_of(batch % dataset.workers), batch // dataset.workers, \
                self.cfg.batch_size
        urls = set()
        for stream in streams:
            plan = dataset.plan(self.epoch, stream)
            targets = plan.order[index * size : (index + 1) * size].tolist()
            urls |= {seg.url for seg in plan.segments for t in targets if seg.offset <= t < seg.offset + seg.end - seg.first}
        return (f"epoch {self.epoch} batch {batch} (streams {streams[0]}-{streams[-1]}) was to be read from "
                f"{', '.join(sorted(urls))}")

    def close(self) -> None:
        """Stop the workers now. A run that stops on a signal cannot leave this to the garbage collector (the
        exception's traceback keeps the loader alive until interpreter exit), and at exit multiprocessing ends
        daemon workers with SIGTERM, which they ignore (`_worker_init`): they would be waited on for ever."""
        live, self._live, self._live_next = self._live, None, None
        self._loader._iterator = None  # persistent workers: the DataLoader keeps its iterator too
        if live is None:
            return
        workers = list(getattr(live, "_workers", ()))  # torch's multi-process iterator; none with workers=0
        shutdown = getattr(live, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()  # what the iterator's __del__ does: each worker is told to exit and joined (5 s at most)
        for worker in workers:
            if worker.is_alive():  # stuck in a read past the orderly shutdown
                worker.kill()
                worker.join()

    def state_dict(self) -> dict[str, Any]:
        dataset = self.dataset
        state = {
            "epoch": self.epoch, "batches_consumed": self.batches_consumed, "seed": dataset.seed,
            "world_size": dataset.world_size, "workers": dataset.workers, "batch_size": self.cfg.batch_size,
            "shuffle_buffer": self.cfg.shuffle_buffer, "resampled": self.cfg.resampled,
            "weights": list(dataset.weights), "dataset": self.fingerprint,
        }
        if dataset.train:  # the layout-free position: samples each canonical stream has emitted in this epoch
            state.update(canonical_streams=dataset.canonical, global_batch=dataset.global_batch,
                         stream_position=self.batches_consumed * dataset.per_step)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position. The position is the number of samples every canonical stream has
        emitted, so any layout that fits the saved data.canonical_streams (pipeline.data.plan) yields exactly the
        global batches the saved run would have: an elastic resume continues the same loss curve."""
        dataset, mine = self.dataset, self.state_dict()
        for key in ("seed", "resampled", "weights", "dataset", "shuffle_buffer"):
            if state.get(key) != mine[key]:
                what = "data set (shard names and sizes)" if key == "dataset" else key
                raise ConfigError(
                    f"cannot resume the data position: the saved loader state has {what} {state.get(key)!r}, "
                    f"this loader has {mine[key]!r}; resuming needs the same seed, mode and data set (or start "
                    "the data at a new epoch)"
                )
        epoch = int(state["epoch"])
        if dataset.train:
            saved = state.get("canonical_streams")
            if saved is None:
                raise ConfigError("the saved loader state has no data.canonical_streams (written by an earlier "
                                  "version, whose batches depended on the layout): resume it with that version, "
                                  "or start a new run")
            if self.cfg.canonical_streams not in (0, saved):
                raise ConfigError(f"data.canonical_streams is {self.cfg.canonical_streams}, but the run being resumed "
                                  f"was planned over {saved} canonical streams: a resume keeps them (they decide "
                                  f"the batches); set data.canonical_streams={saved} or leave it 0")
            if int(state["global_batch"]) != dataset.global_batch:
                raise ConfigError(f"the run being resumed has global batch {state['global_batch']}, this one "
                                  f"{dataset.global_batch}: a resume keeps train.global_batch_size (it decides the "
                                  "epoch plan)")
            if saved != dataset.canonical:
                dataset.set_canonical(int(saved))
            position = int(state["stream_position"])
            if position % dataset.per_step:
                raise ConfigError(f"the saved data position ({position} samples per canonical stream) is not a "
                                  f"whole number of this layout's steps ({dataset.per_step} samples per stream)")
            consumed = position // dataset.per_step
        else:
            consumed = int(state["batches_consumed"])
        self._loader, self._live, self._live_next = self._data_loader(), None, None  # workers see the new plan
        self.epoch = epoch
        if not 0 <= consumed <= len(self):
            raise ValueError(f"saved data position {consumed} batches is outside 0..{len(self)}")
        self.batches_consumed = consumed
        if dataset.train and dataset.rank == 0 and (int(state["world_size"]), int(state["workers"]),
                                                    int(state["batch_size"])) != (dataset.world_size,
                                                                                  dataset.workers, self.cfg.batch_size):
            log.info("data position of epoch %d resumed on another layout (world size %s -> %d, workers %s -> %d, "
                     "micro-batch %s -> %d): the same %d canonical streams, the same global batches", epoch,
                     state["world_size"], dataset.world_size, state["workers"], dataset.workers, state["batch_size"],
                     self.cfg.batch_size, dataset.canonical)


def join_parts(parts: list[Batch]) -> Batch:
    """One micro-batch from the workers' parts of a step, in worker order."""
    if len(parts) == 1:
        return parts[0]
    media = [part.media for part in parts]
    if any(isinstance(m, imagedecode.EncodedImages) for m in media):
        joined = imagedecode.concat(media)
    else:
        joined = torch.cat(media)
    return Batch(joined, torch.cat([part.tokens for part in parts]), [k for part in parts for k in part.keys],
                 torch.cat([part.labels for part in parts]), torch.cat([part.valid for part in parts]))


class DeferredImages:
    """A batch's images still encoded (StreamingLoader.defer_decode): `materialize(batch)` decodes them on
    the loader's device, each time a pass needs them; the first time counts in the loader's stats."""

    def __init__(self, encoded: imagedecode.EncodedImages, loader: StreamingLoader):
        self.encoded, self.loader, self.counted = encoded, loader, False

    def __len__(self) -> int:
        return len(self.encoded)


def materialize(batch: Batch) -> Batch:
    """The batch with its images decoded when the loader deferred them (else the batch itself). Decoding
    is deterministic, so every call gives the same pixels and the same `valid` rows."""
    if not isinstance(batch.media, DeferredImages):
        return batch
    deferred = batch.media
    decoded = deferred.loader._decode_on_device(batch._replace(media=deferred.encoded), count=not deferred.counted)
    deferred.counted = True
    return decoded


def build_loader(cfg: DataConfig, urls: str, *, rank: int, world_size: int, seed: int, media_transform,
                 tokenizer, train: bool = True, image_size: int | None = None,
                 device: torch.device | str | None = None, global_batch: int | None = None) -> StreamingLoader:
    """A loader over `urls` for this rank; `media_transform` and `tokenizer` come from the model side.
    `global_batch`: samples per optimizer step over all ranks (default world_size x data.batch_size: no
    accumulation); it and data.canonical_streams decide the training batches (pipeline.data.plan).
    `device`: where data.decode=gpu decodes (default CUDA when present, else the CPU). With data.mixture set, a
    training loader reads the manifest's sources (`urls` is not used)."""
    manifest = mixture.read_manifest(cfg.mixture, cfg.storage_options) if cfg.mixture and train else None
    if manifest:
        urls = "::".join(source.urls for source in manifest)
    if not urls:
        raise ConfigError("no shard URLs given (data.train_urls / data.val_urls is empty)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    # read on rank 0 and broadcast: every rank calls build_loader at the same point (a collective)
    try:
        index = shard_index(urls, cfg.storage_options, world_size=world_size)
    except SourceError as error:
        if manifest:  # the user wrote the manifest's entries, not this '::' list: name the entry
            raise source_error(cfg, "mixture", urls, error) from None
        raise
    shard_urls, sizes, left_out, absent = index.sources, index.sizes, index.left_out, index.absent
    absent = [(url, size) for url, size in absent if size > 0]  # a counted shard that was not there is told
    if rank == 0:  # every rank finds the same: one of them tells
        _warn_missing(left_out, absent)
    sources = [[(url, sizes[url]) for url in source] for source in shard_urls]
    weights = list(cfg.weights) or [1.0] * len(sources)
    if len(weights) != len(sources):
        raise ConfigError(f"data.weights has {len(weights)} entries for {len(sources)} sources in '{urls}'")
    counts = None
    if manifest:
        counts = mixture.epoch_counts(manifest, [sum(n for _, n in source) for source in sources], cfg.epoch_samples)
        if rank == 0:
            log.info("data.mixture %s: samples per epoch %s", cfg.mixture,
                     ", ".join(f"{source.urls}: {count}" for source, count in zip(manifest, counts)))
    names = json.dumps([[(storage.base_name(u), n) for u, n in source] for source in sources])
    names += json.dumps(counts) if counts else ""  # a mixture's shares are part of what the data set is
    fingerprint = hashlib.sha1(names.encode()).hexdigest()[:16]
    dataset = StreamingDataset(cfg, sources, rank=rank, world_size=world_size, seed=seed,
                               media_transform=media_transform, tokenizer=tokenizer, train=train,
                               image_size=image_size, weights=weights, missing=frozenset(url for url, _ in absent),
                               mixture_counts=counts, global_batch=global_batch)
    loader = StreamingLoader(dataset, cfg, fingerprint, device)
    if rank == 0:  # found once for the whole data set: counted on one rank
        loader.stats["shards_not_found"] += len(left_out) + len(absent)
        loader.stats["samples_not_found"] += sum(size for _, size in left_out)
    return loader
