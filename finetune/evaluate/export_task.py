"""The held-out generation task export's fidelity ladder scores each GGUF on, built by eval's own rules.

Export does not import eval (stages stay apart): the CLI and `finetune run` build this with eval's task loading,
metric functions and result file, and hand it to `export_run(..., task=...)`. The score function is eval's
`metrics.score` bound to the task's metric, normalisation and pattern, so a GGUF's number means what eval's does.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from finetune.evaluate import metrics
from finetune.evaluate.runner import default_tasks
from finetune.evaluate.tasks import EvalError, load_items

GENERATION_KINDS = ("held_out", "generate")


def ladder_task(run: Path, recipe) -> dict | None:
    """The recipe's first held_out/generate task (or the held-out rows when it lists none) as
    {name, metric, prompts, references, score, max_new_tokens, eval: {base, tuned}}; None when there is none."""
    run = Path(run)
    try:
        tasks = default_tasks(recipe, run)
    except EvalError:
        return None
    task = next((t for t in tasks if t.kind in GENERATION_KINDS), None)
    if task is None:
        return None
    items = [it for it in load_items(task, run, recipe.data.system_prompt, recipe.eval.limit)
             if it.prompt and it.references]
    if not items:
        return None
    metric = task.metrics[0]
    return {"name": task.name, "metric": metric, "prompts": [it.prompt for it in items],
            "references": [list(it.references) for it in items],
            "score": functools.partial(metrics.score, metric, options=tuple(task.normalize), pattern=task.pattern),
            "max_new_tokens": task.max_new_tokens, "eval": _eval_values(run, task.name, metric)}


def _eval_values(run: Path, task: str, metric: str) -> dict:
    """base and fine-tuned values from eval/results.json (HF), when `finetune eval` has run."""
    path = run / "eval" / "results.json"
    if not path.is_file():
        return {}
    try:
        rows = json.loads(path.read_text(encoding="utf-8")).get("results", [])
    except ValueError:
        return {}
    got = {r.get("model"): r.get("value") for r in rows if r.get("task") == task and r.get("metric") == metric}
    tuned = got.get("merged", got.get("adapter"))
    return {k: v for k, v in (("base", got.get("base")), ("tuned", tuned)) if v is not None}
