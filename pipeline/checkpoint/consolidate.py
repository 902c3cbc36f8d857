"""The weights of a checkpoint as one fp32 state dict, from any ZeRO stage: what the `export` and `eval`
commands read (pipeline.commands.runs.load_model_from_run).

DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint` does the work for ZeRO 1-3; it does not read a
ZeRO-0 checkpoint (no optimizer partitions), whose weights are whole in rank 0's model-states file: that
case is ours.
"""

from __future__ import annotations

from pathlib import Path

import torch


def consolidated_state_dict(checkpoint_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a (local) DeepSpeed checkpoint, from any ZeRO stage."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = Path(checkpoint_dir) / tag
    if list(tag_dir.glob("*optim_states.pt")) and any("zero" in p.name for p in tag_dir.iterdir()):
        state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
    else:
        # ZeRO-0: the module's weights are whole in rank 0's model-states file
        model_states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not model_states:
            raise FileNotFoundError(f"no DeepSpeed model states in '{tag_dir}'")
        state = torch.load(model_states[0], map_location="cpu", weights_only=False)["module"]
    return {name: tensor.float() for name, tensor in state.items()}
