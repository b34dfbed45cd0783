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

from finetune.errors import UserError

log = logging.getLogger("finetune")

PACKAGES = ("finetune", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "gguf")


def cache_root() -> Path:
    """Where finetune keeps what outlives a run: converted GGUF bases, tokenised data (FINETUNE_CACHE)."""
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))


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
# Stages: what each one leaves, and whether it is complete and up to date. Stages learn about each other only
# through these functions (never by importing another stage or copying its marker names).

ADAPTER, MERGED, EXPORT, EVAL = "adapter", "merged", "export", "eval"
MARKER = ".complete"
"""Written last into adapter/ and merged/: JSON with what the directory was made from (and file hashes)."""
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_config.json")


class RunDirError(UserError):
    """The run directory is in a state we must not write over or read from; the message says what to do."""


def newest_mtime(path: Path) -> float:
    """The last time anything under `path` was written (0 if it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_mtime
    return max((p.stat().st_mtime for p in path.rglob("*") if p.is_file()), default=0.0) if path.is_dir() else 0.0


def newer_than(output: Path, *inputs: Path) -> bool:
    """make's rule: `output` exists and nothing under `inputs` was written after it."""
    out = newest_mtime(output)
    return out > 0 and all(out >= newest_mtime(i) for i in inputs)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_hashes(root: Path) -> dict[str, dict]:
    """Size and sha256 of every file under `root` (the body of a completion marker)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MARKER}


def read_marker(directory: Path) -> dict | None:
    try:
        body = json.loads((Path(directory) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def adapter_sha(run: Path) -> str | None:
    """One hash of the adapter's weights and config: what merged/ and export/ record they were made from."""
    files = [Path(run) / ADAPTER / name for name in ADAPTER_WEIGHTS]
    if not all(f.is_file() for f in files):
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def adapter_complete(run: Path) -> bool:
    """adapter/ holds the weights and config (train publishes the directory whole, its marker inside)."""
    return all((Path(run) / ADAPTER / name).is_file() for name in ADAPTER_WEIGHTS)


def check_adapter(run: Path) -> None:
    """Raise a one-line RunDirError when a file of adapter/ no longer matches the hash its marker recorded
    (a damaged disk, a partial copy, a hand edit), instead of a library traceback later."""
    adapter = Path(run) / ADAPTER
    if not adapter_complete(run):
        raise RunDirError(f"{adapter}: no finished adapter here; run `finetune train` first (or check the path)")
    marker = read_marker(adapter)
    if marker is None or "files" not in marker:  # written before markers existed: nothing to compare with
        return
    for name, want in marker["files"].items():
        path = adapter / name
        if not path.is_file():
            raise RunDirError(f"{path}: missing, but {adapter / MARKER} lists it; copy the whole adapter/ directory "
                              "again, or train again")
        if path.stat().st_size != want["bytes"] or file_sha256(path) != want["sha256"]:
            raise RunDirError(f"{path}: does not match the sha256 recorded in {adapter / MARKER} when it was written "
                              "(damaged or replaced); restore it from a copy, or train again (the latest checkpoint "
                              "in checkpoints/ also holds the adapter)")


def adapter_marker_body(adapter: Path) -> dict:
    return {"written": now(), "files": tree_hashes(adapter)}


def merged_complete(run: Path) -> bool:
    """merged/ was finished (its marker is written last) from the adapter that is in adapter/ now."""
    marker = read_marker(Path(run) / MERGED)
    return marker is not None and marker.get("adapter_sha256") == adapter_sha(run) and adapter_sha(run) is not None


def merged_marker_body(run: Path, base: str) -> dict:
    return {"adapter_sha256": adapter_sha(run), "base": base, "time": now()}


def merged_token(run: Path) -> str | None:
    """What an export records it was made from: the merged/ marker's text (changes with every merge)."""
    marker = Path(run) / MERGED / MARKER
    return marker.read_text(encoding="utf-8") if marker.is_file() else None


def eval_complete(run: Path, config: dict) -> bool:
    """eval/results.json exists, was computed with this eval `config`, and is newer than the weights it scored."""
    res = Path(run) / EVAL / "results.json"
    if not res.is_file() or not (Path(run) / EVAL / "table.md").is_file():
        return False
    try:
        old = json.loads(res.read_text(encoding="utf-8"))
    except ValueError:
        return False
    if old.get("config") != config:
        return False
    weights = [Path(run) / ADAPTER] + ([Path(run) / MERGED] if "merged" in old.get("models", []) else [])
    return all(res.stat().st_mtime >= newest_mtime(w) for w in weights)


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
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a writer that was killed (not a live one)
        if not _pid_alive(stale.name.rpartition(".tmp")[2]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if marker is not None:
            (tmp / marker).write_text(json.dumps(marker_body or {}, indent=1, default=str) + "\n", encoding="utf-8")
        publish_staged_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_staged_dir(tmp: Path, path: Path) -> None:
    """fsync every file and directory under `tmp`, then rename it to `path` (for writers that stage a directory
    themselves, like the Trainer's checkpoint save). An existing `path` is moved aside first and deleted only
    once the new one is in place, so some complete version is always there."""
    tmp, path = Path(tmp), Path(path)
    for p in sorted(tmp.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync_path(p)
    fsync_path(tmp)
    old = path.with_name(f".old-{path.name}")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    fsync_path(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


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
