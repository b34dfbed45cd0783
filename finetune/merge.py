"""`finetune merge`: fold the LoRA adapter into a standalone model that computes what the adapter computed.

The adapter was trained against dequant(NF4(W)), not against W. So the default merge reloads the base exactly
as training did (same BitsAndBytesConfig), dequantises every 4-bit layer to the compute dtype, and adds the
LoRA delta to *that*. `--base original` adds the delta to the 16-bit W instead, which carries the NF4 error
into the merged model; we allow it, but we measure it.

Every merge measures itself: `merged/fidelity.json` compares the adapter on its NF4 base with the merged
model on a probe set (KL of the next-token distributions, argmax agreement, max |Δ logit|, greedy generations).

An 8-bit (LLM.int8) base is merged the same way, into its int8 weights times their row scales. What training
computed there depends on the device it ran on (models.eight_bit_training_path): on a CPU the dequantised weights
in fp32, on CUDA LLM.int8 with int8-rounded activations. The reference is that training path, and the report adds
LLM.int8's inference path (int8 activations) beside it, with its floor: the same comparison on the base alone,
which no merge can go below. Its `int8` section states the limits applied and whether the merge is within them.
"""

from __future__ import annotations

import contextlib
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
                             eight_bit_training_path, four_bit_modules, keep_training_nf4_layout, load_base,
                             quantized_base, resize_for_tokenizer)
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
MAX_MEAN_KL = 1e-4
MIN_ARGMAX = 0.999
"""Limits for a merged model against a reference that computes with the same weights in the same dtype (an NF4
run's dequantised base, a CPU-trained 8-bit run's training path): what is left is summation order (8-bit merges of
the tiny test models: mean KL 1.6e-12 and 1.7e-11). The tests hold every fp32 merge to them; the report applies
them to 8-bit."""
INT8_FLOOR_FACTOR = 2.0
"""A comparison that involves LLM.int8's int8 activations may reach this many times its floor (the same comparison
on the base alone, no adapter). Measured with perturbed adapters that move the model by mean KL 0.75 and 4.6 on
the tiny models: merged vs LLM.int8 inference was 0.98x and 0.54x the floor; a merge without the adapter ~900x."""

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
    trained_on: str = "cpu"
    """manifest.json's device: "cpu", or the name of the CUDA GPU the adapter was trained on."""


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
    return RunInfo(run, recipe, source, precision, template, tok, manifest.get("device") or "cpu")


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
    line = (f"merge fidelity ({f['base']} base, {f['dtype']}, {f['probes']}): "
            f"mean KL {f['mean_kl']:.2e}, max KL {f['max_kl']:.2e}, "
            f"argmax agreement {100 * f['argmax_agreement']:.2f}% of {f['positions']} positions, "
            f"max |Δlogit| {f['max_abs_dlogit']:.2e}, greedy generations identical {g['identical']}/{g['prompts']} "
            f"(token agreement {100 * g['token_agreement']:.1f}%); "
            f"for scale, the adapter moved the base by mean KL {f['adapter_vs_base_mean_kl']:.2e}")
    return line + (f"; {f['int8']['summary']}" if "int8" in f else "")


@dataclass
class Reference:
    """What the merged model is measured against: the adapter on the base as training computed it."""

    logits: list[torch.Tensor]
    gen: list[list[int]]
    moved: float
    """Mean KL from the base to the adapter: the scale against which the merge's drift is read."""
    describe: str
    runtime: list[torch.Tensor] | None = None
    """8-bit: the adapter through LLM.int8's inference path (int8 activations)."""
    runtime_base: list[torch.Tensor] | None = None
    """8-bit: the base alone through that path (with the dense base, the floor)."""


def int8_training_path(trained_on: str) -> str:
    """What bitsandbytes computed in training on an 8-bit base (models.eight_bit_training_path)."""
    if trained_on == "cpu":
        return "the int8 weights dequantised, fp32 activations (bitsandbytes' CPU training path)"
    return f"LLM.int8, int8 activations (bitsandbytes on CUDA: {trained_on})"


def _describe_reference(info: RunInfo) -> str:
    q = info.recipe.quantization
    if q.load_in_8bit:
        return f"the adapter on the 8-bit base as training computed it: {int8_training_path(info.trained_on)}"
    if q.load_in_4bit:
        return f"the adapter on the {q.quant_type.upper()} base (bitsandbytes)"
    return "the adapter on the 16-bit base"


def reference_logits(model, info: RunInfo, probes: Probes, stop_ids: list[int]) -> Reference:
    """The adapter on the base as loaded for training, with and without the adapter; for an 8-bit base through the
    path training ran, plus LLM.int8's inference path (which is that path when training ran on CUDA)."""
    eight = info.recipe.quantization.load_in_8bit
    fp_path = eight and info.trained_on == "cpu"
    with eight_bit_training_path(model) if fp_path else contextlib.nullcontext(), _quiet_int8_cast():
        logits = probe_logits(model, probes)
        gen = greedy(model, probes, stop_ids)
        with model.disable_adapter():
            base = probe_logits(model, probes)
    ref = Reference(logits, gen, compare_logits(base, logits)["mean_kl"], _describe_reference(info))
    if fp_path:  # the layers are back in eval mode: LLM.int8
        with _quiet_int8_cast():
            ref.runtime = probe_logits(model, probes)
            with model.disable_adapter():
                ref.runtime_base = probe_logits(model, probes)
    elif eight:
        ref.runtime, ref.runtime_base = logits, base
    return ref


