"""Recipe loading: every shipped recipe validates, and malformed recipes give one-line errors, all at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.recipe import RecipeError, apply_override, load_recipe

REPO = Path(__file__).resolve().parent.parent
# recipes/accelerate holds `accelerate launch` configs, not recipes.
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


def test_recipes_exist():
    names = {str(p.relative_to(REPO)) for p in RECIPES}
    for required in ("recipes/smollm2/135m_qlora_quickstart.yaml", "recipes/llama2/7b_qlora_alpaca.yaml",
                     "recipes/llama3/8b_qlora_chat.yaml", "recipes/llama/65b_qlora_guanaco.yaml",
                     "recipes/tinyllama/1.1b_qlora_chat.yaml"):
        assert required in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)  # data paths in recipes are relative to the repo root
    recipe = load_recipe(path.relative_to(REPO))
    assert recipe.output_dir
    first = path.read_text().splitlines()[0]
    assert first.startswith("# finetune ") or first.startswith("# accelerate "), "first line must give the command"


BASE = {"model": {"base": "meta-llama/Llama-2-7b-hf"}, "data": {"train": [{"path": "tatsu-lab/alpaca"}]},
        "output_dir": "runs/x"}

# (what is wrong, recipe fragment merged over BASE, expected error line after "x.yaml: ")
MALFORMED = [
    ("unknown key with suggestion", {"lora": {"rank": 8}}, "lora.rank: unknown key (did you mean lora.r?)"),
    ("negative rank", {"lora": {"r": -4}}, "lora.r: must be a positive integer (got -4)"),
    ("zero rank", {"lora": {"r": 0}}, "lora.r: must be a positive integer (got 0)"),
    ("string for number", {"train": {"learning_rate": "fast"}}, "train.learning_rate: must be a number (got 'fast')"),
    ("float for int", {"train": {"micro_batch_size": 2.5}}, "train.micro_batch_size: must be an integer (got 2.5)"),
    ("negative lr", {"train": {"learning_rate": -1e-4}}, "train.learning_rate: must be a positive number (got -0.0001)"),
    ("bad literal", {"quantization": {"quant_type": "int3"}},
     "quantization.quant_type: must be one of 'nf4' or 'fp4' (got 'int3')"),
    ("unknown top-level key", {"modle": {"base": "x"}}, "modle: unknown key (did you mean model?)"),
    ("empty target list", {"lora": {"target_modules": []}},
     "lora.target_modules: must list at least one module name, or be all-linear (got [])"),
    ("dropout out of range", {"lora": {"dropout": 1.0}}, "lora.dropout: must be < 1.0 (got 1.0)"),
    ("unknown template", {"data": {"train": [{"path": "tatsu-lab/alpaca"}], "template": "nope"}},
     "data.template: unknown template; choose one of"),
    ("missing data file", {"data": {"train": [{"path": "data/missing.jsonl"}]}},
     "data.train[0].path: file not found (relative paths are resolved from the current directory) (got 'data/missing.jsonl')"),
    ("unknown format", {"data": {"train": [{"path": "tatsu-lab/alpaca", "format": "csvish"}]}},
     "data.train[0].format: must be one of 'alpaca', 'messages', 'sharegpt', 'prompt_completion', 'text', "
     "'preference', 'preference_messages' or 'kto' (got 'csvish')"),
    ("scalar where list", {"data": {"train": "x.jsonl"}}, "data.train: must be a list (got 'x.jsonl')"),
    ("empty train list", {"data": {"train": []}}, "data.train: must not be empty (got [])"),
    ("unknown builtin", {"model": {"base": "builtin:gpt5"}},
     "model.base: unknown builtin model; choose one of: builtin:smollm2-135m-instruct (got 'builtin:gpt5')"),
    ("bad bool", {"model": {"base": "x", "trust_remote_code": "maybe"}},
     "model.trust_remote_code: must be true or false (got 'maybe')"),
    ("scalar section", {"lora": 5}, "lora: must be a mapping of keys (a YAML section) (got 5)"),
    ("missing gguf", {"model": {"base": "./nope.gguf"}}, "model.base: file or directory not found"),
    ("non-integer held-out count", {"data": {"train": [{"path": "tatsu-lab/alpaca"}], "held_out": 2.5}},
     "data.held_out: must be a fraction below 1 (e.g. 0.05) or a whole count of rows (e.g. 20) (got 2.5)"),
    ("missing required section", {"output_dir": None}, "output_dir: must be a string (got null)"),
]


@pytest.mark.parametrize("what,fragment,expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_recipe_one_line(tmp_path, what, fragment, expected):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({**BASE, **fragment}))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert len(e.value.problems) == 1, e.value.problems
    line = e.value.problems[0]
    assert line.startswith(f"{path}: {expected}"), line
    assert "\n" not in line


def test_every_problem_reported_at_once(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({**BASE, "lora": {"rank": 8, "r": -1}, "train": {"epochs": 0},
                                    "data": {"train": [{"path": "gone.jsonl"}], "template": "nope"}}))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    fields = sorted(p.split(": ")[1] for p in e.value.problems)
    assert fields == ["data.template", "data.train[0].path", "lora.r", "lora.rank", "train.epochs"]


def test_bad_yaml_names_the_line(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  base: x\nlora:\n  r: [8\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert e.value.problems[0].startswith(f"{path}:5: invalid YAML")


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_coerce_types(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(BASE))
    r = load_recipe(path, ["lora.r=8", "train.max_steps=20", "quantization.double_quant=false",
                           "train.learning_rate=1e-4", "data.train[0].format=messages", "lora.target_modules=[q_proj,v_proj]"])
    assert (r.lora.r, r.train.max_steps, r.quantization.double_quant) == (8, 20, False)
    assert r.train.learning_rate == 1e-4 and r.data.train[0].format == "messages"
    assert r.lora.target_modules == ["q_proj", "v_proj"]


def test_bad_override_is_reported(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(RecipeError) as e:
        load_recipe(path, ["lora.r=-3"])
    assert e.value.problems == [f"{path}: lora.r: must be a positive integer (got -3)"]
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(path, ["lora.r"])
    raw = {"data": {"train": [{}]}}
    with pytest.raises(ValueError, match="out of range"):
        apply_override(raw, "data.train[3].path=x")


def test_cli_validate_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "lora": {"rank": 8}}))
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    out = subprocess.run([sys.executable, "-m", "finetune", "validate", str(good), str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert f"{good}: ok" in out.stdout
    assert out.stderr.strip() == f"{bad}: lora.rank: unknown key (did you mean lora.r?)"
    assert "Traceback" not in out.stderr


def test_cli_help_lists_field_docs():
    out = subprocess.run([sys.executable, "-m", "finetune", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "lora.r" in out.stdout and "LoRA rank." in out.stdout
    assert "quantization.compute_dtype" in out.stdout


def test_cli_version():
    out = subprocess.run([sys.executable, "-m", "finetune", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("finetune ")
