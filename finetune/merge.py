"""`finetune merge`: fold the LoRA adapter into a standalone model that computes what the adapter computed.

The adapter was trained against dequant(NF4(W)), not against W. So the default merge reloads the base exactly
as training did (same BitsAndBytesConfig), dequantises every 4-bit layer to the compute dtype, and adds the
LoRA delta to *that*. `--base original` adds the delta to the 16-bit W instead, which carries the NF4 error
into the merged model; we allow it, but we measure it.

Every merge measures itself: `merged/fidelity.json` compares the adapter on its NF4 base with the merged
model on a probe set (KL of the next-token distributions, argmax agreement, max |Δ logit|, greedy generations).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune import rundir
from finetune.agreement import generation_agreement
from finetune.data import prompt_ids, render_ids_and_mask
from finetune.errors import UserError
from finetune.hardware import Hardware, Precision, detect_hardware
from finetune.models import (BaseSource, dequantize_4bit_layers, dequantize_8bit_layers, eight_bit_modules,
                             four_bit_modules, keep_training_nf4_layout, load_base, quantized_base, resize_for_tokenizer)
from finetune.recipe import Recipe, load_resolved
from finetune.report import write_report
from finetune.templates import ChatTemplate, saved_template

log = logging.getLogger("finetune")

BASES = ("dequantized", "original")
MAX_PROBES = 8
MAX_PROBE_TOKENS = 192
"""Per probe. The reference logits of every probe position are kept in memory while the model is merged."""
GEN_TOKENS = 16
GEN_PROMPTS = 4
"""Greedy generations compared: few and short, since the NF4 reference decodes slowly on a CPU."""

BUILTIN_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a neural network is.",
    "List three colours.",
]


class MergeError(UserError):
    """The run directory cannot be merged as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# The run directory


@dataclass
class RunInfo:
    run: Path
    recipe: Recipe
    source: BaseSource
    precision: Precision
    template: ChatTemplate
    tok: object


def read_run(run: Path) -> RunInfo:
    """Everything merge needs, read back from what `finetune train` wrote."""
    from transformers import AutoTokenizer

    run = Path(run)
    adapter = run / rundir.ADAPTER
    rundir.check_adapter(run)  # one line naming a damaged file, not a safetensors traceback later
    recipe = load_resolved(run / "resolved.yaml")
    manifest = rundir.read_manifest(run)
    base = manifest.get("base") or {}
    if not base.get("hf_path"):
        raise MergeError(f"{run / 'manifest.json'}: base.hf_path is missing; the run did not finish its setup")
    source = BaseSource(base.get("spec", recipe.model.base), base["hf_path"], base.get("gguf_file"))
    prec = manifest.get("precision") or {}
    dtype = getattr(torch, prec.get("compute_dtype", "float32"))
    # Only the dtype and the attention kernel matter for loading; the optimizer is irrelevant here.
    precision = Precision(dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, optimizer="adamw_torch",
                          attn_implementation=prec.get("attn_implementation", "sdpa"))
    tok = AutoTokenizer.from_pretrained(adapter)
    template = saved_template(recipe.data.template, tok)
    return RunInfo(run, recipe, source, precision, template, tok)


# ---------------------------------------------------------------------------------------------
# Layers: dequantise, refuse 4-bit, merge


def merge_lora(peft_model):
    """Fold the adapter into its dense base with peft's own merge (merge_and_unload); return the plain model.

    peft merges every variant the recipe can ask for: plain and rsLoRA deltas (B·A·scaling, computed in the
    adapter's fp32), DoRA (the magnitude vector rescales each merged row), trainable token rows (written into the
    embedding rows) and modules_to_save (the trained copies replace the originals).

    Refuses a model that is still quantized in memory: adding the delta to a 4-bit (or 8-bit) layer means
    re-quantising the sum, which rounds most of the (small) delta away. Dequantise first (dense_adapter_model).
    """
    from peft.tuners.lora import Linear as DenseLoraLinear
    from peft.tuners.lora import LoraLayer

    still = four_bit_modules(peft_model) + eight_bit_modules(peft_model)
    if still:
        raise MergeError(
            f"refusing to merge into a model that is still 4-bit in memory ({len(still)} layers, e.g. {still[0]}): "
            "the sum would be re-quantised to NF4 and most of the LoRA update rounded away. Dequantise the base "
            "first (finetune merge --base dequantized does this).")
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer) and not isinstance(mod, DenseLoraLinear):
            raise MergeError(f"{name}: {type(mod).__module__}.{type(mod).__name__} is not peft's dense LoRA layer; "
                             "load the adapter onto the dequantized base (dense_adapter_model) before merging")
    return peft_model.merge_and_unload(safe_merge=True)


