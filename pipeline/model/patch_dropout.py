"""FLIP's patch dropout, with masks that depend only on a sample's place in its step (`PatchDropout`).

    rows = patch_dropout_rows(model)     # once per step
    rows.place(first_row); model(...)    # before each forward of the step
"""

from __future__ import annotations

import torch
from torch import nn

_LOW32 = 0xFFFFFFFF


def _mix32(x):
    """A bijective integer hash of values in [0, 2**32) (xor-shift-multiply), for int64 tensors and Python
    ints alike; the multiplier is below 2**27, so no product leaves int64 on any device."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _LOW32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _LOW32
    return (x >> 16) ^ x


class PatchDropout(nn.Module):
    """FLIP's patch dropout whose mask of a sample depends only on (step seed, the sample's row in the step).

    Ours rather than open_clip's PatchDropout: that one draws one random matrix for the micro-batch from
    torch's global RNG, so a sample's mask depends on how the step's batch is cut into micro-batches and on
    every draw before it. Here the score of patch j of the sample in row r is a counter-based hash of
    (seed, r, j), computed on the device in one pass; the top `keep` scores are kept, in patch order. The
    class token (the first `num_prefix_tokens` tokens) is always kept. The trainer says where the rows of
    the next forward sit with `place(seed, first_row)` (see `patch_dropout_rows`), once per forward; a
    forward that was not placed draws a fresh seed from torch's RNG and numbers its rows from 0, as any
    dropout would. Evaluation (`eval()`) keeps every patch.
    """

    def __init__(self, prob: float, num_prefix_tokens: int = 1):
        super().__init__()
        if not 0 <= prob < 1:
            raise ValueError(f"patch dropout probability must be in [0, 1), got {prob}")
        self.prob, self.num_prefix_tokens = prob, num_prefix_tokens
        self._placement: tuple[int, int] | None = None

    def place(self, seed: int, first_row: int) -> None:
        """The rows of the next forward are rows first_row, first_row + 1, ... of the step seeded `seed`."""
        self._placement = (int(seed) & _LOW32, int(first_row))

    def keep_indices(self, rows: int, patches: int, seed: int, first_row: int, device) -> torch.Tensor:
        """Long[rows, keep]: the patches (0-based, after the prefix tokens) each row keeps, ascending."""
        keep = max(1, int(patches * (1 - self.prob)))
        # the seed's hash is a Python int: a kernel argument, no copy to the device
        row_ids = (torch.arange(first_row, first_row + rows, device=device) & _LOW32) ^ _mix32(seed & _LOW32)
        patch_ids = torch.arange(patches, device=device)
        scores = _mix32(_mix32(row_ids)[:, None] ^ (patch_ids * 0x9E3779B1 & _LOW32))
        # scores * patches + j: every score distinct, so the top-k (and the mask) never depends on tie-breaking
        chosen = (scores * patches + patch_ids).topk(keep, dim=1).indices
        return chosen.sort(dim=1).values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        placement, self._placement = self._placement, None
        if not self.training or self.prob == 0:
            return x
        seed, first_row = placement if placement is not None else (int(torch.randint(0, 2**31, (1,))), 0)
        prefix, patches = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        kept = self.keep_indices(x.shape[0], patches.shape[1], seed, first_row, x.device)
        patches = patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return torch.cat([prefix, patches], dim=1)

    def extra_repr(self) -> str:
        return f"prob={self.prob}"


class PatchDropoutRows:
    """Where the rows of a model's next forward sit in the step's batch, for its PatchDropout modules.

        rows = patch_dropout_rows(model)     # once per step: the step's seed, from torch's RNG
        rows.place(first_row); model(...)    # before each forward of the step (each micro-batch, each pass)
    """

    def __init__(self, modules: list[PatchDropout], seed: int):
        self.modules, self.seed = modules, seed

    def place(self, first_row: int) -> None:
        for module in self.modules:
            module.place(self.seed, first_row)


def patch_dropout_rows(model: nn.Module) -> PatchDropoutRows:
    """A step's `PatchDropoutRows` for `model`. The seed is drawn from torch's RNG only when the model drops
    patches, so runs without patch dropout keep their random stream."""
    modules = [module for module in model.modules() if isinstance(module, PatchDropout) and module.prob > 0]
    seed = int(torch.randint(0, 2**31, (1,))) if modules else 0
    return PatchDropoutRows(modules, seed)
