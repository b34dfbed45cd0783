"""Real-token throughput: `finetune train` against a plain TRL SFTTrainer + PEFT QLoRA script.

Same model, same rows (bench/lengthmix.py: most examples short, a long tail), same chat template, one epoch each,
so every arm trains on the same real tokens. Arms run alternately in one process, with repeats:

    ours_packed   `finetune train` with our defaults: data.packing: true (TRL's BFD packing, padding-free,
                  position_ids), train.gradient_checkpointing: auto (off when the plan fits without it)
    ours_padded   `finetune train` with data.packing: false (other defaults as above)
    ours_same     `finetune train` with TRL's settings spelled out: packing off, gradient checkpointing on. The
                  same work as the trl arm, so its ratio is our overhead (or lack of it)
    ours_nockpt   ours_packed with gradient checkpointing off
    ours_packed_torch_dropout  ours_packed with torch's LoRA dropout (no lane masks, finetune/dropout.py): ablation
    ours_grouped  `finetune train` with data.packing: false, data.group_by_length: true
    trl           SFTTrainer + LoraConfig with TRL's defaults: padded batches, no packing, gradient checkpointing
    trl_packed    the same script with TRL's one-flag packing: packing=True (BFD, padding-free), gradient
                  checkpointing as TRL defaults it (on)
    trl_packed_nockpt  trl_packed with gradient_checkpointing=False

Every arm also reports model FLOPs per token, achieved FLOP per CPU-second and MFU against the torch.mm peak the
bench measures at the model's shapes (bench/mfu.py states the formula), twice: against the best peak measured
before and after all arms (MFU), and against the median of peak samples taken after every training step of the
arm itself (MFU paired: the same torch.mm speed varies by 30% from second to second on a shared machine, so this
one compares two speeds measured side by side; the samples' time is left out of the arm's CPU and wall time).
--profile adds a table of where the training steps' CPU time goes (matmul, dequantise, attention, elementwise,
optimizer) for each arm (and takes no peak samples, so the profile holds only the training steps).

Every arm uses the same micro-batch and gradient accumulation (our recipe defaults) and the same precision
(fp32 on CPU: TRL's bf16=True default breaks NF4 training on a CPU, see NOTES.md). Tokens are counted where
the Trainer sees them (training_step's inputs): real = non-pad, fed = the tensor's size. Time is the Trainer's
own train_runtime (wall) and the process CPU time over the training steps (model loading excluded); on a CPU
the ratios use CPU time, which other processes on a shared machine do not distort.

    python bench/throughput.py                       # SmolLM2-135M (built in), 64 rows, 3 repeats
    python bench/throughput.py --rows 32 --repeats 1 # a quicker look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from unittest import mock

import _common
import lengthmix
import mfu
import yaml

CHATML = _common.REPO / "data_templates" / "chatml.jinja"


class TokenCounter:
    """Counts the tokens of every training_step, whichever trainer runs it, and the process CPU time from the
    start of the first step to the end of the last (model loading and saving excluded). On a shared machine
    CPU time is far steadier than wall time: other people's processes slow the clock, not the work."""

    def __init__(self):
        self.real = self.fed = self.steps = self.keys = 0
        self.cpu_first = self.cpu_last = None
        self.profile = False
        self.prof = None
        self.sampler = None  # mfu.PeakSampler: the matmul peak sampled after every step (not under --profile)
        self.peaks: list[float] = []
        self.excluded_cpu = self.excluded_wall = self.last_sample_cpu = 0.0

    def install(self):
        from transformers import Trainer

        original = Trainer.training_step
        counter = self

        def training_step(self, model, inputs, *a, **kw):
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            counter.fed += ids.numel()
            counter.real += int(mask.sum()) if mask is not None else ids.numel()  # padding-free: no pads at all
            counter.steps += 1
            counter.keys += mfu.causal_keys(mfu.example_lengths(inputs))
            if counter.cpu_first is None:
                if counter.sampler is not None:  # one sample before the first step: the samples bracket every step
                    counter.sample_peak()
                if counter.profile:
                    import torch

                    counter.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                    counter.prof.start()
                counter.cpu_first = time.process_time()
            out = original(self, model, inputs, *a, **kw)
            counter.cpu_last = time.process_time()
            if counter.sampler is not None:  # its time is taken out of the arm's CPU and wall time
                counter.last_sample_cpu = counter.sample_peak()
                counter.excluded_cpu += counter.last_sample_cpu
            return out

        Trainer.training_step = training_step

    def sample_peak(self) -> float:
        """One matmul peak sample; its wall time is added to excluded_wall, its CPU time returned."""
        wall, cpu = time.time(), time.process_time()
        self.peaks.append(self.sampler.sample(seconds_per_shape=0.05))
        self.excluded_wall += time.time() - wall
        return time.process_time() - cpu

    def take(self) -> dict:
        out = {"real_tokens": self.real, "fed_tokens": self.fed, "micro_steps": self.steps,
               "mean_keys_per_token": round(self.keys / max(1, self.real), 2),
               # the samples between the first step and the last (the last one comes after cpu_last)
               "cpu_seconds": (round(self.cpu_last - self.cpu_first - (self.excluded_cpu - self.last_sample_cpu), 2)
                               if self.cpu_first is not None else None),
               "peak_samples": [round(p) for p in self.peaks], "sampling_wall_s": round(self.excluded_wall, 2)}
        if self.prof is not None:
            self.prof.stop()
            out["profile"] = mfu.profile_table(self.prof)
            self.prof = None
        self.real = self.fed = self.steps = self.keys = 0
        self.cpu_first = self.cpu_last = None
        self.peaks = []
        self.excluded_cpu = self.excluded_wall = self.last_sample_cpu = 0.0
        return out


