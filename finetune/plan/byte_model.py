"""The byte model: what bitsandbytes, peft and torch allocate for a QLoRA run, part by part.

Weights and optimizer state are counted byte for byte the way those libraries allocate them (tests/test_plan.py
checks this exactly, with finetune/memory.py, against models loaded on the CPU). Activations come from counting
the tensors autograd saves in a LLaMA decoder layer under our pipeline's dtypes; the per-token coefficients in
ACT_COEFFS were measured on the CPU with the profiler (fp32, and bf16 autocast as a stand-in for a GPU): the
measurements are in bench/RESULTS.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.plan.shapes import Shape


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
    chunked_loss: bool = True
    """The loss never holds [tokens, vocab] logits: TRL 1.16's fused LM head (Triton tiles) on a GPU,
    finetune/loss.py's token chunks on the CPU. False: the model's own full-logits loss."""
    use_dora: bool = False
    """lora.use_dora: a trained magnitude vector per adapted linear, and what DoRA's forward keeps (dora_bytes)."""
    new_tokens: int = 0
    """Rows data.add_tokens / add_template_tokens add to the embeddings (the vocabulary grows by this many)."""
    token_tables: int = 0
    """How many embedding matrices train those rows (peft's trainable_token_indices): embed_tokens, and lm_head
    when untied and not in modules_to_save. Each holds a [new_tokens, hidden] delta, its gradient and Adam state."""
    wrapped_head: bool = False
    """lm_head is a peft wrapper (trainable token rows, or modules_to_save): finetune/loss.py does not serve it, so
    on the CPU the loss runs TRL's own torch path (logits_bytes, wrapped_head_bytes)."""
    loss_head: str = "ours"
    """ours: SFT's loss (finetune/loss.py on the CPU); trl: TRL's preference trainers, whose fused LM head runs its
    own chunked torch path on the CPU (a [min(tokens, 4096), 32768] matmul buffer whatever the vocabulary)."""


SHARDINGS = ("none", "ddp", "fsdp", "fsdp_offload", "zero3", "zero3_offload")


def nf4_weight_bytes(n: int, double_quant: bool, blocksize: int = 64) -> int:
    """Bytes of one 4-bit Linear weight with n elements, as bitsandbytes 0.50 stores it: nf4_split's two parts."""
    return sum(nf4_split(n, double_quant, blocksize))


