"""Rules for several ranks that need no second process (issue 17): a checkpoint resumes only with the number of
processes that wrote it, FSDP/ZeRO-3 are refused on CPU ranks, and the bytes a rank holds are counted right."""

from __future__ import annotations

import pytest
import torch

from finetune import checkpoints as ck
from finetune import distributed
from finetune.resume import ResumeError, check_world_size, written_by


def checkpoint(root, meta=None, rng=("rng_state_0.pth", "rng_state_1.pth")):
    tmp = ck.begin(root / "checkpoint-4")
    for name in rng:
        (tmp / name).write_bytes(b"x")
    return ck.commit(tmp, root / "checkpoint-4", meta={"global_step": 4, **(meta or {})})


def test_resume_with_another_number_of_processes_is_refused_in_one_line(tmp_path):
    ckpt = checkpoint(tmp_path / "run" / "checkpoints", {"world_size": 2})
    assert written_by(ckpt) == 2
    check_world_size(ckpt, 2)  # the same number: fine
    check_world_size(None, 3)  # nothing to resume: fine
    for world in (1, 4):
        with pytest.raises(ResumeError) as e:
            check_world_size(ckpt, world)
        line = str(e.value)
        assert "\n" not in line and f"with {world} process" in line and "written by 2" in line
        assert "--num_processes 2" in line and f"model.adapter: {ckpt}" in line


def test_older_checkpoints_tell_their_world_size_by_their_rng_files(tmp_path):
    assert written_by(checkpoint(tmp_path / "a")) == 2
    single = checkpoint(tmp_path / "b", rng=("rng_state.pth",))
    assert written_by(single) == 1
    with pytest.raises(ResumeError, match="written by 1"):
        check_world_size(single, 2)


@pytest.mark.parametrize("env", [{"ACCELERATE_USE_FSDP": "true"},
                                 {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}])
def test_fsdp_and_zero3_refused_on_cpu_ranks(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    distributed.check_sharding_hardware(cuda=True)
    with pytest.raises(distributed.ShardingError, match="needs GPUs: on CPU ranks Accelerate trains plain DDP"):
        distributed.check_sharding_hardware(cuda=False)


def test_plain_ddp_on_cpu_is_not_refused(monkeypatch):
    for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(k, raising=False)
    distributed.check_sharding_hardware(cuda=False)


def test_held_parameter_bytes_counts_4bit_weights_and_local_shards():
    import bitsandbytes as bnb

    model = torch.nn.Sequential(bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32), torch.nn.Linear(32, 8))
    model[0].weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")._quantize("cpu")
    held = distributed.held_parameter_bytes(model)
    four = model[0].weight.numel() * model[0].weight.element_size()
    assert four == 32 * 64 // 2  # two NF4 values a byte
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    assert held == {"total": full, "four_bit": four}

    class Shard(torch.nn.Module):  # a DTensor-like parameter: only its local shard counts
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(10, 4))
            self.p.to_local = lambda: torch.zeros(5, 4)

    assert distributed.held_parameter_bytes(Shard()) == {"total": 5 * 4 * 4, "four_bit": 0}


def test_plan_per_rank_zero3_is_the_loaded_model_over_two_ranks(recipe_factory, tiny_model_dir):
    """`finetune plan --accelerate-config recipes/accelerate/zero3_qlora.yaml` without deepspeed: the model
    tests/zero3_cpu.py partitions, loaded whole in this process; each of the 2 ranks holds half of every parameter
    (total/num_processes, exact: every parameter of the tiny model has an even count) and the whole quantisation
    constants. Measured on 2 CPU ranks where deepspeed is installed: tests/test_ranks_slow.py."""
    from fsdp2_cpu import qlora, quant_state_bytes
    from per_rank import assert_per_rank, plan_with_config

    model = qlora(str(tiny_model_dir))
    whole = distributed.held_parameter_bytes(model)
    plan = plan_with_config(recipe_factory(quantization={"compute_dtype": "float32", "quant_storage": "float32"}),
                            "zero3_qlora.yaml")
    assert (plan["setup"]["num_processes"], plan["setup"]["sharding"]) == (2, "zero3")
    assert_per_rank(plan, whole["total"] // 2, whole["four_bit"] // 2, quant_state_bytes(model))
