"""Run a step that calls native code (llama.cpp, a GGUF tokenizer, ...) in a child process, so that when the
native code crashes it is the child that dies, and the user gets one line instead of `Segmentation fault`.

    value = isolate.call(fn, arg, what="evaluating run-q8_0.gguf", runtime="llama-cpp-python")
    # raises isolate.Crashed (a UserError): "llama-cpp-python 0.3.36 crashed with SIGSEGV while evaluating ..."

Why a fresh `python -m finetune.isolate` subprocess and not multiprocessing:
- `fork` copies a process whose OpenMP/torch thread pools (and, on a GPU, CUDA context) do not survive a fork:
  the child can hang or fail in ways that have nothing to do with the step.
- multiprocessing's `spawn` re-imports the parent's `__main__` in the child. From the `finetune` console script
  that is harmless, but a user's own script or notebook without an `if __name__ == "__main__"` guard would run
  again inside the child. A `-m finetune.isolate` child imports only what the step needs.
The function, its arguments and its result travel with pickle (the function by reference: module + name); the
parent's `sys.path` goes first, so the child finds the same modules. Exceptions raised in the child come back
and are raised again in the parent, as themselves when they pickle. The child's stdout/stderr go to a temp file
whose last lines the crash keeps (for the run's log and verify.json), never to the user's terminal.

A crash never deletes anything: files the step wrote before it died stay where they are.

Test hook: `FINETUNE_CRASH_CHILD=tag1,tag2` makes the child of any call whose `tag` is listed kill itself with
SIGSEGV before running the step, the way a native crash ends it (tests use this to exercise the retry paths).

This module imports nothing heavy: it is imported by the CLI's export and model-loading paths.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from finetune.errors import UserError

CRASH_HOOK = "FINETUNE_CRASH_CHILD"
TAIL_LINES = 20


def runtime_version(package: str) -> str:
    """"llama-cpp-python 0.3.36" (or the bare name when it is not installed)."""
    try:
        return f"{package} {metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return package


def signal_name(returncode: int) -> str | None:
    """SIGSEGV for -11 (how subprocess reports a child killed by a signal); None for a normal exit."""
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


@dataclass
class Crash:
    """A child that died without returning: killed by a signal, or exiting without a result."""

    what: str
    """What was being run, e.g. "evaluating run-q8_0.gguf"."""
    runtime: str
    """The native runtime and its version, e.g. "llama-cpp-python 0.3.36"."""
    returncode: int
    signal: str | None
    log_tail: list[str] = field(default_factory=list)
    """The child's last stdout/stderr lines (llama.cpp's own messages), for logs, never the one-line message."""

    @property
    def how(self) -> str:
        return f"crashed with {self.signal}" if self.signal else f"exited with code {self.returncode} and no result"

    @property
    def message(self) -> str:
        return f"{self.runtime} {self.how} while {self.what}"

    def to_dict(self) -> dict:
        return {"what": self.what, "runtime": self.runtime, "returncode": self.returncode, "signal": self.signal,
                "message": self.message, "log_tail": self.log_tail}


class Crashed(UserError):
    """A native step took its child process down. The message is the one line; `.crash` has the details."""

    def __init__(self, crash: Crash):
        super().__init__(crash.message)
        self.crash = crash


@dataclass
class Outcome:
    """What `attempt` returns: the value, or the crash (never both)."""

    value: object = None
    crash: Crash | None = None

    @property
    def ok(self) -> bool:
        return self.crash is None


def call(fn, *args, what: str, runtime: str, tag: str | None = None, **kwargs):
    """fn(*args, **kwargs) in a child process; its value, its exception re-raised, or `Crashed`.

    `runtime` is a package name ("llama-cpp-python") whose version goes into the message."""
    out = attempt(fn, *args, what=what, runtime=runtime, tag=tag, **kwargs)
    if out.crash is not None:
        raise Crashed(out.crash)
    return out.value


def attempt(fn, *args, what: str, runtime: str, tag: str | None = None, **kwargs) -> Outcome:
    """Like `call`, but a crash is returned as `Outcome(crash=...)` (for callers that retry or report it)."""
    if getattr(fn, "__module__", None) == "__main__":
        raise TypeError(f"isolate: {fn.__qualname__} must live in an importable module, not __main__")
    with tempfile.TemporaryDirectory(prefix="finetune-isolate-") as tmp:
        job, result, output = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl", Path(tmp) / "output.txt"
        with open(job, "wb") as f:
            pickle.dump(list(sys.path), f)  # first, so the child can import fn's module before unpickling it
            pickle.dump((fn, args, kwargs, tag), f)
        with open(output, "wb") as out:
            proc = subprocess.run([sys.executable, "-m", "finetune.isolate", str(job), str(result)],
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  env=_child_env())
        tail = output.read_text(encoding="utf-8", errors="replace").splitlines()[-TAIL_LINES:]
        if proc.returncode == 0 and result.is_file():
            with open(result, "rb") as f:
                ok, payload = pickle.load(f)
            if ok:
                return Outcome(value=payload)
            raise _rebuild(payload)
    return Outcome(crash=Crash(what, runtime_version(runtime), proc.returncode, signal_name(proc.returncode), tail))


def _child_env() -> dict:
    env = dict(os.environ)
    # The child must import this very `finetune` (a source checkout may not be the installed one).
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("PYTHONFAULTHANDLER", None)  # a crash is reported in one line, not as a traceback dump
    return env


def _rebuild(payload) -> BaseException:
    """The child's exception: itself when it pickled, else a RuntimeError carrying its type and message."""
    exc, kind, text = payload
    if isinstance(exc, BaseException):
        return exc
    return RuntimeError(f"{kind}: {text}")


def _child(job: Path, result: Path) -> None:
    with open(job, "rb") as f:
        for p in reversed(pickle.load(f)):
            if p not in sys.path:
                sys.path.insert(0, p)
        fn, args, kwargs, tag = pickle.load(f)
    if tag and tag in os.environ.get(CRASH_HOOK, "").split(","):
        os.kill(os.getpid(), signal.SIGSEGV)
    try:
        payload = (True, fn(*args, **kwargs))
    except BaseException as e:  # noqa: BLE001 - every exception goes back to the parent
        try:
            pickle.loads(pickle.dumps(e))
            carried = e
        except Exception:  # noqa: BLE001 - an exception that does not pickle travels as text
            carried = None
        payload = (False, (carried, type(e).__name__, str(e)))
    try:
        data = pickle.dumps(payload)
    except Exception as e:  # noqa: BLE001 - a value that does not pickle is the step's bug: say so
        data = pickle.dumps((False, (None, type(e).__name__, f"the result could not be sent back: {e}")))
    tmp = result.with_name(result.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, result)  # a result file exists only when it is whole


if __name__ == "__main__":
    _child(Path(sys.argv[1]), Path(sys.argv[2]))
    sys.stdout.flush()
    # Skip interpreter teardown: native libraries (llama.cpp among them) can crash in their exit handlers,
    # after the result is safely written.
    os._exit(0)