@contextlib.contextmanager
def _quiet_int8_cast():
    """bitsandbytes warns that it casts the activations to fp16 on every LLM.int8 matmul: hundreds of lines per
    probe pass. The report states what that path is."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def int8_section(trained_on: str, merged: dict, runtime: dict, floor: dict) -> dict:
    """The 8-bit report: the limits on the merged model against the training path, LLM.int8's inference path against
    the merged model beside its floor (LLM.int8 vs the dequantised weights on the base alone), and the verdict.
    Argmax is no limit where int8 activations are involved: on near ties it flips at the floor (88% measured)."""
    int8_trained = trained_on != "cpu"
    floor_limit = max(MAX_MEAN_KL, INT8_FLOOR_FACTOR * floor["mean_kl"])
    limits = {"mean_kl": floor_limit if int8_trained else MAX_MEAN_KL,
              "argmax_agreement": None if int8_trained else MIN_ARGMAX, "runtime_mean_kl": floor_limit}
    within = (merged["mean_kl"] <= limits["mean_kl"] and runtime["mean_kl"] <= floor_limit
              and (int8_trained or merged["argmax_agreement"] >= MIN_ARGMAX))
    argmax = "" if int8_trained else f", argmax ≥ {100 * MIN_ARGMAX:.1f}%"
    summary = (f"8-bit base trained on {trained_on}, reference: {int8_training_path(trained_on)}, limits against it: "
               f"mean KL ≤ {limits['mean_kl']:.2e}{argmax}; LLM.int8 inference (int8 activations) vs merged: mean "
               f"KL {runtime['mean_kl']:.2e}, argmax {100 * runtime['argmax_agreement']:.2f}%, at a floor of mean KL "
               f"{floor['mean_kl']:.2e} (the base alone, LLM.int8 vs its dequantised weights), limit "
               f"{floor_limit:.2e} ({INT8_FLOOR_FACTOR:g}x the floor): "
               + ("within the limits" if within else "OUTSIDE the limits"))
    keys = ("mean_kl", "max_kl", "argmax_agreement", "max_abs_dlogit")
    return {"trained_on": trained_on, "training_path": int8_training_path(trained_on),
            "runtime": {k: runtime[k] for k in keys}, "floor": {k: floor[k] for k in keys},
            "limits": limits, "within_limits": within, "summary": summary}


def measure(merged, ref: Reference, floor: dict | None, info: RunInfo, probes: Probes, stop_ids: list[int],
            base: str, device: str) -> dict:
    """fidelity.json: the merged model against the reference (and, 8-bit, against LLM.int8's inference path)."""
    new = probe_logits(merged, probes)
    fid = {"base": base, "dtype": info.precision.dtype_name, "probes": probes.source, "device": device,
           "reference": ref.describe, **compare_logits(ref.logits, new),
           "generation": compare_generations(ref.gen, greedy(merged, probes, stop_ids)),
           "adapter_vs_base_mean_kl": ref.moved}
    if floor is not None:
        fid["int8"] = int8_section(info.trained_on, fid, compare_logits(ref.runtime, new), floor)
    fid["summary"] = fidelity_summary(fid)
    return fid


# ---------------------------------------------------------------------------------------------
# The stage


def _choose_hardware(info: RunInfo) -> Hardware:
    """The GPU when one has room for a dense copy of the model, else the CPU (slower, never out of memory)."""
    hw = detect_hardware("auto")
    if not hw.cuda:
        return hw
    if info.recipe.quantization.load_in_8bit and info.trained_on == "cpu":
        return detect_hardware("cpu")  # bitsandbytes' CPU training path (the reference) exists on a CPU only
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

    # 1. The reference: the adapter on the base exactly as training computed it (4-bit when training was).
    model = _load_with_adapter(info, hw, quantized=quantized)
    ref = reference_logits(model, info, probes, stop_ids)

    # 2. The dense base the delta goes into.
    floor = None
    if base == "dequantized":
        if quantized:
            model = dense_adapter_model(model, run / rundir.ADAPTER, info.precision.compute_dtype)
        if ref.runtime_base is not None:  # 8-bit: LLM.int8 vs the dequantised weights, on the base alone
            with model.disable_adapter():
                floor = compare_logits(ref.runtime_base, probe_logits(model, probes))
            ref.runtime_base = None
    else:
        del model
        model = _load_with_adapter(info, hw, quantized=False)
    merged = merge_lora(model)

    # 3. Measure the merged model against the reference.
    fid = measure(merged, ref, floor, info, probes, stop_ids, base, hw.name)
    del ref

    # 4. Save atomically: a temp dir renamed into place, the completion marker (which adapter) last.
    with rundir.publishing_dir(run / rundir.MERGED, rundir.MARKER, rundir.merged_marker_body(run, base)) as tmp:
        _save(merged, tok, template, tmp)
        rundir.write_json(tmp / "fidelity.json", fid)
    out = run / rundir.MERGED
    rundir.add_event(run, "merge", base=base, seconds=round(time.time() - started, 1))
    print(fid["summary"], flush=True)
    if not fid.get("int8", {}).get("within_limits", True):
        log.warning("the merged model is outside the 8-bit fidelity limits (see merged/fidelity.json, int8)")
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

