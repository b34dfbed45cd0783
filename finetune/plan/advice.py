"""What to change when a run does not fit: the cheapest changes first, each applied on top of the ones before,
each line with the total it gives, until one fits."""

from __future__ import annotations

import math
from dataclasses import replace

from finetune.plan.byte_model import Setup
from finetune.plan.parts import total_bytes
from finetune.plan.shapes import Shape
from finetune.plan.sizes import fmt


class _Search:
    """The setup as changed so far, the changes, and the advice lines that name them."""

    def __init__(self, shape: Shape, setup: Setup, memory: int):
        self.shape, self.setup, self.memory = shape, setup, memory
        self.lines: list[str] = []
        self.changes: dict = {}

    def total(self, **changes) -> int:
        return total_bytes(self.shape, replace(self.setup, **changes))

    def fits(self, **changes) -> bool:
        return self.total(**changes) <= self.memory

    def propose(self, text: str, per: str = "", **changes) -> bool:
        """Advise these changes on top of the ones before; True when that makes the run fit."""
        self.lines.append(f"{text}: {fmt(self.total(**changes))}{per}")
        self.setup = replace(self.setup, **changes)
        self.changes.update(changes)
        return self.fits()


def advise(shape: Shape, setup: Setup, gpu_memory: int) -> tuple[list[str], dict | None]:
    """(advice lines, the Setup fields they change): the changes make the run fit, or are None when nothing
    short of a smaller model does."""
    search = _Search(shape, setup, gpu_memory)
    for step in (_checkpointing, _eight_bit_optimizer, _micro_batch, _sequence_length, _offload, _more_gpus):
        if step(search):
            return search.lines, search.changes
    search.lines.append("it does not fit even sharded over 8 GPUs with CPU offload; use a smaller model")
    return search.lines, None


def _checkpointing(s: _Search) -> bool:
    if s.setup.gradient_checkpointing:
        return False
    return s.propose("turn on gradient checkpointing (train.gradient_checkpointing: true)", gradient_checkpointing=True)


def _eight_bit_optimizer(s: _Search) -> bool:
    if s.setup.optimizer not in ("adamw_torch", "paged_adamw_32bit", "adamw_torch_fused") or s.setup.device != "cuda":
        return False
    return s.propose("use the paged 8-bit optimizer (train.optimizer: paged_adamw_8bit)", optimizer="paged_adamw_8bit")


def _micro_batch(s: _Search) -> bool:
    for b in range(s.setup.batch - 1, 0, -1):
        if s.fits(batch=b):
            accum = math.ceil(s.setup.batch / b)
            return s.propose(f"lower train.micro_batch_size to {b} (raise train.grad_accum x{accum} to keep the "
                             f"effective batch)", batch=b)
    return False


def _sequence_length(s: _Search) -> bool:
    """Micro-batch 1 and the longest max_length (a multiple of 16) that fits, by bisection."""
    lo, hi = 16, s.setup.seq_len
    if not s.fits(batch=1, seq_len=lo):
        return False
    while hi - lo > 16:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if s.fits(batch=1, seq_len=mid) else (lo, mid)
    seq = lo // 16 * 16
    return s.propose(f"micro_batch_size 1 and data.max_length {seq}", batch=1, seq_len=seq)


def _offload(s: _Search) -> bool:
    if s.setup.sharding not in ("fsdp", "zero3"):
        return False
    sharding = s.setup.sharding + "_offload"
    return s.fits(sharding=sharding) and s.propose(
        f"offload parameters and optimizer state to CPU RAM ({sharding}; fsdp_offload_params: true in "
        f"recipes/accelerate/fsdp_qlora.yaml, with train.optimizer: adamw_torch)", sharding=sharding)


def _more_gpus(s: _Search) -> bool:
    for n in (2, 4, 8):
        for sharding in ("fsdp", "fsdp_offload"):
            if s.fits(num_processes=n, sharding=sharding):
                offload = " with fsdp_offload_params: true" if sharding.endswith("offload") else ""
                return s.propose(f"shard over {n} GPUs ({sharding}, recipes/accelerate/fsdp_qlora.yaml{offload})",
                                 per=" per GPU", num_processes=n, sharding=sharding)
    return False
