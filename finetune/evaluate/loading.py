"""Open a run directory for inference: its recipe, tokenizer, template, stop tokens, and the models.

The base is the same 4-bit base the adapter was trained on (built from the run's recipe), and the adapter
is attached with PEFT; "base" is that same object with the adapter switched off, so base and tuned share
every weight except the LoRA delta. The merged model is read from merged/ in the compute dtype.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from finetune.evaluate.tasks import EvalError
from finetune.recipe import Recipe, load_resolved

MODEL_CHOICES = ("base", "adapter", "merged")


@dataclass
class RunContext:
    run: Path
    recipe: Recipe
    manifest: dict
    tok: object
    template: object
    stops: list[int]
    precision: object
    hw: object


def open_run(run: Path | str) -> RunContext:
    from transformers import AutoTokenizer

    from finetune import rundir
    from finetune.evaluate.generation import stop_token_ids
    from finetune.hardware import choose_precision, detect_hardware
    from finetune.templates import saved_template

    run = Path(run)
    if not (run / "resolved.yaml").is_file():
        raise EvalError(f"{run}: not a run directory (no resolved.yaml); give the output_dir of a trained run")
    if not rundir.adapter_complete(run):
        raise EvalError(f"{run}: has no adapter yet; run `finetune train` (or `finetune run`) first")
    rundir.check_adapter(run)  # a damaged adapter file: one line naming it, not a safetensors traceback
    recipe = load_resolved(run / "resolved.yaml")
    # The adapter's tokenizer is the one training used: pad fix applied, the run's chat template inside.
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    template = saved_template(recipe.data.template, tok)
    hw = detect_hardware(recipe.train.device)
    precision = choose_precision(recipe, hw)
    return RunContext(run, recipe, rundir.read_manifest(run), tok, template, stop_token_ids(tok, template),
                      precision, hw)


def merged_ready(run: Path) -> bool:
    """merged/ is complete and was merged from the adapter now in adapter/ (an older merge is another model)."""
    from finetune import rundir

    return rundir.merged_complete(Path(run))


def load_tuned(ctx: RunContext, dense_on_cpu: bool = True):
    """The 4-bit base with the run's adapter attached (eval mode, no dropout)."""
    from peft import PeftModel

    from finetune.models import load_base, resize_for_tokenizer, resolve_base

    base = load_base(ctx.recipe, resolve_base(ctx.recipe.model.base), ctx.precision, ctx.hw)
    resize_for_tokenizer(base, ctx.tok)
    model = PeftModel.from_pretrained(base, str(ctx.run / "adapter"), is_trainable=False)
    if dense_on_cpu and not ctx.hw.cuda:
        densify_4bit_on_cpu(model, ctx.precision.compute_dtype)
    return model.eval()


def densify_4bit_on_cpu(model, dtype) -> int:
    """Swap every 4-bit base layer for a dense one holding dequant(NF4(W)), the adapter staying on top.

    On the CPU, bitsandbytes computes a 4-bit layer by dequantising its whole weight and then multiplying, on
    every call; in generation that is once per new token, which made decoding several times slower than the
    matmuls (bench/RESULTS.md).
    Dequantising once gives the very same weights, so the outputs are identical (a test checks it). Skipped
    when the dense copy would not fit comfortably in memory; never done on a GPU, where 4-bit kernels are fast
    and memory is what 4-bit is for.
    """
    import os

    import bitsandbytes as bnb
    import torch

    from finetune.models import dequantize_4bit_layers  # what merge uses too: the same dense weights

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    dense_bytes = sum(m.in_features * m.out_features for m in layers) * torch.finfo(dtype).bits // 8
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if not layers or dense_bytes > ram // 4:
        return 0
    return dequantize_4bit_layers(model, dtype)


def load_merged(ctx: RunContext):
    from transformers import AutoModelForCausalLM

    from finetune.models import local_device

    if not merged_ready(ctx.run):
        raise EvalError(f"{ctx.run / 'merged'}: no merged model of the current adapter; run `finetune merge "
                        f"{ctx.run}` first (or evaluate with --model adapter)")
    model = AutoModelForCausalLM.from_pretrained(
        ctx.run / "merged", dtype=ctx.precision.compute_dtype, device_map={"": local_device(ctx.hw)},
        trust_remote_code=ctx.recipe.model.trust_remote_code)
    return model.eval()


def as_model(model, name: str):
    """A context manager giving the model to run as `name`: base = the PEFT model with its adapter off."""
    if name == "base":
        return model.disable_adapter()
    return contextlib.nullcontext()


def load_for_inference(run: Path | str, which: str = "adapter"):
    """(context, model, name) for generate/chat: the adapter on its 4-bit base, the merged model, or the base."""
    if which not in MODEL_CHOICES:
        raise EvalError(f"--model: choose one of {', '.join(MODEL_CHOICES)} (got {which!r})")
    ctx = open_run(run)
    model = load_merged(ctx) if which == "merged" else load_tuned(ctx)
    return ctx, model
