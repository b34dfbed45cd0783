"""The LoRA adapter as a GGUF in llama.cpp's adapter layout, and the base it applies to as a GGUF.

The layout is what llama.cpp's convert_lora_to_gguf.py writes and its adapter loader checks:
- metadata general.architecture = llama, general.type = adapter, adapter.type = lora, adapter.lora.alpha;
- per adapted matrix `blk.N.attn_q.weight`: `blk.N.attn_q.weight.lora_a` holding A as PEFT stores it
  (rank x in_features) and `.lora_b` holding B (out_features x rank), in GGUF's reversed dimension order
  ne = [in, r] and [r, out]; for q/k, B's rows get the same rotary permutation as the merged weight;
- llama.cpp scales B·A by alpha / rank (rank read from A). PEFT's scale can differ (rslora: alpha / sqrt(r);
  alpha_pattern: another alpha for some modules); then that factor is folded into B so that the product
  llama.cpp computes is exactly PEFT's.

The base is what training computed with: for a 4-bit run the NF4 weights dequantized exactly as merge does,
not the original 16-bit ones; it goes through the same GGUF writer as the merged model.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.errors import UserError
from finetune.export.gguf import permute_qk

log = logging.getLogger("finetune")


class AdapterGGUFError(UserError):
    """The adapter cannot be written as a llama.cpp LoRA GGUF; the message says why."""


@dataclass
class AdapterGGUF:
    path: Path
    alpha: float
    pairs: int
    folded: list[str]
    """Modules whose B absorbed PEFT's scale / llama.cpp's scale (rslora or alpha_pattern)."""


def _alpha_for(cfg: dict, module: str) -> float:
    # PEFT's rule (peft.utils.other.get_pattern_key): a pattern matches the end of the module name.
    for pattern, alpha in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return float(cfg["lora_alpha"])


def _pairs(adapter_dir: Path) -> dict[str, dict]:
    """{base weight name (model.layers.0.self_attn.q_proj.weight): {"A": array, "B": array}}; anything that
    is not a LoRA A/B matrix is an error, since llama.cpp's adapter holds nothing else."""
    from safetensors.numpy import load_file

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise AdapterGGUFError(f"{path}: not found; the GGUF adapter is made from the safetensors adapter")
    pairs: dict[str, dict] = {}
    for key, value in load_file(path).items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise AdapterGGUFError(f"{path.name}: {key} is not a LoRA A/B matrix; llama.cpp's LoRA adapters hold only "
                                   "those (modules_to_save, DoRA magnitudes and trained embeddings are not "
                                   "supported): export the merged model (--format gguf) instead")
        pairs.setdefault(m.group(1), {})[m.group(2)] = value.astype(np.float32)
    return pairs


def write_adapter_gguf(adapter_dir: Path, config_dir: Path, out: Path, name: str = "finetune",
                       alpha: float | None = None, swap_ab: bool = False) -> AdapterGGUF:
    """Write the PEFT adapter in `adapter_dir` as a llama.cpp LoRA GGUF at `out` (published atomically).
    `config_dir` holds the base's config.json (head counts for the rotary permutation).

    `alpha` and `swap_ab` write it wrong on purpose, for the negative-control tests."""
    import gguf
    from transformers import AutoConfig

    from finetune.rundir import publishing_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if cfg.get("use_dora"):
        raise AdapterGGUFError("lora.use_dora: llama.cpp's LoRA adapters have no DoRA magnitudes; export the merged "
                               "model (--format gguf) instead")
    config = AutoConfig.from_pretrained(config_dir)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    meta_alpha = float(cfg["lora_alpha"]) if alpha is None else float(alpha)
    folded, tensors = [], []
    for module, ab in sorted(_pairs(adapter_dir).items()):
        new = names.get_name(module + ".weight", try_suffixes=(".weight",)) if module else None
        if new is None or set(ab) != {"A", "B"}:
            raise AdapterGGUFError(f"{adapter_dir.name}: {module}: no llama.cpp tensor name, or A/B missing")
        a, b = ab["A"], ab["B"]
        rank = a.shape[0]
        peft_scale = _alpha_for(cfg, module) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
        factor = peft_scale / (float(cfg["lora_alpha"]) / rank)
        if abs(factor - 1.0) > 1e-12:
            b = b * np.float32(factor)
            folded.append(module)
        if module.endswith(("q_proj", "k_proj")):
            b = permute_qk(b, n_head if module.endswith("q_proj") else n_kv)
        if swap_ab:
            a, b = b.T.copy(), a.T.copy()
        tensors.append((new + ".lora_a", np.ascontiguousarray(a)))  # new is already blk.N.attn_q.weight
        tensors.append((new + ".lora_b", np.ascontiguousarray(b)))
    out.parent.mkdir(parents=True, exist_ok=True)
    with publishing_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_name(name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, meta_alpha)
        for tname, arr in tensors:
            writer.add_tensor(tname, arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    if folded:
        log.info("gguf_adapter: PEFT's scale folded into B for %d modules (rslora or alpha_pattern)", len(folded))
    return AdapterGGUF(out, meta_alpha, len(tensors) // 2, folded)


# ---------------------------------------------------------------------------------------------
# The base the adapter applies to


def dense_base_dir(run: Path, tok, work: Path) -> Path:
    """An HF directory holding the base exactly as training computed with it: for a 4-bit run the NF4 weights
    dequantized to fp32 (layer by layer, as merge does), else the base itself; with the run's tokenizer."""
    import torch

    from finetune import rundir
    from finetune.hardware import Precision
    from finetune.models import (BaseSource, dequantize_4bit_layers, dequantize_8bit_layers, load_base,
                                 quantized_base, resize_for_tokenizer)
    from finetune.recipe import load_resolved

    recipe = load_resolved(run / "resolved.yaml")
    base = rundir.read_manifest(run).get("base") or {}
    if not base.get("hf_path"):
        raise AdapterGGUFError(f"{run / 'manifest.json'}: base.hf_path is missing; the run did not finish its setup")
    source = BaseSource(base.get("spec", recipe.model.base), base["hf_path"], base.get("gguf_file"))
    precision = Precision(torch.float32, bf16=False, fp16=False, optimizer="adamw_torch",
                          attn_implementation="sdpa")
    model = load_base(recipe, source, precision, _cpu(), quantized=quantized_base(recipe))
    resize_for_tokenizer(model, tok)
    dequantize_4bit_layers(model, torch.float32)
    dequantize_8bit_layers(model, torch.float32)
    out = Path(tempfile.mkdtemp(prefix="base-", dir=work))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    del model
    return out


def _cpu():
    from finetune.hardware import detect_hardware

    return detect_hardware("cpu")


def remove_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
