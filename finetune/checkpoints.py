"""Checkpoints that survive kill -9, a crash inside the save, and a full disk; loading that never unpickles code.

The protocol, all on the main process:

    checkpoints/.tmp-checkpoint-N/   every file written here first (a crash leaves only this, ignored, cleaned)
        ...files..., then each fsynced, then COMPLETE_MARKER (sizes + sha256 of every file), fsynced
    rename .tmp-checkpoint-N -> checkpoint-N, then fsync checkpoints/

A rename within one filesystem is atomic, so `checkpoint-N` either does not exist or holds every file and its
marker. A directory without a valid marker is never taken as a checkpoint. Old checkpoints are deleted by first
renaming them out of the `checkpoint-*` namespace, so a half-deleted one can never look complete either.

Builds on rundir's hashing and fsync; train.py and the trainer subclass in guard.py build on it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from finetune import rundir
from finetune.errors import UserError

file_sha256 = rundir.file_sha256  # one hashing helper for the whole package

log = logging.getLogger("finetune")

PREFIX = "checkpoint-"
COMPLETE_MARKER = "finetune_complete.json"
_STAGING = (".tmp-", ".old-", ".del-")
_STEP = re.compile(r"^checkpoint-(\d+)$")
# Files that torch.load reads back (optimizer, scheduler, scaler, RNG states) or that could be mistaken for
# weights: every one of them must pass a weights_only load before the Trainer sees the checkpoint.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


class CheckpointError(UserError):
    """A checkpoint cannot be written or must not be loaded (disk full, damaged, unsafe pickle)."""


# ---------------------------------------------------------------------------------------------
# Writing


def staging_dir(final: Path) -> Path:
    return Path(final).parent / f".tmp-{Path(final).name}"


def begin(final: Path) -> Path:
    """Create an empty staging directory for `final` (a leftover from a crashed save is discarded)."""
    tmp = staging_dir(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def abort(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def commit(tmp: Path, final: Path, meta: dict | None = None, marker: bool = True) -> Path:
    """fsync every file in `tmp`, write the completion marker, and rename `tmp` to `final` atomically.

    If `final` already exists (the same step saved again, e.g. after resuming from it) it is moved aside first and
    deleted only once the new directory is in place.
    """
    tmp, final = Path(tmp), Path(final)
    if marker:
        body = {"format": 1, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(meta or {}),
                "files": rundir.tree_hashes(tmp)}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
    rundir.publish_staged_dir(tmp, final)
    return final


def write_marker(ckpt: Path, meta: dict | None = None) -> None:
    """(Re)write the completion marker of an existing directory in place. Used by tests to forge checkpoints."""
    ckpt = Path(ckpt)
    (ckpt / COMPLETE_MARKER).unlink(missing_ok=True)
    body = {"format": 1, **(meta or {}), "files": rundir.tree_hashes(ckpt)}
    (ckpt / COMPLETE_MARKER).write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")


def remove(ckpt: Path) -> None:
    """Delete a checkpoint: rename it out of the checkpoint-* namespace first, so a crash mid-delete leaves no
    directory that could pass for a checkpoint."""
    ckpt = Path(ckpt)
    doomed = ckpt.parent / f".del-{ckpt.name}"
    if doomed.exists():
        shutil.rmtree(doomed)
    os.rename(ckpt, doomed)
    rundir.fsync_path(ckpt.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def rotate(root: Path, keep: int | None) -> list[Path]:
    """Keep the `keep` newest complete checkpoints; incomplete directories never count and are never the reason
    a complete one is deleted."""
    if not keep:
        return []
    doomed = list_complete(root)[:-keep]
    for ckpt in doomed:
        log.info("deleting %s (train.save_total_limit=%d)", ckpt, keep)
        remove(ckpt)
    return doomed


# ---------------------------------------------------------------------------------------------
# Finding


def step_of(path: Path) -> int | None:
    m = _STEP.match(Path(path).name)
    return int(m.group(1)) if m else None


def read_marker(ckpt: Path) -> dict | None:
    try:
        body = json.loads((Path(ckpt) / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and isinstance(body.get("files"), dict) else None


def is_complete(ckpt: Path) -> bool:
    """Published by commit(): it has a valid marker. Only a save that finished can have one, since the marker is
    written last and the directory renamed into place after it. Whether the files still match the marker is
    verify()'s question: a mismatch means damage or tampering, which is refused loudly, never skipped silently."""
    return read_marker(ckpt) is not None


