"""Commands over a trained run directory: `export` (weights open_clip loads) and `eval` (held-out figures).

    python -m pipeline export runs/demo-clip runs/demo-clip/open_clip.pt
    python -m pipeline eval runs/demo-clip --data shards/shapes/val

A run directory is read through its config.yaml (pipeline.train.config.RunConfig) and its
checkpoints (pipeline.checkpoint.manager), consolidated from any ZeRO stage, local or remote.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
from pathlib import Path

from pipeline.core.errors import ConfigError

# torch, the model, data and checkpoint code are imported inside the functions that use them, not at import: the
# CLI imports this module to declare `eval` and `export`, and their --help must not wait for torch and open_clip


def load_model_from_run(run_dir: str | Path, tag: str | None = None):
    """(ContrastiveModel on CPU in eval mode, RunConfig) from a run directory's latest checkpoint, or the
    one named by `tag`; the checkpoint may be local or remote (checkpoint.dir in the run's config.yaml)
    and of any ZeRO stage: the weights are consolidated to fp32."""
    from pipeline.checkpoint.consolidate import consolidated_state_dict
    from pipeline.checkpoint.layout import LATEST
    from pipeline.checkpoint.layout import local_problem as _local_problem
    from pipeline.checkpoint.manager import CheckpointManager
    from pipeline.model.build import build_model
    from pipeline.train.config import RunConfig, load_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory '{run_dir}' does not exist")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"'{run_dir}' is not a run directory: it has no config.yaml")
    cfg = load_config(RunConfig, config_path)
    manager = CheckpointManager(cfg.checkpoint, run_dir, rank=0, world_size=1)
    tag = tag or manager.latest_tag()
    if tag is None:
        raise ConfigError(f"no checkpoint under '{manager.url}' (no '{LATEST}' file): train longer")
    problem = manager.problem(tag)
    if problem is not None:
        others = [other for other in manager.tags() if other != tag]
        hint = f" (other checkpoints: {', '.join(others)}; pick one with --tag)" if others else ""
        raise ConfigError(f"checkpoint '{manager._join(tag)}' cannot be read: {problem}{hint}")
    with tempfile.TemporaryDirectory() as scratch:
        root = manager.url
        if manager.remote:
            root = manager.download(tag, scratch)
            problem = _local_problem(Path(root) / tag)  # remote files can be opened only once downloaded
            if problem is not None:
                raise ConfigError(f"checkpoint '{manager._join(tag)}' cannot be read: {problem}")
        weights = consolidated_state_dict(root, tag)
    # the checkpoint holds every weight: no need to read model.pretrained (which may no longer exist)
    model = build_model(dataclasses.replace(cfg.model, pretrained=""))
    model.load_state_dict(weights)
    model.eval()
    return model, cfg


def export(run_dir: str | Path, out_path: str | Path, tag: str | None = None) -> Path:
    """Write `model.open_clip_state_dict()` of a run's latest (or given) checkpoint to `out_path`."""
    import torch

    model, _ = load_model_from_run(run_dir, tag)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.open_clip_state_dict(), out_path)
    return out_path


def _export_command(args: argparse.Namespace) -> int:
    path = export(args.run_dir, args.out, tag=args.tag)
    config = Path(args.run_dir) / "config.yaml"
    print(f"exported {args.run_dir} -> {path}\n"
          f"evaluate it: python -m pipeline eval {path} --config {config}")
    return 0


def _register_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write a run's weights as an open_clip state dict",
        description="Consolidate a run's latest DeepSpeed checkpoint (any ZeRO stage) into a state dict that "
        "open_clip.create_model_and_transforms(name, pretrained=OUT) loads.",
    )
    parser.add_argument("run_dir", help="run directory (holds config.yaml and checkpoints)")
    parser.add_argument("out", help="output .pt path")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest)")
    parser.set_defaults(func=_export_command)


# -- the `eval` command ---------------------------------------------------------------------------

