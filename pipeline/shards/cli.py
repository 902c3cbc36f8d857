"""Build, verify, list and index WebDataset tar shards: `python -m pipeline shards build|verify|ls|index`.

    python -m pipeline shards build --source shapes --split train --output shards/shapes/train
    python -m pipeline shards build --source folder --input photos/ --resize 256 --output s3://bucket/photos \\
        --storage-option client_kwargs.endpoint_url=http://127.0.0.1:9000
    python -m pipeline shards build --source manifest --input pairs.parquet --output shards/pairs --workers 4
    python -m pipeline shards verify shards/shapes/train s3://bucket/photos/photos-000000.tar
    python -m pipeline shards ls shards/shapes/train --limit 5 [--json]   # keys and fields as the loader sees them
    python -m pipeline shards index s3://bucket/laion400m --workers 64   # sizes.json for img2dataset output

A data set is `{prefix}-{index:06d}.tar` shards, `sizes.json` (shard name -> samples, as open_clip
reads it), `{prefix}-{index:06d}_stats.json` per shard (img2dataset-like) and `classes.json` for the
embedded labelled sets.
"""
# The docstring is `shards --help`. This module is the command line: the parsers, and each subcommand's run,
# which raises ConfigError (or UnreadableShard) for pipeline.cli to report. The work is elsewhere:
# pipeline.shards.build (the builder), pipeline.shards.verify, pipeline.shards.ls, and, for `index`, the
# loader's own reader of shard sizes (pipeline.data.shardindex).

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tarfile
from typing import Any

from pipeline.core.args import parse_overrides
from pipeline.core.errors import ConfigError
from pipeline.data import shardformat, shardindex
from pipeline.shards import synthetic
from pipeline.shards.build import build_shards
from pipeline.shards.config import MANIFEST_FORMATS, RESIZE_MODES, SOURCES, BuildConfig
from pipeline.shards.ls import list_samples
from pipeline.shards.verify import verify


class UnreadableShard(ConfigError):
    """A shard that cannot be read (`shards ls`, `shards index`): the CLI exits 1 with the message, as `shards
    verify` does when it finds a problem, not 2 (a bad setting)."""

    exit_status = 1


def parse_storage_options(pairs: list[str]) -> dict[str, Any]:
    """["client_kwargs.endpoint_url=http://...", "anon=true"] -> nested dict (dots make sub-dicts), parsed as
    the trainer's dot-list overrides are (pipeline.core.args): values are YAML scalars."""
    try:
        return parse_overrides(pairs or [])
    except ConfigError as error:
        raise ConfigError(f"--storage-option: {error}") from None


