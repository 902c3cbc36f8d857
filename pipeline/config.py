"""Configs: nested dataclasses, filled from defaults, then a YAML file, then dot-list overrides.

    cfg = load_config(RunConfig, "configs/demo-clip.yaml", ["optim.lr=1e-3", "train.global_batch_size=256"])

Every component owns its config dataclass (`DataConfig` in data.py, `ModelConfig` in models.py,
...); this module only knows how to fill, validate and dump dataclasses. A key that no dataclass
declares is an error naming the key and the valid ones, before any work starts. Each dataclass
may validate itself in `__post_init__` by raising `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration: the message names the key or setting at fault."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the declared field type, or raise ConfigError naming `key`."""
    if value is None:
        return None
    tp = _unwrap_optional(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' is a section; expected a mapping, got {value!r}")
        return _build(tp, value, prefix=key + ".")
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}") from None
        if number != int(number):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return int(number)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    return value


def _build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    types_by_name = _field_types(cls)
    unknown = [k for k in values if k not in types_by_name]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(types_by_name), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise ConfigError(
            f"unknown config key '{prefix}{key}'{hint}; valid keys in "
            f"'{prefix.rstrip('.') or 'top level'}': {', '.join(sorted(types_by_name))}"
        )
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(value, types_by_name[name], prefix + name)
    # nested sections not mentioned still get their defaults through default_factory
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {error}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["optim.lr=1e-3", "data.urls=[a,b]"]` -> nested dict; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file '{path}' is not valid YAML: {error}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return loaded


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults <- YAML file <- dot-list overrides, validated; errors name the bad key."""
    values: dict[str, Any] = read_yaml(path) if path else {}
    values = _merge(values, parse_overrides(overrides or []))
    return _build(cls, values)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (what `load_config` reads back to an equal config)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------------
# Run configuration: the training layer's own sections, and `RunConfig` composing every section.


# Training precisions, under the names open_clip users type (open_clip_train --precision); 'auto' picks one.
PRECISIONS = ("amp_bf16", "amp", "fp32")
# Former names, refused with a pointer to the new one: the modes behind them changed.
RENAMED_PRECISIONS = {"bf16": "amp_bf16", "fp16": "amp", "amp_bfloat16": "amp_bf16"}


def check_precision_name(precision: str) -> None:
    """ConfigError for a precision name that is not 'auto' or one of PRECISIONS, with the name meant."""
    if precision == "auto" or precision in PRECISIONS:
        return
    choices = f"choices: auto, {', '.join(PRECISIONS)}"
    if precision in RENAMED_PRECISIONS:
        raise ConfigError(
            f"train.precision={precision} was renamed: did you mean train.precision={RENAMED_PRECISIONS[precision]}? "
            f"({choices})"
        )
    if precision == "pure_bf16":
        raise ConfigError(
            "train.precision=pure_bf16 is not offered: bf16 weights measured slower end to end than amp_bf16 "
            "(DeepSpeed's bf16 optimizer: 1805 vs 2574 samples/s, ViT-B-32 on an H100); use train.precision=amp_bf16"
        )
    close = difflib.get_close_matches(precision, PRECISIONS, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(f"train.precision: {hint}got {precision!r} ({choices})")


@dataclasses.dataclass
class OptimConfig:
    name: str = "adamw"
    """Optimizer: 'adamw' or 'lamb'. Biases, norms, the logit scale/bias and sigma heads get no weight decay."""
    lr: float = 5e-4
    """Peak learning rate, reached at the end of the linear warmup."""
    weight_decay: float = 0.1
    """Decoupled weight decay on the weight matrices."""
    beta1: float = 0.9
    """First-moment decay."""
    beta2: float = 0.98
    """Second-moment decay (0.98 as in CLIP: steadier at large batch)."""
    eps: float = 1e-6
    """Denominator epsilon."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from 0 to `lr`."""
    min_lr_ratio: float = 0.0
    """The cosine schedule ends at `lr * min_lr_ratio`."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    fused: bool = True
    """AdamW with torch's fused kernel (one launch for all parameters instead of several per tensor, and no
    per-tensor host read); on CUDA and CPU, ignored by LAMB."""

    def __post_init__(self):
        if self.name not in ("adamw", "lamb"):
            raise ConfigError(f"optim.name must be 'adamw' or 'lamb', got {self.name!r}")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("optim.beta1 and optim.beta2 must be in [0, 1)")


@dataclasses.dataclass
class TrainConfig:
    name: str = "run"
    """Run name: the run directory is `{output_dir}/{name}`."""
    output_dir: str = "runs"
    """Parent directory of run directories."""
    steps: int = 1000
    """Optimizer steps of the whole run (the cosine schedule spans them)."""
    global_batch_size: int = 256
    """Samples per optimizer step over all ranks: world_size x micro-batch x accum_steps (data.batch_size, the
    per-rank micro-batch, is derived from it)."""
    accum_steps: int = 1
    """GradCache micro-batches per step; the contrastive batch is the whole global batch either way."""
    precision: str = "auto"
    """'amp_bf16' (fp32 weights and optimizer, bf16 autocast), 'amp' (fp16 autocast with dynamic loss scaling),
    'fp32', or 'auto': amp_bf16 on CUDA, fp32 on CPU. The names are open_clip_train's --precision names."""
    compile: str = "auto"
    """torch.compile each transformer block: 'auto' (on with CUDA at ZeRO 0-2, off on CPU and at ZeRO-3,
    where DeepSpeed's parameter hooks break graphs), 'on' or 'off'. Compile time is logged apart."""
    overwrite: bool = False
    """Allow a fresh run (train.resume=none) into a run directory that already holds checkpoints, which are
    then deleted. Off: such a start is refused, so a forgotten resume flag never loses a run."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    seed: int = 0
    """Seeds the model init, the data order and dropout."""
    log_every: int = 10
    """Write a metrics.jsonl record every this many steps."""
    resume: str = "none"
    """'none' starts fresh, 'auto' continues from the latest checkpoint if there is one, or a checkpoint path."""
    collective_timeout_s: float = 600.0
    """A collective that waits longer than this fails the run instead of hanging it (e.g. a dead rank)."""
    stop_after_steps: int = 0
    """Stop this invocation after this many steps (a job slot shorter than the run; resume continues it);
    the schedule still spans train.steps. 0: run to train.steps."""
    log_sample_keys: bool = False
    """Append every step's sample keys to `keys_rank{r}.jsonl` in the run directory (an audit of what was read)."""

    def __post_init__(self):
        check_precision_name(self.precision)
        self.compile = {"true": "on", "false": "off", "yes": "on", "no": "off"}.get(str(self.compile).lower(),
                                                                                   str(self.compile).lower())
        if self.compile not in ("auto", "on", "off"):
            raise ConfigError(f"train.compile must be auto, on or off, got {self.compile!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.steps <= 0:
            raise ConfigError(f"train.steps must be positive, got {self.steps}")
        if self.global_batch_size <= 0:
            raise ConfigError(f"train.global_batch_size must be positive, got {self.global_batch_size}")
        if self.accum_steps <= 0:
            raise ConfigError(f"train.accum_steps must be positive, got {self.accum_steps}")
        if self.global_batch_size % self.accum_steps:
            raise ConfigError(
                f"train.global_batch_size ({self.global_batch_size}) is not divisible by train.accum_steps "
                f"({self.accum_steps})"
            )
        if self.stop_after_steps < 0:
            raise ConfigError(f"train.stop_after_steps must be >= 0, got {self.stop_after_steps}")
        if self.log_every <= 0:
            raise ConfigError(f"train.log_every must be positive, got {self.log_every}")
        if not self.name or "/" in self.name:
            raise ConfigError(f"train.name must be a non-empty name without '/', got {self.name!r}")
        if self.collective_timeout_s <= 0:
            raise ConfigError("train.collective_timeout_s must be positive")

    def micro_batch_size(self, world_size: int) -> int:
        """Per-rank micro-batch; ConfigError when the global batch does not split evenly."""
        per_step = world_size * self.accum_steps
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size ({self.global_batch_size}) is not divisible by world size "
                f"({world_size}) x train.accum_steps ({self.accum_steps})"
            )
        return self.global_batch_size // per_step


@dataclasses.dataclass
class CheckpointConfig:
    dir: str = ""
    """Where checkpoints go: a local path or an fsspec URL (s3://bucket/run); empty = `{run_dir}/checkpoints`."""
    every_steps: int = 0
    """Save every this many steps (0: only at the end)."""
    keep_last: int = 3
    """Keep this many most recent checkpoints; older ones are deleted."""
    every_minutes: float = 0.0
    """Also save when this many minutes have passed since the last save (0: off); with SIGTERM/SIGUSR1
    handling, a preempted job loses at most this much work."""
    staging_dir: str = ""
    """Local directory where remote checkpoints are written before upload; empty = `{run_dir}/checkpoint-staging`."""
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Passed to fsspec for a remote `dir`, e.g. {'client_kwargs': {'endpoint_url': 'http://127.0.0.1:9000'}}."""

    def __post_init__(self):
        if self.every_steps < 0:
            raise ConfigError(f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        if self.every_minutes < 0:
            raise ConfigError(f"checkpoint.every_minutes must be >= 0, got {self.every_minutes}")


@dataclasses.dataclass
class EvalConfig:
    every_steps: int = 0
    """Evaluate on data.val_urls every this many steps (0: only at the end; no data.val_urls: never)."""
    batch_size: int = 128
    """Per-rank evaluation batch."""

    def __post_init__(self):
        if self.every_steps < 0:
            raise ConfigError(f"eval.every_steps must be >= 0, got {self.every_steps}")
        if self.batch_size <= 0:
            raise ConfigError(f"eval.batch_size must be positive, got {self.batch_size}")


def _define_run_config() -> type:
    # The component configs live in their modules, which import ConfigError from here; importing
    # them at the top of this module would be circular, so RunConfig is built on first access.
    from pipeline.data import DataConfig
    from pipeline.losses import LossConfig
    from pipeline.models import ModelConfig

    # typing.get_type_hints resolves the (string) annotations in this module's namespace
    globals().update(DataConfig=DataConfig, LossConfig=LossConfig, ModelConfig=ModelConfig)

    @dataclasses.dataclass
    class RunConfig:
        """Everything one training run reads: a YAML file with these sections, plus overrides."""

        model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
        """Towers: see pipeline.models.ModelConfig."""
        loss: LossConfig = dataclasses.field(default_factory=LossConfig)
        """Contrastive loss: see pipeline.losses.LossConfig."""
        data: DataConfig = dataclasses.field(default_factory=DataConfig)
        """Streaming loader: see pipeline.data.DataConfig."""
        optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
        """Optimizer and learning-rate schedule."""
        train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
        """Steps, batch, precision, ZeRO stage, resume."""
        checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
        """Where and how often to checkpoint."""
        eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
        """Held-out evaluation."""

    RunConfig.__module__ = __name__
    RunConfig.__qualname__ = "RunConfig"
    return RunConfig


def __getattr__(name: str) -> Any:
    if name == "RunConfig":
        globals()["RunConfig"] = _define_run_config()
        return globals()["RunConfig"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
