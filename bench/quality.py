"""Held-out quality: `finetune train` (our defaults, packing on) against a plain TRL + PEFT script.

The task is generated here: extract a person's name, age and city from a sentence as `name=...; age=...;
city=...`. Training sentences use one set of phrasings; held-out sentences use phrasings never seen in training,
so the score measures whether the format and the skill were learned, not the strings.

Arms (same rows, same LoRA r/alpha/dropout, same learning rate, micro-batch and epochs; same chat template):

    trl         the script a TRL user writes: prompt-completion rows, SFTTrainer with TRL's defaults (padded
                batches, completion-only loss), a LoraConfig, the model in NF4
    ours        `finetune train` with our defaults (data.packing: true: a step holds micro x accum examples)
    ours_time   `finetune train`, stopped at the trl arm's wall time (max_steps = what fits in that time at the
                `ours` arm's measured seconds per step, for the same seed): equal wall time

Every arm is judged the same way: plain transformers + peft greedy decoding of the saved adapter on its NF4
base, exact match of the reply against the target. Reported per arm: exact match pooled over seeds with its
Wilson 95% interval, and stop rate (replies that ended with the end-of-turn token).

    python bench/quality.py                                  # SmolLM2, 400 rows, 2 epochs, 3 seeds
    python bench/quality.py --rows 160 --epochs 2 --seeds 2  # a quicker look
    python bench/quality.py --smoke                          # the tiny random model: the plumbing only
    python bench/quality.py --judge-only DIR --seeds 2       # judge kept adapters DIR/{arm}-{seed} again
    python bench/quality.py --first-seed 2 --seeds 1 --keep DIR   # one more seed (adapters kept in DIR), then
                                                             # pool the result files:
    python bench/quality.py --combine bench/results/quality-A.json bench/results/quality-B.json

Beside each arm's interval, ours and ours_time are compared with trl row by row (the same held-out rows): the
difference in exact match with a paired bootstrap 95% interval.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import _common
import yaml

CHATML = _common.REPO / "data_templates" / "chatml.jinja"
NAMES = ["Ann", "Bob", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam", "Mona",
         "Nils", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wen", "Yusuf", "Zoe"]
CITIES = ["Oslo", "Paris", "Lima", "Cairo", "Tokyo", "Berlin", "Madrid", "Nairobi", "Toronto", "Sydney", "Dublin",
          "Lisbon", "Seoul", "Quito", "Vienna", "Prague", "Accra", "Hanoi", "Denver", "Porto"]
TRAIN_PHRASINGS = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "{name} ({age}) moved to {city} last year.",
    "At {age}, {name} calls {city} home.",
    "Our new colleague {name} is {age} and is based in {city}.",
]
HELD_OUT_PHRASINGS = [  # never seen in training
    "Living in {city}, {name} just turned {age}.",
    "{city} resident {name} celebrated a {age}th birthday today.",
    "The file lists {name}, aged {age}, with an address in {city}.",
    "Born {age} years ago, {name} now works in {city}.",
]
INSTRUCTION = "Extract the person's name, age and city. Answer exactly as: name=NAME; age=AGE; city=CITY"


def make_rows(n: int, phrasings: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 90)
        text = rng.choice(phrasings).format(name=name, age=age, city=city)
        rows.append({"instruction": INSTRUCTION, "input": text, "output": f"name={name}; age={age}; city={city}"})
    return rows


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(max(0.0, centre - half), 3), round(min(1.0, centre + half), 3))


def user_text(row: dict) -> str:
    return f"{row['instruction']}\n\n{row['input']}"  # what our alpaca format renders as the user turn


# ---------------------------------------------------------------------------------------------
# The arms


def train_ours(work: Path, model: str, data: Path, args, seed: int, max_steps: int | None) -> dict:
    from finetune.recipe import load_recipe
    from finetune.train import train

    name = "ours" if max_steps is None else "ours_time"
    recipe = {
        "model": {"base": model},
        "quantization": {"compute_dtype": "float32"},
        "lora": {"r": args.r, "alpha": 2 * args.r, "dropout": 0.05},
        "data": {"train": [{"path": str(data), "format": "alpaca"}], "template": "chatml", "held_out": 0,
                 "max_length": args.max_length},
        "train": {"epochs": args.epochs, "micro_batch_size": args.micro_batch, "grad_accum": 1,
                  "learning_rate": args.lr, "report_to": ["none"], "save_steps": 100000, "seed": seed,
                  **({"max_steps": max_steps} if max_steps else {})},
        "output_dir": str(work / f"{name}-{seed}"),
    }
    path = work / f"{name}-{seed}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    shutil.rmtree(recipe["output_dir"], ignore_errors=True)
    started = time.time()
    run = train(load_recipe(path), path)
    seconds = time.time() - started
    logs = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    summary = next(x for x in reversed(logs) if "train_runtime" in x)
    steps = json.loads((run / "manifest.json").read_text())["global_step"]
    return {"adapter": str(run / "adapter"), "train_seconds": float(summary["train_runtime"]),
            "wall_seconds": round(seconds, 1), "optimizer_steps": steps}


def train_trl(work: Path, model_dir: str, rows: list[dict], args, seed: int) -> dict:
    """The script a TRL user would write (TRL's defaults: padded, completion-only loss on prompt-completion)."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32  # TRL's bf16 default breaks NF4 on a CPU (NOTES.md)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHATML.read_text()
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.pad_token = tok.unk_token or tok.eos_token
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": user_text(r)}],
                                      "completion": [{"role": "assistant", "content": r["output"]}]} for r in rows])
    out = work / f"trl-{seed}"
    cfg = SFTConfig(output_dir=str(out), num_train_epochs=args.epochs, per_device_train_batch_size=args.micro_batch,
                    max_length=args.max_length, learning_rate=args.lr, bf16=cuda, use_cpu=not cuda,
                    report_to="none", save_strategy="no", seed=seed)
    peft_cfg = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05, target_modules="all-linear",
                          task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_cfg)
    started = time.time()
    result = trainer.train()
    seconds = time.time() - started
    trainer.model.save_pretrained(out / "adapter")
    return {"adapter": str(out / "adapter"), "train_seconds": float(result.metrics["train_runtime"]),
            "wall_seconds": round(seconds, 1), "optimizer_steps": trainer.state.global_step}


