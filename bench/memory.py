"""Memory: 4-bit weight bytes against bf16, peak RSS of a training step, and `finetune plan` against measurement.

    weights      NF4 with and without double quant vs bf16, as transformers + bitsandbytes load them, for
                 SmolLM2-135M (built in) and a random-initialised 1.1B LLaMA shape (TinyLlama's; no download)
    rss          peak resident memory of one QLoRA training step on SmolLM2 (VmHWM, reset before the step), with
                 the loss over full logits (the model's own) and in chunks (finetune/loss.py, what SFT runs use)
    activations  the planner's activation estimate against the profiler's measured peak of a training step,
                 on random LLaMA shapes, fp32 and bf16 autocast, with and without gradient checkpointing

    python bench/memory.py                      # weights + rss
    python bench/memory.py --activations        # also the activation grid (a few minutes)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import _common

GIB = 1024 ** 3


def load_bytes(model_dir: Path, mode: str) -> dict:
    """Load model_dir as bf16 or NF4 (dq: double quant) exactly as transformers does, and count its bytes."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from finetune.memory import model_bytes

    kw = {"dtype": torch.bfloat16, "device_map": {"": "cpu"}}
    if mode != "bf16":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=mode == "nf4_dq",
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kw)
    model.requires_grad_(False)  # a plain bf16 load leaves every parameter trainable; model_bytes counts those as LoRA
    b = model_bytes(model)
    del model
    return b


def random_llama(out: Path, shape) -> Path:
    """A random-initialised LLaMA of the given planner Shape, saved in bf16 (nothing is downloaded)."""
    import torch
    from transformers import LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    cfg = _common.llama_config(shape)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    return out


def weights_section(work: Path) -> list[dict]:
    from finetune import plan as P
    from finetune.models import resolve_base

    rows = []
    models = {"SmolLM2-135M": (Path(resolve_base("builtin:smollm2-135m-instruct").hf_path), P.SHAPES["smollm2-135m"]),
              "LLaMA 1.1B shape (random)": (random_llama(work / "llama-1.1b", P.SHAPES["tinyllama-1.1b"]),
                                            P.SHAPES["tinyllama-1.1b"])}
    for name, (path, shape) in models.items():
        got = {m: load_bytes(path, m) for m in ("bf16", "nf4", "nf4_dq")}
        bf16_total = got["bf16"]["base"] + got["bf16"]["kept"]
        for mode in ("bf16", "nf4", "nf4_dq"):
            b = got[mode]
            est = P.weight_parts(shape, P.Setup(double_quant=mode == "nf4_dq", load_in_4bit=mode != "bf16",
                                                sharding="fsdp"))  # fsdp: kept weights stay 16-bit, as loaded
            rows.append({"model": name, "weights": mode, "linears MiB": b["base"] / 2**20,
                         "kept (emb/head/norms) MiB": b["kept"] / 2**20, "total MiB": (b["base"] + b["kept"]) / 2**20,
                         "x bf16 (total)": (b["base"] + b["kept"]) / bf16_total,
                         "x bf16 (linears)": b["base"] / got["bf16"]["base"],
                         "plan linears exact": est["base"] == b["base"]})
    return rows


RSS_CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from finetune.recipe import load_recipe
from finetune.hardware import detect_hardware, choose_precision
from finetune.models import resolve_base, load_base, attach_lora
from finetune.memory import step_peak_bytes

def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

chunked = sys.argv[5] == "chunked"
recipe = load_recipe(sys.argv[2], sys.argv[6:])
hw = detect_hardware("cpu"); pr = choose_precision(recipe, hw)
torch.manual_seed(0)   # same adapter, ids and dropout masks in every child: the losses are comparable
model = attach_lora(load_base(recipe, resolve_base(recipe.model.base), pr, hw), recipe, recipe.train.gradient_checkpointing)
for p in model.parameters():
    if p.requires_grad: p.data = p.data.float()
model.config.use_cache = False; model.train()
if chunked:   # the loss as our SFT runs compute it: TRL's fused LM head, served by finetune/loss.py
    from trl.trainer.utils import add_fused_lm_head
    from finetune.loss import install
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1")); assert install(model)
kw = {"fused_lm_head": True} if chunked else {}
b, s = int(sys.argv[3]), int(sys.argv[4])
ids = torch.randint(5, model.config.vocab_size, (b, s))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
model(input_ids=ids, labels=ids, **kw).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)   # warm
before = vm("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")   # reset the peak (VmHWM) to the current RSS
t = time.time()
out = model(input_ids=ids, labels=ids, **kw); loss = float(out.loss); out.loss.backward(); del out
opt.step(); opt.zero_grad(set_to_none=True)
step_s = time.time() - t
peak = vm("VmHWM:")
allocated = step_peak_bytes(model, b, s, opt, fused=chunked)
print(json.dumps({"rss_before": before, "rss_peak": peak, "step_seconds": step_s, "profiler_peak": allocated,
                  "loss": loss}))
