"""LiT (model.lock_image, model.lock_text): locked towers from a pretrained state dict saved in the test.

- the trainable parameters are exactly those open_clip's `lock_image_tower` / `lock_text_tower` leave
  trainable, for every number of unlocked groups; bad settings name the key;
- a fully locked tower runs its forward without autograd: no graph, and fewer bytes saved for backward;
  a partly unlocked tower under gradient checkpointing still gets the gradients of an unchecked one;
- the optimizer holds only trainable parameters;
- on 2 gloo ranks at ZeRO 0, 1, 2 and 3 (GradCache, 2 micro-batches; image tower locked, text tower
  locked but its projection): the optimizer's state covers only the trainable parameters, the gradient
  reductions DeepSpeed makes carry only their elements, the frozen weights stay bit-identical to the
  checkpoint after the steps, and the loss goes down.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.core.errors import ConfigError
from pipeline.model.build import build_model
from pipeline.model.config import ModelConfig
from pipeline.parallel.checkpointing import apply_activation_checkpointing
from tests.distributed_helpers import run_ranks


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """A tiny-clip state dict in open_clip's format, as `model.pretrained` takes it."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("lit") / "tiny-clip.pt"
    torch.save(build_model(ModelConfig(name="tiny-clip")).open_clip_state_dict(), path)
    return str(path)


def _trainable(model: torch.nn.Module, prefix: str = "") -> set[str]:
    return {prefix + name for name, parameter in model.named_parameters() if parameter.requires_grad}


@pytest.mark.parametrize("groups", [0, 1, 2, 3])
def test_image_lock_leaves_open_clips_groups_trainable(groups, pretrained):
    import open_clip

    ours = build_model(ModelConfig(name="tiny-clip", pretrained=pretrained, lock_image=True,
                                   lock_image_unlocked_groups=groups))
    theirs = open_clip.create_model("tiny-clip", pretrained=pretrained)
    theirs.lock_image_tower(unlocked_groups=groups)
    assert _trainable(ours) == _trainable(theirs, "clip.")
    assert ours.media_locked == (groups == 0) and not ours.text_locked
    assert (groups == 0) == (not _trainable(ours.clip.visual))
    saved = torch.load(pretrained, weights_only=True)
    for name, parameter in ours.clip.visual.named_parameters():
        assert torch.equal(parameter, saved[f"visual.{name}"]), f"{name}: not the checkpoint's weights"


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_text_lock_leaves_open_clips_layers_trainable(layers, pretrained):
    import open_clip

    ours = build_model(ModelConfig(name="tiny-clip", pretrained=pretrained, lock_text=True,
                                   lock_text_unlocked_layers=layers))
    theirs = open_clip.create_model("tiny-clip", pretrained=pretrained)
    theirs.lock_text_tower(unlocked_layers=layers)
    assert _trainable(ours) == _trainable(theirs, "clip.")
    assert ours.text_locked == (layers == 0) and not ours.media_locked


@pytest.mark.parametrize("values, message", [
    ({"lock_image_unlocked_groups": 1}, "model.lock_image_unlocked_groups=1 only applies with model.lock_image"),
    ({"lock_text_unlocked_layers": 2}, "model.lock_text_unlocked_layers=2 only applies with model.lock_text"),
    ({"lock_image": True, "lock_image_unlocked_groups": -1}, "model.lock_image_unlocked_groups must be >= 0"),
    ({"lock_image_freeze_bn_stats": True}, "model.lock_image_freeze_bn_stats only applies"),
    ({"name": "tiny-clap", "modality": "audio", "lock_image": True}, "model.lock_image: tiny-clap is an audio"),
])
def test_bad_lock_settings_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**values)


def test_unlocking_every_group_is_refused():
    with pytest.raises(ConfigError, match="model.lock_image_unlocked_groups=9 unlocks the whole image tower"):
        build_model(ModelConfig(name="tiny-clip", lock_image=True, lock_image_unlocked_groups=9))
    with pytest.raises(ConfigError, match="model.lock_text_unlocked_layers=9 unlocks the whole text tower"):
        build_model(ModelConfig(name="tiny-clip", lock_text=True, lock_text_unlocked_layers=9))


