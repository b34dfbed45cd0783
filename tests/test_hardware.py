"""Recipe + hardware -> trainer arguments, with CUDA faked (CI has no GPU)."""

from __future__ import annotations

import pytest
import torch

from finetune.hardware import Hardware, choose_precision
from finetune.recipe import validate_recipe
from finetune.train import sft_config

CPU = Hardware(cuda=False, bf16=False, flash_attn=False, name="cpu")
A100 = Hardware(cuda=True, bf16=True, flash_attn=True, name="NVIDIA A100")
T4 = Hardware(cuda=True, bf16=False, flash_attn=False, name="Tesla T4")


def recipe(**sections):
    raw = {"model": {"base": "meta-llama/Llama-2-7b-hf"}, "data": {"train": [{"path": "tatsu-lab/alpaca"}]},
           "output_dir": "runs/x"}
    raw.update(sections)
    return validate_recipe(raw)


def _shape(r, n: int = 100, length: int = 30):
    from finetune.data.packing import step_shape

    t = r.train
    return step_shape([length] * n, t.micro_batch_size, t.grad_accum, r.data.max_length, r.data.packing)


def test_cpu_never_autocasts_over_nf4():
    """The trap: SFTConfig defaults to bf16=True; over NF4 layers computing in fp32 that broke training on CPU."""
    p = choose_precision(recipe(), CPU)
    assert p.compute_dtype == torch.float32 and not p.bf16 and not p.fp16
    assert any("falling back to float32" in w for w in p.warnings)
    args = sft_config(recipe(), p, CPU, __import__("pathlib").Path("/tmp/x"), False, _shape(recipe()))
    assert args.bf16 is False and args.fp16 is False and args.use_cpu is True
    assert args.optim == "adamw_torch"


def test_cuda_bf16_defaults():
    p = choose_precision(recipe(), A100)
    assert p.compute_dtype == torch.bfloat16 and p.bf16 and not p.fp16 and not p.warnings
    assert p.optimizer == "paged_adamw_8bit"  # the QLoRA paper's paged optimizer
    assert p.attn_implementation == "sdpa"


def test_flash_attention_when_installed_and_asked():
    assert choose_precision(recipe(model={"base": "x", "attn_implementation": "flash_attention_2"}), A100
                            ).attn_implementation == "flash_attention_2"
    p = choose_precision(recipe(model={"base": "x", "attn_implementation": "flash_attention_2"}), T4)
    assert p.attn_implementation == "sdpa" and any("flash_attention_2" in w for w in p.warnings)


def test_bf16_unsupported_gpu_falls_back_loudly():
    p = choose_precision(recipe(), T4)
    assert p.compute_dtype == torch.float32 and not p.bf16 and not p.fp16
    assert any("Tesla T4" in w and "float32" in w for w in p.warnings)


def test_fp16_on_llama_warns():
    p = choose_precision(recipe(quantization={"compute_dtype": "float16"}), T4)
    assert p.compute_dtype == torch.float16 and p.fp16 and not p.bf16
    assert any("bfloat16 is recommended" in w for w in p.warnings)


def test_explicit_optimizer_and_paged_on_cpu():
    assert choose_precision(recipe(train={"optimizer": "adamw_torch"}), A100).optimizer == "adamw_torch"
    p = choose_precision(recipe(train={"optimizer": "paged_adamw_8bit"}), CPU)
    assert p.optimizer == "adamw_torch" and any("needs CUDA" in w for w in p.warnings)


@pytest.mark.parametrize("hw", [CPU, A100, T4], ids=["cpu", "a100", "t4"])
def test_autocast_flags_always_match_compute_dtype(hw):
    for dtype in ("bfloat16", "float16", "float32"):
        p = choose_precision(recipe(quantization={"compute_dtype": dtype}), hw)
        assert p.bf16 == (p.compute_dtype == torch.bfloat16)
        assert p.fp16 == (p.compute_dtype == torch.float16)


def test_gradient_checkpointing_and_logging_mapping(tmp_path):
    r = recipe(train={"gradient_checkpointing": True, "report_to": ["tensorboard"], "save_steps": 7,
                      "micro_batch_size": 2, "grad_accum": 8, "max_steps": 30},
               data={"train": [{"path": "tatsu-lab/alpaca"}], "packing": False})  # packed: see test_packing.py
    args = sft_config(r, choose_precision(r, CPU), CPU, tmp_path, True, _shape(r))
    assert args.gradient_checkpointing is True
    assert args.report_to == ["tensorboard"]
    assert (args.save_steps, args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_steps) == (7, 2, 8, 30)
    assert args.output_dir == str(tmp_path / "checkpoints")
    assert args.eval_strategy == "steps"
