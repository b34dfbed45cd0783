"""`finetune run RECIPE`: train -> merge -> eval -> export, each stage skipped when its output is complete
and up to date, so a re-run after a crash continues where it stopped.

Up to date means: complete by the stage's own test, and not older than the output of the stage before it
(make's rule). Deleting merged/ therefore re-runs merge and every stage after it, and nothing before.
Whether a stage is complete and up to date is the run directory's to say (finetune/rundir.py); this module
only chains the stages, as the CLI does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from finetune import rundir
from finetune.errors import UserError
from finetune.recipe import Recipe, load_resolved

STAGES = ("train", "merge", "eval", "export")
# Sections whose change makes an existing adapter a different experiment (eval/export may change freely).
TRAINING_SECTIONS = ("model", "quantization", "lora", "data", "train", "output_dir")


class PipelineError(UserError):
    """The run directory holds something `finetune run` must not silently reuse or overwrite."""


@dataclass
class StageOutcome:
    stage: str
    ran: bool
    why: str
    seconds: float = 0.0

    def line(self) -> str:
        took = f" in {self.seconds:.0f} s" if self.ran else ""
        return f"[{self.stage}] {'ran' if self.ran else 'skipped'}{took}: {self.why}"


def training_changes(recipe: Recipe, run: Path) -> list[str]:
    """Training keys whose value differs between this recipe and the one the run was trained with."""
    resolved = run / "resolved.yaml"
    if not resolved.is_file():
        return []
    old = load_resolved(resolved).model_dump(mode="json")
    new = recipe.model_dump(mode="json")
    changes = []
    for section in TRAINING_SECTIONS:
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += [f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            changes.append(f"{section}: {a!r} -> {b!r}")
    return changes


def _has_checkpoints(run: Path) -> bool:
    return (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("checkpoint-*"))


def stage_train(recipe: Recipe, recipe_path, overrides, run: Path) -> StageOutcome:
    from finetune.train import train

    if rundir.adapter_complete(run):
        changes = training_changes(recipe, run)
        if changes:
            raise PipelineError(f"{run}: holds an adapter trained with a different recipe ({'; '.join(changes[:4])}); "
                                "choose another output_dir, or delete the run directory to train again")
        return StageOutcome("train", False, f"adapter complete in {run / 'adapter'}")
    resume = _has_checkpoints(run)
    train(recipe, recipe_path, resume=resume, overrides=list(overrides))
    return StageOutcome("train", True, "resumed from the latest checkpoint" if resume else "trained")


def stage_merge(run: Path) -> StageOutcome:
    from finetune.merge import merge_run

    # merged_complete also checks that merged/ came from the adapter in adapter/ now.
    if rundir.merged_complete(run) and rundir.newer_than(run / rundir.MERGED, run / rundir.ADAPTER):
        return StageOutcome("merge", False, "merged/ is complete and newer than the adapter")
    merge_run(run)
    return StageOutcome("merge", True, "merged into the dequantized base")


def stage_eval(recipe: Recipe, run: Path) -> StageOutcome:
    from finetune.evaluate import eval_complete, evaluate_run

    results = run / "eval" / "results.json"
    held = run / "held_out.jsonl"
    if not recipe.eval.tasks and not (held.is_file() and held.stat().st_size):
        return StageOutcome("eval", False, "nothing to evaluate (no eval.tasks and no held-out rows)")
    if eval_complete(run, recipe) and rundir.newer_than(results, run / rundir.MERGED):
        return StageOutcome("eval", False, "results.json is up to date for this eval section")
    evaluate_run(run, recipe=recipe)
    return StageOutcome("eval", True, f"wrote {results}")


def stage_export(recipe: Recipe, run: Path) -> StageOutcome:
    ex = recipe.export
    if not ex.formats:
        return StageOutcome("export", False, "the recipe has no export formats")
    from finetune.export import export_complete, export_run

    if export_complete(run, ex.formats, ex.gguf_type) and rundir.newer_than(run / rundir.EXPORT, run / rundir.MERGED):
        return StageOutcome("export", False, f"{', '.join(ex.formats)} complete and newer than merged/")
    # Several GGUF types listed: the fidelity ladder (--verify) is what tells them apart, so it is written too.
    verify = ex.verify or len(ex.gguf_type) > 1
    task = None
    if verify:
        from finetune.evaluate.export_task import ladder_task

        task = ladder_task(run, recipe)
    export_run(run, ex.formats, ex.gguf_type, verify, None, task=task)
    return StageOutcome("export", True, f"exported {', '.join(ex.formats)}")


def run_pipeline(recipe: Recipe, recipe_path, overrides=(), echo=print) -> tuple[Path, list[StageOutcome]]:
    """Run every stage that is not already complete and up to date; returns the run dir and what happened."""
    run = Path(recipe.output_dir)
    outcomes = []
    steps = [lambda: stage_train(recipe, recipe_path, overrides, run), lambda: stage_merge(run),
             lambda: stage_eval(recipe, run), lambda: stage_export(recipe, run)]
    for name, step in zip(STAGES, steps):
        echo(f"[{name}] ...")
        started = time.time()
        outcome = step()
        outcome.seconds = time.time() - started
        echo(outcome.line())
        outcomes.append(outcome)
    return run, outcomes
