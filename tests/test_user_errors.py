"""Every problem reaches the user as one line: user errors (exit 2) name the field or file and the fix;
anything unexpected (exit 1) is one line plus where its traceback was written. Logging never hijacks a
handler it did not create."""

from __future__ import annotations

import io
import logging
import shutil
import sys

import pytest
from typer.testing import CliRunner

from finetune.cli import app

RUNNER = CliRunner()


def _one_line(result) -> str:
    # (log lines such as "finetune: WARNING: ..." may come before it; they are not the error)
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("finetune: ")]
    assert "Traceback" not in result.output, result.output
    assert len(lines) == 1, result.output
    return lines[0]


def test_foreign_stream_handler_keeps_its_stream(tmp_path):
    """A handler someone else put on the `finetune` logger (pytest's capture, a notebook's) is left alone."""
    from finetune import rundir

    class Foreign(logging.StreamHandler):
        pass

    mine = io.StringIO()
    foreign = Foreign(mine)
    logger = logging.getLogger("finetune")
    logger.addHandler(foreign)
    try:
        rundir.setup_logging(tmp_path)
        rundir.setup_logging(tmp_path)  # a second run in the same process
        assert foreign.stream is mine
        logger.warning("hello from a test")
        assert "hello from a test" in mine.getvalue()
        assert "hello from a test" in (tmp_path / "train.log").read_text()
        # our own stderr handler follows today's sys.stderr (tests and notebooks swap it)
        swapped = io.StringIO()
        old, sys.stderr = sys.stderr, swapped
        try:
            logger.warning("to the new stderr")
        finally:
            sys.stderr = old
        assert "to the new stderr" in swapped.getvalue()
        assert sum(isinstance(h, rundir._OwnStderrHandler) for h in logger.handlers) == 1
    finally:
        logger.removeHandler(foreign)


def test_damaged_adapter_is_named_in_one_line(merged_run, tmp_path):
    run, _ = merged_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export"))
    weights = copy / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(b"\x00" * 7 + weights.read_bytes()[7:])  # a flipped header: "invalid header length"
    for argv in (["merge", str(copy)], ["generate", str(copy), "--prompt", "hi", "--max-new-tokens", "2"],
                 ["export", str(copy), "--format", "adapter"], ["eval", str(copy)]):
        result = RUNNER.invoke(app, argv)
        line = _one_line(result)
        assert result.exit_code == 2, (argv, result.output)
        assert str(weights) in line and "sha256" in line, line


def test_unexpected_exception_is_one_line_with_the_traceback_kept(monkeypatch, recipe_factory):
    import finetune.cli as cli

    def boom(*a, **k):
        raise RuntimeError("something nobody expected\nsecond line")

    monkeypatch.setattr(cli, "load_recipe", boom)
    monkeypatch.delenv("FINETUNE_DEBUG", raising=False)
    result = RUNNER.invoke(app, ["validate", str(recipe_factory())])
    line = _one_line(result)
    assert result.exit_code == 1
    assert line.startswith("internal error: RuntimeError: something nobody expected second line")
    path = line.split("full traceback: ")[1].split(";")[0]
    kept = open(path, encoding="utf-8").read()
    assert "Traceback" in kept and "something nobody expected" in kept and "def boom" not in line
    monkeypatch.setenv("FINETUNE_DEBUG", "1")
    result = RUNNER.invoke(app, ["validate", str(recipe_factory())])
    assert isinstance(result.exception, RuntimeError)  # the developer gets the real exception


def test_tokenizer_template_without_one_is_a_user_error(tmp_path, tiny_model_dir, recipe_factory):
    import json

    bare = tmp_path / "bare-model"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    cfg = bare / "tokenizer_config.json"
    body = json.loads(cfg.read_text())
    body.pop("chat_template", None)
    cfg.write_text(json.dumps(body))
    recipe = recipe_factory(model={"base": str(bare)})
    result = RUNNER.invoke(app, ["data", str(recipe), "data.template=tokenizer"])
    line = _one_line(result)
    assert result.exit_code == 2 and line.startswith("error: data.template: `tokenizer` was asked for"), line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_user_error(recipe_factory):
    result = RUNNER.invoke(app, ["train", str(recipe_factory()), "train.device=cuda"])
    line = _one_line(result)
    assert result.exit_code == 2 and "train.device: cuda was asked for but no CUDA GPU is visible" in line


def test_bitsandbytes_crashing_on_this_cpu_is_one_line(recipe_factory, monkeypatch, tmp_path):
    """bitsandbytes' CPU kernel dying (SIGILL/SIGSEGV on a CPU it was not built for) is probed in a child process:
    one line naming the runtime, the signal and the fix, instead of a dead process."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "fresh-cache"))  # no cached verdict: the probe runs
    monkeypatch.setenv("FINETUNE_CRASH_CHILD", "bnb-probe")
    result = RUNNER.invoke(app, ["train", str(recipe_factory())])
    errors = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    line = errors[0]
    assert "data:" not in result.output, "probed before any data work"
    assert "bitsandbytes" in line and "crashed with SIGSEGV" in line and "load_in_4bit: false" in line, line
    monkeypatch.delenv("FINETUNE_CRASH_CHILD")
    from finetune.models import check_bnb_runs_on_this_cpu

    check_bnb_runs_on_this_cpu()  # passes here, and the verdict is kept for the next load
    assert list((tmp_path / "fresh-cache" / "bnb-cpu-ok").iterdir())
