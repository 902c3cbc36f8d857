"""The run configuration: `RunConfig` composed of every component's section, and the training section.

    cfg = load_config(RunConfig, "configs/demo-clip.yaml", ["optim.lr=1e-3", "train.global_batch_size=256"])

The sections live with their components in the layers below (`ModelConfig` in pipeline/model/config.py,
`DataConfig` in pipeline/data/config.py, `LossConfig` in pipeline/loss.py, `OptimConfig` in pipeline/optim.py,
`CheckpointConfig` in pipeline/checkpoint/manager.py, `EvalConfig` in pipeline/eval/evaluate.py); this module composes them and owns `TrainConfig`, which only the
train loop reads. Filling, validating and dumping are pipeline.core.args.
"""

from __future__ import annotations

import dataclasses

from pipeline.checkpoint.manager import CheckpointConfig
from pipeline.core.args import dump_config, load_config, to_dict  # noqa: F401  (the config API, with RunConfig)
from pipeline.core.errors import ConfigError
from pipeline.data.config import DataConfig
from pipeline.eval.evaluate import EvalConfig
from pipeline.loss import LossConfig
from pipeline.model.config import ModelConfig
from pipeline.optim import OptimConfig
from pipeline.parallel.parallelize import check_precision_name


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
    tf32: bool = True
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores (as open_clip's trainer does): the
    fp32 logits of the loss, which dominate the step at very large contrastive batches, run several times
    faster; false keeps full fp32 there."""
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
class RunConfig:
    """Everything one training run reads: a YAML file with these sections, plus overrides."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Towers: see pipeline.model.config.ModelConfig."""
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    """Contrastive loss: see pipeline.loss.LossConfig."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Streaming loader: see pipeline.data.dataset.DataConfig."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule: see pipeline.optim.OptimConfig."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """Steps, batch, precision, ZeRO stage, resume."""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """Where and how often to checkpoint: see pipeline.checkpoint.manager.CheckpointConfig."""
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    """Held-out evaluation: see pipeline.eval.evaluate.EvalConfig."""
