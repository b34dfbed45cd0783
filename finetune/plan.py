"""`finetune plan`: estimate the peak accelerator memory of a recipe before anything is downloaded.

The estimate is a sum of named parts, each computed from the model shape (LLaMA family) and the recipe:

    4-bit base        packed NF4/FP4 weights + their quantisation constants (double quant or not)
    kept weights      embeddings, lm_head, norms (fp32: peft's prepare_model_for_kbit_training upcasts them)
    LoRA              adapter parameters, their gradients and the optimizer state
    activations       what autograd keeps for backward, with or without gradient checkpointing
    transient         the largest dequantised weight (bitsandbytes dequantises one layer at a time)
    overhead          CUDA context and allocator fragmentation (not visible to torch.cuda.max_memory_allocated)

Weights and optimizer state are computed byte for byte the way bitsandbytes, peft and torch allocate them
(tests/test_plan.py checks this *exactly*, with finetune/memory.py, against models loaded on the CPU). Activations come from counting
the tensors autograd saves in a LLaMA decoder layer under our pipeline's dtypes; the per-token coefficients
below were measured on this CPU with the profiler (fp32, and bf16 autocast as a stand-in for a GPU), see
bench/RESULTS.md. On a GPU, bench/gpu.py compares the estimate with torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

from finetune.errors import UserError
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

GIB = 1024 ** 3
MIB = 1024 ** 2


class PlanError(UserError):
    """The plan cannot be made (unknown model shape, bad size string); the message says how to fix it."""


# ---------------------------------------------------------------------------------------------
# Model shapes


@dataclass(frozen=True)
class Shape:
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool = False
    head_dim: int | None = None

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of the linear layers in one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.hd, self.kv_heads * self.hd, self.intermediate
        return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
                ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]

    def n_params(self) -> int:
        per_layer = sum(a * b for _, a, b in self.linears()) + 2 * self.hidden
        return self.layers * per_layer + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


# Published configs (config.json of each checkpoint). Keys are what `--shape` accepts; ALIASES map hub ids.
SHAPES: dict[str, Shape] = {s.name: s for s in [
    Shape("llama-7b", 32000, 4096, 32, 32, 32, 11008),
    Shape("llama-13b", 32000, 5120, 40, 40, 40, 13824),
    Shape("llama-33b", 32000, 6656, 60, 52, 52, 17920),
    Shape("llama-65b", 32000, 8192, 80, 64, 64, 22016),
    Shape("llama-2-7b", 32000, 4096, 32, 32, 32, 11008),
    Shape("llama-2-13b", 32000, 5120, 40, 40, 40, 13824),
    Shape("llama-2-70b", 32000, 8192, 80, 64, 8, 28672),
    Shape("llama-3-8b", 128256, 4096, 32, 32, 8, 14336),
    Shape("llama-3-70b", 128256, 8192, 80, 64, 8, 28672),
    Shape("tinyllama-1.1b", 32000, 2048, 22, 32, 4, 5632),
    Shape("smollm2-135m", 49152, 576, 30, 9, 3, 1536, tied=True),
]}
ALIASES = {
    "llama-30b": "llama-33b", "huggyllama/llama-7b": "llama-7b", "huggyllama/llama-13b": "llama-13b",
    "huggyllama/llama-30b": "llama-33b", "huggyllama/llama-65b": "llama-65b",
    "meta-llama/llama-2-7b-hf": "llama-2-7b", "meta-llama/llama-2-7b-chat-hf": "llama-2-7b",
    "meta-llama/llama-2-13b-hf": "llama-2-13b", "meta-llama/llama-2-13b-chat-hf": "llama-2-13b",
    "meta-llama/llama-2-70b-hf": "llama-2-70b", "meta-llama/llama-2-70b-chat-hf": "llama-2-70b",
    "meta-llama/meta-llama-3-8b": "llama-3-8b", "meta-llama/meta-llama-3-8b-instruct": "llama-3-8b",
    "meta-llama/llama-3.1-8b": "llama-3-8b", "meta-llama/llama-3.1-8b-instruct": "llama-3-8b",
    "meta-llama/meta-llama-3-70b": "llama-3-70b", "meta-llama/meta-llama-3-70b-instruct": "llama-3-70b",
    "meta-llama/llama-3.1-70b": "llama-3-70b", "meta-llama/llama-3.1-70b-instruct": "llama-3-70b",
    "meta-llama/llama-3.3-70b-instruct": "llama-3-70b",
    "tinyllama/tinyllama-1.1b-chat-v1.0": "tinyllama-1.1b", "tinyllama/tinyllama_v1.1": "tinyllama-1.1b",
    "huggingfacetb/smollm2-135m": "smollm2-135m", "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
    "builtin:smollm2-135m-instruct": "smollm2-135m",
}


def shape_from_config(cfg: dict, name: str) -> Shape:
    """A Shape from a config.json dict (LLaMA-family keys)."""
    try:
        heads = cfg["num_attention_heads"]
        return Shape(name, cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], heads,
                     cfg.get("num_key_value_heads") or heads, cfg["intermediate_size"],
                     bool(cfg.get("tie_word_embeddings", False)), cfg.get("head_dim"))
    except KeyError as e:
        raise PlanError(f"{name}: config has no {e.args[0]!r}; only LLaMA-family configs can be planned "
                        f"(or pass --shape, one of {', '.join(SHAPES)})") from None


def _shape_from_gguf(path: Path) -> Shape:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field_value(key):
        f = reader.fields.get(key)
        if f is None:
            return None
        if key == "tokenizer.ggml.tokens":
            return len(f.data)
        return int(f.parts[f.data[0]][0])

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    get = lambda k: field_value(f"{arch}.{k}")  # noqa: E731
    heads = get("attention.head_count")
    names = {t.name for t in reader.tensors}
    return Shape(path.stem, field_value("tokenizer.ggml.tokens") or get("vocab_size"), get("embedding_length"),
                 get("block_count"), heads, get("attention.head_count_kv") or heads, get("feed_forward_length"),
                 tied="output.weight" not in names)


def resolve_shape(base: str, shape: str | None = None) -> tuple[Shape, str]:
    """The model shape and where it came from, without downloading anything."""
    if shape:
        key = ALIASES.get(shape.lower(), shape.lower())
        if key not in SHAPES:
            raise PlanError(f"--shape: unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
        return SHAPES[key], "built-in table"
    key = ALIASES.get(base.lower(), base.lower())
    if key in SHAPES:
        return SHAPES[key], "built-in table"
    path = Path(base).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return shape_from_config(json.loads((path / "config.json").read_text()), base), f"{path / 'config.json'}"
    if base.endswith(".gguf") and path.is_file():
        return _shape_from_gguf(path), f"GGUF metadata of {path.name}"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base, "config.json")
    except Exception:  # not a valid repo id, or no hub library: fall through to the error below
        cached = None
    if isinstance(cached, str):
        return shape_from_config(json.loads(Path(cached).read_text()), base), "cached hub config"
    raise PlanError(f"model.base: no local config for {base!r} and it is not in the built-in table; "
                    f"pass --shape with one of {', '.join(SHAPES)}")


# ---------------------------------------------------------------------------------------------
# Byte counts of what bitsandbytes / peft / torch allocate


def nf4_weight_bytes(n: int, double_quant: bool, blocksize: int = 64) -> int:
    """Bytes of one 4-bit Linear weight with n elements, as bitsandbytes 0.50 stores it.

    packed data n/2 bytes; one absmax per block of 64: float32, or with double quant uint8 plus a float32
    absmax per 256 of those, a float32 offset and the 256-entry float32 code of the second level. Every layer
    also keeps its own 16-entry float32 NF4 code.
    """
    blocks = -(-n // blocksize)
    packed = (n + 1) // 2
    if not double_quant:
        return packed + 4 * blocks + 16 * 4
    return packed + blocks + 4 * (-(-blocks // 256)) + 4 + 256 * 4 + 16 * 4


def lora_targets(shape: Shape, target_modules) -> list[tuple[str, int, int]]:
    """The adapted linears of one layer. all-linear is every projection (peft leaves lm_head out)."""
    if target_modules == "all-linear":
        return shape.linears()
    wanted = set(target_modules)
    return [t for t in shape.linears() if t[0] in wanted]


def paged_bytes(tensor_sizes: list[int], optimizer: str) -> int:
    """The part of a paged optimizer's state in CUDA unified memory (tensors of >= 1e5 elements), which
    torch.cuda.max_memory_allocated does not see."""
    if not optimizer.startswith("paged_"):
        return 0
    per_element = 2 if optimizer.endswith("8bit") else 8  # two uint8 or two float32 states (absmax is not paged)
    return sum(per_element * n for n in tensor_sizes if n >= 100_000)


def optimizer_state_bytes(tensor_sizes: list[int], optimizer: str, state_bytes: int = 4, device: str = "cuda") -> int:
    """Bytes of optimizer state for trainable tensors of the given element counts.

    adamw_torch: exp_avg + exp_avg_sq in the parameter dtype, plus a 4-byte `step` tensor per parameter that
    lives on the CPU unless the optimizer is fused/capturable (so it only counts when planning for the CPU).
    bitsandbytes 8-bit: uint8 states + a float32 absmax per 256 elements each, for tensors of >= 4096 elements;
    smaller tensors get two float32 states. Paged variants allocate the same bytes in CUDA unified memory.
    """
    total = 0
    if optimizer in ("adamw_torch", "adamw_torch_fused"):
        for n in tensor_sizes:
            total += 2 * n * state_bytes + (4 if device == "cpu" else 0)
        return total
    eight_bit = optimizer in ("paged_adamw_8bit", "adamw_8bit")
    for n in tensor_sizes:
        if eight_bit and n >= 4096:
            total += 2 * n + 2 * 4 * (-(-n // 256))
        else:
            total += 2 * 4 * n
    if eight_bit and any(n >= 4096 for n in tensor_sizes):
        total += 2 * 256 * 4  # the shared signed/unsigned dynamic quantisation maps
    return total


# Per-token activation coefficients (bytes), measured on this CPU with the profiler: see bench/RESULTS.md.
# h hidden, kv = kv_heads*head_dim, i intermediate, r = sum of LoRA ranks over the adapted linears of a
# layer, nh heads, v vocab. "layer" is what one decoder layer keeps for backward; "ckpt" what it keeps with
# gradient checkpointing (its input: the residual stream, in the embeddings' dtype `res`); "loss"
# the log-softmax phase of the loss (the logits themselves are dropped before backward, as Trainer does), plus
# "loss_const" bytes that do not scale with tokens; "layer_phase" the gradients live, besides the stored
# activations, while one layer runs backward (its MLP or its attention, whichever is larger).
ACT_COEFFS = {
    # fp32 compute (CPU): every saved tensor is fp32 and the LoRA branches share the layer's input.
    "fp32": dict(layer=lambda s, r: 4 * (6 * s.hidden + 2 * _kv(s) + 4 * s.intermediate + r + s.heads + 2),
                 ckpt=lambda s, res: res * s.hidden + 20,
                 loss=lambda s: 12 * s.vocab + 256,
                 loss_const=lambda s: 0,
                 layer_phase=lambda s: max(8 * s.intermediate + 5 * s.hidden // 4, 16 * s.hidden)),
    # bf16 autocast over the fp32 norms/embeddings/LoRA that prepare_model_for_kbit_training leaves: the
    # residual stream is fp32, each LoRA input is its own bf16 copy, the MLP is fp32 between matmuls, and
    # autocast keeps a bf16 copy of the (fp32, frozen) lm_head weight from forward to backward.
    "bf16": dict(layer=lambda s, r: 24 * s.hidden + 4 * _kv(s) + 14 * s.intermediate + 2 * r + 4 * s.heads + 8,
                 ckpt=lambda s, res: res * s.hidden + 20,
                 loss=lambda s: 12 * s.vocab + 256,
                 loss_const=lambda s: 2 * s.vocab * s.hidden,
                 layer_phase=lambda s: max(10 * s.intermediate + 5 * s.hidden, 20 * s.hidden)),
}


def _kv(s: Shape) -> int:
    return s.kv_heads * s.hd


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Setup:
    """Everything the estimate depends on besides the shape (defaults: the recipe defaults on a GPU)."""

    seq_len: int = 1024
    batch: int = 4
    load_in_4bit: bool = True
    double_quant: bool = True
    compute: str = "bf16"
    """bf16 | fp16 | fp32: the compute dtype that will really be used (fp32 on CPU)."""
    lora_r: int = 16
    lora_dropout: float = 0.0
    target_modules: object = "all-linear"
    optimizer: str = "paged_adamw_8bit"
    gradient_checkpointing: bool = True
    num_processes: int = 1
    sharding: str = "none"
    """none | ddp | fsdp | fsdp_offload | zero3 | zero3_offload."""
    device: str = "cuda"


SHARDINGS = ("none", "ddp", "fsdp", "fsdp_offload", "zero3", "zero3_offload")


@dataclass
class Part:
    key: str
    label: str
    bytes: int
    note: str = ""


@dataclass
class Plan:
    shape: Shape
    shape_source: str
    setup: Setup
    parts: list[Part]
    gpu_memory: int | None
    advice: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Decisions the plan made for the recipe (e.g. gradient checkpointing: auto)."""

    def part(self, key: str) -> int:
        return sum(p.bytes for p in self.parts if p.key == key)

    paged: int = 0
    """Bytes of paged optimizer state (CUDA unified memory): needed on the GPU, invisible to the allocator."""

    @property
    def peak_allocated(self) -> int:
        """Comparable to torch.cuda.max_memory_allocated: everything but the overhead and paged memory."""
        return sum(p.bytes for p in self.parts if p.key != "overhead") - self.paged

    @property
    def total(self) -> int:
        return sum(p.bytes for p in self.parts)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total <= self.gpu_memory

    def to_dict(self) -> dict:
        return {"shape": asdict(self.shape), "shape_source": self.shape_source, "setup": asdict(self.setup),
                "parts": [asdict(p) for p in self.parts], "peak_allocated_bytes": self.peak_allocated,
                "paged_bytes": self.paged, "total_bytes": self.total, "gpu_memory_bytes": self.gpu_memory, "fits": self.fits,
                "advice": self.advice, "notes": self.notes}


