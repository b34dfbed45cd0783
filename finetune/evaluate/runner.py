"""`finetune eval RUN_DIR`: every task on the base and on the fine-tuned model(s), then the report.

Reads top to bottom: open the run -> load the task rows -> for each model, run every task -> score,
bootstrap, write eval/. The 4-bit base is loaded once and serves as both "base" (adapter off) and
"adapter"; the merged model, when asked for, is loaded after that one is freed.
"""

from __future__ import annotations

import gc
import logging
import shutil
from pathlib import Path

from finetune import rundir
from finetune.evaluate import report as R
from finetune.evaluate.loading import as_model, load_merged, load_tuned, merged_ready, open_run
from finetune.evaluate.scoring import SCORERS
from finetune.evaluate.tasks import EvalError, load_items

log = logging.getLogger("finetune")


def _sha(path: Path) -> str:
    return rundir.file_sha256(path) if path.is_file() else ""


def default_tasks(recipe, run: Path):
    """A recipe without eval.tasks still gets its held-out rows evaluated."""
    from finetune.recipe import EvalTask

    if recipe.eval.tasks:
        return list(recipe.eval.tasks)
    if (run / "held_out.jsonl").is_file() and (run / "held_out.jsonl").stat().st_size:
        if recipe.train.method in ("dpo", "orpo", "simpo"):  # held-out pairs: the preference accuracy too
            return [EvalTask(name="held_out", kind="held_out"), EvalTask(name="preference", kind="preference")]
        return [EvalTask(name="held_out", kind="held_out")]
    raise EvalError("eval.tasks: nothing to evaluate; add eval.tasks to the recipe or set data.held_out and train again")


def eval_config(recipe, run: Path, limit: int | None, model: str | None) -> dict:
    """Everything that decides the numbers besides the weights: compared by `eval_complete`."""
    ev = recipe.eval.model_dump(mode="json")
    ev["limit"] = limit if limit is not None else recipe.eval.limit
    ev["model"] = model or recipe.eval.model
    files = {t.path: _sha(Path(t.path)) for t in recipe.eval.tasks if t.path}
    return {"eval": ev, "files": files, "held_out": _sha(run / "held_out.jsonl"),
            "template": recipe.data.template, "system_prompt": recipe.data.system_prompt}


def _models(which: str) -> list[str]:
    return ["base"] + (["adapter"] if which in ("adapter", "both") else []) + (["merged"] if which in ("merged", "both") else [])


def eval_complete(run: Path, recipe=None, limit: int | None = None, model: str | None = None) -> bool:
    """results.json exists, was computed with this eval config, and is newer than the weights it scored."""
    from finetune.recipe import load_resolved

    run = Path(run)
    if recipe is None:
        if not (run / "resolved.yaml").is_file():
            return False
        recipe = load_resolved(run / "resolved.yaml")
    return rundir.eval_complete(run, eval_config(recipe, run, limit, model))


def _run_tasks(ctx, model, names: list[str], tasks, items, batch_size, limit, runs, echo) -> None:
    from finetune.evaluate.lm_eval_bridge import lm_eval_scores

    for task in tasks:
        for name in names:
            echo(f"eval: {task.name} on {name}")
            with as_model(model, name):
                if task.kind == "lm_eval":
                    subs = lm_eval_scores(model, ctx.tok, task, batch_size, limit)
                    for sub, run in subs.items():
                        key = task.name if len(subs) == 1 else f"{task.name}/{sub}"
                        runs.setdefault(key, {"kind": task.kind, "runs": {}})["runs"][name] = run
                else:
                    run = SCORERS[task.kind](ctx, model, task, items[task.name], batch_size, f"{task.name}/{name}")
                    runs.setdefault(task.name, {"kind": task.kind, "runs": {}})["runs"][name] = run


def evaluate_run(run: Path | str, recipe=None, limit: int | None = None, model: str | None = None,
                 echo=print) -> Path:
    """Evaluate a trained run; returns the path of eval/results.json. `recipe` (default: the run's
    resolved.yaml) supplies the eval section, so `finetune run` can evaluate with an edited one."""
    ctx = open_run(run)
    run = ctx.run
    if recipe is not None:
        ctx.recipe = recipe
    recipe = ctx.recipe
    which = model or recipe.eval.model
    if which not in ("adapter", "merged", "both"):
        raise EvalError(f"--model: choose adapter, merged or both (got {which!r})")
    limit = limit if limit is not None else recipe.eval.limit
    if which in ("merged", "both") and not merged_ready(run):
        raise EvalError(f"{run / 'merged'}: no merged model of the current adapter; run `finetune merge {run}` "
                        "first, or use --model adapter")
    tasks = default_tasks(recipe, run)
    items = {t.name: load_items(t, run, recipe.data.system_prompt, limit) for t in tasks if t.kind != "lm_eval"}
    for t in tasks:
        if t.kind == "lm_eval":
            from finetune.evaluate.lm_eval_bridge import check_tasks

            check_tasks(t)
    bs = recipe.eval.batch_size
    runs: dict[str, dict] = {}

    tuned = load_tuned(ctx)
    _run_tasks(ctx, tuned, ["base", "adapter"] if which != "merged" else ["base"], tasks, items, bs, limit, runs, echo)
    del tuned
    gc.collect()
    if which in ("merged", "both"):
        merged = load_merged(ctx)
        _run_tasks(ctx, merged, ["merged"], tasks, items, bs, limit, runs, echo)
        del merged
        gc.collect()

    out = run / "eval"
    if (out / "predictions").is_dir():
        shutil.rmtree(out / "predictions")  # a task removed from the recipe must not leave stale predictions
    rows = []
    for name, entry in runs.items():
        rows += R.result_rows(name, entry["kind"], entry["runs"], recipe.eval.bootstrap)
        R.write_predictions(out / "predictions" / f"{R.safe_name(name)}.jsonl", _pred_items(items.get(name), entry),
                            entry["runs"])
    results = {"run": str(run), "created": rundir.now(), "models": _models(which), "limit": limit,
               "bootstrap": recipe.eval.bootstrap, "stop_tokens": [ctx.tok.convert_ids_to_tokens(i) for i in ctx.stops],
               "config": eval_config(recipe, run, limit, model), "results": rows}
    R.write_markdown(out, results)
    # results.json last: its presence (and mtime) marks the stage complete for `finetune run`.
    rundir.write_json(out / "results.json", results)
    from finetune.report import write_report

    write_report(run)
    return out / "results.json"


def _pred_items(items, entry) -> list[dict]:
    if items is not None:
        return [{"id": it.id, "prompt": it.prompt if it.prompt is not None else it.text,
                 "reference": it.references[0] if len(it.references) == 1 else it.references,
                 **({"choices": it.choices} if it.choices else {})} for it in items]
    first = next(iter(entry["runs"].values()))  # lm-eval: prompt and target come with its samples
    return [{"id": o.get("doc_id"), "prompt": o.get("prompt"), "reference": o.get("reference")} for o in first.outputs]