def _load_model(source: Path, config_path: str | None, overrides: list[str]):
    """(model, RunConfig) from a run directory or an exported .pt with its config; ConfigError naming what
    is missing or unreadable."""
    import torch

    from pipeline.model.build import build_model
    from pipeline.train.config import RunConfig, load_config

    if source.is_dir():
        config_path = config_path or str(source / "config.yaml")
        if not Path(config_path).is_file():
            raise ConfigError(f"'{source}' is not a run directory: it has no config.yaml (or pass --config)")
        cfg = load_config(RunConfig, config_path, overrides)
        # the latest checkpoint, consolidated from any ZeRO stage, local or remote
        model, _ = load_model_from_run(source)
        return model, cfg
    if not source.is_file():
        raise ConfigError(f"'{source}' is neither a run directory nor a weights file")
    # an exported .pt: the run's config.yaml beside it unless --config names one
    config_path = config_path or (str(source.parent / "config.yaml") if (source.parent / "config.yaml").is_file()
                                  else None)
    if config_path is None:
        raise ConfigError(f"weights file '{source}' needs --config (the YAML config it was trained with: its run "
                          "directory's config.yaml)")
    try:
        torch.load(source, map_location="cpu", weights_only=False, mmap=True)  # mapped, not read: cheap
    except Exception as error:  # whatever torch or pickle raises, these are not weights we can load
        raise ConfigError(f"weights file '{source}' cannot be read: {' '.join(str(error).split())[:200]}") from None
    # model.pretrained loads the weights: an open_clip state dict (image), ours (audio)
    cfg = load_config(RunConfig, config_path, [*overrides, f"model.pretrained={source}"])
    return build_model(cfg.model), cfg


def _eval_command(args: argparse.Namespace) -> int:
    import torch

    from pipeline.data.loader import build_loader
    from pipeline.eval.evaluate import evaluate, format_table, read_classes
    from pipeline.model.build import get_tokenizer, image_size, media_transform

    # our skipped-sample and progress notes, without open_clip's model-building chatter
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    model, cfg = _load_model(Path(args.source), args.config, args.overrides)
    data_url = args.data or cfg.data.val_urls
    if not data_url:
        raise ConfigError("no held-out data: pass --data URL (the run's config has no data.val_urls)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data_cfg = dataclasses.replace(cfg.data, batch_size=args.batch_size or cfg.eval.batch_size,
                                   workers=cfg.data.workers if args.workers is None else args.workers)
    tokenizer = get_tokenizer(cfg.model)
    loader = build_loader(data_cfg, data_url, rank=0, world_size=1, seed=cfg.train.seed,
                          media_transform=media_transform(cfg.model, is_train=False), tokenizer=tokenizer,
                          train=False, image_size=image_size(cfg.model))
    classes = None if args.no_zero_shot else read_classes(data_url, cfg.data.storage_options)
    metrics = evaluate(model.to(device), loader, tokenizer=tokenizer, classes_json=classes, device=device,
                       max_batches=args.max_batches, progress=True)
    print(f"{args.source} on {data_url}" + (f" ({len(classes['classes'])} classes)" if classes else ""))
    print(format_table(metrics))
    if classes is None:
        print("zero-shot: not run, " + ("--no-zero-shot" if args.no_zero_shot else
                                         "the held-out set has no classes.json (class names and prompt templates, "
                                         "as `shards build` writes for the embedded labelled sets)"))
    if args.json:
        report = {"source": str(args.source), "data": data_url, "metrics": metrics}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _register_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="retrieval R@1/5/10 and zero-shot accuracy of a trained run on held-out shards",
        description="Evaluate a run (its latest checkpoint, consolidated from any ZeRO stage) or exported weights\n"
        "on held-out shards: media<->text retrieval R@1/5/10 both ways and, when the data set has a\n"
        "classes.json, zero-shot top-1/top-5, each printed with its chance level.",
        epilog="examples:\n  python -m pipeline eval runs/demo-clip --data shards/shapes/val\n"
        "  python -m pipeline eval runs/demo-clip data.workers=0 --data s3://bucket/shapes/val --json eval.json\n"
        "  python -m pipeline eval open_clip.pt --config configs/demo-clip.yaml --data shards/shapes/val --json e.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="run directory (with config.yaml and checkpoints) or an exported weights "
                        ".pt (open_clip state dict for image models, ours for audio models)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides as for train, right after SOURCE (before any --option), "
                        "e.g. data.workers=0 data.storage_options.endpoint_url=http://...")
    parser.add_argument("--data", default=None, help="held-out shards: data set directory, shard URL pattern, "
                        "'::'-joined sources, any fsspec protocol (default: the config's data.val_urls)")
    parser.add_argument("--config", default=None, help="YAML config the weights were trained with (default: "
                        "config.yaml of the run directory, or beside the .pt)")
    parser.add_argument("--batch-size", type=int, default=None, help="evaluation batch (default: eval.batch_size)")
    parser.add_argument("--workers", type=int, default=None, help="data loader workers (default: data.workers)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--max-batches", type=int, default=None, help="stop after this many batches (a quick look)")
    parser.add_argument("--no-zero-shot", action="store_true", help="skip zero-shot even if classes.json exists")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures to this JSON file")
    parser.set_defaults(func=_eval_command,
                        imports=("pipeline.data.loader", "pipeline.eval.evaluate", "pipeline.model.build"))


def register_cli(subparsers) -> None:
    _register_export(subparsers)
    _register_eval(subparsers)
