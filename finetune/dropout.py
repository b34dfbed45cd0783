"""LoRA dropout with a cheaper random mask on the CPU.

peft applies `nn.Dropout(lora.dropout)` to the input of every adapted projection: seven masks per layer, as
large as the activations. On a CPU, torch draws such a mask with `bernoulli_`, one Mersenne-twister number per
element (about 7-9 ns each, one thread): in the default SmolLM2 run that was 1.8 of 18.5 CPU-seconds of a step,
the largest cost after matmul (bench/RESULTS.md, issue 16). Here one 64-bit draw from the same generator gives
four 16-bit lanes, and an element is kept when its lane is at or above a threshold: the same Bernoulli mask with
the drop probability rounded to a multiple of 1/65536 (0.05 -> 0.0500031), kept elements scaled by 1/(1 - p) of
that p so the expectation is exact, a bool mask saved for the backward pass as torch's dropout saves one. Seeded
by the same torch generator, so a run is as reproducible as before (its masks differ from torch's).

Only CPU training swaps it in (train.build_model): on a GPU torch's fused dropout kernel is already cheap. It has
no parameters and nothing of it is saved with the adapter, so merge and export do not see it.
"""

from __future__ import annotations

import math

import torch

LANES = 65536
"""A 16-bit lane takes this many values: the drop probability is a multiple of 1/LANES."""


class _MaskedScale(torch.autograd.Function):
    """x * keep / (1 - p) forward, grad * keep / (1 - p) backward, with keep a saved bool tensor."""

    @staticmethod
    def forward(ctx, x, keep, scale: float):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def keep_mask(shape, drop_lanes: int, device=None, generator=None) -> torch.Tensor:
    """A bool tensor of `shape`, each element False with probability drop_lanes / LANES, independently."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-2**63, None, generator=generator)  # all 64 bits uniform: four independent 16-bit lanes
    lanes = words.view(torch.int16)[:n].view(shape)
    return lanes >= drop_lanes - LANES // 2  # int16 lanes run from -32768: this many of the 65536 values drop


class LaneDropout(torch.nn.Module):
    """nn.Dropout's behaviour (identity in eval mode) with the lane mask above; p is rounded to a multiple of
    1/65536."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.drop_lanes = round(p * LANES)
        self.p = self.drop_lanes / LANES

    def forward(self, x):
        if not self.training or self.drop_lanes == 0:
            return x
        keep = keep_mask(x.shape, self.drop_lanes, device=x.device)
        return _MaskedScale.apply(x, keep, LANES / (LANES - self.drop_lanes))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_lane_dropout(model) -> int:
    """Replace peft's nn.Dropout in every LoRA layer's lora_dropout by LaneDropout of the same p (in place).
    Returns how many were replaced; p = 0 layers (nn.Identity in peft) are left alone."""
    count = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, drop in dropouts.items():
            if type(drop) is torch.nn.Dropout and drop.p > 0:
                lane = LaneDropout(drop.p)
                lane.train(drop.training)
                dropouts[name] = lane
                count += 1
    return count