def list_complete(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(step_of(p), p) for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return [p for _, p in sorted(found) if is_complete(p)]


def latest_complete(root: Path) -> Path | None:
    done = list_complete(root)
    return done[-1] if done else None


def incomplete(root: Path) -> list[Path]:
    """Directories that are not complete checkpoints: our own staging leftovers and unmarked checkpoint-* dirs."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        if p.name.startswith(_STAGING) or (step_of(p) is not None and not is_complete(p)):
            out.append(p)
    return out


def clean_partial(root: Path) -> list[Path]:
    """Delete what crashed saves left behind (only the single writer holding the run lock may call this).

    Our own staging directories are removed. An unmarked `checkpoint-N` cannot come from our protocol (another
    tool, or an older version, wrote it): it is never used, and moved aside rather than deleted, since it may
    be someone's data.
    """
    removed = []
    for p in incomplete(root):
        if p.name.startswith(".old-") and is_complete(p) and not (p.parent / p.name[5:]).exists():
            # A crash between the two renames of a re-save: this is still the only copy of that step.
            os.rename(p, p.parent / p.name[5:])
            log.warning("restored %s from %s (a re-save of that step was interrupted)", p.name[5:], p.name)
            continue
        if p.name.startswith(_STAGING):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        else:
            aside = p.parent / f"incomplete-{p.name}"
            if not aside.exists():
                os.rename(p, aside)
                log.warning("%s has no completion marker: never used as a checkpoint; moved to %s", p, aside)
                removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------
# Loading safely


def verify(ckpt: Path) -> dict:
    """Check a checkpoint before anything reads it: marker, sizes, sha256, adapter in safetensors, and every
    pickle-format file loadable with torch.load(weights_only=True). Returns the marker. Raises CheckpointError."""
    ckpt = Path(ckpt)
    body = read_marker(ckpt)
    if body is None:
        raise CheckpointError(f"{ckpt}: no valid completion marker ({COMPLETE_MARKER}); it is not a complete "
                              "checkpoint and will not be loaded")
    for rel, info in body["files"].items():
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: listed in the completion marker but missing; delete {ckpt} to resume from "
                                  "the checkpoint before it")
        if p.stat().st_size != info.get("bytes") or file_sha256(p) != info.get("sha256"):
            raise CheckpointError(f"{p}: does not match its completion marker (changed after it was saved); "
                                  f"delete {ckpt} to resume from the checkpoint before it")
    listed = set(body["files"]) | {COMPLETE_MARKER}
    extra = [p for p in ckpt.rglob("*") if p.is_file() and p.relative_to(ckpt).as_posix() not in listed]
    if extra:
        raise CheckpointError(f"{extra[0]}: not part of the checkpoint as saved (added later); remove it")
    if (ckpt / "adapter_model.bin").exists() or not (ckpt / "adapter_model.safetensors").is_file():
        raise CheckpointError(f"{ckpt}: the adapter must be adapter_model.safetensors (pickled .bin adapters are "
                              "never loaded)")
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.suffix in PICKLE_SUFFIXES:
            safe_torch_load(p)
    return body


def safe_torch_load(path: Path):
    """torch.load with weights_only=True: tensors, containers and numpy arrays only. A pickle that names any other
    global (os.system, builtins.exec, a class with __reduce__) is refused before any of its code runs."""
    import pickle

    import numpy as np
    import torch

    np_core = getattr(np, "_core", None) or np.core
    # The same allowlist transformers uses for rng_state.pth (numpy's RNG state is an ndarray).
    allow = [np_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allow):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise CheckpointError(f"{path}: refused to load: not plain tensor data ({first[:200]}); this file may have "
                              "been tampered with. Delete the checkpoint directory and resume from an earlier one"
                              ) from None


# ---------------------------------------------------------------------------------------------
# Helpers