def weight_parts(shape: Shape, setup: Setup) -> dict[str, int]:
    """Bytes of the frozen base: 4-bit linears (or 16-bit ones), kept weights and buffers."""
    sharded = setup.sharding.startswith(("fsdp", "zero3"))
    compute_bytes = 4 if setup.compute == "fp32" else 2
    # Non-sharded QLoRA runs peft's prepare_model_for_kbit_training, which upcasts every non-4-bit weight to
    # fp32. Sharded runs skip it so every weight in an FSDP unit shares the quant_storage dtype.
    kept_bytes = 4 if (setup.load_in_4bit and not sharded) else compute_bytes
    if setup.load_in_4bit:
        base = shape.layers * sum(nf4_weight_bytes(a * b, setup.double_quant) for _, a, b in shape.linears())
    else:
        base = shape.layers * sum(a * b for _, a, b in shape.linears()) * compute_bytes
    kept = (shape.vocab * shape.hidden * (1 if shape.tied else 2) + (2 * shape.layers + 1) * shape.hidden) * kept_bytes
    buffers = 2 * (shape.hd // 2) * 4  # rotary inv_freq and original_inv_freq, float32
    return {"base": base, "kept": kept, "buffers": buffers, "kept_dtype_bytes": kept_bytes}


def lora_tensor_sizes(shape: Shape, setup: Setup) -> list[int]:
    sizes = []
    for _ in range(shape.layers):
        for _, a, b in lora_targets(shape, setup.target_modules):
            sizes += [setup.lora_r * a, b * setup.lora_r]
    return sizes


def adapter_dtype_bytes(setup: Setup) -> int:
    # We keep adapters in fp32 (train.keep_adapter_fp32); sharded runs keep them in the storage dtype so FSDP
    # can flatten them with the base weights.
    return 2 if setup.sharding.startswith(("fsdp", "zero3")) and setup.compute != "fp32" else 4


def lora_dropout_bytes(shape: Shape, setup: Setup) -> int:
    """Per token and layer, what LoRA dropout adds: peft gives every adapted linear its own Dropout, whose fp32
    output (lora_A's saved input, no longer shared with the base layer's) and bool mask live until backward.
    Under bf16 autocast lora_A saves its own bf16 copy either way, so the hidden-sized inputs add 3 bytes and
    the MLP's fp32 intermediate 4. Measured with the profiler on this CPU (bench/RESULTS.md): 0 without dropout,
    30% of SmolLM2's activations with the quickstart's 0.05 and no checkpointing."""
    if setup.lora_dropout <= 0:
        return 0
    targets = lora_targets(shape, setup.target_modules)
    if setup.compute == "fp32":
        return sum(5 * a for _, a, _ in targets)
    return sum((4 if name == "down_proj" else 3) * a for name, a, _ in targets)


def activation_bytes(shape: Shape, setup: Setup) -> int:
    coeff = ACT_COEFFS["fp32" if setup.compute == "fp32" else "bf16"]
    r_sum = setup.lora_r * len(lora_targets(shape, setup.target_modules))
    drop = lora_dropout_bytes(shape, setup)
    layer = coeff["layer"](shape, r_sum) + drop
    res = weight_parts(shape, setup)["kept_dtype_bytes"]  # the residual stream has the embeddings' dtype
    stored = shape.layers * (coeff["ckpt"](shape, res) if setup.gradient_checkpointing else layer)
    # While a recomputed layer runs backward, the dropout inputs' gradients are live too (measured: +30%).
    phase = coeff["layer_phase"](shape) + (layer + drop * 3 // 10 if setup.gradient_checkpointing else 0)
    tokens = setup.seq_len * setup.batch
    # The bf16 copy autocast makes of an fp32 lm_head only exists when prepare_model_for_kbit_training upcast it.
    const = coeff["loss_const"](shape) if res == 4 else 0
    return tokens * stored + max(tokens * coeff["loss"](shape) + const, tokens * phase)


def estimate(shape: Shape, setup: Setup, gpu_memory: int | None = None, source: str = "") -> Plan:
    if setup.sharding not in SHARDINGS:
        raise PlanError(f"--sharding: must be one of {', '.join(SHARDINGS)} (got {setup.sharding!r})")
    n = max(1, setup.num_processes)
    w = weight_parts(shape, setup)
    sizes = lora_tensor_sizes(shape, setup)
    a_bytes = adapter_dtype_bytes(setup)
    lora = sum(sizes) * a_bytes
    grads = lora
    opt = optimizer_state_bytes(sizes, setup.optimizer, 4 if a_bytes == 4 else 2, setup.device)
    sharded = setup.sharding.startswith(("fsdp", "zero3"))
    offload = setup.sharding.endswith("offload")
    div = n if sharded else 1
    parts = []
    kept_note = "fp32 (upcast by prepare_model_for_kbit_training)" if w["kept_dtype_bytes"] == 4 else "16-bit"
    base_label = "4-bit base (NF4, double quant)" if setup.load_in_4bit and setup.double_quant else (
        "4-bit base (NF4, no double quant)" if setup.load_in_4bit else "16-bit base linears")
    if offload:
        parts.append(Part("base", base_label, 0, f"{_fmt(w['base'])} offloaded to CPU RAM"))
        parts.append(Part("kept", "embeddings, lm_head, norms", 0, f"{_fmt(w['kept'])} offloaded to CPU RAM"))
    else:
        parts.append(Part("base", base_label, w["base"] // div, f"sharded over {n}" if sharded else ""))
        parts.append(Part("kept", "embeddings, lm_head, norms", w["kept"] // div, kept_note))
    parts.append(Part("buffers", "rotary buffers", w["buffers"]))
    note = f"r={setup.lora_r}, {len(sizes) // 2} adapters, {'fp32' if a_bytes == 4 else '16-bit'}"
    if offload:
        parts.append(Part("lora", "LoRA parameters", 0, f"{_fmt(lora)} offloaded"))
        parts.append(Part("grads", "LoRA gradients", 0, "offloaded"))
        parts.append(Part("optimizer", f"optimizer state ({setup.optimizer})", 0, f"{_fmt(opt)} offloaded"))
    else:
        parts.append(Part("lora", "LoRA parameters", lora // div, note))
        parts.append(Part("grads", "LoRA gradients", grads // div))
        paged = paged_bytes(sizes, setup.optimizer) // div
        opt_note = f"{_fmt(paged)} of it paged (CUDA unified memory)" if paged else ""
        parts.append(Part("optimizer", f"optimizer state ({setup.optimizer})", opt // div, opt_note))
    if setup.sharding == "ddp" or (setup.sharding == "none" and n > 1):
        parts.append(Part("ddp", "DDP gradient buckets", grads, "a flat copy of the gradients for all-reduce"))
    if sharded:
        # FSDP/ZeRO-3 gather one decoder layer at a time (two with prefetch) and the root unit (embeddings,
        # lm_head) while it is used.
        layer = weight_parts(replace(shape, layers=1), setup)["base"] + sum(sizes[:2 * len(lora_targets(shape, setup.target_modules))]) * a_bytes
        root = shape.vocab * shape.hidden * (1 if shape.tied else 2) * w["kept_dtype_bytes"]
        parts.append(Part("gathered", "gathered (unsharded) units", 2 * layer + root,
                          "two decoder layers + embeddings/lm_head, all-gathered for compute"))
    ckpt = "with" if setup.gradient_checkpointing else "without"
    parts.append(Part("activations", f"activations ({ckpt} gradient checkpointing)", activation_bytes(shape, setup),
                      f"batch {setup.batch} x seq {setup.seq_len}"))
    if setup.device == "cuda" and setup.load_in_4bit:
        biggest = max(a * b for _, a, b in shape.linears())
        parts.append(Part("transient", "dequantised weight (transient)", biggest * (4 if setup.compute == "fp32" else 2),
                          "largest linear, dequantised for its matmul"))
    if setup.device == "cuda":
        allocated = sum(p.bytes for p in parts)
        parts.append(Part("overhead", "CUDA context + allocator slack", 600 * MIB + allocated // 20,
                          "600 MiB context + 5% fragmentation"))
    plan = Plan(shape, source, setup, parts, gpu_memory, paged=0 if offload else paged_bytes(sizes, setup.optimizer) // div)
    if gpu_memory is not None and not plan.fits:
        plan.advice = advise(shape, setup, gpu_memory)
    return plan


def advise(shape: Shape, setup: Setup, gpu_memory: int) -> list[str]:
    """What to change so that it fits, each with the total it would give (first the cheapest changes)."""
    out = []

    def total(s: Setup) -> int:
        return estimate(shape, s).total

    def fits(s: Setup) -> bool:
        return total(s) <= gpu_memory

    if not setup.gradient_checkpointing:
        s = replace(setup, gradient_checkpointing=True)
        out.append(f"turn on gradient checkpointing (train.gradient_checkpointing: true): {_fmt(total(s))}")
        if fits(s):
            return out
        setup = s
    if setup.optimizer in ("adamw_torch", "paged_adamw_32bit", "adamw_torch_fused") and setup.device == "cuda":
        s = replace(setup, optimizer="paged_adamw_8bit")
        out.append(f"use the paged 8-bit optimizer (train.optimizer: paged_adamw_8bit): {_fmt(total(s))}")
        if fits(s):
            return out
    for b in range(setup.batch - 1, 0, -1):
        s = replace(setup, batch=b)
        if fits(s):
            accum = math.ceil(setup.batch / b)
            out.append(f"lower train.micro_batch_size to {b} (raise train.grad_accum x{accum} to keep the "
                       f"effective batch): {_fmt(total(s))}")
            return out
    s1 = replace(setup, batch=1)
    lo, hi = 16, setup.seq_len
    if fits(replace(s1, seq_len=lo)):
        while hi - lo > 16:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(replace(s1, seq_len=mid)) else (lo, mid)
        out.append(f"micro_batch_size 1 and data.max_length {lo // 16 * 16}: {_fmt(total(replace(s1, seq_len=lo // 16 * 16)))}")
        return out
    if setup.sharding in ("fsdp", "zero3"):
        s = replace(setup, sharding=setup.sharding + "_offload")
        if fits(s):
            out.append(f"offload parameters and optimizer state to CPU RAM ({s.sharding}; fsdp_offload_params: true "
                       f"in recipes/accelerate/fsdp_qlora.yaml, with train.optimizer: adamw_torch): {_fmt(total(s))}")
            return out
    for n in (2, 4, 8):
        for sharding in ("fsdp", "fsdp_offload"):
            s = replace(setup, num_processes=n, sharding=sharding)
            if fits(s):
                out.append(f"shard over {n} GPUs ({sharding}, recipes/accelerate/fsdp_qlora.yaml"
                           f"{' with fsdp_offload_params: true' if sharding.endswith('offload') else ''}): "
                           f"{_fmt(total(s))} per GPU")
                return out
    out.append("it does not fit even sharded over 8 GPUs with CPU offload; use a smaller model")
    return out


def setup_from_recipe(recipe, *, seq_len=None, batch=None, num_processes=1, sharding=None, device="cuda") -> Setup:
    """The Setup a recipe trains with on `device` (auto choices resolved the way hardware.py resolves them)."""
    q, t = recipe.quantization, recipe.train
    compute = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[q.compute_dtype] if device == "cuda" else "fp32"
    optimizer = t.optimizer
    if optimizer == "auto":
        optimizer = "paged_adamw_8bit" if device == "cuda" else "adamw_torch"
    elif device != "cuda" and optimizer != "adamw_torch":
        optimizer = "adamw_torch"
    if sharding is None:
        sharding = "ddp" if num_processes > 1 else "none"
    if batch is None:
        # Packed without flash-attention, train.py feeds one max_length block per forward pass.
        flash = recipe.model.attn_implementation == "flash_attention_2" and device == "cuda"
        batch = 1 if recipe.data.packing and not flash else t.micro_batch_size
    return Setup(seq_len=seq_len or recipe.data.max_length, batch=batch,
                 load_in_4bit=q.load_in_4bit, double_quant=q.double_quant, compute=compute, lora_r=recipe.lora.r,
                 lora_dropout=recipe.lora.dropout,
                 target_modules=recipe.lora.target_modules if isinstance(recipe.lora.target_modules, str)
                 else tuple(recipe.lora.target_modules),
                 optimizer=optimizer, gradient_checkpointing=t.gradient_checkpointing is not False,
                 num_processes=num_processes, sharding=sharding, device=device)


AUTO_CKPT_FRACTION = {"cuda": 0.8, "cpu": 0.5}
"""gradient_checkpointing: auto turns it off only when the plan without it needs at most this fraction of the
memory: the planner is validated to 4% on the CPU but not yet on a GPU, and on a CPU other processes share the
RAM. Measured on SmolLM2 on this CPU (bench/RESULTS.md): without checkpointing, packed training ran 26% faster (a
recomputed layer recomputes attention over a whole packed block) and padded training 16% faster."""


def plan_recipe(recipe, gpu_memory: int | None, **kw) -> Plan:
    """The plan of a recipe; train.gradient_checkpointing: auto is resolved as train() resolves it."""
    shape, source = resolve_shape(recipe.model.base, kw.pop("shape", None))
    setup = setup_from_recipe(recipe, **kw)
    if recipe.train.gradient_checkpointing == "auto":
        ckpt, why = auto_checkpointing(shape, setup, gpu_memory)
        setup = replace(setup, gradient_checkpointing=ckpt)
        plan = estimate(shape, setup, gpu_memory, source)
        plan.notes.append(f"gradient checkpointing auto: {why}")
        return plan
    return estimate(shape, setup, gpu_memory, source)


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
        return False, f"off (the run needs {_fmt(without)} without it, within {_fmt(limit)}, " \
                      f"{fraction:.0%} of {_fmt(memory)} {where})"
    return True, f"on (without it the run would need {_fmt(without)}, more than {_fmt(limit)} of {_fmt(memory)} {where})"


def checkpointing_for_run(recipe, hw, memory: int | None = None) -> tuple[bool, str]:
    """train.gradient_checkpointing resolved for this process: the recipe's value, or the auto decision against
    the memory this process has (the GPU's, per process with the launch's sharding; on a CPU half the available
    RAM, which other processes share). Unknown shapes keep it on."""
    value = recipe.train.gradient_checkpointing
    if value != "auto":
        return bool(value), f"{'on' if value else 'off'} (train.gradient_checkpointing: {str(value).lower()})"
    import os

    from finetune import distributed

    if memory is None:
        if hw.cuda:
            import torch

            memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        else:
            import psutil

            memory = psutil.virtual_memory().available
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sharding = ("fsdp" if distributed.sharded() else "ddp") if world > 1 else "none"
    try:
        shape, _ = resolve_shape(recipe.model.base)
        setup = setup_from_recipe(recipe, num_processes=world, sharding=sharding, device="cuda" if hw.cuda else "cpu")
    except PlanError as e:
        return True, f"on (auto: the model's shape is unknown to the planner: {e})"
    return auto_checkpointing(shape, setup, memory)


def read_accelerate_config(path: str | Path) -> tuple[int, str]:
    """(num_processes, sharding) from an `accelerate launch --config_file` YAML."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise PlanError(f"--accelerate-config: cannot read {path}: {e}") from None
    n = int(cfg.get("num_processes") or 1) * 1
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


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*$", re.I)


def parse_size(text: str) -> int:
    """'24GiB', '24GB', '80G', '40960MiB' -> bytes. A bare number is GiB.

    GB is read as GiB, as GPU makers use it: a "24GB" RTX 4090 has 24564 MiB, an "80GB" A100 has 80 GiB."""
    m = _SIZE.match(text)
    if not m:
        raise PlanError(f"--gpu-memory: cannot read {text!r}; write e.g. 24GiB, 80GB or 48")
    value, unit = float(m.group(1)), (m.group(2) or "GiB").upper()
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    if unit == "B":
        return int(value)
    return int(value * 1024 ** powers[unit[0]])


def _fmt(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB // 4 else f"{n / MIB:.1f} MiB"


def render(plan: Plan) -> str:
    s, sh = plan.setup, plan.shape
    lines = [f"model: {sh.name} ({sh.n_params() / 1e9:.2f}B parameters; shape from {plan.shape_source})",
             f"setup: seq {s.seq_len} x micro-batch {s.batch}, LoRA r={s.lora_r}, {s.optimizer}, compute {s.compute}, "
             f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}, "
             f"{s.num_processes} process(es), sharding {s.sharding}, per {'GPU' if s.device == 'cuda' else 'process'}"]
    width = max(len(p.label) for p in plan.parts)
    for p in plan.parts:
        lines.append(f"  {p.label.ljust(width)}  {_fmt(p.bytes):>11}  {p.note}")
    lines.append(f"  {'peak allocated (cf. torch.cuda.max_memory_allocated)'.ljust(width)}  {_fmt(plan.peak_allocated):>11}")
    lines.append(f"  {'total needed'.ljust(width)}  {_fmt(plan.total):>11}")
    lines.extend(plan.notes)
    if plan.gpu_memory is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"{verdict} in {_fmt(plan.gpu_memory)} ({100 * plan.total / plan.gpu_memory:.0f}% used)")
        for a in plan.advice:
            lines.append(f"  - {a}")
    return "\n".join(lines)
