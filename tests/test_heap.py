"""finetune/heap.py: freed activation-sized blocks stay in the process, measured by the kernel's own count of
minor page faults (getrusage) in fresh processes, one with glibc's defaults and one inside reuse_freed_memory()."""

from __future__ import annotations

import subprocess
import sys

import pytest

from finetune import heap

PROBE = """
import contextlib, resource, sys
import torch
from finetune.heap import reuse_freed_memory

def step():  # a step's activations: 20 tensors of 6 MiB, written, then all freed
    xs = [torch.ones(1536 * 1024) for _ in range(20)]
    del xs

with (reuse_freed_memory() if sys.argv[1] == "reuse" else contextlib.nullcontext()):
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(heap._glibc() is None, reason="mallopt is glibc's")
def test_freed_blocks_are_reused_without_page_faults():
    default, reuse = _faults("default"), _faults("reuse")
    # 10 steps touch 10 x 120 MiB = 307k pages; glibc's defaults fault on a share of them every step
    assert reuse < default / 2, (default, reuse)
