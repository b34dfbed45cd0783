"""What an optimizer step means when examples are packed.

Unpacked, an optimizer step holds `micro_batch_size x grad_accum` examples (per process), and an epoch has
`examples / that` steps. Packed naively -- TRL's `packing=True` fills max_length blocks and the micro-batch counts
blocks -- a step holds as many times more examples as fit in a block (issue 19 measured it on instruction data),
an epoch has that many times fewer updates, and the learning-rate schedule means something else (issue 19).

Here a packed step holds, on average, exactly the examples an unpacked one holds. We pack ourselves, into a
chosen *number* of blocks rather than into as few as possible: k blocks per optimizer step and
B = ceil(examples x k / examples_per_step) blocks, so an epoch has B / k steps = the unpacked count. Examples are
dealt longest-first into the least-filled block that still has room (LPT), which also evens out the tokens per
block; no block exceeds data.max_length, so the memory the planner counts is unchanged. k is the smallest
number of blocks per step for which the blocks stay at most ~90% full on average (fewest forward passes that
still pack well). The padding-free speed-up stays: blocks hold no padding, and attention stays inside each
example (the collator's position_ids restart at every example: `seq_lengths`).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import asdict, dataclass

FILL = 0.9
"""The mean fill of a block we aim at: fuller leaves longest-first dealing too little room for the last rows."""


@dataclass(frozen=True)
class StepShape:
    """How the trainer batches: what SFTConfig gets, and what a step means (for the summary and report.md)."""

    packed: bool
    block_length: int
    """The most tokens a row may hold (data.max_length)."""
    per_device: int
    """Rows per forward pass: packed blocks, or examples."""
    accum: int
    """Forward passes per optimizer step."""
    rows: int
    """Packed blocks, or examples (one epoch, all processes)."""
    examples: int
    steps_per_epoch: int
    unpacked_steps_per_epoch: int
    fill: float | None = None
    """Packed: the mean fraction of max_length a block holds (blocks carry no padding either way)."""

    @property
    def examples_per_step(self) -> float:
        return self.examples / self.steps_per_epoch if self.steps_per_epoch else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "examples_per_step": round(self.examples_per_step, 2)}


def step_shape(lengths: list[int], micro: int, accum: int, max_length: int, packing: bool, world: int = 1,
               blocks_per_forward: int = 1) -> StepShape:
    """The batching that keeps a step's meaning. `blocks_per_forward`: packed blocks one forward pass may hold
    (1 unless the attention kernel keeps packed blocks apart within a row, as flash-attention's varlen does)."""
    n = len(lengths)
    per_step = micro * accum * world
    unpacked = max(1, math.ceil(n / per_step))
    if not packing or n == 0:
        return StepShape(False, max_length, micro, accum, n, n, unpacked, unpacked)
    tokens = sum(min(x, max_length) for x in lengths)
    k = 1  # blocks per step per process: the fewest whose blocks are at most FILL full on average
    while k * world < per_step and tokens > FILL * max_length * _blocks(n, k * world, per_step):
        k += 1
    blocks = len(assign(lengths, _blocks(n, k * world, per_step), max_length))
    per_device = max(d for d in range(1, min(k, blocks_per_forward) + 1) if k % d == 0)
    steps = max(1, math.ceil(blocks / (k * world)))
    return StepShape(True, max_length, per_device, k // per_device, blocks, n, steps, unpacked,
                     round(tokens / (blocks * max_length), 4))


def _blocks(n: int, blocks_per_step: int, per_step: int) -> int:
    return max(1, math.ceil(n * blocks_per_step / per_step))


def assign(lengths: list[int], blocks: int, max_length: int) -> list[list[int]]:
    """Example indices of each block: longest first into the least-filled block with room (a new block when
    none has room). Deterministic: ties go to the lower index."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    heap = [(0, b) for b in range(blocks)]  # (tokens, block)
    members: list[list[int]] = [[] for _ in range(blocks)]
    for i in order:
        size = min(lengths[i], max_length)
        skipped = []
        while heap and heap[0][0] + size > max_length:
            skipped.append(heapq.heappop(heap))
        if heap:
            used, b = heapq.heappop(heap)
        else:
            used, b = 0, len(members)
            members.append([])
        members[b].append(i)
        heapq.heappush(heap, (used + size, b))
        for item in skipped:
            heapq.heappush(heap, item)
    return [m for m in members if m]


def pack(dataset, shape: StepShape):
    """The encoded dataset (input_ids, labels) as shape.rows padding-free blocks with `seq_lengths`, the column
    TRL's collator turns into position_ids that restart at every example."""
    import datasets
    import pyarrow.compute as pc

    lengths = pc.list_value_length(dataset.data.column("input_ids")).to_pylist()
    groups = assign(lengths, shape.rows, shape.block_length) if shape.packed else [[i] for i in range(len(lengths))]
    ids, labels = dataset["input_ids"], dataset["labels"]
    rows = {"input_ids": [], "labels": [], "seq_lengths": []}
    for group in groups:
        group = sorted(group)  # dataset order inside a block: reproducible, and no length sort leaks into it
        rows["input_ids"].append([t for i in group for t in ids[i][: shape.block_length]])
        rows["labels"].append([t for i in group for t in labels[i][: shape.block_length]])
        rows["seq_lengths"].append([min(lengths[i], shape.block_length) for i in group])
    return datasets.Dataset.from_dict(rows)


def packed_blocks(lengths: list[int], block_length: int) -> int:
    """How many blocks TRL's `pack_dataset(..., strategy="bfd")` makes of rows with these token counts (what
    `packing=True` in TRL alone would train on; the naive baseline the docs and benches compare with)."""
    import datasets
    import numpy as np
    import pyarrow as pa
    from trl.data_utils import pack_dataset

    lengths = [n for n in lengths if n > 0]
    if not lengths:
        return 0
    # Only the lengths matter: one-byte dummy tokens, so this costs one byte per token, not a Python list.
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    column = pa.LargeListArray.from_arrays(offsets, pa.array(np.zeros(int(offsets[-1]), dtype=np.int8)))
    rows = datasets.Dataset(datasets.table.InMemoryTable(pa.table({"input_ids": column})))
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return len(pack_dataset(rows, block_length, strategy="bfd"))
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def shape_for(recipe, train_dataset, attn_implementation: str | None = None) -> StepShape:
    """The step shape of a recipe on its encoded training set (world size from the launcher's environment)."""
    import os

    import pyarrow.compute as pc

    t, d = recipe.train, recipe.data
    lengths = pc.list_value_length(train_dataset.data.column("input_ids")).to_pylist()
    attn = attn_implementation or recipe.model.attn_implementation
    # sdpa/eager attend over a whole row: one packed block per forward pass keeps attention inside each block.
    blocks_per_forward = t.micro_batch_size if attn == "flash_attention_2" else 1
    return step_shape(lengths, t.micro_batch_size, t.grad_accum, d.max_length, d.packing,
                      int(os.environ.get("WORLD_SIZE", "1")), blocks_per_forward)