def nf4_split(n: int, double_quant: bool, blocksize: int = 64) -> tuple[int, int]:
    """(packed data, quantisation constants) of one 4-bit Linear weight with n elements, in bytes.

    packed data n/2 bytes (the Params4bit parameter); one absmax per block of 64: float32, or with double quant
    uint8 plus a float32 absmax per 256 of those, a float32 offset and the 256-entry float32 code of the second
    level. Every layer also keeps its own 16-entry float32 NF4 code. The constants are not parameters: FSDP and
    ZeRO-3 leave them whole on every rank (the Linear4bit module keeps its quant_state).
    """
    blocks = -(-n // blocksize)
    packed = (n + 1) // 2
    if not double_quant:
        return packed, 4 * blocks + 16 * 4
    return packed, blocks + 4 * (-(-blocks // 256)) + 4 + 256 * 4 + 16 * 4


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


def weight_parts(shape: Shape, setup: Setup) -> dict[str, int]:
    """Bytes of the frozen base: 4-bit linears (or 16-bit ones), kept weights and buffers. base is four_bit (the
    packed 4-bit parameters) + quant_state (their quantisation constants), or the 16-bit linears."""
    sharded = setup.sharding.startswith(("fsdp", "zero3"))
    compute_bytes = 4 if setup.compute == "fp32" else 2
    # Non-sharded QLoRA runs peft's prepare_model_for_kbit_training, which upcasts every non-4-bit weight to
    # fp32. Sharded runs skip it so every weight in an FSDP unit shares the quant_storage dtype.
    kept_bytes = 4 if (setup.load_in_4bit and not sharded) else compute_bytes
    if setup.load_in_4bit:
        split = [nf4_split(a * b, setup.double_quant) for _, a, b in shape.linears()]
        four_bit, constants = (shape.layers * sum(x) for x in zip(*split))
        base = four_bit + constants
    else:
        four_bit = constants = 0
        base = shape.layers * sum(a * b for _, a, b in shape.linears()) * compute_bytes
    kept = (shape.vocab * shape.hidden * (1 if shape.tied else 2) + (2 * shape.layers + 1) * shape.hidden) * kept_bytes
    buffers = 2 * (shape.hd // 2) * 4  # rotary inv_freq and original_inv_freq, float32
    # peft's trainable token layers keep a copy of the rows they train (trainable_tokens_original)
    buffers += trained_token_tables(shape, setup) * setup.new_tokens * shape.hidden * kept_bytes
    return {"base": base, "four_bit": four_bit, "quant_state": constants, "kept": kept, "buffers": buffers,
            "kept_dtype_bytes": kept_bytes}


def lora_tensor_sizes(shape: Shape, setup: Setup) -> list[int]:
    """Element counts of the trainable tensors, layer by layer (A, B and with DoRA its magnitude vector, one
    entry per output row), then the new token rows of each embedding matrix that trains them."""
    sizes = []
    for _ in range(shape.layers):
        for _, a, b in lora_targets(shape, setup.target_modules):
            sizes += [setup.lora_r * a, b * setup.lora_r] + ([b] if setup.use_dora else [])
    return sizes + [setup.new_tokens * shape.hidden] * trained_token_tables(shape, setup)


def trained_token_tables(shape: Shape, setup: Setup) -> int:
    """Embedding matrices whose new rows train (a tied head shares the input embedding's delta)."""
    return min(setup.token_tables, 1 if shape.tied else 2) if setup.new_tokens else 0


def tensors_per_adapter(setup: Setup) -> int:
    return 3 if setup.use_dora else 2


def dora_bytes(shape: Shape, setup: Setup) -> tuple[int, int]:
    """(bytes per token, bytes per layer) that DoRA adds to what a decoder layer keeps for backward (peft 0.21's
    DoraLinearLayer.forward): the magnitude scale multiplies the base output and the LoRA output, and a
    multiplication by a trained tensor keeps its other operand, so both [tokens, out] results stay alive (in the
    activation dtype). With LoRA dropout peft recomputes the base output from the dequantized weight, and
    F.linear keeps that fp32/compute-dtype copy of every adapted 4-bit weight until backward (a dense base's
    own weight is no copy). Checked against the profiler: tests/test_plan_variants.py."""
    if not setup.use_dora:
        return 0, 0
    targets = lora_targets(shape, setup.target_modules)
    act = 4 if setup.compute == "fp32" else 2
    per_token = 2 * act * sum(out for _, _, out in targets)
    copies = setup.lora_dropout > 0 and setup.load_in_4bit
    per_layer = sum(a * b for _, a, b in targets) * (4 if setup.compute == "fp32" else 2) if copies else 0
    return per_token, per_layer


def adapter_dtype_bytes(setup: Setup) -> int:
    # We keep adapters in fp32 (train.keep_adapter_fp32); sharded runs keep them in the storage dtype so FSDP
    # can flatten them with the base weights.
    return 2 if setup.sharding.startswith(("fsdp", "zero3")) and setup.compute != "fp32" else 4


def lora_dropout_bytes(shape: Shape, setup: Setup) -> int:
    """Per token and layer, what LoRA dropout adds: peft gives every adapted linear its own Dropout, whose fp32
    output (lora_A's saved input, no longer shared with the base layer's) and bool mask live until backward.
    Under bf16 autocast lora_A saves its own bf16 copy either way, so the hidden-sized inputs add 3 bytes and
    the MLP's fp32 intermediate 4. Checked against the profiler with and without dropout: bench/RESULTS.md."""
    if setup.lora_dropout <= 0:
        return 0
    targets = lora_targets(shape, setup.target_modules)
    if setup.compute == "fp32":
        return sum(5 * a for _, a, _ in targets)
    return sum((4 if name == "down_proj" else 3) * a for name, a, _ in targets)


LOSS_CHUNK_BYTES = 32 * 2**20
"""fp32 logits per token chunk of finetune/loss.py (which reads it from here)."""
TRL_TILE = (4096, 32768)
"""Tokens x vocabulary of one tile of TRL's Triton fused LM head (trl/kernels/chunked_logprob.py)."""


def chunk_tokens(vocab: int, budget: int = LOSS_CHUNK_BYTES) -> int:
    """Tokens per chunk of finetune/loss.py: as many as `budget` bytes of fp32 logits hold (at least 16)."""
    return max(16, budget // (4 * vocab))


def logits_bytes(shape: Shape, setup: Setup, chunked: bool | None = None) -> int:
    """Peak bytes of the loss's logits phase for one forward. Full logits: the fp32 logits, their log-softmax and
    its gradient live together (12 bytes x vocab per token, measured: bench/RESULTS.md). Chunked on the CPU
    (finetune/loss.py): the chunk's fp32 logits and exp, plus per scored token its gradient d log p / d hidden
    (fp32, kept from forward to backward) and a few scalars. TRL's Triton tiles on a GPU: one tile of logits in
    the compute dtype, plus fp32 per-token statistics."""
    chunked = setup.chunked_loss if chunked is None else chunked
    tokens = setup.seq_len * setup.batch
    if not chunked:
        return tokens * (12 * shape.vocab + 256) + wrapped_head_bytes(shape, setup)
    if setup.device == "cpu" and (setup.loss_head == "trl" or setup.wrapped_head):
        # trl/kernels/chunked_logprob.py without Triton: one fp32 buffer of TOKEN_CHUNK_SIZE x chunk_size (4096 x
        # 32768) per pass, fp32 per-token statistics, and in backward the fp32 gradient of the hidden states.
        # A wrapped (trained) head adds peft's merged weight and its fp32 gradient.
        # (and six fp32 [tokens, vocab] tile temporaries of the torch path, measured with the profiler)
        head = wrapped_head_bytes(shape, setup) + 24 * tokens * min(shape.vocab, TRL_TILE[1]) * (
            setup.wrapped_head or setup.loss_head == "trl")
        return 4 * min(tokens, TRL_TILE[0]) * TRL_TILE[1] + tokens * (4 * shape.hidden + 32) + head
    if setup.device == "cpu":
        return 8 * shape.vocab * min(tokens, chunk_tokens(shape.vocab)) + tokens * (4 * shape.hidden + 32)
    tile = min(tokens, TRL_TILE[0]) * min(shape.vocab, TRL_TILE[1])
    return tile * (4 if setup.compute == "fp32" else 2) + tokens * (4 * shape.hidden + 48)


def wrapped_head_bytes(shape: Shape, setup: Setup) -> int:
    """A trained (peft-wrapped) lm_head: the merged [vocab, hidden] weight peft builds each forward is kept for
    backward, and backward makes its full fp32 gradient before taking the trained rows."""
    return 8 * shape.vocab * shape.hidden if setup.wrapped_head else 0


def activation_bytes(shape: Shape, setup: Setup) -> int:
    """Peak bytes of activations: what every layer stores for backward, plus the larger of the loss's
    log-softmax and one layer's backward working set."""
    coeff = ACT_COEFFS["fp32" if setup.compute == "fp32" else "bf16"]
    r_sum = setup.lora_r * len(lora_targets(shape, setup.target_modules))
    drop = lora_dropout_bytes(shape, setup)
    dora, dora_const = dora_bytes(shape, setup)
    layer = coeff["layer"](shape, r_sum) + drop + dora
    res = weight_parts(shape, setup)["kept_dtype_bytes"]  # the residual stream has the embeddings' dtype
    stored = shape.layers * (coeff["ckpt"](shape, res) if setup.gradient_checkpointing else layer)
    # While a recomputed layer runs backward, the dropout inputs' gradients are live too (the 3/10 is fitted to
    # the profiler's peak, bench/RESULTS.md).
    phase = coeff["layer_phase"](shape) + (layer + drop * 3 // 10 if setup.gradient_checkpointing else 0)
    tokens = setup.seq_len * setup.batch
    # DoRA's weight copies, per live layer: all of them, or with checkpointing the recomputed layer's and (fitted to
    # the profiler's peak) the next one's
    const_layers = min(2, shape.layers) if setup.gradient_checkpointing else shape.layers
    # The bf16 copy autocast makes of an fp32 lm_head only exists when prepare_model_for_kbit_training upcast it.
    const = coeff["loss_const"](shape) if res == 4 else 0
    if setup.chunked_loss and setup.device == "cuda" and const:
        const = 2 * min(shape.vocab, TRL_TILE[1]) * shape.hidden  # TRL casts one vocabulary tile of lm_head at a time
    loss = logits_bytes(shape, setup) + const if setup.chunked_loss else \
        tokens * coeff["loss"](shape) + const + wrapped_head_bytes(shape, setup)
    return tokens * stored + const_layers * dora_const + max(loss, tokens * phase)
