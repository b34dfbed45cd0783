"""`finetune plan`: estimate the peak accelerator memory of a recipe before anything is downloaded.

The estimate is a sum of named parts (parts.py), each computed from the model shape (shapes.py: LLaMA family)
and the run's setup by a byte model (byte_model.py) that counts what bitsandbytes, peft and torch allocate.
When it does not fit, advice.py searches for the cheapest change that does. from_recipe.py turns a recipe and
the machine it will run on into a setup, the way train() resolves it (precision from hardware.choose_precision,
`gradient_checkpointing: auto` from the plan); render.py prints the table.

Checked byte for byte against models loaded on the CPU by tests/test_plan.py, and the per-rank weights under each
shipped accelerate config against what 2-rank CPU runs hold (tests/per_rank.py); on a GPU, bench/gpu.py compares
the estimate with torch.cuda.max_memory_allocated; the figures are in bench/RESULTS.md.

Importing this package does not import torch (`finetune --help` and `finetune validate` stay fast); planning a
recipe does, through hardware.choose_precision.
"""

from finetune.plan.advice import advise
from finetune.plan.byte_model import (ACT_COEFFS, SHARDINGS, Setup, activation_bytes, adapter_dtype_bytes,
                                      chunk_tokens, logits_bytes, lora_dropout_bytes, lora_targets, lora_tensor_sizes,
                                      nf4_weight_bytes,
                                      optimizer_state_bytes, paged_bytes, weight_parts)
from finetune.plan.estimator import Plan, estimate
from finetune.plan.from_recipe import (AUTO_CKPT_FRACTION, auto_checkpointing, checkpointing_for_run, plan_recipe,
                                       read_accelerate_config, setup_from_recipe, target_precision)
from finetune.plan.parts import Part, plan_parts, total_bytes
from finetune.plan.render import render
from finetune.plan.shapes import ALIASES, SHAPES, Shape, resolve_shape, shape_from_config
from finetune.plan.sizes import GIB, MIB, PlanError, fmt, parse_size

__all__ = [
    "ACT_COEFFS", "ALIASES", "AUTO_CKPT_FRACTION", "GIB", "MIB", "SHAPES", "SHARDINGS", "Part", "Plan",
    "PlanError", "Setup", "Shape", "activation_bytes", "adapter_dtype_bytes", "advise", "auto_checkpointing",
    "checkpointing_for_run", "chunk_tokens", "estimate", "fmt", "logits_bytes", "lora_dropout_bytes", "lora_targets", "lora_tensor_sizes",
    "nf4_weight_bytes", "optimizer_state_bytes", "paged_bytes", "parse_size", "plan_parts", "plan_recipe",
    "read_accelerate_config", "render", "resolve_shape", "setup_from_recipe", "shape_from_config",
    "target_precision", "total_bytes", "weight_parts",
]
