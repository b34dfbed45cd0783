"""`accelerate launch --num_processes 2 --cpu -m finetune train RECIPE`: two CPU ranks (DDP on gloo) on the
tiny fixture. Only rank 0 writes the run directory, the ranks train on disjoint shards, the adapter is normal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import make_recipe
from per_rank import assert_per_rank, plan_with_config

ROWS = [{"instruction": f"what is item {i}", "input": "", "output": f"answer {i}"} for i in range(32)]
"""32 distinct rows: 4 steps x micro-batch 4 x 2 ranks is exactly one epoch, so no row may be seen twice."""


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("ddp")
    # Unpacked, so that what each rank collates is one row (packed, it would be blocks of rows).
    recipe = make_recipe(tmp, tiny_model_dir, rows=ROWS, data={"packing": False},
                         train={"max_steps": 4, "micro_batch_size": 4, "grad_accum": 1, "save_steps": 2,
                                "learning_rate": 5e-3, "report_to": ["none"], "gradient_checkpointing": False})
    env = dict(os.environ, FINETUNE_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1")
    accelerate = shutil.which("accelerate") or f"{sys.executable} -m accelerate.commands.launch"
    cmd = [*accelerate.split(), *(["launch"] if accelerate.endswith("accelerate") else []), "--num_processes", "2", "--cpu",
           "--main_process_port", "29517", "-m", "finetune", "train", str(recipe)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run", proc


def test_two_ranks_on_gloo_with_disjoint_shards(ddp_run):
    run, _ = ddp_run
    d = json.loads((run / "manifest.json").read_text())["distributed"]
    assert (d["world_size"], d["backend"]) == (2, "gloo")
    assert d["examples_per_rank"] == [16, 16] and d["distinct_per_rank"] == [16, 16]
    assert d["examples_seen_by_every_rank"] == 0
    assert d["rank_fingerprints"][0] != d["rank_fingerprints"][1]


def test_only_rank_zero_writes(ddp_run):
    run, proc = ddp_run
    assert proc.stdout.count("done: ") == 1
    logs = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logs if "loss" in x] == [1, 2, 3, 4]  # each step logged once, not once per rank
    top = sorted(p.name for p in run.iterdir())
    assert not [n for n in top if "rank" in n or n.endswith("_1")], top
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    # The Trainer stores each rank's RNG state in the checkpoint (needed to resume exactly); nothing else per rank.
    per_rank = sorted(p.name for p in (run / "checkpoints" / "checkpoint-4").iterdir() if "_1" in p.name)
    assert per_rank == ["rng_state_1.pth"]


def test_result_is_a_normal_adapter(ddp_run, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, _ = ddp_run
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert weights and not any(k.startswith("module.") for k in weights)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # trained: B starts at zero
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run / "adapter")
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        with model.disable_adapter():
            before = model(ids).logits
        after = model(ids).logits
    assert not torch.allclose(before, after)


def test_plan_per_rank_matches_ddp_ranks(ddp_run):
    """`finetune plan --accelerate-config recipes/accelerate/ddp.yaml`: each rank holds the whole model, and the
    plan's per-rank parameter and 4-bit bytes equal what both ranks held, exactly. (The manifest does not record
    the quantisation constants; in DDP they are the single process's, checked by tests/test_plan.py.)"""
    run, _ = ddp_run
    d = json.loads((run / "manifest.json").read_text())["distributed"]
    plan = plan_with_config(run.parent / "recipe.yaml", "ddp.yaml")
    assert (plan["setup"]["num_processes"], plan["setup"]["sharding"]) == (2, "ddp")
    for total, four_bit in zip(d["parameter_bytes_per_rank"], d["four_bit_bytes_per_rank"], strict=True):
        assert_per_rank(plan, total, four_bit, None)
