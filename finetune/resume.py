"""Deciding whether and from where `finetune train --resume` continues.

A resume must continue the run that wrote the checkpoint. The manifest of that run holds the sha256 of its
resolved recipe and of every data file; if either differs now, the resumed run would silently be a different
experiment, so it is refused (unless --force) with the list of what changed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from finetune import checkpoints as ck
from finetune import rundir
from finetune.errors import UserError

log = logging.getLogger("finetune")


AFTER_TRAINING = ("eval", "export")
"""Recipe sections that do not change what training computes."""


class ResumeError(UserError):
    """The run directory cannot be resumed as asked."""


@dataclass
class ResumePlan:
    checkpoint: Path | None
    """The latest complete checkpoint to continue from; None starts from step 0."""
    step: int = 0
    changes: list[str] = field(default_factory=list)
    """What differs from the run that wrote the checkpoint (only non-empty with --force)."""
    max_steps: int | None = None
    """The total steps of the run that wrote the checkpoint (from its marker)."""


def plan(run: Path, resolved_yaml: str, data_hashes: dict, resume: bool, force: bool) -> ResumePlan:
    """Refuse or accept the run directory as it is. Only the lock holder calls this (it cleans partial saves)."""
    root = Path(run) / "checkpoints"
    for p in ck.clean_partial(root):
        log.warning("removed %s: an interrupted save that never completed", p)
    latest = ck.latest_complete(root)
    if not resume:
        if latest is not None:
            raise ResumeError(f"{run}: has checkpoints from an earlier run (latest: {latest.name}); add --resume to "
                              "continue it, or choose another output_dir")
        return ResumePlan(None)
    if latest is None:
        log.warning("--resume: no complete checkpoint in %s; starting from step 0", root)
        return ResumePlan(None)
    changes = what_changed(run, resolved_yaml, data_hashes)
    if changes and not force:
        raise ResumeError(f"{run}: refusing to resume from {latest.name}: the recipe or data changed since it was "
                          f"written: {'; '.join(changes)}. Undo the change, choose another output_dir, or add "
                          "--force to resume anyway")
    marker = ck.verify(latest)
    return ResumePlan(latest, ck.step_of(latest) or 0, changes, marker.get("max_steps"))


def written_by(checkpoint: Path) -> int | None:
    """How many processes trained up to `checkpoint`: from its marker, else from its per-rank RNG files."""
    world = (ck.read_marker(checkpoint) or {}).get("world_size")
    if world:
        return int(world)
    ranks = list(Path(checkpoint).glob("rng_state_*.pth"))
    return len(ranks) if ranks else 1 if (Path(checkpoint) / "rng_state.pth").is_file() else None


def check_world_size(checkpoint: Path | None, world: int) -> None:
    """Refuse to continue a checkpoint with another number of processes: the ranks' data shards, the steps'
    global batch and the per-rank RNG states would all differ from the run that wrote it."""
    if checkpoint is None:
        return
    was = written_by(checkpoint)
    if was is not None and was != world:
        raise ResumeError(
            f"{checkpoint.parent.parent}: refusing to resume {checkpoint.name} with {world} process"
            f"{'es' if world != 1 else ''}: it was written by {was}, and each step's batch, every rank's data "
            f"shard and RNG state depend on that; resume with {was} process{'es' if was != 1 else ''} "
            f"(accelerate launch --num_processes {was} ...), or start a new run from its adapter "
            f"(model.adapter: {checkpoint})")


def what_changed(run: Path, resolved_yaml: str, data_hashes: dict) -> list[str]:
    """Human-readable differences between the run in `run` and the recipe/data we are about to use."""
    m = rundir.read_manifest(run)
    out = []
    if m.get("resolved_sha256") and m["resolved_sha256"] != rundir.sha256_text(resolved_yaml):
        old_path = Path(run) / "resolved.yaml"
        try:
            old_text = old_path.read_text(encoding="utf-8") if old_path.is_file() else ""
            old = yaml.safe_load(old_text) if rundir.sha256_text(old_text) == m["resolved_sha256"] else None
        except (OSError, yaml.YAMLError):
            old = None
        if isinstance(old, dict):
            # output_dir is where the run lives, not what it computes: a run directory may be moved and resumed;
            # eval/export act after training and may change freely (as `finetune run` allows).
            out += [f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in _diff(old, yaml.safe_load(resolved_yaml))
                    if k != "output_dir" and k.split(".")[0].split("[")[0] not in AFTER_TRAINING]
        else:
            out.append(f"the resolved recipe changed (sha256 {m['resolved_sha256'][:12]} -> "
                       f"{rundir.sha256_text(resolved_yaml)[:12]})")
    old_data = m.get("data_sha256")
    if isinstance(old_data, dict):
        for name in sorted(set(old_data) | set(data_hashes)):
            a, b = old_data.get(name), data_hashes.get(name)
            if a == b:
                continue
            what = "added" if a is None else "removed" if b is None else "content changed"
            out.append(f"data file {name}: {what}")
    return out


def trim_log(path: Path, step: int) -> None:
    """Drop train_log.jsonl rows written after the checkpoint we resume from: that work is redone, and the log
    must describe the run that produced the final adapter. A line cut by a kill is dropped too."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line)
    rundir.write_text(path, "".join(k + "\n" for k in kept))


def _diff(a, b, prefix: str = ""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            yield from _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _diff(x, y, f"{prefix}[{i}]")
    elif a != b:
        yield prefix, a, b


def _short(v) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."
