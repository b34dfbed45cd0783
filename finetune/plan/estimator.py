"""A Plan: the parts of a setup's peak memory on a shape, whether it fits, and if not what to change."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from finetune.plan.advice import advise
from finetune.plan.byte_model import Setup
from finetune.plan.parts import Part, held_per_rank, plan_parts
from finetune.plan.shapes import Shape


@dataclass
class Plan:
    shape: Shape
    shape_source: str
    setup: Setup
    parts: list[Part]
    gpu_memory: int | None
    advice: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Decisions the plan made for the recipe (e.g. gradient checkpointing: auto)."""
    paged: int = 0
    """Bytes of paged optimizer state (CUDA unified memory): needed on the GPU, invisible to the allocator."""
    advised_changes: dict | None = None
    """The Setup fields the advice changes, when those changes make the run fit."""
    held_per_rank: dict = field(default_factory=dict)
    """The parameter bytes one process holds (parts.held_per_rank), comparable to manifest.json's distributed
    section."""

    def part(self, key: str) -> int:
        return sum(p.bytes for p in self.parts if p.key == key)

    @property
    def peak_allocated(self) -> int:
        """Comparable to torch.cuda.max_memory_allocated: everything but the overhead and paged memory."""
        return sum(p.bytes for p in self.parts if p.key != "overhead") - self.paged

    @property
    def total(self) -> int:
        return sum(p.bytes for p in self.parts)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total <= self.gpu_memory

    def to_dict(self) -> dict:
        return {"shape": asdict(self.shape), "shape_source": self.shape_source, "setup": asdict(self.setup),
                "parts": [asdict(p) for p in self.parts], "peak_allocated_bytes": self.peak_allocated,
                "paged_bytes": self.paged, "total_bytes": self.total, "gpu_memory_bytes": self.gpu_memory,
                "fits": self.fits, "advice": self.advice, "advised_changes": self.advised_changes,
                "notes": self.notes, "held_per_rank": self.held_per_rank}


def estimate(shape: Shape, setup: Setup, gpu_memory: int | None = None, source: str = "") -> Plan:
    """The plan of `setup` on `shape`; given the memory of one GPU (or process), whether it fits there and,
    if it does not, what to change."""
    parts, paged = plan_parts(shape, setup)
    plan = Plan(shape, source, setup, parts, gpu_memory, paged=paged, held_per_rank=held_per_rank(shape, setup))
    if gpu_memory is not None and not plan.fits:
        plan.advice, plan.advised_changes = advise(shape, setup, gpu_memory)
    return plan
