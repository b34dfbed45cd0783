"""Assemble the fidelity ladder (finetune.export.ladder has the measurements) and the adapter GGUF's check.

    ladder = build_ladder(merged_dir, {"f16": path, "q4_k_m": path}, seqs, task, tok, template,
                          adapter=(base_gguf, lora_gguf, base_hf_dir, adapter_dir))

`task` is the first held-out generation task as finetune.evaluate.export_task builds it (prompts, references,
the metric's scoring function, eval's base/tuned values) or None; export never imports eval itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from finetune.agreement import generation_agreement
from finetune.export import ladder as L
from finetune.export.quantize import gguf_stats

log = logging.getLogger("finetune")

ADAPTER_LABEL = "base+lora"
MAX_PROMPTS = 32
"""Held-out prompts the ladder generates on (the first ones, in file order), per type."""


def _stops(tok, template) -> list[int]:
    ids = [tok.convert_tokens_to_ids(t) for t in template.stop_tokens(tok)]
    return list(dict.fromkeys(i for i in ids if isinstance(i, int) and i != tok.unk_token_id))


def _reference(merged_dir: Path, seqs, prompts, stops, max_new, pad_id) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    model.eval()
    return {"logits": L.hf_logits(model, seqs),
            "generations": L.hf_greedy(model, prompts, stops, max_new, pad_id) if prompts else []}


def _measure(label: str, side: dict, ref: dict, task: dict | None, tok) -> dict:
    row = {"type": label, **L.kl_top1(ref["logits"], side["logits"])}
    if ref["generations"]:
        gens = [g["ids"] for g in side["generations"]]
        row["greedy"] = generation_agreement(ref["generations"], gens)
        row["stop_rate"] = float(np.mean([g["stopped"] for g in side["generations"]]))
    if task:
        row["task_value"] = L.task_value(task, [g["text"] for g in side["generations"]])
    return row


def _evaluate(label: str, path: Path, lora: Path | None, ctx: dict) -> tuple[dict, dict | None]:
    """One GGUF (or base + adapter) in llama.cpp: (its row, the child's answers or None when it crashed)."""
    side, attempts = L.run_llama_ladder(path, ctx["n_ctx"], ctx["seqs"], ctx["prompts"], ctx["stops"],
                                        ctx["max_new"], lora_path=lora)
    files = [path] + ([lora] if lora else [])
    stats = [gguf_stats(f) for f in files]
    size = sum(s["file_bytes"] for s in stats)
    base = {"type": label, "files": [f.name for f in files], "file_bytes": size,
            "bits_per_weight": 8 * size / max(stats[0]["parameters"], 1), "tensor_types": stats[0]["tensor_types"],
            "llama_cpp_runs": attempts}
    if side is None:
        return {**base, "crashed": True, "passed": False}, None
    return {**base, **_measure(label, side, ctx["ref"], ctx["task"], ctx["tok"])}, side


def _same_weights_check(row: dict, label: str, merged_dir: Path, path: Path, ctx: dict, side: dict) -> None:
    same = L.same_weights(merged_dir, path, ctx["seqs"], side["logits"])
    floor = L.SAME_KL_FLOOR.get(label, L.QUANT_SAME_KL_FLOOR)
    limit = max(floor, L.SAME_KL_FRACTION * row["mean_kl"])
    row["vs_same_weights"] = same
    row["passed"] = same["mean_kl"] <= limit
    row["check"] = (f"mean KL from HF on this file's own weights {same['mean_kl']:.2e} <= {limit:.2e} "
                    f"(max({floor:g}, {L.SAME_KL_FRACTION:g} x KL from fp32))")


def build_ladder(merged_dir: Path, files: dict[str, Path], seqs: list[list[int]], task: dict | None, tok, template,
                 adapter: tuple | None = None, f16_bytes: int | None = None) -> dict:
    """Every type's row (see finetune.export.ladder); `adapter` = (base_gguf, lora_gguf, base_hf_dir, adapter_dir)
    adds the base + LoRA pair as a row, its own check, and the base model's task value (llama.cpp, no adapter)."""
    from finetune.data import prompt_ids

    if task and len(task["prompts"]) > MAX_PROMPTS:  # every type generates on each: keep the ladder affordable
        task = {**task, "prompts": task["prompts"][:MAX_PROMPTS], "references": task["references"][:MAX_PROMPTS]}
    stops = _stops(tok, template)
    prompts = [prompt_ids(p, tok, template) for p in task["prompts"]] if task else []
    max_new = task["max_new_tokens"] if task else 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    n_ctx = max([len(s) for s in seqs] + [len(p) + max_new for p in prompts]) + 8
    ctx = {"seqs": seqs, "prompts": prompts, "stops": stops, "max_new": max_new, "n_ctx": n_ctx, "task": task,
           "tok": tok, "ref": _reference(merged_dir, seqs, prompts, stops, max_new, pad)}
    reference = {"model": "merged/ in HF, fp32", "stop_tokens": [tok.convert_ids_to_tokens(i) for i in stops]}
    if task:
        ref_texts = [tok.decode(g, skip_special_tokens=True) for g in ctx["ref"]["generations"]]
        reference.update(task=task["name"], metric=task["metric"], prompts=len(prompts),
                         task_value=L.task_value(task, ref_texts), eval=task.get("eval") or {})
    rows = []
    for label, path in files.items():
        row, side = _evaluate(label, path, None, ctx)
        if side is not None:
            _same_weights_check(row, label, merged_dir, path, ctx, side)
        rows.append(row)
    result = {"reference": reference, "rows": rows}
    if adapter:
        result["adapter"] = _adapter_rows(adapter, ctx, result)
    _base_value(result, task)
    _relative_sizes(result["rows"], f16_bytes)
    return result


def _adapter_rows(adapter: tuple, ctx: dict, result: dict) -> dict:
    """The base + LoRA GGUF pair against HF PeftModel on the same base, and the base alone (its task value)."""
    base_gguf, lora_gguf, base_dir, adapter_dir = adapter
    try:
        row, side = _evaluate(ADAPTER_LABEL, base_gguf, lora_gguf, ctx)
    except Exception as e:  # noqa: BLE001 - llama.cpp refused the adapter (its shapes or metadata): a FAIL row
        return _refused(result, base_gguf, lora_gguf, e)
    check = {"passed": False}
    if side is not None:
        check = verify_adapter(base_dir, adapter_dir, base_gguf, ctx["seqs"], side["logits"])
        row["passed"] = check["passed"]
        row["vs_same_weights"] = check["vs_same_base_weights"]
    result["rows"].append(row)
    if ctx["task"]:
        base_row, _ = _evaluate("base", base_gguf, None, ctx)
        result["base"] = {k: base_row.get(k) for k in ("type", "files", "task_value", "mean_kl", "top1_agreement")}
    return check


def _refused(result: dict, base_gguf: Path, lora_gguf: Path, e: Exception) -> dict:
    msg = f"llama.cpp did not load {lora_gguf.name} on {base_gguf.name}: {type(e).__name__}: {e}"
    log.warning("gguf_adapter: %s", msg)
    size = base_gguf.stat().st_size + lora_gguf.stat().st_size
    result["rows"].append({"type": ADAPTER_LABEL, "files": [base_gguf.name, lora_gguf.name], "file_bytes": size,
                           "passed": False, "error": msg})
    return {"passed": False, "error": msg}


def check_adapter_gguf(base_gguf: Path, lora_gguf: Path, base_dir: Path, adapter_dir: Path, seqs) -> dict:
    """The adapter check alone (no ladder): llama.cpp base + LoRA GGUF vs HF PeftModel; passed or not."""
    n_ctx = max(len(s) for s in seqs) + 8
    try:
        side, attempts = L.run_llama_ladder(base_gguf, n_ctx, seqs, [], [], 0, lora_path=lora_gguf)
    except Exception as e:  # noqa: BLE001 - refused by llama.cpp
        return {"passed": False, "error": f"{type(e).__name__}: {e}"}
    if side is None:
        return {"passed": False, "llama_cpp_runs": attempts}
    return verify_adapter(base_dir, adapter_dir, base_gguf, seqs, side["logits"])


ADAPTER_MAX_KL = 1e-3
"""base+lora in llama.cpp vs HF PeftModel on the base's own GGUF weights, mean KL per position (nats). The merged
f16 GGUF measured ~4e-5 against fp32 on the tiny test model (llama.cpp rounds activations to f16 in f16
matmuls); max |dlogit| and argmax are no thresholds (0.1 and 97% there: the tiny model's logits are large and
have near ties). It is the ladder's f16 floor (finetune.export.ladder.SAME_KL_FLOOR) for a file read right."""


def verify_adapter(base_dir: Path, adapter_dir: Path, base_gguf: Path, seqs, lc_logits) -> dict:
    """HF PeftModel (the adapter as training saved it) on the base: with the base weights read back from the base
    GGUF (the tight check) and on the fp32 dense base (what training computed)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.export.verify import compare

    out = {}
    for key, from_gguf in (("vs_peft_fp32", False), ("vs_same_base_weights", True)):
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        if from_gguf:
            L.load_gguf_weights(base, base_gguf)
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
        model.eval()
        hf = L.hf_logits(model, seqs)
        out[key] = {**compare(hf, lc_logits), **L.kl_top1(hf, lc_logits)}
        del model, base
    same = out["vs_same_base_weights"]
    out["checks"] = {f"mean KL from PeftModel on the same base weights <= {ADAPTER_MAX_KL:g}":
                     same["mean_kl"] <= ADAPTER_MAX_KL}
    out["passed"] = all(out["checks"].values())
    return out


def _base_value(result: dict, task: dict | None) -> None:
    """The base model's task value for the delta column: llama.cpp on the base GGUF when it was written, else
    eval's base value (HF) when `finetune eval` ran; each row gets value - base."""
    if not task:
        return
    value, source = None, None
    if result.get("base", {}).get("task_value") is not None:
        value, source = result["base"]["task_value"], "llama.cpp, base GGUF"
    elif (task.get("eval") or {}).get("base") is not None:
        value, source = task["eval"]["base"], "finetune eval (HF)"
    result["reference"]["base_value"], result["reference"]["base_source"] = value, source
    for row in result["rows"]:
        if value is not None and row.get("task_value") is not None:
            row["delta_vs_base"] = row["task_value"] - value


def _relative_sizes(rows: list[dict], f16_bytes: int | None) -> None:
    ref = f16_bytes or next((r["file_bytes"] for r in rows if r["type"] == "f16"), None)
    for r in rows:
        if ref:
            r["size_vs_f16"] = r["file_bytes"] / ref


# ---------------------------------------------------------------------------------------------
# Text


def _f(x, spec=".3f", signed=False):
    if x is None:
        return "–"
    return format(x, ("+" if signed else "") + spec)


def ladder_table(ladder: dict) -> str:
    """The markdown table report.md and stdout show."""
    ref = ladder["reference"]
    metric = ref.get("metric", "task")
    head = ["type", "size", "vs f16", "bits/weight", "mean KL", "max KL", "top-1", "greedy identical",
            f"{metric} (llama.cpp)", "Δ vs base", "check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ladder["rows"]:
        g = r.get("greedy") or {}
        cells = [r["type"], f"{r['file_bytes'] / 2**20:.1f} MiB", _f(r.get("size_vs_f16"), ".2f"),
                 _f(r.get("bits_per_weight"), ".2f"), _f(r.get("mean_kl"), ".2e"), _f(r.get("max_kl"), ".2e"),
                 _f(r.get("top1_agreement"), ".3f"),
                 f"{g['identical']}/{g['prompts']}" if g else "–", _f(r.get("task_value")),
                 _f(r.get("delta_vs_base"), signed=True),
                 "crashed" if r.get("crashed") else ("PASS" if r.get("passed") else "FAIL")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"Against {ref['model']} on {ladder['rows'][0].get('positions', 0) if ladder['rows'] else 0} "
             "held-out positions (KL in nats)."]
    if "task" in ref:
        notes.append(f"{ref['task']}: {metric} {ref['task_value']:.3f} in fp32 HF on {ref['prompts']} prompts "
                     f"(greedy, stops {', '.join(ref['stop_tokens'])}); base {_f(ref.get('base_value'))}"
                     + (f" ({ref['base_source']})" if ref.get("base_source") else " (run `finetune eval` or export "
                        "gguf_adapter for the base value)") + ".")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"


def ladder_lines(ladder: dict) -> list[str]:
    """One line per type for stdout: 'q4_k_m: 0.31 of f16's size, exact_match 0.95 vs 0.95 in fp32'."""
    ref = ladder["reference"]
    out = []
    for r in ladder["rows"]:
        size = f"{r['size_vs_f16']:.2f} of f16's size" if r.get("size_vs_f16") else f"{r['file_bytes'] / 2**20:.1f} MiB"
        task = (f", {ref['metric']} {_f(r.get('task_value'))} vs {ref['task_value']:.3f} in fp32"
                if "task" in ref else "")
        out.append(f"{r['type']}: {size}, {_f(r.get('bits_per_weight'), '.2f')} bits/weight, mean KL "
                   f"{_f(r.get('mean_kl'), '.2e')}, top-1 {_f(r.get('top1_agreement'))}{task}"
                   + ("" if r.get("passed") else " — FAIL"))
    return out
