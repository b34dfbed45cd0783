"""`finetune run` on the tiny fixture: every stage runs once, a re-run skips them all, and deleting merged/
re-runs merge and only the stages after it."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_recipe

from finetune.pipeline import PipelineError, run_pipeline
from finetune.recipe import load_recipe


def quiet(_msg):
    pass


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("pipeline")
    return make_recipe(root, tiny_model_dir, data={"held_out": 4}, train={"eval_steps": 100},
                       eval={"model": "both", "bootstrap": 100,
                             "tasks": [{"name": "held", "kind": "held_out", "max_new_tokens": 6}]},
                       export={"formats": ["adapter"]})


def ran(outcomes) -> dict:
    print("\n".join(o.line() for o in outcomes))  # shown by pytest when an assertion below fails
    return {o.stage: o.ran for o in outcomes}


def test_run_skips_what_is_complete_and_reruns_what_is_stale(recipe_path):
    from typer.testing import CliRunner

    from finetune.cli import app

    recipe = load_recipe(recipe_path)
    run, outcomes = run_pipeline(recipe, recipe_path, echo=quiet)
    assert ran(outcomes) == {"train": True, "merge": True, "eval": True, "export": True}
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["models"] == ["base", "adapter", "merged"]
    assert "## Evaluation (base vs fine-tuned)" in (run / "report.md").read_text()

    # Again, through the CLI: nothing to do; the table and the report path are printed.
    res = CliRunner().invoke(app, ["run", str(recipe_path)])
    assert res.exit_code == 0, res.output
    for stage in ("train", "merge", "eval", "export"):
        assert f"[{stage}] skipped" in res.output
    assert "| held | loss ↓ |" in res.stdout, res.output and f"report: {run / 'report.md'}" in res.stdout
    stamp = (run / "eval" / "results.json").stat().st_mtime

    # merged/ lost: merge and everything after it runs again, training does not.
    shutil.rmtree(run / "merged")
    _, outcomes = run_pipeline(recipe, recipe_path, echo=quiet)
    assert ran(outcomes) == {"train": False, "merge": True, "eval": True, "export": True}
    assert (run / "eval" / "results.json").stat().st_mtime > stamp

    # A new eval section re-runs eval alone.
    raw_override = "eval.tasks[0].max_new_tokens=4"
    _, outcomes = run_pipeline(load_recipe(recipe_path, [raw_override]), recipe_path, [raw_override], echo=quiet)
    assert ran(outcomes) == {"train": False, "merge": False, "eval": True, "export": False}

    # A training change must not reuse the adapter silently.
    with pytest.raises(PipelineError, match=r"train\.max_steps: 4 -> 6"):
        run_pipeline(load_recipe(recipe_path, ["train.max_steps=6"]), recipe_path, ["train.max_steps=6"], echo=quiet)
    res = CliRunner().invoke(app, ["run", str(recipe_path), "train.max_steps=6"])
    assert res.exit_code == 2 and "different recipe" in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_quickstart_run_shows_a_real_improvement(tmp_path):
    """The README's promise, on the real SmolLM2-135M (minutes on a CPU)."""
    repo = Path(__file__).resolve().parent.parent
    recipe_file = repo / "recipes" / "smollm2" / "135m_qlora_quickstart.yaml"
    import os

    cwd = os.getcwd()
    os.chdir(repo)  # the recipe's data paths are relative to the repository root
    try:
        overrides = [f"output_dir={tmp_path / 'run'}"]
        run, outcomes = run_pipeline(load_recipe(recipe_file, overrides), recipe_file, overrides, echo=quiet)
    finally:
        os.chdir(cwd)
    rows = json.loads((run / "eval" / "results.json").read_text())["results"]
    get = {(r["task"], r["metric"], r["model"]): r for r in rows}
    held = get[("extraction", "json_match", "adapter")]
    assert held["delta"] > 0 and held["delta_ci95"][0] > 0
    assert get[("extraction", "stop_rate", "adapter")]["value"] >= 0.95
    assert ("general_knowledge", "contains", "adapter") in get and ("general_mc", "acc", "adapter") in get
