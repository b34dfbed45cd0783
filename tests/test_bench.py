"""bench/gpu.py --smoke: the GPU script runs end to end on the CPU (tiny shape, both arms) and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_bench_smoke(tmp_path):
    env = dict(os.environ, FINETUNE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("gpu-smoke-*.json")
    data = json.loads(result.read_text())
    arms = {r["arm"]: r for r in data["results"]}
    assert set(arms) == {"ours", "trl"}
    assert arms["ours"]["non_pad_fraction"] == 1.0  # packed, padding-free
    assert arms["trl"]["non_pad_fraction"] < 1.0  # padded batches
    for r in arms.values():
        assert r["real_tokens"] > 0 and r["real_tokens_per_s"] > 0 and r["steps"] == 2
    assert arms["ours"]["plan_peak_allocated_gib"] > 0
    assert data["machine"]["torch"] and data["command"].startswith("bench/gpu.py")
