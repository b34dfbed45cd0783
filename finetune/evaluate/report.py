"""Turn per-example scores into eval/results.json, eval/predictions/<task>.jsonl, eval/table.md and
eval/report.md. The table is rendered from the result rows alone, so every number it shows is in
results.json (a test checks this).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from finetune.evaluate import metrics as M

TRANSFORMS = {"perplexity": M.perplexity}
MODEL_ORDER = ("base", "adapter", "merged")


def _clean(x):
    """NaN/inf are not JSON; a missing number is null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def result_rows(task: str, kind: str, runs: dict, n_boot: int, seed: int = 0) -> list[dict]:
    """One row per (metric, model): value, 95% CI and n; tuned rows add the delta to base and its paired CI."""
    metrics: list[str] = []
    for run in runs.values():
        for m in list(run.reported) + list(run.values):
            if m not in metrics:
                metrics.append(m)
    rows = []
    for metric in metrics:
        tf = TRANSFORMS.get(metric)
        base = runs.get("base")
        base_value = None
        for model in MODEL_ORDER:
            run = runs.get(model)
            if run is None or (metric not in run.values and metric not in run.reported):
                continue
            vals, w = run.values.get(metric), run.weights.get(metric)
            value = run.reported[metric] if metric in run.reported else M.aggregate(vals, w, tf)
            row = {"task": task, "kind": kind, "metric": metric, "model": model, "value": value,
                   "n": len(vals) if vals is not None else len(run.outputs),
                   "ci95": list(M.bootstrap_ci(vals, w, n_boot, seed, tf)) if vals else None,
                   "higher_is_better": metric not in M.LOWER_IS_BETTER}
            if model == "base":
                base_value = value
            elif base is not None and base_value is not None:
                row["delta"] = value - base_value
                bvals = base.values.get(metric)
                if vals and bvals and len(bvals) == len(vals):
                    row["delta_ci95"] = list(M.paired_bootstrap_ci(bvals, vals, base.weights.get(metric), w,
                                                                   n_boot, seed, tf))
                else:
                    row["delta_ci95"] = None
            rows.append({k: _clean(v) for k, v in row.items()})
    return rows


def fmt(x, signed: bool = False) -> str:
    """The one number format of the table (tests parse it back)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    sign = "+" if signed and x >= 0 else ""
    return f"{sign}{x:.1f}" if abs(x) >= 1000 else f"{sign}{x:.3f}"


def _delta_cell(row: dict | None) -> str:
    if row is None or row.get("delta") is None:
        return "–"
    d, ci = row["delta"], row.get("delta_ci95")
    cell = fmt(d, signed=True)
    if ci and None not in ci:
        excludes_zero = ci[0] > 0 or ci[1] < 0
        cell = (f"**{cell}**" if excludes_zero else cell) + f" [{fmt(ci[0], True)}, {fmt(ci[1], True)}]"
    return cell


def table(rows: list[dict]) -> str:
    models = [m for m in MODEL_ORDER if any(r["model"] == m for r in rows)]
    tuned = [m for m in models if m != "base"]
    head = ["task", "metric", "n"] + models + [f"Δ {m} [95% CI]" for m in tuned if "base" in models]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r["task"], r["metric"]) for r in rows))
    for task, metric in keys:
        by_model = {r["model"]: r for r in rows if r["task"] == task and r["metric"] == metric}
        n = next(iter(by_model.values()))["n"]
        label = metric + (" ↓" if not next(iter(by_model.values()))["higher_is_better"] else "")
        cells = [task, label, str(n)] + [fmt(by_model[m]["value"]) if m in by_model else "–" for m in models]
        if "base" in models:
            cells += [_delta_cell(by_model.get(m)) for m in tuned]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def safe_name(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", task).strip("_") or "task"


def write_predictions(path: Path, items: list[dict], runs: dict) -> None:
    """One line per example: prompt, reference, and each model's output side by side."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for k, item in enumerate(items):
            row = dict(item)
            for model in MODEL_ORDER:
                run = runs.get(model)
                if run is None or k >= len(run.outputs):
                    continue
                out = run.outputs[k]
                row[model] = out.get("text")
                details = {key: v for key, v in out.items() if key not in ("text", "doc_id", "prompt", "reference")}
                if details:
                    row.setdefault("details", {})[model] = details
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def write_markdown(out_dir: Path, results: dict) -> None:
    """eval/table.md (included in the run's report.md) and eval/report.md (the table with its legend)."""
    tbl = table(results["results"])
    (out_dir / "table.md").write_text(tbl + "\n", encoding="utf-8")
    stop_tokens = ", ".join(f"`{t}`" for t in results.get("stop_tokens", []))
    lines = [
        f"# Evaluation: {Path(results['run']).name}", "",
        f"Models: {', '.join(results['models'])}. Greedy decoding, the run's template, stop tokens {stop_tokens}.", "",
        tbl, "",
        "- Δ = tuned − base. The interval is a paired bootstrap over the same examples "
        f"({results['bootstrap']} resamples); **bold** when it excludes zero.",
        "- ↓ lower is better (loss, perplexity); every other metric is a score where higher is better.",
        "- stop_rate: the fraction of generations that ended with a stop token before `max_new_tokens`.",
        "- end_token_rate (when the template's end-of-turn token is not EOS): the fraction that ended with the "
        "template's end token rather than EOS; `predictions/<task>.jsonl` names each reply's `stop_token`.",
        "- Per-example outputs: `predictions/<task>.jsonl`; all numbers: `results.json`.",
    ]
    if results.get("limit"):
        lines.append("- Quick check: only the first rows of each task were used (`--limit`).")
    if (out_dir.parent / "loss.png").is_file():
        lines += ["", "## Training and held-out loss", "", "![loss](../loss.png)"]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