def dense_adapter_model(peft_model, adapter_dir: Path, dtype: torch.dtype):
    """The same adapter on dense dequant(quantized W) layers: peft's unload() gives back the quantized base, each
    quantized layer becomes a plain Linear holding exactly the weights training used, and the adapter is loaded
    again onto it, so peft wraps dense layers and merges with its dense code."""
    from peft import PeftModel

    base = peft_model.unload()
    n = dequantize_4bit_layers(base, dtype) + dequantize_8bit_layers(base, dtype)
    log.info("merge: dequantised %d quantized layers to %s", n, dtype)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Probes and fidelity


@dataclass
class Probes:
    sequences: list[list[int]]
    """Full conversations (prompt + reference reply): next-token distributions are compared at every position."""
    prompts: list[list[int]]
    """Prompts ending in the generation prompt: greedy generations are compared."""
    source: str


def probe_set(run: Path, tok, template: ChatTemplate, limit: int = MAX_PROBES) -> Probes:
    """The held-out rows of the run, or a few built-in prompts when there are none."""
    rows = []
    held = Path(run) / "held_out.jsonl"
    if held.is_file():
        rows = [json.loads(line) for line in held.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r.get("messages") or r.get("text")][:limit]
    seqs, prompts = [], []
    for r in rows:
        msgs = r.get("messages")
        if msgs:
            seqs.append(render_ids_and_mask(msgs, tok, template)[0])
            prompt = msgs[:-1] if msgs[-1]["role"] == "assistant" and len(msgs) > 1 else msgs
            prompts.append(prompt_ids(prompt, tok, template))
        else:
            ids = tok(r["text"], add_special_tokens=False)["input_ids"]
            seqs.append(ids)
            prompts.append(ids[: max(1, len(ids) // 2)])
    source = f"{len(rows)} held-out rows"
    if not rows:
        source = f"{len(BUILTIN_PROMPTS)} built-in prompts"
        for p in BUILTIN_PROMPTS:
            ids = prompt_ids([{"role": "user", "content": p}], tok, template)
            seqs.append(ids)
            prompts.append(ids)
    return Probes([s[:MAX_PROBE_TOKENS] for s in seqs], [p[:MAX_PROBE_TOKENS] for p in prompts], source)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def probe_logits(model, probes: Probes) -> list[torch.Tensor]:
    """fp32 logits on the CPU for every probe position, one sequence at a time (no padding effects)."""
    dev = _device_of(model)
    out = []
    for ids in probes.sequences:
        x = torch.tensor([ids], device=dev)
        out.append(model(input_ids=x, use_cache=False).logits[0].float().cpu())
    return out


@torch.no_grad()
def greedy(model, probes: Probes, stop_ids: list[int], n: int = GEN_TOKENS) -> list[list[int]]:
    dev = _device_of(model)
    gens = []
    for ids in probes.prompts[:GEN_PROMPTS]:
        x = torch.tensor([ids], device=dev)
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             eos_token_id=stop_ids, pad_token_id=stop_ids[0])
        gens.append(out[0, len(ids):].tolist())
    return gens


def compare_logits(ref: list[torch.Tensor], new: list[torch.Tensor]) -> dict:
    """KL(ref || new) of the next-token distributions, argmax agreement and max |Δ logit| over all positions."""
    kls, agree, total, max_dlogit = [], 0, 0, 0.0
    for r, n in zip(ref, new):
        lr, ln = torch.log_softmax(r.double(), -1), torch.log_softmax(n.double(), -1)
        kls.append((lr.exp() * (lr - ln)).sum(-1).clamp_min(0))
        agree += int((r.argmax(-1) == n.argmax(-1)).sum())
        total += r.shape[0]
        max_dlogit = max(max_dlogit, float((r - n).abs().max()))
    kl = torch.cat(kls)
    return {"mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "argmax_agreement": agree / max(total, 1),
            "positions": total, "max_abs_dlogit": max_dlogit}


compare_generations = generation_agreement  # one definition for merge and export (finetune/agreement.py)


def fidelity_summary(f: dict) -> str:
    g = f["generation"]
    return (f"merge fidelity ({f['base']} base, {f['dtype']}, {f['probes']}): "
            f"mean KL {f['mean_kl']:.2e}, max KL {f['max_kl']:.2e}, "
            f"argmax agreement {100 * f['argmax_agreement']:.2f}% of {f['positions']} positions, "
            f"max |Δlogit| {f['max_abs_dlogit']:.2e}, greedy generations identical {g['identical']}/{g['prompts']} "
            f"(token agreement {100 * g['token_agreement']:.1f}%); "
            f"for scale, the adapter moved the base by mean KL {f['adapter_vs_base_mean_kl']:.2e}")


# ---------------------------------------------------------------------------------------------
# The stage


def _choose_hardware(info: RunInfo) -> Hardware:
    """The GPU when one has room for a dense copy of the model, else the CPU (slower, never out of memory)."""
    hw = detect_hardware("auto")
    if not hw.cuda:
        return hw
    src = Path(info.source.hf_path)
    need = 2 * sum(p.stat().st_size for p in src.glob("*.safetensors")) if src.is_dir() else 0
    free, _ = torch.cuda.mem_get_info()
    if need and free < 1.2 * need:
        log.warning("merge: the GPU has %.1f GB free and the dense model needs about %.1f GB; merging on the CPU",
                    free / 1e9, need / 1e9)
        return Hardware(cuda=False, bf16=False, flash_attn=False, name="cpu")
    return hw


def _load_with_adapter(info: RunInfo, hw: Hardware, quantized: bool):
    from peft import PeftModel

    base = load_base(info.recipe, info.source, info.precision, hw, quantized=quantized)
    resize_for_tokenizer(base, info.tok)
    keep_training_nf4_layout(base)
    model = PeftModel.from_pretrained(base, str(info.run / "adapter"), is_trainable=False)
    model.eval()
    return model


def merge_run(run: Path, base: str = "dequantized") -> Path:
    """Write run/merged/ (safetensors shards, config, generation config, tokenizer) and merged/fidelity.json."""
    if base not in BASES:
        raise MergeError(f"--base: must be one of {', '.join(BASES)} (got {base!r})")
    run = Path(run)
    info = read_run(run)
    rundir.setup_logging(run, "merge.log")
    started = time.time()
    hw = _choose_hardware(info)
    tok, template = info.tok, info.template
    stop_ids = list(dict.fromkeys(tok.convert_tokens_to_ids(t) for t in template.stop_tokens(tok)))
    probes = probe_set(run, tok, template)
    quantized = quantized_base(info.recipe)

    # 1. The reference: the adapter on the base exactly as training saw it (4-bit when training was).
    model = _load_with_adapter(info, hw, quantized=quantized)
    ref_logits = probe_logits(model, probes)
    ref_gen = greedy(model, probes, stop_ids)
    with model.disable_adapter():
        base_logits = probe_logits(model, probes)
    moved = compare_logits(base_logits, ref_logits)["mean_kl"]
    del base_logits

    # 2. The dense base the delta goes into.
    if base == "dequantized":
        if quantized:
            model = dense_adapter_model(model, run / rundir.ADAPTER, info.precision.compute_dtype)
    else:
        del model
        model = _load_with_adapter(info, hw, quantized=False)
    merged = merge_lora(model)

    # 3. Measure the merged model against the reference.
    fid = {"base": base, "dtype": info.precision.dtype_name, "probes": probes.source, "device": hw.name,
           **compare_logits(ref_logits, probe_logits(merged, probes)),
           "generation": compare_generations(ref_gen, greedy(merged, probes, stop_ids)),
           "adapter_vs_base_mean_kl": moved}
    del ref_logits
    fid["summary"] = fidelity_summary(fid)

    # 4. Save atomically: a temp dir renamed into place, the completion marker (which adapter) last.
    with rundir.publishing_dir(run / rundir.MERGED, rundir.MARKER, rundir.merged_marker_body(run, base)) as tmp:
        _save(merged, tok, template, tmp)
        rundir.write_json(tmp / "fidelity.json", fid)
    out = run / rundir.MERGED
    rundir.add_event(run, "merge", base=base, seconds=round(time.time() - started, 1))
    print(fid["summary"], flush=True)
    if base == "original":
        log.warning("merged into the original 16-bit weights: the adapter was trained on their NF4 version, so the "
                    "merged model drifts from it as measured above (use --base dequantized to avoid this)")
    write_report(run)
    return out


def _save(model, tok, template: ChatTemplate, out: Path) -> None:
    from transformers import GenerationConfig

    model.config.use_cache = True
    eos = list(dict.fromkeys([tok.eos_token_id] + [tok.convert_tokens_to_ids(t) for t in template.stop_tokens(tok)]))
    gen = getattr(model, "generation_config", None) or GenerationConfig()
    # Generation must stop at the template's end-of-turn token as well as EOS.
    gen.eos_token_id = eos if len(eos) > 1 else eos[0]
    gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = tok.bos_token_id
    model.generation_config = gen
    model.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
    tok.chat_template = template.source
    tok.save_pretrained(out)

