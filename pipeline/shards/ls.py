"""List the samples of shards as the loader sees them: `list_samples(urls)`, what `python -m pipeline shards ls`
prints. The same reader and grouping as the loader's (pipeline.data.shardformat), without decoding.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pipeline.core import storage
from pipeline.data import shardformat


def list_samples(urls: list[str], storage_options: dict[str, Any] | None = None,
                 limit: int = 0) -> Iterator[dict[str, Any]]:
    """Every sample of the shards as the loader sees it (same reader, same grouping): {"shard", "key",
    "fields": {field: bytes}} plus "skipped": reason for a sample the loader skips at read."""
    import braceexpand

    storage_options = storage_options or {}
    shown = 0
    for pattern in urls:
        for source in braceexpand.braceexpand(pattern):
            fs, path = storage.url_to_fs(source, storage_options)
            shard_urls = [source] if path.endswith(".tar") or not fs.isdir(path) else storage.list_tars(source,
                                                                                                        storage_options)
            for url in shard_urls:
                with storage.open_shard(url, storage_options=storage_options) as stream:
                    for sample in shardformat.iter_samples(stream, wanted=lambda index: False):
                        record = {"shard": url, "key": sample.key, "fields": dict(sorted(sample.sizes.items()))}
                        if sample.problem:
                            record["skipped"] = sample.problem
                        yield record
                        shown += 1
                        if limit and shown >= limit:
                            return
