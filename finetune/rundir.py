"""The run directory: what each stage leaves for the next one and for the person who opens it.

    resolved.yaml   the recipe after overrides        manifest.json   versions, hashes, device, events
    data_report.json                                   held_out.jsonl  the rows evaluation uses
    train.log       everything logged                  train_log.jsonl one JSON object per trainer log
    checkpoints/    full training state                adapter/        the PEFT adapter + tokenizer
    loss.png        training/held-out loss             report.md       the summary a person reads first
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Iterator

log = logging.getLogger("finetune")

PACKAGES = ("finetune", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "gguf")


def is_main_process() -> bool:
    """True on rank 0 (or when not distributed). Only rank 0 writes the run directory."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_manifest(run: Path) -> dict:
    p = Path(run) / "manifest.json"
    return json.loads(p.read_text()) if p.is_file() else {}


# ---------------------------------------------------------------------------------------------
# Atomic publishing: every file or directory another stage (or a person) reads is written under a temp name,
# fsynced, and renamed into place, so a crash leaves either the old version or the whole new one.


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (some filesystems refuse it on directories; the rename is atomic anyway)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def publishing_file(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path` to write; when the block succeeds it is fsynced and renamed over `path`;
    when it fails the temp file is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def publishing_dir(path: Path, marker: str | None = None, marker_body: dict | None = None) -> Iterator[Path]:
    """Yield an empty temp directory beside `path`; when the block succeeds every file in it is fsynced, the
    completion `marker` (if any) is written last, and the directory is renamed to `path`. An existing `path` is
    moved aside first and deleted only once the new one is in place. On failure nothing of it remains."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if marker is not None:
            (tmp / marker).write_text(json.dumps(marker_body or {}, indent=1, default=str) + "\n", encoding="utf-8")
        for p in sorted(tmp.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            fsync_path(p)
        fsync_path(tmp)
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_path(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (see publishing_file)."""
    with publishing_file(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_json(path: Path, obj) -> None:
    """Write JSON atomically, so a crash never leaves half a manifest."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def update_manifest(run: Path, **fields) -> dict:
    m = read_manifest(run)
    m.update(fields)
    write_json(Path(run) / "manifest.json", m)
    return m


def add_event(run: Path, kind: str, **details) -> None:
    """Record something a reader of report.md must know: resumes, fallbacks, skipped steps."""
    m = read_manifest(run)
    m.setdefault("events", []).append({"time": now(), "kind": kind, **details})
    write_json(Path(run) / "manifest.json", m)


class _OwnStderrHandler(logging.StreamHandler):
    """The stderr handler finetune adds. Only handlers of this class (and the run's own file handlers, marked
    below) are ever touched again: a handler someone else put on the `finetune` logger (pytest's log capture,
    a notebook's, a job runner's) keeps its stream."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):  # always today's sys.stderr: tests and notebooks swap it between runs
        return sys.stderr

    @stream.setter
    def stream(self, value):  # logging.StreamHandler.__init__ assigns it; the getter ignores it on purpose
        pass


_OWN_FILE_HANDLER = "_finetune_run_log"


def setup_logging(run: Path | None = None, name: str = "train.log") -> None:
    """Log to stderr, and to a file in the run directory (main process only)."""
    logger = logging.getLogger("finetune")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, _OwnStderrHandler) for h in logger.handlers):
        h = _OwnStderrHandler()
        h.setFormatter(logging.Formatter("finetune: %(levelname)s: %(message)s"))
        logger.addHandler(h)
    if run is not None and is_main_process():
        path = os.path.abspath(str(Path(run) / name))
        for h in own_log_files():  # one run's log at a time: a later run in this process must not write here
            if h.baseFilename != path:
                logger.removeHandler(h)
                h.close()
        if not any(h.baseFilename == path for h in own_log_files()):
            fh = logging.FileHandler(path, encoding="utf-8")
            setattr(fh, _OWN_FILE_HANDLER, True)
            fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.addHandler(fh)
    logger.propagate = False


def own_log_files() -> list[logging.FileHandler]:
    """The run-log file handlers that setup_logging added (never a handler somebody else attached)."""
    return [h for h in logging.getLogger("finetune").handlers if getattr(h, _OWN_FILE_HANDLER, False)]