def write_recipe(work: Path, model: str, data: Path, args, name: str) -> Path:
    recipe = {
        # ours_packed_rowmask: packed, but attention over the whole row with transformers' block mask (plain sdpa)
        "model": {"base": model, **({"attn_implementation": "sdpa"} if name == "ours_packed_rowmask" else {})},
        "data": {"train": [{"path": str(data), "format": "alpaca"}], "template": "chatml",
                 "max_length": args.max_length,
                 "packing": name.startswith("ours_packed") or name == "ours_nockpt",
                 "group_by_length": name == "ours_grouped"},
        "train": {"epochs": 1, "micro_batch_size": args.micro_batch, "grad_accum": args.grad_accum,
                  "report_to": ["none"], "save_steps": 100000, "seed": 0,
                  **({"gradient_checkpointing": name == "ours_same"} if name in ("ours_same", "ours_nockpt") else {})},
        "output_dir": str(work / name),
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_ours(recipe_path: Path) -> float:
    from finetune.recipe import load_recipe
    from finetune.train import train

    recipe = load_recipe(recipe_path)
    shutil.rmtree(recipe.output_dir, ignore_errors=True)
    run = train(recipe, recipe_path)
    logs = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    return float(next(x["train_runtime"] for x in reversed(logs) if "train_runtime" in x))


def run_trl(model_dir: str, data: Path, args, work: Path, max_steps: int = -1, packing: bool = False,
            gradient_checkpointing: bool = True) -> float:
    """The script a TRL user would write: model in 4-bit, a LoraConfig, SFTTrainer, TRL's defaults (packing: its
    one-flag BFD packing, padding-free; gradient_checkpointing: TRL's default is on)."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHATML.read_text()  # the same tokens as our arm
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.pad_token = tok.unk_token or tok.eos_token
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    ds = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": r["instruction"]},
                                                   {"role": "assistant", "content": r["output"]}]} for r in rows])
    cfg = SFTConfig(output_dir=str(work / "trl"), num_train_epochs=1, max_steps=max_steps,
                    per_device_train_batch_size=args.micro_batch,
                    gradient_accumulation_steps=args.grad_accum, max_length=args.max_length, learning_rate=2e-4,
                    bf16=cuda, use_cpu=not cuda, report_to="none", save_strategy="no", seed=0,
                    packing=packing, gradient_checkpointing=gradient_checkpointing)
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_cfg)
    out = trainer.train()
    return float(out.metrics["train_runtime"])


_COUNTER = None
ABLATIONS = {  # arm -> what it turns off in `finetune train`, by replacing the function train.py calls
    "ours_packed_torch_dropout": {"finetune.dropout.use_lane_dropout": lambda model: 0},
}


def run_arm(arm: str, args, work: Path, data: Path, model_dir: str, recipes: dict) -> dict:
    """Train one arm once in this process; its tokens, CPU and wall time."""
    global _COUNTER
    if _COUNTER is None:
        _COUNTER = TokenCounter()
        _COUNTER.install()
    t0 = time.time()
    work.mkdir(parents=True, exist_ok=True)
    if arm.startswith("trl"):
        seconds = run_trl(model_dir, data, args, work, packing=arm.startswith("trl_packed"),
                          gradient_checkpointing=not arm.endswith("nockpt"))
    else:
        with contextlib.ExitStack() as stack:
            for target, stand_in in ABLATIONS.get(arm, {}).items():
                stack.enter_context(mock.patch(target, stand_in))
            seconds = run_ours(recipes[arm])
    c = _COUNTER.take()
    seconds -= c["sampling_wall_s"]  # the Trainer's train_runtime includes the peak samples taken between steps
    return {"seconds": round(seconds, 2), **c,
            "non_pad_fraction": round(c["real_tokens"] / max(1, c["fed_tokens"]), 4),
            "real_tokens_per_s": round(c["real_tokens"] / seconds, 1),
            "real_tokens_per_cpu_s": round(c["real_tokens"] / c["cpu_seconds"], 2),
            "wall_incl_load_s": round(time.time() - t0, 1), **_flops(c, args)}


def _flops(c: dict, args) -> dict:
    """Model FLOPs per token (bench/mfu.py) and what this arm achieved per CPU-second."""
    from finetune.plan import resolve_shape

    shape, _ = resolve_shape(args.model)
    fpt = mfu.flops_per_token(shape, 16, c["mean_keys_per_token"])
    achieved = c["real_tokens"] * fpt / c["cpu_seconds"]
    out = {"model_flops_per_token": round(fpt), "achieved_flops_per_cpu_s": round(achieved)}
    if c["peak_samples"]:
        out["mfu_paired"] = round(achieved / _common.median(c["peak_samples"]), 3)
    return out


def run_child(arm: str, args, work: Path) -> dict:
    """run_arm in a fresh Python process (--isolate)."""
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--one", arm, "--work", str(work), "--model", args.model,
           "--max-length", str(args.max_length), "--micro-batch", str(args.micro_batch),
           "--grad-accum", str(args.grad_accum), "--threads", str(args.threads)] + (["--profile"] if args.profile else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"bench arm {arm} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _summary_row(arm: str, mine: list[dict], peak: float) -> dict:
    achieved = _common.median([r["achieved_flops_per_cpu_s"] for r in mine])
    paired = [r["mfu_paired"] for r in mine if "mfu_paired" in r]
    samples = [p for r in mine for p in r.get("peak_samples", [])]
    return {"arm": arm, "real tok per CPU-s (median)": _common.median([r["real_tokens_per_cpu_s"] for r in mine]),
            "real tok/s wall (median)": _common.median([r["real_tokens_per_s"] for r in mine]),
            "non-pad fraction": mine[0]["non_pad_fraction"], "real tokens": mine[0]["real_tokens"],
            "model GFLOP/token": round(mine[0]["model_flops_per_token"] / 1e9, 4),
            "achieved GFLOP per CPU-s": round(achieved / 1e9, 2), "peak GFLOP per CPU-s": round(peak / 1e9, 2),
            "MFU": round(achieved / peak, 3),
            **({"peak during the arm (median GFLOP per CPU-s)": round(_common.median(samples) / 1e9, 1),
                "MFU paired (median)": _common.median(paired)} if paired else {}),
            "repeats": len(mine), "profile": mine[0].get("profile")}


def main():
    ap = argparse.ArgumentParser(description="finetune train vs a plain TRL script: real tokens per second")
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--arms", default="ours_packed,ours_padded,trl",
                    help="any of ours_packed, ours_padded, ours_same, ours_nockpt, ours_grouped, "
                    "ours_packed_torch_dropout, trl, trl_packed, trl_packed_nockpt")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is not inflated by "
                    "threads spinning while they wait for each other on a busy machine)")
    ap.add_argument("--isolate", action="store_true", help="run every arm in a fresh process, so no arm inherits "
                    "another's heap, caches or imported state")
    ap.add_argument("--profile", action="store_true", help="profile the training steps of every arm (slower: "
                    "use it for the profile table, not for the speed ratios)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this arm once in this process (--isolate)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from finetune.models import resolve_base

    global _COUNTER
    _COUNTER = TokenCounter()
    _COUNTER.install()
    _COUNTER.profile = args.profile
    from finetune.plan import resolve_shape

    shape, _ = resolve_shape(args.model)
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    if not args.profile and not torch.cuda.is_available() and (args.one or not args.isolate):  # where arms run
        _COUNTER.sampler = mfu.PeakSampler(shape, threads=args.threads, dtype=dtype)
    if args.one:  # a child of --isolate: one arm, one JSON line
        data = args.work / "mix.jsonl"
        (args.work / args.one).mkdir(parents=True, exist_ok=True)
        recipes = {args.one: write_recipe(args.work / args.one, args.model, data, args, args.one)}
        print("RESULT " + json.dumps(run_arm(args.one, args, args.work / args.one, data,
                                             resolve_base(args.model).hf_path, recipes)), flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    data = lengthmix.write(work / "mix.jsonl", args.rows, seed=0)
    model_dir = resolve_base(args.model).hf_path
    arms = args.arms.split(",")
    recipes = {a: write_recipe(work, args.model, data, args, a) for a in arms if not a.startswith("trl")}
    peaks = [mfu.matmul_peak(shape, threads=args.threads, dtype=dtype)]
    runs = []
    for rep in range(args.repeats):
        order = arms[rep % len(arms):] + arms[:rep % len(arms)]  # rotate, so no arm always goes first
        for arm in order:
            if args.isolate:
                row = run_child(arm, args, work)
            else:
                row = run_arm(arm, args, work, data, model_dir, recipes)
            runs.append({"repeat": rep, "arm": arm, **row})
            print(f"[{rep}] {arm}: {runs[-1]['real_tokens_per_s']} real tok/s (wall), "
                  f"{runs[-1]['real_tokens_per_cpu_s']} per CPU-second", flush=True)
    peaks.append(mfu.matmul_peak(shape, threads=args.threads, dtype=dtype))  # before and after: the better one
    peak = max(p["peak_flops_per_cpu_s"] for p in peaks)
    # The ratio is taken on CPU time on a CPU (steady on a shared machine) and on wall time on a GPU.
    metric = "real_tokens_per_s" if torch.cuda.is_available() else "real_tokens_per_cpu_s"
    summary = [_summary_row(arm, [r for r in runs if r["arm"] == arm], peak) for arm in arms]
    ratios = {"metric": metric}
    for anchor in [a for a in arms if a.startswith("trl")]:
        for arm in [a for a in arms if not a.startswith("trl")]:
            per_rep = [x[metric] / y[metric] for rep in range(args.repeats)
                       for x in runs if x["arm"] == arm and x["repeat"] == rep
                       for y in runs if y["arm"] == anchor and y["repeat"] == rep]
            ratios[f"{arm}/{anchor}"] = {"median": round(_common.median(per_rep), 3),
                                         "per_repeat": [round(x, 3) for x in per_rep]}
            for row in summary:
                if row["arm"] == arm:
                    row[f"x {anchor}"] = ratios[f"{arm}/{anchor}"]["median"]
    print(_common.table(summary, list(dict.fromkeys(k for row in summary for k in row if k != "profile"))))
    for row in summary:
        if row.get("profile"):
            print(f"profile of {row['arm']} (repeat 0):\n" + _common.table(row["profile"], list(row["profile"][0])))
    path = _common.save("throughput", {"args": vars(args), "runs": runs, "summary": summary, "ratios": ratios,
                                       "matmul_peak": peaks}, args.out)
    print(f"results: {path}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
