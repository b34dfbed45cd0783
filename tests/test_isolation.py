"""Native steps run in a child process (finetune.isolate): a crash there is one line, never the end of finetune.

Crashes are real ones: the child kills itself with SIGSEGV, either in a test function or through the
FINETUNE_CRASH_CHILD hook, which fires inside the child of a call with that tag (the verifier, the GGUF-base
conversion and lm-eval's task loading all run in their real children otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from importlib.metadata import version

import pytest
from typer.testing import CliRunner

from finetune import isolate
from finetune.errors import UserError

RUNNER = CliRunner()


def _write_then_segfault(path: str) -> None:
    with open(path, "w") as f:
        f.write("partial")
    os.kill(os.getpid(), signal.SIGSEGV)


def _add(a, b):
    return a + b


def _raise_value_error():
    raise ValueError("bad value 42")


def test_a_segfaulting_child_is_one_line_naming_signal_file_and_runtime(tmp_path, capfd):
    partial = tmp_path / "out.gguf"
    with pytest.raises(isolate.Crashed) as info:
        isolate.call(_write_then_segfault, str(partial), what=f"evaluating {partial.name}",
                     runtime="llama-cpp-python")
    msg = str(info.value)
    assert isinstance(info.value, UserError)
    assert msg == f"llama-cpp-python {version('llama-cpp-python')} crashed with SIGSEGV while evaluating out.gguf"
    assert "\n" not in msg and "Traceback" not in msg
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Fatal Python error" not in out + err
    assert partial.read_text() == "partial"  # what the step wrote before it died stays
    assert info.value.crash.signal == "SIGSEGV" and info.value.crash.returncode == -signal.SIGSEGV


def test_a_child_returns_values_and_raises_its_exceptions_in_the_parent():
    assert isolate.call(_add, 2, b=3, what="adding", runtime="numpy") == 5
    with pytest.raises(ValueError, match="bad value 42"):
        isolate.call(_raise_value_error, what="raising", runtime="numpy")
    out = isolate.attempt(_write_then_segfault, os.devnull, what="x", runtime="numpy")
    assert not out.ok and out.crash.signal == "SIGSEGV"


# --- export --verify --------------------------------------------------------------------------------


@pytest.fixture
def run_copy(merged_run, tmp_path):
    """A copy of the session's merged run (named `run`, so the GGUF is run-f16.gguf): these tests rewrite export/."""
    pytest.importorskip("llama_cpp", reason="CI installs llama-cpp-python for the GGUF tests")
    from merged_run import one_thread

    dst = tmp_path / "run"
    shutil.copytree(merged_run[0], dst)
    shutil.rmtree(dst / "export", ignore_errors=True)
    with one_thread():
        yield dst


def _export_verify(run, monkeypatch, crash: str | None):
    from finetune.cli import app

    if crash:
        monkeypatch.setenv(isolate.CRASH_HOOK, crash)
    else:
        monkeypatch.delenv(isolate.CRASH_HOOK, raising=False)
    res = RUNNER.invoke(app, ["export", str(run), "--format", "gguf", "--gguf-type", "f16", "--verify"])
    ver = json.loads((run / "export" / "verify.json").read_text())
    return res, ver


def test_export_verify_f16_passes_in_its_child(run_copy, monkeypatch):
    res, ver = _export_verify(run_copy, monkeypatch, None)
    assert res.exit_code == 0, res.output
    assert ver["passed"] and ver["llama_cpp_runs"] == [{"use_extra_bufts": True, "crashed": False}]
    assert ver["tokenisation"]["identical"] == ver["tokenisation"]["texts"] >= 30
    assert ver["vs_same_weights"]["argmax_agreement"] >= 0.99
    assert "crashed" not in ver["summary"] and ver["summary"] in res.output


def test_default_buffers_crash_then_retry_passes_and_both_are_recorded(run_copy, monkeypatch):
    res, ver = _export_verify(run_copy, monkeypatch, "verify-default")
    assert res.exit_code == 0, res.output
    first, second = ver["llama_cpp_runs"]
    assert first["crashed"] and first["crash"]["signal"] == "SIGSEGV" and first["use_extra_bufts"]
    assert not second["crashed"] and second["use_extra_bufts"] is False  # as the child's model reported it
    assert ver["passed"]
    lc = version("llama-cpp-python")
    assert ver["summary"].startswith(
        f"llama.cpp (llama-cpp-python {lc}) crashed with SIGSEGV on this CPU with its default buffers while "
        "evaluating run-f16.gguf; with extra buffer types off it passed: users of this llama.cpp build on this "
        "CPU will hit the crash.")
    assert ver["summary"] in (run_copy / "report.md").read_text()
    assert "Traceback" not in res.output


def test_llama_cpp_crashing_both_ways_is_one_line_exit_1_and_the_gguf_stays(run_copy, monkeypatch):
    res, ver = _export_verify(run_copy, monkeypatch, "verify-default,verify-no-extra-bufts")
    assert res.exit_code == 1, res.output
    gguf = run_copy / "export" / "gguf" / "run-f16.gguf"
    assert gguf.is_file() and gguf.stat().st_size > 0
    assert not ver["passed"] and [r["crash"]["signal"] for r in ver["llama_cpp_runs"]] == ["SIGSEGV", "SIGSEGV"]
    line = ver["summary"]
    assert "\n" not in line and line in res.output and "Traceback" not in res.output
    assert f"llama-cpp-python {version('llama-cpp-python')}" in line and "SIGSEGV" in line
    assert "run-f16.gguf" in line and "could not run" in line
    assert line in (run_copy / "report.md").read_text()


# --- the other native steps ------------------------------------------------------------------------


def test_a_crash_converting_a_gguf_base_is_one_line(tmp_path, monkeypatch):
    from finetune.models import gguf_to_hf_dir

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(isolate.CRASH_HOOK, "gguf-base")
    base = tmp_path / "base.gguf"
    base.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(isolate.Crashed) as info:
        gguf_to_hf_dir(base)
    msg = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in msg
    assert msg.startswith(f"transformers {version('transformers')} crashed with SIGSEGV while converting {base}")


def test_a_crash_loading_lm_eval_tasks_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from finetune.evaluate.lm_eval_bridge import check_tasks
    from finetune.recipe import EvalTask

    monkeypatch.setenv(isolate.CRASH_HOOK, "lm-eval")
    task = EvalTask(name="arc", kind="lm_eval", lm_eval_tasks=["ft_local"], include_path=str(tmp_path))
    with pytest.raises(isolate.Crashed) as info:
        check_tasks(task)
    assert str(info.value) == (f"lm-eval {version('lm-eval')} crashed with SIGSEGV while loading lm-eval task(s) "
                               "ft_local of eval task arc")