# ---------------------------------------------------------------------------------------------
# The judge: the same plain transformers + peft greedy decoding for every arm


def judge(model_dir: str, adapter: str, held: list[dict], max_new_tokens: int = 32) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHATML.read_text()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    stops = [t for t in {end, tok.eos_token_id} if t is not None and t >= 0]
    hits, stopped = [], 0
    for row in held:
        ids = tok.apply_chat_template([{"role": "user", "content": user_text(row)}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id or 0)
        new = out[0, ids.shape[1]:].tolist()
        stopped += bool(new) and new[-1] in stops
        text = tok.decode([t for t in new if t not in stops], skip_special_tokens=True).strip()
        hits.append(int(text == row["output"]))
    return {"exact": sum(hits), "stopped": stopped, "n": len(held), "hits": hits}


# ---------------------------------------------------------------------------------------------


def one_seed(seed: int, args, work: Path, model: str, model_dir: str) -> list[dict]:
    rows = make_rows(args.rows, TRAIN_PHRASINGS, seed)
    held = make_rows(args.held_out, HELD_OUT_PHRASINGS, 10_000 + seed)
    data = work / f"train-{seed}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = []
    trl = train_trl(work, model_dir, rows, args, seed)
    ours = train_ours(work, model, data, args, seed, None)
    per_step = ours["train_seconds"] / max(1, ours["optimizer_steps"])
    fit = max(1, int(trl["train_seconds"] / per_step))  # our steps that fit in TRL's training time
    timed = train_ours(work, model, data, args, seed, fit)
    for arm, r in (("trl", trl), ("ours", ours), ("ours_time", timed)):
        out.append({"seed": seed, "arm": arm, **r, **judge(model_dir, r["adapter"], held)})
        print(f"[seed {seed}] {arm}: {out[-1]['exact']}/{out[-1]['n']} exact, {out[-1]['stopped']} stopped, "
              f"{out[-1]['optimizer_steps']} steps, {out[-1]['train_seconds']:.0f} s", flush=True)
    return out


def _mean(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return round(sum(values) / len(values), 1) if values else None


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for arm in ("trl", "ours", "ours_time"):
        mine = [r for r in runs if r["arm"] == arm]
        k, n = sum(r["exact"] for r in mine), sum(r["n"] for r in mine)
        rows.append({"arm": arm, "exact match": round(k / n, 3) if n else None, "95% interval": wilson(k, n),
                     "stop rate": round(sum(r["stopped"] for r in mine) / n, 3) if n else None,
                     "optimizer steps (mean)": _mean(mine, "optimizer_steps"), "train s (mean)": _mean(mine, "train_seconds"),
                     "seeds": len(mine)})
    return rows


def paired(runs: list[dict], arm: str, against: str = "trl", draws: int = 10_000) -> dict:
    """arm - against in exact match over the same held-out rows (each seed's rows are judged for every arm), with a
    paired bootstrap 95% interval over (seed, row): the rows both got right or both got wrong cancel, so this is
    tighter than comparing the two Wilson intervals."""
    by = {(r["seed"], r["arm"]): r["hits"] for r in runs if "hits" in r}
    diffs = [a - b for seed in sorted({s for s, _ in by}) if (seed, arm) in by and (seed, against) in by
             for a, b in zip(by[(seed, arm)], by[(seed, against)])]
    if not diffs:
        return {}
    rng = random.Random(0)
    n = len(diffs)
    means = sorted(sum(rng.choice(diffs) for _ in range(n)) / n for _ in range(draws))
    return {"comparison": f"{arm} - {against}", "difference": round(sum(diffs) / n, 3),
            "95% interval (paired bootstrap)": (round(means[int(0.025 * draws)], 3), round(means[int(0.975 * draws)], 3)),
            "rows only arm got right": diffs.count(1), f"rows only {against} got right": diffs.count(-1), "rows": n}


def judge_only(args, model_dir: str, seeds) -> list[dict]:
    """Judge kept adapters again (DIR/{arm}-{seed}, as an earlier run left them) on the same held-out rows."""
    runs = []
    for seed in seeds:
        held = make_rows(args.held_out, HELD_OUT_PHRASINGS, 10_000 + seed)
        for arm in ("trl", "ours", "ours_time"):
            adapter = _kept_adapter(args.judge_only / f"{arm}-{seed}")
            if adapter:
                runs.append({"seed": seed, "arm": arm, "adapter": str(adapter), **judge(model_dir, str(adapter), held)})
                print(f"[seed {seed}] {arm}: {runs[-1]['exact']}/{runs[-1]['n']} exact", flush=True)
    return runs


def _kept_adapter(folder: Path) -> Path | None:
    """The adapter an arm saved under folder (the folder itself, or the run's adapter/ below it; never a
    mid-run checkpoint), or None when the arm was not kept."""
    found = sorted(p.parent for p in folder.rglob("adapter_config.json") if "checkpoint-" not in str(p)) \
        if folder.is_dir() else []
    return min(found, key=lambda p: len(p.parts)) if found else None


def main():
    ap = argparse.ArgumentParser(description="held-out quality: finetune train vs a plain TRL script")
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--held-out", type=int, default=40)
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="a tiny random model (plumbing only; scores mean nothing)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--combine", type=Path, nargs="+", default=None, metavar="FILE",
                    help="pool the runs of earlier result files (per seed and arm; later files fill in missing "
                         "fields, e.g. the per-row hits of a --judge-only file) and summarise them")
    ap.add_argument("--judge-only", type=Path, default=None, metavar="DIR",
                    help="judge the adapters DIR/{trl,ours,ours_time}-{seed} again instead of training")
    ap.add_argument("--keep", type=Path, default=None, metavar="DIR",
                    help="train in DIR and keep it (the adapters, for a later --judge-only on more held-out rows)")
    args = ap.parse_args()

    if args.combine:
        return report(combined(args.combine), args, "quality-combined")
    import torch

    torch.set_num_threads(args.threads)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        model = str(_tiny_model(work))
        args.rows, args.held_out, args.seeds, args.epochs = 24, 4, 1, 1
    else:
        model = args.model
    from finetune.models import resolve_base

    model_dir = resolve_base(model).hf_path
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    if args.judge_only:
        runs = judge_only(args, model_dir, seeds)
    else:
        runs = [r for seed in seeds for r in one_seed(seed, args, work, model, model_dir)]
    report(runs, args, "quality-smoke" if args.smoke else "quality")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def report(runs: list[dict], args, name: str) -> None:
    summary = summarise(runs)
    print(_common.table(summary, list(summary[0])))
    comparisons = [c for c in (paired(runs, "ours"), paired(runs, "ours_time")) if c]
    if comparisons:
        print(_common.table(comparisons, list(comparisons[0])))
    path = _common.save(name, {"args": vars(args), "runs": runs, "summary": summary, "paired": comparisons}, args.out)
    print(f"results: {path}")


def combined(files: list[Path]) -> list[dict]:
    runs: dict[tuple, dict] = {}
    for f in files:
        for r in json.loads(Path(f).read_text())["runs"]:
            key = (r["seed"], r["arm"])
            if key in runs and (runs[key]["exact"], runs[key]["n"]) != (r["exact"], r["n"]):
                raise SystemExit(f"{f}: seed {r['seed']} {r['arm']} was judged {r['exact']}/{r['n']} here and "
                                 f"{runs[key]['exact']}/{runs[key]['n']} before: not the same adapter")
            runs[key] = {**r, **runs.get(key, {})}
    return [runs[k] for k in sorted(runs)]


def _tiny_model(work: Path) -> Path:
    import sys

    sys.path.insert(0, str(_common.REPO / "tests"))
    from tiny import build_tiny_llama

    return build_tiny_llama(work / "tiny")


if __name__ == "__main__":
    main()
