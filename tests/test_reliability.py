"""Checkpoints that survive kill -9, SIGTERM, crashes in the save, NaN and planted pickles (issue 6).

Every run trains the tiny fixture for a few steps. Kills and signals hit real `finetune train` subprocesses; the
resumes and the cheaper failure cases run the same CLI in-process. "Equal" means bit-for-bit on CPU: the per-step
loss and learning rate after the resume point and every tensor of the final adapter.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from conftest import make_recipe
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune import checkpoints as ck
from finetune.cli import app

# The tiny runs take ~0.1 s per step; a subprocess sleeps a little at each step end so that a kill or a signal
# sent after step k lands before the run ends, whatever the machine's load.
SLOW_STEPS = ("from transformers import trainer_callback as _tc; import time as _t\n"
              "_f = _tc.DefaultFlowCallback.on_step_end\n"
              "_tc.DefaultFlowCallback.on_step_end = lambda self, *a, **k: (_t.sleep(0.15), _f(self, *a, **k))[1]\n")

TRAIN = {"max_steps": 10, "micro_batch_size": 4, "grad_accum": 2, "learning_rate": 5e-3, "save_steps": 2,
         "save_total_limit": 2, "report_to": ["none"], "gradient_checkpointing": False, "logging_steps": 1}


class Rel:
    """The two recipes (grad_accum 2; packing on) and their uninterrupted runs, built once per module."""

    def __init__(self, root: Path, model_dir: Path):
        self.root = root
        lora = {"r": 8, "alpha": 16, "dropout": 0.1}  # dropout on: the RNG state must be restored too
        self.recipe = {
            "grad_accum": make_recipe(root / "ga", model_dir, train=TRAIN, lora=lora),
            "packing": make_recipe(root / "pack", model_dir, lora=lora, data={"packing": True},
                                   train={**TRAIN, "max_steps": 8, "micro_batch_size": 2}),
        }
        self.steps = {"grad_accum": 10, "packing": 8}
        self._baseline: dict[str, Path] = {}

    def baseline(self, kind: str) -> Path:
        if kind not in self._baseline:
            out = self.root / f"A-{kind}"
            r = cli("train", self.recipe[kind], f"output_dir={out}")
            assert r.exit_code == 0, r.output
            self._baseline[kind] = out
        return self._baseline[kind]


@pytest.fixture(scope="module")
def rel(tmp_path_factory, tiny_model_dir):
    import finetune.guard  # noqa: F401 - import transformers/trl now, so their log handlers bind to the real stderr,
    # not to the stream of the first CliRunner call (closed afterwards).

    # One intra-op thread, here and in every subprocess: the same arithmetic everywhere (runs are compared bit for
    # bit), and on a busy 2-core machine two OpenMP threads per process made these tiny runs ~30x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_CACHE", str(tmp_path_factory.getbasetemp() / "finetune-cache"))
        mp.setenv("OMP_NUM_THREADS", "1")
        yield Rel(tmp_path_factory.mktemp("reliability"), tiny_model_dir)
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# helpers


def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        traceback.print_exception(*r.exc_info)  # shown by pytest if the test fails
    return r


def launch(args, log: Path, inject: str = "") -> subprocess.Popen:
    """`finetune ...` in a fresh interpreter (the real module entry point), optionally with a fault injected."""
    code = (f"import sys, runpy\n{inject}\nsys.argv = ['finetune', *{[str(a) for a in args]!r}]\n"
            "runpy.run_module('finetune', run_name='__main__', alter_sys=True)\n")
    return subprocess.Popen([sys.executable, "-c", code], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def error_line(r) -> str:
    """The one-line error the CLI printed (a user error must never come with a traceback)."""
    # (a progress bar may leave its last frame on the same line, hence the search inside each line)
    lines = [line[line.index("error: "):] for line in r.output.splitlines() if "error: " in line]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output[-3000:]
    return lines[0]


def step_rows(run: Path) -> list[dict]:
    """The per-step rows of train_log.jsonl, in the order they were written."""
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


def steps(run: Path) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["learning_rate"]) for r in step_rows(run)}


def wait_for_step(run: Path, k: int, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            if max(steps(run), default=0) >= k:
                return
        except (OSError, ValueError):
            pass  # not written yet, or a line being written
        assert proc.poll() is None, f"training ended before step {k}:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no step {k} after {timeout} s:\n{log.read_text()[-3000:]}")


def events(run: Path, kind: str) -> list[dict]:
    m = json.loads((run / "manifest.json").read_text())
    return [e for e in m.get("events", []) if e["kind"] == kind]


def assert_continues_like(a: Path, b: Path, after: int, n: int) -> None:
    """b (resumed after step `after`) equals the uninterrupted a: per-step loss and lr, then the final adapter."""
    la, lb = steps(a), steps(b)
    logged = [r["step"] for r in step_rows(b)]
    # (a restart from step 0 that happens to retrace the same steps would log them twice)
    assert logged == list(range(1, n + 1)), f"missing or duplicated steps in the resumed log: {logged}"
    for s in range(after + 1, n + 1):
        assert lb[s] == la[s], f"step {s}: resumed (loss, lr) {lb[s]} != uninterrupted {la[s]}"
    wa, wb = load_file(a / "adapter" / "adapter_model.safetensors"), load_file(b / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"adapter tensor {name} differs after resuming"


def complete_steps(run: Path) -> list[int]:
    return [ck.step_of(p) for p in ck.list_complete(run / "checkpoints")]


# ---------------------------------------------------------------------------------------------
# kill -9, SIGTERM


@pytest.mark.parametrize("kind", ["grad_accum", "packing"])
def test_kill9_at_random_step_then_resume_equals_uninterrupted(rel, kind, tmp_path):
    recipe, n = rel.recipe[kind], rel.steps[kind]
    a = rel.baseline(kind)
    b, log = tmp_path / "B", tmp_path / "b.log"
    k = random.randint(3, n - 2)  # after the first checkpoint (step 2) is complete, before the end
    proc = launch(["train", recipe, f"output_dir={b}"], log, inject=SLOW_STEPS)
    wait_for_step(b, k, proc, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (b / "adapter").exists()
    resumed_at = complete_steps(b)[-1]
    assert 2 <= resumed_at < n, f"killed after step {k}; latest complete checkpoint {resumed_at}"

    r = cli("train", recipe, f"output_dir={b}", "--resume")
    assert r.exit_code == 0, r.output
    assert_continues_like(a, b, resumed_at, n)
    assert [e["step"] for e in events(b, "resumed")] == [resumed_at]
    assert f"resumed: checkpoint=checkpoint-{resumed_at}" in (b / "report.md").read_text()


def test_sigterm_checkpoints_at_step_boundary_exits_0_and_resumes(rel, tmp_path):
    recipe, n = rel.recipe["grad_accum"], rel.steps["grad_accum"]
    a = rel.baseline("grad_accum")
    b, log = tmp_path / "B", tmp_path / "b.log"
    proc = launch(["train", recipe, f"output_dir={b}"], log, inject=SLOW_STEPS)
    wait_for_step(b, 3, proc, log)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    stopped = complete_steps(b)[-1]
    assert 3 <= stopped < n
    state = json.loads((b / "checkpoints" / f"checkpoint-{stopped}" / "trainer_state.json").read_text())
    assert state["global_step"] == stopped == max(steps(b)), "the checkpoint is not at the last finished step"
    assert f"finetune train {recipe} output_dir={b} --resume" in out
    assert events(b, "interrupted")[0]["signal"] == "SIGTERM"
    assert not (b / ".finetune.lock").exists()

    r = cli("train", recipe, f"output_dir={b}", "--resume")
    assert r.exit_code == 0, r.output
    assert_continues_like(a, b, stopped, n)


def test_second_signal_aborts_at_once(tmp_path):
    """The first signal only asks for a stop (checked end to end above); the second exits at once, releasing the
    lock on the way. Saves are atomic, so dying at any point leaves what was saved intact (see the kill tests)."""
    released = tmp_path / "released"
    code = ("import sys, time, types\nfrom finetune.signals import StopOnSignal\n"
            "t = types.SimpleNamespace(stop_signal=None, resume_command='finetune train r.yaml --resume')\n"
            "with StopOnSignal(t, on_abort=lambda: open(sys.argv[1], 'w').write('yes')):\n"
            "    print('ready', flush=True)\n"
            "    while t.stop_signal is None:\n        time.sleep(0.01)\n"
            "    print('first', t.stop_signal, flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(released)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline().split() == ["first", str(int(signal.SIGINT))]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 128 + signal.SIGINT
    err = proc.stderr.read()
    assert "aborting now" in err and "finetune train r.yaml --resume" in err
    assert released.read_text() == "yes"


# ---------------------------------------------------------------------------------------------
# crashes inside the save, disk full


def test_kill_between_file_writes_of_a_save(rel, tmp_path):
    recipe, n = rel.recipe["grad_accum"], rel.steps["grad_accum"]
    a = rel.baseline("grad_accum")
    b, log = tmp_path / "B", tmp_path / "b.log"
    kill_in_save = ("import os, signal, torch\n_save = torch.save\n"
                    "def _kill(obj, f, *a, **k):\n"
                    "    if str(f).endswith('.tmp-checkpoint-4/scheduler.pt'):\n"
                    "        os.kill(os.getpid(), signal.SIGKILL)\n"
                    "    return _save(obj, f, *a, **k)\n"
                    "torch.save = _kill\n")
    proc = launch(["train", recipe, f"output_dir={b}"], log, inject=kill_in_save)
    proc.wait(timeout=180)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    root = b / "checkpoints"
    partial = root / ".tmp-checkpoint-4"
    assert (partial / "optimizer.pt").is_file() and not (partial / "scheduler.pt").exists()
    # A directory named like a checkpoint but without its completion marker is never taken either.
    shutil.copytree(root / "checkpoint-2", root / "checkpoint-9")
    (root / "checkpoint-9" / ck.COMPLETE_MARKER).unlink()
    assert complete_steps(b) == [2]

    r = cli("train", recipe, f"output_dir={b}", "--resume")
    assert r.exit_code == 0, r.output
    assert not partial.exists() and not (root / "checkpoint-9").exists()
    assert (root / "incomplete-checkpoint-9").is_dir()  # someone else's directory: moved aside, not deleted
    assert_continues_like(a, b, 2, n)


@pytest.mark.parametrize("fault", ["disk_full", "exception"])
def test_crash_inside_save_keeps_previous_checkpoint(rel, tmp_path, monkeypatch, fault):
    recipe = rel.recipe["grad_accum"]
    c = tmp_path / "C"
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if str(f).endswith(".tmp-checkpoint-4/scheduler.pt"):
            Path(f).write_bytes(b"\0" * 100)  # half a file, as a full disk leaves it
            if fault == "disk_full":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            raise RuntimeError("injected failure inside the save")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    r = cli("train", recipe, f"output_dir={c}")
    monkeypatch.undo()
    assert r.exit_code != 0
    if fault == "disk_full":
        assert r.exit_code == 2
        line = error_line(r)
        assert "No space left on device" in line and "checkpoint-2" in line and "is intact" in line
        assert f"finetune train {recipe} output_dir={c} --resume" in line
    else:  # unexpected: one line naming it and where the traceback went (the run's log), exit 1
        assert r.exit_code == 1
        line = error_line(r)
        assert "internal error: RuntimeError: injected failure inside the save" in r.output, line
        assert str(c / "train.log") in line and "injected failure" in (c / "train.log").read_text()
    root = c / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2"], "a partial save was left behind"
    ck.verify(root / "checkpoint-2")
    assert not (c / ".finetune.lock").exists()
    # (resuming after a failed save is checked in test_kill_between_file_writes_of_a_save)


# ---------------------------------------------------------------------------------------------
# planted pickle


class Payload:
    """Unpickling this runs code: it writes a file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("name", ["rng_state.pth", "optimizer.pt"])
