"""A tiny NF4 run, trained and merged once per test session, for the merge and export tests.

Built so that those tests can fail:
- the base has heavy-tailed weights, so NF4's quantisation error is large and merging into the original
  16-bit weights (instead of the dequantized NF4 ones) shows clearly in the fidelity report;
- after training, the LoRA B matrices are perturbed (as peft's own merge tests initialise LoRA to
  non-identity), so the adapter moves the model far more than any rounding could.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

SYSTEM_PROMPT = "You answer briefly."


def outlier_base(src: Path, dst: Path) -> Path:
    """Copy the tiny model with 1% of each matrix's entries made 12x larger: each outlier sets its NF4 block's
    absmax, so every other weight in that block is quantised coarsely."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                mask = torch.rand(p.shape, generator=g) < 0.01
                p[mask] *= 12
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def perturb_lora_b(adapter_dir: Path, scale: float = 0.1, seed: int = 0) -> None:
    """Make the adapter clearly non-identity (trained LoRA B starts at zero and moves little in 4 steps)."""
    from safetensors.torch import load_file, save_file

    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    g = torch.Generator().manual_seed(seed)
    for k, v in tensors.items():
        if "lora_B" in k:
            tensors[k] = v + scale * torch.randn(v.shape, generator=g)
    save_file(tensors, path, metadata={"format": "pt"})
    reseal_adapter(adapter_dir)


def reseal_adapter(adapter_dir: Path) -> None:
    """Record a deliberately edited adapter's files in its completion marker, as train does when it writes one
    (without this, merge/eval/export rightly refuse the edited file as damaged)."""
    from finetune import rundir

    rundir.write_json(adapter_dir / rundir.MARKER, rundir.adapter_marker_body(adapter_dir))


def build_merged_run(tmp: Path, tiny_model_dir: Path) -> tuple[Path, Path]:
    """(run directory with adapter/ and merged/, the base model directory)."""
    from conftest import make_recipe
    from finetune.merge import merge_run
    from finetune.recipe import load_recipe
    from finetune.train import train

    with one_thread():
        base = outlier_base(tiny_model_dir, tmp / "base")
        path = make_recipe(tmp, base, data={"held_out": 4, "system_prompt": SYSTEM_PROMPT})
        run = train(load_recipe(path), path)
        perturb_lora_b(run / "adapter")
        merge_run(run)
    return run, base


@contextlib.contextmanager
def one_thread():
    """One intra-op thread: on the tiny model every op is tiny, and on a busy 2-core machine each OpenMP
    parallel region waits for a descheduled second thread (a merge measured 0.4 s with one thread, 10-50 s
    with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
