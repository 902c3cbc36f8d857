"""Activation checkpointing is applied from outside the model (pipeline.parallel.checkpointing), never by it:
a freshly built model runs every block plainly whatever model.grad_checkpointing says, and
`apply_activation_checkpointing` switches every transformer stack and ResNet stage of both towers."""

from __future__ import annotations

import pytest
import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import CustomTransformer, Transformer

from pipeline.core.errors import ConfigError
from pipeline.media.audio import AudioConfig
from pipeline.model.build import build_model
from pipeline.model.config import ModelConfig
from pipeline.parallel.checkpointing import activation_checkpointing_on, apply_activation_checkpointing

TONES_AUDIO = AudioConfig(sample_rate=16000, clip_seconds=2.0, n_mels=32, n_fft=512, hop_length=160, f_max=8000.0)
CONFIGS = {
    "tiny-clip": ModelConfig(name="tiny-clip", grad_checkpointing=True),  # two open_clip transformers
    "demo-clip": ModelConfig(name="demo-clip", grad_checkpointing=True),  # a ResNet image tower
    "tiny-clap": ModelConfig(name="tiny-clap", modality="audio", audio=TONES_AUDIO, grad_checkpointing=True),
}


def _stages(model: torch.nn.Module) -> list[torch.nn.Module]:
    """What checkpointing wraps: each open_clip transformer stack, each stage of a ResNet tower."""
    stages = []
    for module in model.modules():
        if isinstance(module, (Transformer, CustomTransformer)):
            stages.append(module)
        elif isinstance(module, ModifiedResNet):
            stages += [getattr(module, f"layer{i}") for i in range(1, 5)]
    return stages


def _wrapped(model: torch.nn.Module) -> list[bool]:
    # the mechanism: an instance `forward` shadowing the class's; open_clip's own flag stays off
    return ["forward" in stage.__dict__ for stage in _stages(model)]


@pytest.mark.parametrize("name", CONFIGS)
def test_a_built_model_has_no_checkpointing_and_the_parallel_layer_turns_it_on(name):
    model = build_model(CONFIGS[name])
    stages = _stages(model)
    assert len(stages) >= 2
    assert not hasattr(model, "set_grad_checkpointing") and not hasattr(model, "grad_checkpointing")
    assert not any(_wrapped(model)) and not activation_checkpointing_on(model)
    assert not any(getattr(m, "grad_checkpointing", False) for m in model.modules())
    keys = list(model.state_dict())

    switched = apply_activation_checkpointing(model, True)
    assert switched == sum(isinstance(m, (Transformer, CustomTransformer, ModifiedResNet)) for m in model.modules())
    assert all(_wrapped(model)) and activation_checkpointing_on(model)
    assert not any(getattr(m, "grad_checkpointing", False) for m in model.modules())  # never open_clip's own path
    assert list(model.state_dict()) == keys

    apply_activation_checkpointing(model, False)
    assert not any(_wrapped(model)) and not activation_checkpointing_on(model)


def test_a_model_without_two_stacks_is_refused():
    with pytest.raises(ConfigError, match="model.grad_checkpointing: found 0 transformer stacks"):
        apply_activation_checkpointing(torch.nn.Linear(2, 2), True)
    assert apply_activation_checkpointing(torch.nn.Linear(2, 2), False) == 0  # off: nothing to check