def _inputs(count: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    pixels = torch.randint(0, 256, (count, 3, 64, 64), dtype=torch.uint8, generator=generator)
    return pixels, torch.randint(1, 49000, (count, 32), generator=generator)


def _saved_bytes(model: torch.nn.Module) -> tuple[dict, int]:
    """The model's outputs and the bytes autograd saved for backward during its forward."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = model(*_inputs())
    return outputs, sum(saved)


def test_a_locked_tower_runs_without_autograd(pretrained):
    locked = build_model(ModelConfig(name="tiny-clip", pretrained=pretrained, lock_image=True)).train()
    trainable = build_model(ModelConfig(name="tiny-clip", pretrained=pretrained)).train()
    locked_outputs, locked_bytes = _saved_bytes(locked)
    outputs, all_bytes = _saved_bytes(trainable)
    assert locked_outputs["media_features"].grad_fn is None and not locked_outputs["media_features"].requires_grad
    assert locked_outputs["text_features"].grad_fn is not None
    assert torch.allclose(locked_outputs["media_features"], outputs["media_features"])
    assert locked_bytes < 0.75 * all_bytes, (locked_bytes, all_bytes)
    # a partly unlocked tower keeps its graph
    partly = build_model(ModelConfig(name="tiny-clip", pretrained=pretrained, lock_image=True,
                                     lock_image_unlocked_groups=1))
    assert partly(*_inputs())["media_features"].grad_fn is not None


def test_partly_unlocked_tower_under_checkpointing_gets_the_unchecked_gradients(pretrained):
    def gradients(grad_checkpointing: bool) -> dict[str, torch.Tensor]:
        model = build_model(ModelConfig(name="tiny-clip", pretrained=pretrained, lock_image=True,
                                        lock_image_unlocked_groups=2, lock_text=True, lock_text_unlocked_layers=2,
                                        grad_checkpointing=grad_checkpointing))
        apply_activation_checkpointing(model, grad_checkpointing)  # as build_engine_for does
        outputs = model(*_inputs())
        (outputs["media_features"] @ outputs["text_features"].T).logsumexp(dim=1).sum().backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    last_block = "clip.visual.transformer.resblocks.1.mlp.c_fc.weight"
    assert last_block in plain and plain[last_block].abs().sum() > 0
    for name, grad in plain.items():
        if grad is None:  # the temperature: not in this loss
            assert checkpointed[name] is None, name
            continue
        assert checkpointed[name] is not None, f"{name}: no gradient under checkpointing"
        assert torch.allclose(checkpointed[name], grad, rtol=1e-5, atol=1e-7), name


def test_the_optimizer_holds_only_trainable_parameters(pretrained):
    from pipeline.optim import OptimConfig, build_optimizer

    model = build_model(ModelConfig(name="tiny-clip", pretrained=pretrained, lock_image=True, lock_text=True,
                                    lock_text_unlocked_layers=1))
    optimizer = build_optimizer(model, OptimConfig())
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = {id(p): name for name, p in model.named_parameters()}
    assert {names[i] for i in held} == {"clip.text_projection", "clip.logit_scale"}
    assert all(group["params"] for group in optimizer.param_groups), "no empty group (ZeRO cannot flatten one)"


# -- 2 gloo ranks, ZeRO 0-3 ------------------------------------------------------------------------
REDUCTIONS = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor")


class ReductionCounter:
    """Elements DeepSpeed sends through its reduction collectives while active (its comm backend's
    all_reduce, reduce, reduce_scatter, ... wrapped on the backend instance)."""

    def __init__(self):
        import deepspeed.comm.comm as ds_comm

        self.backend, self.elements, self.active = ds_comm.cdb, 0, False
        for name in REDUCTIONS:
            if hasattr(self.backend, name):
                setattr(self.backend, name, self._wrap(name, getattr(self.backend, name)))

    def _wrap(self, name: str, original):
        def counted(*args, **kwargs):
            if self.active:
                # reduce_scatter*(output, input): the input is reduced; the others: their first argument
                position = 1 if name.startswith("reduce_scatter") else 0
                keyword = next((key for key in ("input_tensor", "input_list", "tensor", "tensors") if key in kwargs), None)
                reduced = kwargs[keyword] if keyword else args[position]
                items = reduced if isinstance(reduced, (list, tuple)) else [reduced]
                self.elements += sum(t.numel() for t in items if isinstance(t, torch.Tensor))
            return original(*args, **kwargs)
        return counted


def _lit_steps(rank: int, world_size: int, pretrained: str, zero_stage: int) -> dict:
    from deepspeed import zero

    from pipeline.data.config import Batch
    from pipeline.loss import LossConfig, build_loss
    from pipeline.optim import OptimConfig, build_optimizer
    from pipeline.parallel import distributed, parallelize
    from pipeline.train.step import backward_step

    distributed.init_distributed(120)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny-clip", pretrained=pretrained, lock_image=True, lock_text=True,
                                    lock_text_unlocked_layers=1))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    accum, micro = 2, 4
    ds_config = parallelize.deepspeed_config(
        micro_batch_size=micro, accum_steps=accum, world_size=world_size, zero_stage=zero_stage,
        precision="fp32", grad_clip=1.0, log_every=1,
    )
    optimizer = build_optimizer(model, OptimConfig(lr=2e-2, warmup_steps=0, weight_decay=0.0))
    engine = parallelize.build_engine(model, optimizer, None, ds_config)
    counter = ReductionCounter()
    engine_backward, engine_step = engine.backward, engine.step

    def counted(method):
        def call(*args, **kwargs):
            counter.active = True
            try:
                return method(*args, **kwargs)
            finally:
                counter.active = False
        return call

    engine.backward, engine.step = counted(engine_backward), counted(engine_step)
    loss_fn = build_loss(LossConfig(), rank, world_size)
    generator = torch.Generator().manual_seed(100 + rank)
    pixels = torch.randint(0, 256, (accum * micro, 3, 64, 64), dtype=torch.uint8, generator=generator)
    tokens = torch.randint(1, 49000, (accum * micro, 32), generator=generator)
    batches = [Batch(pixels[i * micro:(i + 1) * micro], tokens[i * micro:(i + 1) * micro],
                     [str(k) for k in range(micro)], torch.full((micro,), -1)) for i in range(accum)]
    losses, steps = [], 6
    for _ in range(steps):  # the same batch every step: a locked model must still fit it
        loss, _ = backward_step(engine, loss_fn, batches, torch.device("cpu"))
        parallelize.clip_gradients(engine, 1.0)
        engine.step()
        losses.append(float(loss))
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO 1-3 wrap the torch optimizer
    state = sum(value.numel() for entry in base.state.values() for key, value in entry.items() if key == "exp_avg")
    unchanged = {}
    for name, parameter in engine.module.named_parameters():
        if name in frozen:
            with zero.GatheredParameters([parameter], enabled=zero_stage == 3):
                unchanged[name] = torch.equal(parameter.detach().cpu(), frozen[name])
    return {"losses": losses, "state": state, "trainable": trainable,
            "frozen": sum(t.numel() for t in frozen.values()), "unchanged": unchanged,
            "reduced_per_step": counter.elements / steps}


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_lit_trains_only_what_is_unlocked(zero_stage, pretrained):
    results = run_ranks(_lit_steps, 2, pretrained, zero_stage, timeout=300)
    trainable, frozen = results[0]["trainable"], results[0]["frozen"]
    assert frozen > 100 * trainable  # tiny-clip: both towers but the text projection (and the temperature)
    # ZeRO-0 keeps the whole state on each rank; ZeRO 1-3 partition it over the ranks (with some padding)
    state = results[0]["state"] if zero_stage == 0 else sum(result["state"] for result in results)
    assert trainable <= state <= trainable + 64 * 2, (state, trainable)
    for rank, result in enumerate(results):
        assert all(result["unchanged"].values()) and len(result["unchanged"]) > 50, rank
        assert result["losses"][-1] < result["losses"][0] - 0.05, result["losses"]
        # DeepSpeed reduces the trainable gradients once a step at ZeRO 0-1 (at the accumulation boundary) and
        # on each of the 2 backward passes at ZeRO 2-3, plus a scalar or two (the gradient norm); frozen
        # gradients would add millions of elements
        reduced, passes = result["reduced_per_step"], 1 if zero_stage < 2 else 2
        print(f"ZeRO-{zero_stage} rank {rank}: {reduced:.0f} elements reduced per step; trainable {trainable}, "
              f"frozen {frozen}; losses {[round(x, 3) for x in result['losses']]}")
        assert passes * trainable <= reduced <= passes * trainable + 8, reduced