def test_planted_pickle_is_refused_and_never_runs(rel, tmp_path, name):
    recipe = rel.recipe["grad_accum"]
    p = tmp_path / "P"
    shutil.copytree(rel.baseline("grad_accum"), p, ignore=shutil.ignore_patterns("adapter"))
    target = ck.latest_complete(p / "checkpoints")
    pwned = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "payload": Payload(pwned)}, target / name)
    # The payload is live: an unsafe load runs it.
    torch.save(Payload(tmp_path / "control"), tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert (tmp_path / "control").read_text() == "pwned"

    r = cli("train", recipe, f"output_dir={p}", "--resume")
    assert r.exit_code == 2 and "does not match its completion marker" in error_line(r)
    assert not pwned.exists()
    ck.write_marker(target, {"global_step": ck.step_of(target)})  # a forged but self-consistent checkpoint
    r = cli("train", recipe, f"output_dir={p}", "--resume")
    assert r.exit_code == 2 and f"{name}: refused to load" in error_line(r)
    assert not pwned.exists(), "the planted pickle ran"
    assert not (p / "adapter").exists()


def test_base_weights_load_from_safetensors_only(rel, tiny_model_dir, tmp_path):
    """A base directory whose weights are a pickle (pytorch_model.bin) is refused without unpickling it."""
    from safetensors.torch import load_file as load_st

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    weights = load_st(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    pwned = tmp_path / "pwned"
    torch.save({**weights, "payload": Payload(pwned)}, base / "pytorch_model.bin")
    r = cli("train", rel.recipe["grad_accum"], f"output_dir={tmp_path / 'run'}", f"model.base={base}")
    assert r.exit_code == 2 and "model.base" in error_line(r) and "safetensors" in error_line(r)
    assert not pwned.exists()


# ---------------------------------------------------------------------------------------------
# NaN


def _poison_loss(monkeypatch, at_global_steps):
    from finetune.guard import GuardedSFTTrainer

    real = GuardedSFTTrainer.compute_loss

    def poisoned(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = real(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not return_outputs and self.state.global_step in at_global_steps:
            return out * float("nan")
        return out

    monkeypatch.setattr(GuardedSFTTrainer, "compute_loss", poisoned)


def test_nan_stops_names_step_and_keeps_last_good_checkpoint(rel, tmp_path, monkeypatch):
    d = tmp_path / "D"
    _poison_loss(monkeypatch, {4})  # the loss of step 5
    r = cli("train", rel.recipe["grad_accum"], f"output_dir={d}")
    assert r.exit_code == 2, r.output
    line = error_line(r)
    assert "non-finite loss nan at step 5" in line and "checkpoint-4" in line and "on_nan: skip_step" in line
    assert complete_steps(d) == [2, 4] and not (d / "adapter").exists()
    ck.verify(d / "checkpoints" / "checkpoint-4")
    weights = load_file(d / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert events(d, "stopped_non_finite")[0]["step"] == 5
    assert "stopped_non_finite" in (d / "report.md").read_text()


def test_nan_skip_step_counts_and_reports(rel, tmp_path, monkeypatch):
    d = tmp_path / "D"
    _poison_loss(monkeypatch, {4, 5})  # steps 5 and 6
    r = cli("train", rel.recipe["grad_accum"], f"output_dir={d}", "train.on_nan=skip_step",
            "train.save_total_limit=null")
    assert r.exit_code == 0, r.output
    ev = events(d, "skipped_non_finite_steps")
    assert ev and ev[0]["count"] == 2 and ev[0]["steps"] == [5, 6]
    assert "skipped_non_finite_steps: count=2" in (d / "report.md").read_text()
    w = {s: load_file(d / "checkpoints" / f"checkpoint-{s}" / "adapter_model.safetensors") for s in (4, 6, 8)}
    assert all(torch.equal(w[4][k], w[6][k]) for k in w[4]), "a skipped step changed the weights"
    assert not all(torch.equal(w[6][k], w[8][k]) for k in w[6]), "training did not continue after the skips"
    final = load_file(d / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())


# ---------------------------------------------------------------------------------------------
# one writer, resume rules


def test_second_writer_refused_and_stale_lock_recovered(rel, tmp_path):
    recipe = rel.recipe["grad_accum"]
    run = tmp_path / "L"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom finetune.lock import RunLock\nRunLock(sys.argv[1]).acquire()\n"
                               "print('held', flush=True)\ntime.sleep(300)\n", str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = cli("train", recipe, f"output_dir={run}")
        assert r.exit_code == 2, r.output
        line = error_line(r)
        assert "another finetune process" in line and f"pid {holder.pid}" in line
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, as after a crash
        holder.wait()
    assert (run / ".finetune.lock").exists()

    # bf16 on CPU: the loud fallback must reach the report too.
    r = cli("train", recipe, f"output_dir={run}", "train.max_steps=2", "quantization.compute_dtype=bfloat16")
    assert r.exit_code == 0, r.output
    assert not (run / ".finetune.lock").exists()
    assert events(run, "stale_lock_recovered")[0]["pid"] == holder.pid
    report = (run / "report.md").read_text()
    assert "stale_lock_recovered" in report and "falling back to float32" in report


def test_resume_refuses_changed_recipe_or_data_unless_forced(rel, tmp_path):
    recipe = rel.recipe["grad_accum"]
    d = tmp_path / "D"
    shutil.copytree(rel.baseline("grad_accum"), d, ignore=shutil.ignore_patterns("adapter"))

    r = cli("train", recipe, f"output_dir={d}")
    assert r.exit_code == 2 and "add --resume" in error_line(r)

    r = cli("train", recipe, f"output_dir={d}", "train.learning_rate=0.001", "--resume")
    assert r.exit_code == 2, r.output
    assert "train.learning_rate: 0.005 -> 0.001" in error_line(r) and "--force" in error_line(r)

    manifest = json.loads((d / "manifest.json").read_text())
    data_file = next(iter(manifest["data_sha256"]))
    manifest["data_sha256"][data_file] = "0" * 64  # the checkpoint was trained on other data
    (d / "manifest.json").write_text(json.dumps(manifest))
    r = cli("train", recipe, f"output_dir={d}", "--resume")
    assert r.exit_code == 2 and f"data file {data_file}: content changed" in error_line(r)

    r = cli("train", recipe, f"output_dir={d}", "train.learning_rate=0.001", "--resume", "--force")
    assert r.exit_code == 0, r.output
    forced = events(d, "resumed")[-1]["forced_despite"]
    assert any("train.learning_rate" in c for c in forced) and any(data_file in c for c in forced)
    # checkpoint-10 was the last step: nothing is trained past max_steps, its adapter is published as is
    assert max(steps(d)) == 10
    final, last = (load_file(d / sub / "adapter_model.safetensors") for sub in ("adapter", "checkpoints/checkpoint-10"))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert "forced_despite" in (d / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# the checkpoint directory protocol itself (no training)


def _fake_checkpoint(root: Path, step: int) -> Path:
    tmp = ck.begin(root / f"checkpoint-{step}")
    (tmp / "adapter_model.safetensors").write_bytes(b"x" * 10)
    torch.save({"step": torch.tensor(step)}, tmp / "optimizer.pt")
    return ck.commit(tmp, root / f"checkpoint-{step}", meta={"global_step": step})


def test_protocol_marker_rotation_and_cleanup(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (1, 2, 3):
        _fake_checkpoint(root, s)
    ck.begin(root / "checkpoint-4")  # a save that never finished
    (root / "checkpoint-5").mkdir()  # unmarked
    os.rename(_fake_checkpoint(root, 6), root / ".old-checkpoint-6")  # a re-save of step 6 died between its renames
    assert [ck.step_of(p) for p in ck.list_complete(root)] == [1, 2, 3]
    ck.rotate(root, 2)
    assert [ck.step_of(p) for p in ck.list_complete(root)] == [2, 3]
    ck.clean_partial(root)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2", "checkpoint-3", "checkpoint-6",
                                                      "incomplete-checkpoint-5"]
    ck.remove(root / "checkpoint-6")
    # a file damaged after the save: refused loudly by verify(), not silently skipped
    with open(root / "checkpoint-3" / "optimizer.pt", "r+b") as f:
        f.truncate(5)
    with pytest.raises(ck.CheckpointError, match="does not match its completion marker"):
        ck.verify(root / "checkpoint-3")
    ck.remove(root / "checkpoint-3")
    # saving the same step again replaces it atomically
    _fake_checkpoint(root, 2)
    assert ck.verify(root / "checkpoint-2")["global_step"] == 2
    assert not any(p.name.startswith(".") for p in root.iterdir())
