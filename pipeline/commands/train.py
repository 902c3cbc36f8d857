"""The `train` command: `python -m pipeline train --config FILE [KEY=VALUE ...]`.

    python -m pipeline train --config configs/demo-clip.yaml                        # one process (CPU or GPU)
    deepspeed --num_gpus 2 --no_local_rank --module pipeline train --config configs/demo-clip.yaml  # 2 local ranks
    torchrun --nproc_per_node 2 -m pipeline train --config configs/vit-b-32.yaml train.zero_stage=2
    python -m pipeline train --config configs/demo-clip.yaml train.resume=auto      # continue where it stopped
    python -m pipeline train --config configs/vit-b-32.yaml --dry-run --world-size 64   # check and plan only

Every rank runs the same command; the config (YAML file, then the dot-list overrides) is validated
before any work. The run directory is `train.output_dir/train.name`: config.yaml, metrics.jsonl,
TensorBoard events, checkpoints/, curves.png. Rank 0 ends with a summary: steps, samples, time, loss,
the last held-out figures beside chance, where the run is, and what the data lacked.

--dry-run checks the config without training and writes nothing: it validates the config, reads the
data index (shard sizes), builds the model on the meta device (no memory, no weights read) and prints
the plan: world size, micro-batch, accumulation, canonical streams and the shuffle buffers each loader
worker holds, steps per epoch, samples per source, and the memory per rank that weights, gradients and
optimizer states take (activations come on top). Shards this machine cannot read (a path on the
cluster, no credentials) leave out the epoch plan: the rest is printed, then the data's error, and the
exit status is 2.
"""
# The docstring is the command's --help. The loop is pipeline.train.loop; this module only declares the
# command, so that `--help` imports neither torch nor DeepSpeed (they load when the command runs).

from __future__ import annotations

import argparse


def _train_command(args: argparse.Namespace) -> int:
    from pipeline.train.loop import load_run_config, train

    cfg = load_run_config(args.config, args.overrides)
    if args.dry_run:
        report, data_error = plan(cfg, args.world_size)
        print(report, flush=True)
        if data_error is not None:  # the rest of the plan is printed; the data's error ends the dry run
            raise data_error
        return 0
    train(cfg)
    return 0


def _megabytes(count: float) -> str:
    return f"{count / 2**20:,.1f} MiB" if count < 2**30 else f"{count / 2**30:,.2f} GiB"


def _millions(count: int) -> str:
    return f"{count / 1e6:,.2f} M" if count >= 10_000 else f"{count:,}"


def plan(cfg, world_size: int | None = None) -> tuple[str, Exception | None]:
    """The dry run's report (see the module docstring) and the error reading the data raised, if any: the
    model, memory and run-directory lines do not need the data, so a config whose shards this machine cannot
    read (no credentials, a path on the cluster) is still planned. Any other ConfigError is raised as `train`
    would raise it. Writes nothing."""
    import dataclasses

    from pipeline.core.errors import ConfigError
    from pipeline.data.loader import build_loader
    from pipeline.model.build import get_tokenizer, image_size, media_transform
    from pipeline.parallel import distributed
    from pipeline.train.loop import check_data, validate

    world_size = world_size or int(distributed.launcher_environment().get("WORLD_SIZE", "1"))
    micro = validate(cfg, world_size, probe_checkpoints=False, read_data=False)
    accum, global_batch = cfg.train.accum_steps, cfg.train.global_batch_size
    lines = [
        f"dry run of '{cfg.train.name}': nothing trained, nothing written",
        f"world size {world_size}: micro-batch {micro} per rank x {accum} accumulation step{'s' if accum > 1 else ''}"
        f" x {world_size} rank{'s' if world_size > 1 else ''} = global batch {global_batch} (the contrastive batch)",
    ]
    # rank 0's loader of the planned layout: its epoch plan is every rank's (each reads as many batches)
    try:
        check_data(cfg)
        loader = build_loader(dataclasses.replace(cfg.data, batch_size=micro), cfg.data.train_urls, rank=0,
                              world_size=world_size, seed=cfg.train.seed, tokenizer=get_tokenizer(cfg.model),
                              media_transform=media_transform(cfg.model, True), train=True,
                              image_size=image_size(cfg.model), device="cpu", global_batch=global_batch)
    except ConfigError as error:
        data_error = error
        lines.append("data: no epoch plan (the error is the last line)")
    else:
        data_error = None
        lines.extend(_data_lines(cfg, loader, world_size))
    lines.extend(_model_lines(cfg, world_size))
    return "\n".join(lines), data_error


