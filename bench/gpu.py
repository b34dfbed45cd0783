"""One prepared script for a CUDA GPU: QLoRA on random-initialised Llama-2-7B and Llama-3-8B shapes.

For each shape (no download: random weights, a BPE tokenizer trained on the spot on the length mix) it trains
QLoRA r=16 on every linear layer at seq 2048, packed, for a fixed number of steps, twice:

    ours   `finetune train` with our defaults (data.packing: true)
    trl    a plain TRL SFTTrainer + PEFT script with TRL's defaults (padded batches, no packing)

and reports real tokens/s, peak memory (torch.cuda.max_memory_allocated during training), MFU, and
`finetune plan`'s estimate against the measured peak. Budget: under 8 minutes on one H100/H200-class GPU.

    python bench/gpu.py                # on a CUDA machine
    python bench/gpu.py --smoke        # CPU, a tiny shape, seconds: checks the script itself (tests/test_bench.py)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import _common
import lengthmix
import yaml
from throughput import TokenCounter, run_trl

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def build_tokenizer(out: Path, texts: list[str], vocab_size: int):
    """A byte-level BPE with ChatML specials, trained on the bench's own text (ids < vocab_size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<|pad|>", additional_special_tokens=SPECIALS[3:5])
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, shape, device: str, tok) -> Path:
    """Random-initialised LLaMA of a planner Shape, saved in bf16 next to the tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    cfg = _common.llama_config(shape, max_position_embeddings=8192, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id,
                               rope_theta=500000.0 if shape.vocab > 100000 else 10000.0)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(out)
    del model
    return out


class PeakMemory:
    """Resets CUDA peak stats at the first training step of each run, so the peak is training's (not loading's)."""

    def __init__(self):
        self.armed = False

    def install(self):
        import torch
        from transformers import Trainer

        original = Trainer.training_step
        watcher = self

        def training_step(self, model, inputs, *a, **kw):
            if watcher.armed and torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                watcher.armed = False
            return original(self, model, inputs, *a, **kw)

        Trainer.training_step = training_step

    def arm(self):
        self.armed = True

    @staticmethod
    def peak() -> int | None:
        import torch

        return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def run_ours(work: Path, model_dir: Path, data: Path, args) -> tuple[float, object]:
    from finetune.recipe import load_recipe
    from finetune.train import train

    path = work / "ours.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"base": str(model_dir)},
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": {"train": [{"path": str(data), "format": "alpaca"}], "template": "chatml",
                 "max_length": args.seq, "packing": True},
        "train": {"max_steps": args.steps, "micro_batch_size": args.micro_batch, "grad_accum": 1,
                  "report_to": ["none"], "save_steps": 100000, "logging_steps": 1, "seed": 0},
        "output_dir": str(work / "ours-run")}, sort_keys=False))
    recipe = load_recipe(path)
    shutil.rmtree(recipe.output_dir, ignore_errors=True)
    run = train(recipe, path)
    logs = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    # The plan is compared under the decision train made (gradient_checkpointing: auto, against this GPU).
    ckpt = json.loads((run / "manifest.json").read_text())["precision"]["gradient_checkpointing"]
    recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"gradient_checkpointing": ckpt})})
    return float(next(x["train_runtime"] for x in reversed(logs) if "train_runtime" in x)), recipe


def mfu(shape, seq: int, tokens_per_s: float) -> tuple[float | None, float]:
    """Model FLOPs utilisation with TRL's FLOPs-per-token (3 x forward, attention included) and the GPU's
    dense bf16 peak. QLoRA skips the frozen weights' gradients, so this overstates the work done by about 1/3
    and understates nothing: read it as an upper bound on what the kernels could do."""
    import torch
    from transformers import LlamaConfig
    from trl.trainer.utils import compute_flops_per_token, get_peak_flops

    cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads)
    fpt = compute_flops_per_token(cfg, seq)
    peak = get_peak_flops(torch.cuda.get_device_name(0), "bfloat16") if torch.cuda.is_available() else None
    return (tokens_per_s * fpt / peak if peak else None), fpt


def main():
    ap = argparse.ArgumentParser(description="QLoRA on 7B/8B shapes on one CUDA GPU: ours vs plain TRL")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shape, a few steps: checks the script")
    ap.add_argument("--shapes", default="llama-2-7b,llama-3-8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--budget-s", type=float, default=450, help="skip remaining shapes past this many seconds")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from finetune import plan as P

    started = time.time()
    if args.smoke:
        # One thread: on a busy CPU, tiny ops with two threads mostly wait for the other thread to be scheduled.
        torch.set_num_threads(1)
        args.shapes, args.seq, args.steps, args.micro_batch, args.rows = "smoke", 128, 2, 2, 32
        shapes = {"smoke": P.Shape("smoke-tiny", 1000, 64, 2, 4, 2, 128)}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/gpu.py needs a CUDA GPU (or --smoke for the CPU check)")
        shapes = {name: P.SHAPES[name] for name in args.shapes.split(",")}
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    # Random checkpoints are written and read back once per arm: RAM-backed /dev/shm if it has room for them.
    need = 2.5 * max(s.n_params() for s in shapes.values())
    shm = Path("/dev/shm") if (not args.smoke and Path("/dev/shm").is_dir()
                               and shutil.disk_usage("/dev/shm").free > need) else None
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-", dir=shm))
    os.environ["FINETUNE_CACHE"] = str(work / "cache")
    data = lengthmix.write(work / "mix.jsonl", args.rows, seed=0)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    counter, peaks = TokenCounter(), PeakMemory()
    counter.install()
    peaks.install()
    results = []
    for name, shape in shapes.items():
        if time.time() - started > args.budget_s:
            results.append({"shape": name, "skipped": f"time budget ({args.budget_s:.0f} s) spent"})
            continue
        model_dir = work / name
        tok = build_tokenizer(model_dir, [r["instruction"] + " " + r["output"] for r in rows],
                              vocab_size=min(8000, shape.vocab) if not args.smoke else 500)
        t0 = time.time()
        build_model(model_dir, shape, device, tok)
        built_s = time.time() - t0
        for arm in ("ours", "trl"):
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            peaks.arm()
            t0 = time.time()
            if arm == "ours":
                seconds, recipe = run_ours(work, model_dir, data, args)
            else:
                targs = argparse.Namespace(micro_batch=8, grad_accum=1, max_length=args.seq)  # TRL's default batch
                seconds = run_trl(str(model_dir), data, targs, work, max_steps=args.steps)
            c = counter.take()
            tps = c["real_tokens"] / seconds
            util, fpt = mfu(shape, args.seq, tps)
            row = {"shape": name, "arm": arm, "steps": args.steps, "seconds": round(seconds, 2), **c,
                   "real_tokens_per_s": round(tps, 1), "non_pad_fraction": round(c["real_tokens"] / max(1, c["fed_tokens"]), 4),
                   "peak_allocated_gib": None if peaks.peak() is None else round(peaks.peak() / 2**30, 3),
                   "mfu": None if util is None else round(util, 4), "flops_per_token": fpt,
                   "wall_incl_load_s": round(time.time() - t0, 1), "model_build_s": round(built_s, 1)}
            if arm == "ours":
                plan = P.plan_recipe(recipe, None, device="cuda" if device == "cuda" else "cpu")
                row["plan_peak_allocated_gib"] = round(plan.peak_allocated / 2**30, 3)
                row["plan_setup"] = {"batch": plan.setup.batch, "seq_len": plan.setup.seq_len,
                                     "gradient_checkpointing": plan.setup.gradient_checkpointing}
                if row["peak_allocated_gib"]:
                    row["plan_vs_measured"] = round(plan.peak_allocated / peaks.peak(), 3)
            results.append(row)
            print({k: v for k, v in row.items() if k != "plan_setup"}, flush=True)
        shutil.rmtree(model_dir, ignore_errors=True)
    cols = ["shape", "arm", "real_tokens_per_s", "non_pad_fraction", "peak_allocated_gib", "plan_peak_allocated_gib",
            "plan_vs_measured", "mfu", "seconds"]
    print(_common.table([r for r in results if "arm" in r], cols))
    payload = {"args": vars(args), "device": device, "results": results, "total_seconds": round(time.time() - started, 1)}
    print(f"results: {_common.save('gpu-smoke' if args.smoke else 'gpu', payload, args.out)}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
