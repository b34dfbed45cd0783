"""Shared fixtures: a tiny random LLaMA with a trained tokenizer, built once per test session, offline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# No test may reach a hub: everything is built here or shipped in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_tiny_llama, color_rows, write_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path_factory.getbasetemp() / "finetune-cache"))


def make_recipe(tmp_path: Path, model_dir: Path, rows: list[dict] | None = None, **sections) -> Path:
    """Write a small recipe (and its data) for the tiny model; `sections` override whole keys."""
    import yaml

    data_file = write_jsonl(tmp_path / "train.jsonl", rows if rows is not None else color_rows(32))
    recipe = {
        "model": {"base": str(model_dir)},
        "quantization": {"compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": [{"path": str(data_file), "format": "alpaca"}], "template": "chatml", "max_length": 64},
        "train": {"max_steps": 4, "micro_batch_size": 4, "grad_accum": 1, "learning_rate": 5e-3,
                  "report_to": ["none"], "save_steps": 1000, "gradient_checkpointing": False},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def recipe_factory(tmp_path, tiny_model_dir):
    return lambda **kw: make_recipe(tmp_path, tiny_model_dir, **kw)


@pytest.fixture(scope="session")
def merged_run(tmp_path_factory, tiny_model_dir):
    """(run, base): a tiny NF4 run trained and merged once per session (see tests/merged_run.py). Tests that
    write into it add files only (export/); tests that need to change it work on a copy."""
    from merged_run import build_merged_run

    return build_merged_run(tmp_path_factory.mktemp("merged-run"), tiny_model_dir)


# CI explores the same examples every run (a landing must not hinge on which random documents one run drew);
# developers' runs keep drawing new ones, which is how the fuzz finds new defects.
from hypothesis import settings as _hyp_settings  # noqa: E402

_hyp_settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    _hyp_settings.load_profile("ci")
