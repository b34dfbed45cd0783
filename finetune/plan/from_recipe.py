"""From a recipe (and the machine it will run on) to a Setup and a Plan, resolved as train() resolves it:
the compute dtype, optimizer and attention come from hardware.choose_precision, and `gradient_checkpointing:
auto` from the plan itself."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from finetune.plan.byte_model import Setup
from finetune.plan.estimator import Plan, estimate
from finetune.plan.shapes import Shape, resolve_shape
from finetune.plan.sizes import PlanError, fmt

_COMPUTE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def target_precision(recipe, device: str = "cuda", bf16: bool = True):
    """hardware.choose_precision for the machine planned for: a GPU (with bf16 or, like a T4 or V100, without
    it, which falls back to fp32) or the CPU. The GPU is assumed to have flash-attn if the recipe asks for it."""
    # hardware imports torch; importing it here keeps `import finetune.plan` (and `finetune --help`) free of it.
    from finetune.hardware import Hardware, choose_precision

    cuda = device == "cuda"
    name = ("a GPU" if bf16 else "a GPU without bf16") if cuda else "cpu"
    return choose_precision(recipe, Hardware(cuda=cuda, bf16=cuda and bf16, flash_attn=cuda, name=name))


def setup_from_recipe(recipe, *, seq_len=None, batch=None, num_processes=1, sharding=None, device="cuda",
                      bf16=True, chunked_loss=True) -> Setup:
    """The Setup a recipe trains with on `device` (a GPU with or without bf16, or the CPU), its auto choices
    resolved by hardware.choose_precision as train() resolves them."""
    q, t = recipe.quantization, recipe.train
    precision = target_precision(recipe, device, bf16)
    if sharding is None:
        sharding = "ddp" if num_processes > 1 else "none"
    preference = t.method != "sft"
    if batch is None and preference:
        # Never packed; a forward pass holds each pair's chosen and rejected rows (kto: each completion and the
        # mismatched completion of its KL term), and the reference forward that follows it needs no more than the
        # policy's loss phase (no gradient, checked against the profiler in tests/test_preference.py).
        batch = 2 * t.micro_batch_size
    elif batch is None:
        # Packed without flash-attention, train.py feeds one max_length block per forward pass.
        flash = precision.attn_implementation == "flash_attention_2"
        batch = 1 if recipe.data.packing and not flash else t.micro_batch_size
    targets = recipe.lora.target_modules
    return Setup(seq_len=seq_len or recipe.data.max_length, batch=batch,
                 load_in_4bit=q.load_in_4bit, double_quant=q.double_quant, compute=_COMPUTE[precision.dtype_name],
                 lora_r=recipe.lora.r, lora_dropout=recipe.lora.dropout,
                 target_modules=targets if isinstance(targets, str) else tuple(targets),
                 optimizer=precision.optimizer, gradient_checkpointing=t.gradient_checkpointing is not False,
                 num_processes=num_processes, sharding=sharding, device=device, chunked_loss=chunked_loss,
                 loss_head="trl" if preference else "ours", **lora_variant_setup(recipe))


def lora_variant_setup(recipe) -> dict:
    """The Setup fields of DoRA and new tokens. The new tokens are counted as the most the run can add (every
    token of data.add_tokens and the template's required ones): those the tokenizer already has are not added."""
    lora, new = recipe.lora, len(set(recipe.data.add_tokens) | set(_template_tokens(recipe)))
    saved = set(lora.modules_to_save)
    tables = sum(1 for name in ("embed_tokens", "lm_head") if name not in saved)
    wrapped = bool(new and "lm_head" not in saved) or bool(saved & {"lm_head", "embed_tokens"})
    return dict(use_dora=lora.use_dora, new_tokens=new, token_tables=tables if new else 0, wrapped_head=wrapped)


def _template_tokens(recipe) -> list[str]:
    if not recipe.data.add_template_tokens:
        return []
    from finetune.templates import TemplateError, load_template

    try:
        return list(load_template(recipe.data.template).requires)
    except (TemplateError, OSError):
        return []


def plan_recipe(recipe, gpu_memory: int | None, **kw) -> Plan:
    """The plan of a recipe; train.gradient_checkpointing: auto is resolved as train() resolves it. Keywords:
    shape (a built-in shape instead of model.base) and those of setup_from_recipe."""
    shape, source = resolve_shape(recipe.model.base, kw.pop("shape", None))
    setup = setup_from_recipe(recipe, **kw)
    notes = []
    if recipe.train.method != "sft" and kw.get("batch") is None:
        ref = ("; the reference forward runs on the same 4-bit base (no second model)"
               if recipe.train.method in ("dpo", "kto") else "")
        notes.append(f"train.method {recipe.train.method}: a micro-batch of {recipe.train.micro_batch_size} examples "
                     f"is {setup.batch} rows per forward pass (chosen and rejected, or kto's KL completions){ref}")
    if recipe.train.gradient_checkpointing == "auto":
        ckpt, why = auto_checkpointing(shape, setup, gpu_memory)
        setup = replace(setup, gradient_checkpointing=ckpt)
        notes.append(f"gradient checkpointing auto: {why}")
    if setup.device == "cuda" and setup.compute == "fp32" and recipe.quantization.compute_dtype != "float32":
        notes.append(f"compute fp32: quantization.compute_dtype {recipe.quantization.compute_dtype} falls back to "
                     "float32 on a GPU without bf16")
    plan = estimate(shape, setup, gpu_memory, source)
    plan.notes.extend(notes)
    return plan


AUTO_CKPT_FRACTION = {"cuda": 0.8, "cpu": 0.5}
"""gradient_checkpointing: auto turns it off only when the plan without it needs at most this fraction of the
memory: the planner is validated on the CPU but not yet on a GPU, and on a CPU other processes share the RAM.
What turning it off gains is measured in bench/RESULTS.md (throughput)."""


def auto_checkpointing(shape: Shape, setup: Setup, memory: int | None) -> tuple[bool, str]:
    """(use gradient checkpointing, why): off when the run fits without it with room to spare, since
    recomputing every layer's forward in the backward pass costs about a third of a step's compute."""
    if memory is None:
        return True, "on (no memory size known)"
    without = estimate(shape, replace(setup, gradient_checkpointing=False), None).total
    fraction = AUTO_CKPT_FRACTION["cuda" if setup.device == "cuda" else "cpu"]
    limit = int(fraction * memory)
    where = "GPU memory" if setup.device == "cuda" else "available RAM"
    if without <= limit:
        return False, f"off (the run needs {fmt(without)} without it, within {fmt(limit)}, " \
                      f"{fraction:.0%} of {fmt(memory)} {where})"
    return True, f"on (without it the run would need {fmt(without)}, more than {fmt(limit)} of {fmt(memory)} {where})"


def checkpointing_for_run(recipe, hw, memory: int | None = None) -> tuple[bool, str]:
    """train.gradient_checkpointing resolved for this process: the recipe's value, or the auto decision against
    the memory this process has (the GPU's, per process with the launch's sharding; on a CPU half the available
    RAM, which other processes share) and the precision this GPU allows. Unknown shapes keep it on."""
    value = recipe.train.gradient_checkpointing
    if value != "auto":
        return bool(value), f"{'on' if value else 'off'} (train.gradient_checkpointing: {str(value).lower()})"
    from finetune import distributed

    if memory is None:
        memory = _this_process_memory(hw)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sharding = ("fsdp" if distributed.sharded() else "ddp") if world > 1 else "none"
    try:
        shape, _ = resolve_shape(recipe.model.base)
        setup = setup_from_recipe(recipe, num_processes=world, sharding=sharding,
                                  device="cuda" if hw.cuda else "cpu", bf16=hw.bf16)
    except PlanError as e:
        return True, f"on (auto: the model's shape is unknown to the planner: {e})"
    return auto_checkpointing(shape, setup, memory)


def _this_process_memory(hw) -> int:
    """The current GPU's memory, or the RAM available now."""
    if hw.cuda:
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    import psutil

    return psutil.virtual_memory().available


def read_accelerate_config(path: str | Path) -> tuple[int, str]:
    """(num_processes, sharding) from an `accelerate launch --config_file` YAML."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise PlanError(f"--accelerate-config: cannot read {path}: {e}") from None
    n = int(cfg.get("num_processes") or 1)
    kind = str(cfg.get("distributed_type", "NO")).upper()
    if kind == "FSDP":
        offload = bool((cfg.get("fsdp_config") or {}).get("fsdp_offload_params"))
        return n, "fsdp_offload" if offload else "fsdp"
    if kind == "DEEPSPEED":
        ds = cfg.get("deepspeed_config") or {}
        stage = int(ds.get("zero_stage", 0))
        offload = str(ds.get("offload_param_device", "none")).lower() not in ("none", "")
        if stage == 3:
            return n, "zero3_offload" if offload else "zero3"
        return n, "ddp"
    return n, "ddp" if n > 1 else "none"