"""


def rss_section(batch: int, seq: int) -> list[dict]:
    """One training step of the quickstart recipe (SmolLM2, NF4, LoRA r=16), in a fresh process."""
    import json

    from finetune import plan as P
    from finetune.recipe import load_recipe

    rows = []
    recipe_path = str(_common.REPO / "recipes" / "smollm2" / "135m_qlora_quickstart.yaml")
    for ckpt, loss in ((True, "full"), (True, "chunked"), (False, "full"), (False, "chunked")):
        over = [f"train.gradient_checkpointing={str(ckpt).lower()}", "output_dir=/tmp/bench-memory-unused"]
        proc = subprocess.run([sys.executable, "-c", RSS_CHILD, str(_common.REPO), recipe_path, str(batch), str(seq),
                               loss, *over], capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        plan = P.plan_recipe(load_recipe(recipe_path, over), None, device="cpu", batch=batch, seq_len=seq,
                             chunked_loss=loss == "chunked")
        rows.append({"grad ckpt": ckpt, "loss logits": loss, "loss": round(m["loss"], 5),
                     "batch x seq": f"{batch}x{seq}", "RSS before step MiB": m["rss_before"] / 2**20,
                     "peak RSS MiB": m["rss_peak"] / 2**20, "RSS growth MiB": (m["rss_peak"] - m["rss_before"]) / 2**20,
                     "profiler peak MiB": m["profiler_peak"] / 2**20,
                     "plan activations MiB": plan.part("activations") / 2**20,
                     "plan/profiler": plan.part("activations") / m["profiler_peak"],
                     "plan weights+LoRA+opt MiB": sum(plan.part(k) for k in ("base", "kept", "buffers", "lora", "optimizer")) / 2**20,
                     "step s": m["step_seconds"]})
    return rows


GRID = [  # (hidden, layers, heads, kv_heads, intermediate, vocab, batch, seq)
    (256, 2, 4, 2, 512, 1000, 2, 128), (256, 4, 4, 2, 512, 1000, 2, 128), (256, 2, 4, 2, 512, 4000, 2, 128),
    (256, 2, 4, 2, 2048, 1000, 2, 128), (512, 2, 8, 4, 512, 1000, 2, 128), (64, 2, 4, 2, 128, 592, 4, 48),
]


def activations_section(work: Path) -> list[dict]:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from finetune import plan as P
    from finetune.memory import step_peak_bytes

    rows = []
    for h, L, nh, nkv, i, v, b, s in GRID:
        shape = P.Shape("grid", v, h, L, nh, nkv, i)
        path = random_llama(work / f"grid-{h}-{L}-{i}-{v}", shape)
        for compute in ("fp32", "bf16"):
            for ckpt in (False, True):
                dtype = torch.float32 if compute == "fp32" else torch.bfloat16
                q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=dtype)
                m = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=q, dtype=dtype,
                                                         device_map={"": "cpu"}, attn_implementation="sdpa")
                m.config.use_cache = False
                m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=ckpt,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
                m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
                for p in m.parameters():
                    if p.requires_grad:
                        p.data = p.data.float()
                m.train()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute == "bf16"):
                    measured = step_peak_bytes(m, b, s)
                est = P.activation_bytes(shape, P.Setup(seq_len=s, batch=b, compute=compute, lora_r=8,
                                                        gradient_checkpointing=ckpt, device="cpu"))
                rows.append({"h": h, "layers": L, "I": i, "V": v, "tokens": b * s, "compute": compute, "grad ckpt": ckpt,
                             "measured MiB": measured / 2**20, "plan MiB": est / 2**20, "plan/measured": est / measured})
                print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description="4-bit weight bytes, peak RSS of a training step, planner vs profiler")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--activations", action="store_true", help="also run the activation grid (minutes)")
    ap.add_argument("--skip-weights", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # bytes do not depend on it; on a busy 2-core machine one thread is much faster
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the RSS child process too
    work = Path(os.environ.get("BENCH_WORK") or tempfile.mkdtemp(prefix="bench-memory-"))
    payload = {"args": vars(args)}
    if not args.skip_weights:
        payload["weights"] = weights_section(work)
        print(_common.table(payload["weights"], ["model", "weights", "linears MiB", "kept (emb/head/norms) MiB",
                                                 "total MiB", "x bf16 (total)", "x bf16 (linears)", "plan linears exact"]))
    payload["rss"] = rss_section(args.batch, args.seq)
    print(_common.table(payload["rss"], list(payload["rss"][0])))
    if args.activations:
        payload["activations"] = activations_section(work)
        print(_common.table(payload["activations"], list(payload["activations"][0])))
    print(f"results: {_common.save('memory', payload, args.out)}")


if __name__ == "__main__":
    main()