def _data_lines(cfg, loader, world_size: int) -> list[str]:
    """Sources, canonical streams, the epoch and the run, from rank 0's loader of the planned layout."""
    accum, global_batch = cfg.train.accum_steps, cfg.train.global_batch_size
    lines = []
    dataset = loader.dataset
    steps_per_epoch = len(loader) // accum
    for index, source in enumerate(dataset.sources):
        shards, samples = len(source), sum(n for _, n in source)
        per_epoch = f"; {dataset.mixture_counts[index]:,} per epoch" if dataset.mixture_counts else ""
        lines.append(f"source {index}: {shards:,} shard{'s' if shards > 1 else ''}, {samples:,} samples{per_epoch}"
                     f" ({source[0][0] if shards == 1 else source[0][0] + ' ...'})")
    streams = dataset.canonical // (world_size * dataset.workers)
    buffers = (f"; each holds {streams} shuffle buffer{'s' if streams > 1 else ''} of {cfg.data.shuffle_buffer:,} "
               f"samples ({streams * cfg.data.shuffle_buffer:,} samples' raw bytes)") if cfg.data.shuffle_buffer > 1 else ""
    lines.append(f"data: {dataset.canonical} canonical streams of {global_batch // dataset.canonical} samples per "
                 f"global batch; each of the {world_size * dataset.workers} (rank, worker) pairs serves {streams}"
                 + buffers)
    lines.append(f"epoch: {steps_per_epoch:,} steps of {global_batch:,} samples ({steps_per_epoch * global_batch:,}"
                 f" samples; {dataset.remainder_of(0):,} left over, a different stretch each epoch)")
    lines.append(f"run: {cfg.train.steps:,} steps = {cfg.train.steps / max(steps_per_epoch, 1):.2f} epochs, "
                 f"{cfg.train.steps * global_batch:,} samples; log every {cfg.train.log_every}, "
                 + (f"eval every {cfg.eval.every_steps} steps and at the end" if cfg.eval.every_steps else
                    "eval at the end") + (" (no data.val_urls: no eval)" if not cfg.data.val_urls else "")
                 + f", checkpoint every {cfg.checkpoint.every_steps or 'no'} steps and at the end")
    return lines


def _model_lines(cfg, world_size: int) -> list[str]:
    """Parameters and memory per rank of the model (built on the meta device), and the run directory."""
    import dataclasses

    import torch

    from pipeline.checkpoint.manager import CheckpointManager
    from pipeline.model.build import build_model
    from pipeline.parallel.checkpointing import apply_activation_checkpointing
    from pipeline.train.loop import run_dir_of

    lines = []
    # the model on the meta device: shapes and counts without memory or weights (model.pretrained is not read)
    with torch.device("meta"):
        model = build_model(dataclasses.replace(cfg.model, pretrained=""))
        apply_activation_checkpointing(model, cfg.model.grad_checkpointing)  # its ConfigError, as train's
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines.append(f"model {cfg.model.name} ({cfg.model.modality}): {_millions(parameters)} parameters, "
                 f"{_millions(trainable)} trainable")
    # fp32 weights in every precision mode, fp32 gradients, two fp32 optimizer states (AdamW, LAMB);
    # ZeRO-1 partitions the optimizer states over the ranks, ZeRO-2 the gradients too, ZeRO-3 the weights too
    stage = cfg.train.zero_stage
    weights = 4 * parameters / (world_size if stage >= 3 else 1)
    gradients = 4 * trainable / (world_size if stage >= 2 else 1)
    states = 8 * trainable / (world_size if stage >= 1 else 1)
    lines.append(f"memory per rank (ZeRO-{stage}, {cfg.optim.name}): weights {_megabytes(weights)} + gradients "
                 f"{_megabytes(gradients)} + optimizer states {_megabytes(states)} = "
                 f"{_megabytes(weights + gradients + states)}; activations come on top (they grow with the "
                 f"micro-batch: `python -m pipeline bench gpu` measures a step)")
    run_dir = run_dir_of(cfg)
    latest = CheckpointManager(cfg.checkpoint, run_dir, 0, world_size).latest_tag()
    where = f"run directory: {run_dir}"
    if latest and cfg.train.resume == "none" and not cfg.train.overwrite:
        where += f" holds checkpoint {latest}: a fresh start is refused (train.resume=auto continues it)"
    elif latest and cfg.train.resume == "auto":
        where += f": resumes from checkpoint {latest}"
    lines.append(where)
    return lines


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train with DeepSpeed (any launcher, or one process)", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. optim.lr=1e-3 train.steps=100")
    parser.add_argument("--dry-run", action="store_true", help="check the config and print the plan (batch, "
                        "steps per epoch, samples per source, memory per rank); train nothing, write nothing")
    parser.add_argument("--world-size", type=int, default=None, help="with --dry-run: the number of ranks to plan "
                        "for (default: the launcher's WORLD_SIZE, else 1)")
    parser.set_defaults(func=_train_command, imports=("pipeline.train.loop",))
