"""What the machine can do, and the precision/optimizer/attention choices that follow from it.

Kept apart from model loading so the mapping recipe + hardware -> trainer arguments can be unit-tested
with a faked GPU.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch

from finetune.errors import UserError


class HardwareError(UserError, RuntimeError):
    """The recipe asks for hardware this machine does not have."""


@dataclass(frozen=True)
class Hardware:
    cuda: bool
    bf16: bool
    """Whether the *GPU* supports bf16 matmuls. On CPU we never use bf16 autocast (see Precision)."""
    flash_attn: bool
    name: str


def detect_hardware(device: str = "auto") -> Hardware:
    cuda = torch.cuda.is_available() and device != "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise HardwareError("train.device: cuda was asked for but no CUDA GPU is visible (set train.device: auto)")
    return Hardware(
        cuda=cuda,
        bf16=bool(cuda and torch.cuda.is_bf16_supported()),
        flash_attn=importlib.util.find_spec("flash_attn") is not None,
        name=torch.cuda.get_device_name(0) if cuda else "cpu",
    )


@dataclass(frozen=True)
class Precision:
    compute_dtype: torch.dtype
    bf16: bool
    """Trainer autocast flags: always equal to the 4-bit compute dtype, never TRL's default."""
    fp16: bool
    optimizer: str
    attn_implementation: str
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def dtype_name(self) -> str:
        return str(self.compute_dtype).removeprefix("torch.")


def choose_precision(recipe, hw: Hardware) -> Precision:
    """Map the recipe onto dtype, autocast flags, optimizer and attention for this hardware.

    Autocast must agree with the 4-bit compute dtype: bf16 autocast over NF4 layers computing in fp32 made
    the loss rise on CPU (bitsandbytes has no autograd kernel for that mix), so the flags are derived from
    the one dtype chosen here and never left to SFTConfig's bf16=True default.
    """
    warnings = []
    wanted = recipe.quantization.compute_dtype
    if wanted == "bfloat16" and not hw.bf16:
        where = "on CPU" if not hw.cuda else f"on {hw.name}, which lacks bf16"
        warnings.append(f"quantization.compute_dtype: bfloat16 is not used {where}; falling back to float32 "
                        "(set compute_dtype: float32 to silence this)")
        wanted = "float32"
    if wanted == "float16":
        warnings.append("quantization.compute_dtype: float16 on LLaMA overflows in attention and MLP activations; "
                        "bfloat16 is recommended where the GPU supports it")
        if not hw.cuda:
            warnings.append("quantization.compute_dtype: float16 autocast is not available on CPU; using float32")
            wanted = "float32"
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[wanted]

    optimizer = recipe.train.optimizer
    if optimizer == "auto":
        optimizer = "paged_adamw_8bit" if hw.cuda else "adamw_torch"
    elif optimizer.startswith(("paged_", "adamw_8bit")) and not hw.cuda:
        warnings.append(f"train.optimizer: {optimizer} needs CUDA; using adamw_torch on CPU")
        optimizer = "adamw_torch"

    attn = recipe.model.attn_implementation
    if attn == "flash_attention_2" and not (hw.cuda and hw.flash_attn):
        warnings.append("model.attn_implementation: flash_attention_2 needs CUDA and the flash-attn package; using sdpa")
        attn = "sdpa"
    elif attn == "auto":
        attn = "sdpa"
    return Precision(dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                     optimizer=optimizer, attn_implementation=attn, warnings=tuple(warnings))
