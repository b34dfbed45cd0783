"""The run directory: what each stage leaves for the next one and for the person who opens it.

    resolved.yaml   the recipe after overrides        manifest.json   versions, hashes, device, events
    data_report.json                                   held_out.jsonl  the rows evaluation uses
    train.log       everything logged                  train_log.jsonl one JSON object per trainer log
    checkpoints/    full training state                adapter/        the PEFT adapter + tokenizer
    loss.png        training/held-out loss             report.md       the summary a person reads first
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

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


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a manifest."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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


def setup_logging(run: Path | None = None, name: str = "train.log") -> None:
    """Log to stderr, and to a file in the run directory (main process only)."""
    logger = logging.getLogger("finetune")
    logger.setLevel(logging.INFO)
    streams = [h for h in logger.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    if not streams:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("finetune: %(levelname)s: %(message)s"))
        logger.addHandler(h)
    for h in streams:
        if h.stream is not sys.stderr:  # a second run in one process (tests, notebooks) may have a new stderr
            h.stream = sys.stderr  # not setStream(): it flushes the old stream, which may be closed
    if run is not None and is_main_process():
        path = str(Path(run) / name)
        if not any(isinstance(h, logging.FileHandler) and h.baseFilename == os.path.abspath(path) for h in logger.handlers):
            fh = logging.FileHandler(path, encoding="utf-8")
            fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.addHandler(fh)
    logger.propagate = False