# the build options' defaults are BuildConfig's, declared once
_BUILD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(BuildConfig)}


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one (options whose default depends on the source say so)."""

    def _get_help_string(self, action):
        if action.default is None or action.default == [] or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec option for remote paths, repeatable; dots nest, e.g. "
                             "client_kwargs.endpoint_url=http://127.0.0.1:9000, key=..., secret=..., anon=true")


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("shards", help="build, verify, list or index WebDataset tar shards",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="shards_command", metavar="{build,verify,ls,index}")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    for add in (_add_build, _add_verify, _add_ls, _add_index):
        add(commands)


def _add_build(commands) -> None:
    # one flag per BuildConfig field, with its default
    build = commands.add_parser(
        "build", help="build shards from an embedded set, a folder or a manifest",
        description="Build WebDataset shards ({prefix}-{index:06d}.tar, sizes.json, *_stats.json, classes.json). "
                    "Bad samples (corrupt or missing media, empty captions, duplicate keys) are skipped and "
                    "counted; a missing manifest column or an unwritable output stops the build at once, and a "
                    "build that writes no sample fails; a failed build leaves no output directory it created.",
        formatter_class=_DefaultsFormatter)
    build.add_argument("--source", choices=SOURCES, required=True,
                       help="shapes/tones: the embedded generated sets; folder: media files with sidecar .txt/.json "
                            "captions; manifest: a table with a path and a caption column")
    build.add_argument("--output", required=True, help="local directory or fsspec URL (s3://bucket/prefix)")
    build.add_argument("--split", choices=synthetic.SPLITS, default=_BUILD_DEFAULTS["split"],
                       help="embedded sets: train, or val (held out: a different random stream)")
    build.add_argument("--count", type=int, default=None,
                       help="embedded sets: samples to generate (default: shapes 10000/1000, tones 3000/500 for "
                            "train/val)")
    build.add_argument("--seed", type=int, default=_BUILD_DEFAULTS["seed"], help="embedded sets: seed; same seed, same bytes")
    build.add_argument("--image-size", type=int, default=_BUILD_DEFAULTS["image_size"], help="shapes: image side in pixels (64-224)")
    build.add_argument("--sample-rate", type=int, default=_BUILD_DEFAULTS["sample_rate"], help="tones: sample rate in Hz (16000-48000)")
    build.add_argument("--input", default=None,
                       help="folder: the directory (images jpg/png/webp or audio flac/wav, sidecar .txt and/or "
                            ".json with 'caption' or 'captions'); manifest: the table's path or URL")
    build.add_argument("--path-column", default=_BUILD_DEFAULTS["path_column"],
                       help="manifest: column of media paths (local, relative to the manifest, or fsspec URLs)")
    build.add_argument("--caption-column", default=_BUILD_DEFAULTS["caption_column"], help="manifest: column of captions")
    build.add_argument("--key-column", default=_BUILD_DEFAULTS["key_column"],
                       help="manifest: column of sample keys, used when present (dots become '_'); "
                            "otherwise keys are zero-padded row numbers. Other columns go into each .json")
    build.add_argument("--format", choices=MANIFEST_FORMATS, default=None,
                       help="manifest format (default: from the extension)")
    build.add_argument("--prefix", default=None,
                       help="shard name prefix (default: SOURCE-SPLIT for embedded sets, else the input's name)")
    build.add_argument("--samples-per-shard", type=int, default=None,
                       help="input samples per shard (default 1000, tones 500); skipped ones leave it smaller")
    build.add_argument("--max-shard-bytes", type=int, default=0,
                       help="start a new shard before one would exceed this many bytes (0: no limit)")
    build.add_argument("--resize", type=int, default=_BUILD_DEFAULTS["resize"],
                       help="images: target size in pixels of the shorter side (keep_ratio) or of the square "
                            "(center_crop, border); never upscales; 0: keep images as they are")
    build.add_argument("--resize-mode", choices=RESIZE_MODES, default=_BUILD_DEFAULTS["resize_mode"],
                       help="no: keep; keep_ratio: shorter side to --resize; center_crop: then crop the centre "
                            "square; border: longer side to --resize, then pad to a square")
    build.add_argument("--jpeg-quality", type=int, default=_BUILD_DEFAULTS["jpeg_quality"], help="quality of re-encoded JPEG/WebP images")
    build.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                       help="worker processes, each building whole shards; the output is the same for any number")
    _add_storage_option(build)
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=_run_build)


def _add_verify(commands) -> None:
    check = commands.add_parser(
        "verify", help="check shards: tars readable, counts equal sizes.json or *_stats.json",
        description="Check data set directories or shard URLs (local or fsspec, brace patterns allowed): every "
                    "tar readable to the end, every sample has media and a caption (samples grouped as the loader "
                    "groups them), per-shard counts equal sizes.json or, without one, each shard's *_stats.json "
                    "(img2dataset). Lists the problems; exits 1 when there is any, 2 when there is no shard to check.")
    check.add_argument("urls", nargs="+", metavar="URL", help="data set directory or shard (.tar) URL")
    _add_storage_option(check)
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.set_defaults(func=_run_verify)


def _add_ls(commands) -> None:
    listing = commands.add_parser(
        "ls", help="list each sample's key and fields with their sizes, as the loader sees them",
        description="List the samples of shards exactly as the loader groups them (webdataset's keys: the "
                    "member name up to the first dot of its base name, directory included; the field is the "
                    "rest, lower-cased; names webdataset skips, such as .hidden or macOS ._* files, are "
                    "skipped). One line per sample: KEY  FIELD=BYTES ...; a sample the loader skips (a member "
                    "name twice) is marked 'skipped: REASON'. Samples are read in shard order without decoding. "
                    "Where there is no sample to list, it says so and exits 2.",
        formatter_class=_DefaultsFormatter)
    listing.add_argument("urls", nargs="+", metavar="URL",
                         help="data set directory, shard (.tar) URL or brace pattern, local or fsspec")
    listing.add_argument("--limit", type=int, default=0, help="stop after this many samples (0: all)")
    listing.add_argument("--json", action="store_true",
                         help='one JSON object per sample: {"shard": URL, "key": KEY, "fields": {"jpg": 10233, '
                              '"txt": 41}} (and "skipped": REASON where the loader skips it)')
    _add_storage_option(listing)
    listing.set_defaults(func=_run_ls)


def _add_index(commands) -> None:
    index = commands.add_parser(
        "index", help="write sizes.json for an existing data set directory (img2dataset output, or tars only)",
        description="Write URL/sizes.json (shard name -> samples, open_clip's form) for the *.tar directly in a "
                    "data set directory, local or fsspec (s3://bucket/laion400m). Each count is the shard's "
                    "*_stats.json 'successes' where img2dataset wrote one, else the samples counted in the tar "
                    "(grouped as the loader groups them; a damaged tar counts the samples before the damage, "
                    "with a warning naming it). Shards are read on --workers threads. With a sizes.json, a "
                    "training run reads one file per directory at start instead of one per shard. Prints the "
                    "totals; an existing sizes.json is replaced only with --force (and is not read then).",
        formatter_class=_DefaultsFormatter)
    index.add_argument("url", metavar="URL", help="data set directory or prefix holding the *.tar shards")
    index.add_argument("--workers", type=int, default=shardindex.READ_THREADS,
                       help="threads reading *_stats.json files or counting tars")
    index.add_argument("--force", action="store_true", help="replace an existing sizes.json")
    _add_storage_option(index)
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    index.set_defaults(func=_run_index)


def _run_build(args) -> int:
    cfg = BuildConfig(
        source=args.source, output=args.output, split=args.split, count=args.count, seed=args.seed,
        image_size=args.image_size, sample_rate=args.sample_rate, input=args.input,
        path_column=args.path_column, caption_column=args.caption_column, key_column=args.key_column,
        format=args.format, prefix=args.prefix, samples_per_shard=args.samples_per_shard,
        max_shard_bytes=args.max_shard_bytes or None, resize=args.resize, resize_mode=args.resize_mode,
        jpeg_quality=args.jpeg_quality, workers=args.workers,
        storage_options=parse_storage_options(args.storage_option),
    )
    print(build_shards(cfg, progress=not args.quiet).describe())
    return 0


def _run_verify(args) -> int:
    report = verify(args.urls, parse_storage_options(args.storage_option), progress=not args.quiet)
    if not report.shards and not report.problems:  # an empty directory: nothing was checked
        raise ConfigError(f"no .tar shards found at {', '.join(repr(url) for url in args.urls)}: nothing to verify")
    for problem in report.problems:
        print(f"problem: {problem}")
    print(f"{report.shards} shards, {report.samples} samples, {len(report.problems)} problems")
    return 1 if report.problems else 0


def _run_ls(args) -> int:
    if args.limit < 0:
        raise ConfigError(f"--limit must be >= 0, got {args.limit}")
    listed = 0
    try:
        for record in list_samples(args.urls, parse_storage_options(args.storage_option), args.limit):
            listed += 1
            if args.json:
                print(json.dumps(record))
                continue
            fields = "  ".join(f"{name}={size}" for name, size in record["fields"].items())
            skipped = f"  (skipped: {record['skipped']})" if "skipped" in record else ""
            print(f"{record['key']}  {fields}{skipped}")
    except FileNotFoundError as error:
        raise ConfigError(f"not found: {error}") from None
    except (tarfile.TarError, EOFError) as error:
        raise UnreadableShard(f"damaged tar ({error})") from None
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout again at exit
        return 0
    if not listed:
        raise ConfigError(f"no samples found at {', '.join(repr(url) for url in args.urls)}: nothing to list")
    return 0


def _run_index(args) -> int:
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    try:
        summary = shardindex.write_sizes_json(args.url, parse_storage_options(args.storage_option),
                                              threads=args.workers, force=args.force, progress=not args.quiet)
    except shardformat.SizesError as error:
        raise ConfigError(str(error)) from None
    except shardindex.ShardIndexError as error:  # names the shard
        raise UnreadableShard(f"cannot read shard {error}") from None
    print(summary.describe())
    return 0
