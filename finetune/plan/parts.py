"""The estimate as named parts, one line each in `finetune plan`'s table, for one process:

    4-bit base        packed NF4/FP4 weights + their quantisation constants (double quant or not)
    kept weights      embeddings, lm_head, norms (fp32: peft's prepare_model_for_kbit_training upcasts them)
    LoRA              adapter parameters, their gradients and the optimizer state
    activations       what autograd keeps for backward, with or without gradient checkpointing
    transient         the largest dequantised weight (bitsandbytes dequantises one layer at a time)
    overhead          CUDA context and allocator fragmentation (not visible to torch.cuda.max_memory_allocated)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from finetune.plan.byte_model import (SHARDINGS, Setup, activation_bytes, adapter_dtype_bytes, lora_targets,
                                      lora_tensor_sizes, logits_bytes, optimizer_state_bytes, paged_bytes,
                                      tensors_per_adapter, weight_parts)
from finetune.plan.shapes import Shape
from finetune.plan.sizes import MIB, PlanError, fmt


@dataclass
class Part:
    key: str
    label: str
    bytes: int
    note: str = ""


def _sharded(setup: Setup) -> bool:
    return setup.sharding.startswith(("fsdp", "zero3"))


def _offloaded(setup: Setup) -> bool:
    return setup.sharding.endswith("offload")


def _shards(setup: Setup) -> int:
    """How many processes share the sharded parts (1 unless FSDP/ZeRO-3)."""
    return max(1, setup.num_processes) if _sharded(setup) else 1


def plan_parts(shape: Shape, setup: Setup) -> tuple[list[Part], int]:
    """The named parts of one process's peak memory, and the bytes of paged optimizer state among them (CUDA
    unified memory: needed on the GPU, invisible to torch.cuda.max_memory_allocated)."""
    if setup.sharding not in SHARDINGS:
        raise PlanError(f"--sharding: must be one of {', '.join(SHARDINGS)} (got {setup.sharding!r})")
    # data.add_tokens / add_template_tokens: the embeddings (and an untied lm_head) grow by the new rows.
    shape = replace(shape, vocab=shape.vocab + setup.new_tokens)
    parts = _weight_parts(shape, setup) + _adapter_parts(shape, setup) + _parallel_parts(shape, setup)
    parts += _step_parts(shape, setup)
    if setup.device == "cuda":
        allocated = sum(p.bytes for p in parts)
        parts.append(Part("overhead", "CUDA context + allocator slack", 600 * MIB + allocated // 20,
                          "600 MiB context + 5% fragmentation"))
    paged = 0 if _offloaded(setup) else paged_bytes(lora_tensor_sizes(shape, setup), setup.optimizer) // _shards(setup)
    return parts, paged


def total_bytes(shape: Shape, setup: Setup) -> int:
    """All the memory one process needs, overhead included."""
    return sum(p.bytes for p in plan_parts(shape, setup)[0])


def rank_weights(shape: Shape, setup: Setup) -> dict[str, int]:
    """Bytes of the frozen base, the kept weights and LoRA parameters that one process holds, wherever they live
    (on the device, or with offload in CPU RAM). FSDP and ZeRO-3 split every parameter across the processes
    (this is total/num_processes: FSDP2 chunks each tensor's dim 0 and ZeRO-3 pads each to a multiple of the
    ranks, so a rank can differ by up to a row, or an element, per tensor). The 4-bit quantisation constants are
    not parameters: each Linear4bit keeps its quant_state whole, on every rank. Checked against 2-rank CPU runs in
    tests/test_distributed.py and tests/test_ranks_slow.py."""
    w = weight_parts(shape, setup)
    div = _shards(setup)
    lora = sum(lora_tensor_sizes(shape, setup)) * adapter_dtype_bytes(setup)
    return {"base": (w["base"] - w["quant_state"]) // div + w["quant_state"], "four_bit": w["four_bit"] // div,
            "quant_state": w["quant_state"], "kept": w["kept"] // div, "lora": lora // div}


def held_per_rank(shape: Shape, setup: Setup) -> dict:
    """The parameter bytes one process holds, named as manifest.json's `distributed` section records what a run
    held (parameter_bytes_per_rank, four_bit_bytes_per_rank: finetune.distributed.held_parameter_bytes), plus
    the quantisation constants, which are no parameters. offloaded: they live in CPU RAM, not on the device."""
    r = rank_weights(replace(shape, vocab=shape.vocab + setup.new_tokens), setup)
    return {"parameter_bytes": r["base"] - r["quant_state"] + r["kept"] + r["lora"], "four_bit_bytes": r["four_bit"],
            "quant_state_bytes": r["quant_state"], "offloaded": _offloaded(setup)}


def _weight_parts(shape: Shape, setup: Setup) -> list[Part]:
    """The frozen base: quantised linears, the weights kept in higher precision, rotary buffers."""
    w, r = weight_parts(shape, setup), rank_weights(shape, setup)
    if setup.load_in_4bit:
        label = f"4-bit base (NF4, {'double quant' if setup.double_quant else 'no double quant'})"
    else:
        label = "16-bit base linears"
    kept_label = "embeddings, lm_head, norms"
    buffers = Part("buffers", "rotary buffers", w["buffers"])
    if _offloaded(setup):
        return [Part("base", label, 0, f"{fmt(r['base'])} offloaded to CPU RAM"),
                Part("kept", kept_label, 0, f"{fmt(r['kept'])} offloaded to CPU RAM"), buffers]
    kept_note = "fp32 (upcast by prepare_model_for_kbit_training)" if w["kept_dtype_bytes"] == 4 else "16-bit"
    base_note = ""
    if _sharded(setup):
        base_note = f"sharded over {_shards(setup)}" + (
            f"; quantisation constants ({fmt(r['quant_state'])}) whole on every rank" if r["quant_state"] else "")
    return [Part("base", label, r["base"], base_note), Part("kept", kept_label, r["kept"], kept_note), buffers]


def _adapter_parts(shape: Shape, setup: Setup) -> list[Part]:
    """LoRA parameters, their gradients and the optimizer state."""
    sizes = lora_tensor_sizes(shape, setup)
    a_bytes = adapter_dtype_bytes(setup)
    div, lora_rank = _shards(setup), rank_weights(shape, setup)["lora"]
    opt = optimizer_state_bytes(sizes, setup.optimizer, 4 if a_bytes == 4 else 2, setup.device)
    opt_label = f"optimizer state ({setup.optimizer})"
    if _offloaded(setup):
        return [Part("lora", "LoRA parameters", 0, f"{fmt(lora_rank)} offloaded to CPU RAM"),
                Part("grads", "LoRA gradients", 0, "offloaded"),
                Part("optimizer", opt_label, 0, f"{fmt(opt // div)} offloaded")]
    n_adapters = shape.layers * len(lora_targets(shape, setup.target_modules))
    note = f"r={setup.lora_r}, {n_adapters} adapters, {'fp32' if a_bytes == 4 else '16-bit'}"
    if setup.use_dora:
        note += ", DoRA magnitudes"
    if setup.new_tokens and setup.token_tables:
        note += f", {setup.new_tokens} new token rows x {setup.token_tables} embedding matrices"
    paged = paged_bytes(sizes, setup.optimizer) // div
    opt_note = f"{fmt(paged)} of it paged (CUDA unified memory)" if paged else ""
    return [Part("lora", "LoRA parameters", lora_rank, note), Part("grads", "LoRA gradients", lora_rank),
            Part("optimizer", opt_label, opt // div, opt_note)]


def _parallel_parts(shape: Shape, setup: Setup) -> list[Part]:
    """What several processes add: DDP's gradient buckets, or the units FSDP/ZeRO-3 gather for compute."""
    sizes = lora_tensor_sizes(shape, setup)
    a_bytes = adapter_dtype_bytes(setup)
    if setup.sharding == "ddp" or (setup.sharding == "none" and setup.num_processes > 1):
        return [Part("ddp", "DDP gradient buckets", sum(sizes) * a_bytes,
                     "a flat copy of the gradients for all-reduce")]
    if not _sharded(setup):
        return []
    # FSDP/ZeRO-3 gather one decoder layer at a time (two with prefetch) and the root unit (embeddings,
    # lm_head) while it is used.
    per_layer = tensors_per_adapter(setup) * len(lora_targets(shape, setup.target_modules))
    layer = weight_parts(replace(shape, layers=1), setup)["base"] + sum(sizes[:per_layer]) * a_bytes
    root = shape.vocab * shape.hidden * (1 if shape.tied else 2) * weight_parts(shape, setup)["kept_dtype_bytes"]
    return [Part("gathered", "gathered (unsharded) units", 2 * layer + root,
                 "two decoder layers + embeddings/lm_head, all-gathered for compute")]


def _step_parts(shape: Shape, setup: Setup) -> list[Part]:
    """What a training step adds: activations, and on a GPU the dequantised weight of the running matmul."""
    ckpt = "with" if setup.gradient_checkpointing else "without"
    # The loss's logits term, both ways: the one in use is part of the activations' peak.
    chunked, full = logits_bytes(shape, setup, True), logits_bytes(shape, setup, False)
    used = f"chunked {fmt(chunked)} (full [tokens, vocab]: {fmt(full)})" if setup.chunked_loss else \
        f"full [tokens, vocab] {fmt(full)} (chunked: {fmt(chunked)})"
    parts = [Part("activations", f"activations ({ckpt} gradient checkpointing)", activation_bytes(shape, setup),
                  f"batch {setup.batch} x seq {setup.seq_len}; loss logits {used}")]
    if setup.device == "cuda" and setup.load_in_4bit:
        biggest = max(a * b for _, a, b in shape.linears())
        dtype_bytes = 4 if setup.compute == "fp32" else 2
        parts.append(Part("transient", "dequantised weight (transient)", biggest * dtype_bytes,
                          "largest linear, dequantised for its matmul"))
    return parts
