"""Keep freed activation memory in the process during CPU training, instead of handing it back to the kernel.

A CPU training step allocates and frees the same activations every step: tensors of a few MB each (for SmolLM2 at
1024 tokens, [tokens, 1536] fp32 is 6 MB). glibc's malloc serves blocks above its mmap threshold (128 KiB, raised
on the fly up to the size of the largest block freed) with a fresh mmap and unmaps them on free, and it trims the
top of the heap back to the kernel once more than twice that is free. Every step then touches fresh pages again:
each first touch is a minor page fault that also zeroes the 4 KiB page. bench/RESULTS.md traced the 5% we lost
against TRL at equal settings to exactly this (6.9 M minor faults against 5.1 M), and a default SmolLM2 step
made ~2.9 M faults per two steps before this, ~1.7 M after (bench/step_variants.py, 2026-12-03).

`reuse_freed_memory()` raises glibc's mmap threshold to its maximum (32 MiB on 64-bit), which also fixes it (no
more dynamic adjustment), and the trim threshold and top pad so freed blocks stay in the heap for the next step:
the same effect as the MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ environment settings or jemalloc that CPU
training guides recommend, applied from inside the process through mallopt(3). Blocks above 32 MiB are still
mmapped. The cost: the process keeps its peak heap (already the training's high-water mark) until the context
ends, when the defaults come back and malloc_trim(0) returns the free memory. Not glibc (musl, macOS, Windows):
nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameter numbers from glibc's malloc.h
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD_MAX = 32 << 20
"""glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit (4 MiB x sizeof(long)); mallopt refuses a larger threshold."""
KEEP_FREE = 1 << 40
"""Trim threshold while training: more than any heap here, so nothing freed is returned to the kernel."""
TOP_PAD = 64 << 20
"""Grow the heap 64 MiB at a time (default 128 KiB): fewer brk calls while the first step finds its peak."""
DEFAULTS = {M_TRIM_THRESHOLD: 128 << 10, M_TOP_PAD: 128 << 10}
"""glibc's defaults, restored afterwards (the mmap threshold stays at the fixed 32 MiB: harmless, and glibc has no
way to turn the dynamic adjustment back on)."""


def _glibc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # only glibc has it (and mallopt's parameter numbers above)
        libc.mallopt, libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def reuse_freed_memory():
    """Within the block, freed memory up to 32 MiB a block stays in the process for reuse (glibc only)."""
    libc = _glibc()
    applied = libc is not None and all(libc.mallopt(k, v) == 1 for k, v in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, KEEP_FREE), (M_TOP_PAD, TOP_PAD)))
    if applied:
        log.info("CPU training: freed memory stays in the process for the next step (glibc mallopt; finetune/heap.py)")
    try:
        yield applied
    finally:
        if applied:
            for k, v in DEFAULTS.items():
                libc.mallopt(k, v)
            libc.malloc_trim(0)
