"""Every library internal finetune relies on still exists (finetune/internals.py), and the failure is readable."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from finetune import internals

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("record", internals.RECORDS, ids=[r.path for r in internals.RECORDS])
def test_internal_still_exists(record):
    internals.check(record)


def test_a_missing_internal_names_the_package_version_and_the_tested_range():
    from importlib.metadata import version

    gone = replace(internals.RECORDS[0], path="transformers.Trainer._save_checkpoint_renamed")
    with pytest.raises(internals.InternalMissing) as e:
        internals.check(gone)
    msg = str(e.value)
    assert "transformers.Trainer._save_checkpoint_renamed" in msg
    assert f"transformers {version('transformers')} no longer has" in msg
    assert f"transformers<={internals.TESTED['transformers']}.x" in msg
    assert "finetune/internals.py" in msg


def test_a_missing_module_and_a_changed_signature_are_reported_the_same_way():
    gone = replace(internals.RECORDS[0], package="trl", path="trl.trainer.no_such_module.Thing")
    with pytest.raises(internals.InternalMissing, match=r"trl\.trainer has no no_such_module"):
        internals.check(gone)
    changed = replace(internals.RECORDS[0], params=("model", "trial", "metrics"))
    with pytest.raises(internals.InternalMissing, match=r"no parameter 'metrics'"):
        internals.check(changed)
    gone_attr = replace(internals._BY_PATH["bitsandbytes.nn.Linear4bit.support_avx512bf16_for_cpu"],
                        path="bitsandbytes.nn.Linear4bit.no_such_flag")
    with pytest.raises(internals.InternalMissing, match=r"Linear4bit instance has no no_such_flag"):
        internals.check(gone_attr)


def test_get_only_serves_listed_internals():
    assert internals.get("accelerate.commands.launch.launch_command_parser") is not None
    with pytest.raises(KeyError, match="not listed in finetune/internals.py"):
        internals.get("transformers.Trainer._inner_training_loop")


def test_every_listed_user_module_exists():
    for r in internals.RECORDS:
        for path in r.used_in:
            assert (REPO / path).is_file(), f"{r.path}: used_in names {path}, which does not exist"


def test_pyproject_caps_each_package_at_the_next_untested_minor():
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    for package in ("transformers", "peft", "trl", "bitsandbytes", "accelerate"):
        m = re.search(rf'"{package}[^"]*<([0-9.]+)"', text)
        assert m, f"pyproject.toml: {package} has no upper bound, but finetune uses its internals"
        major, minor = internals.TESTED[package].split(".")
        assert m.group(1) == f"{major}.{int(minor) + 1}", (
            f"pyproject.toml caps {package} at <{m.group(1)}, but internals.TESTED says {internals.TESTED[package]}")


def test_importing_the_table_imports_no_library():
    code = ("import sys, finetune.internals as i; i.RECORDS; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl', 'bitsandbytes', 'accelerate') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
