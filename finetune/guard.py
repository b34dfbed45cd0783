"""What keeps a long run safe: atomic checkpoints, a clean stop on SIGTERM/SIGINT, and the NaN guard.

`GuardedSFTTrainer` is TRL's SFTTrainer with one method replaced: `_save_checkpoint` writes the same files
(adapter, optimizer, scheduler, scaler, RNG states, trainer state) into a staging directory and publishes it with
checkpoints.commit (fsync + marker + rename). Everything else, including how the Trainer restores the data
position on resume, is the Trainer's own code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from trl import SFTTrainer

from finetune import checkpoints as ck
from finetune.errors import NonFiniteError

log = logging.getLogger("finetune")


class GuardMixin:
    """Atomic checkpoints, a clean stop on a signal and the NaN guard, for any transformers Trainer subclass: put it
    first, `class Guarded(GuardMixin, SomeTrainer)` (SFT here; TRL's preference trainers in finetune/preference.py).
    Its _save_checkpoint replaces the trainer's whole (TRL's DPO/KTO add only a model card there)."""

    def __init__(self, *args, on_nan: str = "stop", resume_command: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.on_nan = on_nan
        self.resume_command = resume_command
        self.stop_signal: int | None = None
        """The signal that asked us to stop (set from the handler, read at the next step end)."""
        self.skipped_steps: list[int] = []
        self._bad_loss: float | None = None
        self.add_callback(_GuardCallback(self))

    # --- NaN guard, part 1: remember a non-finite micro-batch loss (checked before the optimizer step)
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._bad_loss is None and not torch.isfinite(loss).all():
            self._bad_loss = float(loss.detach().float().sum())
        return loss

    # --- atomic checkpoints
    def _save_checkpoint(self, model, trial):
        step = self.state.global_step
        final = Path(self.args.output_dir) / f"{ck.PREFIX}{step}"
        main = self.args.should_save
        tmp = ck.staging_dir(final)
        try:
            if main:
                ck.begin(final)
            self.accelerator.wait_for_everyone()
            self.store_flos()
            self.save_model(str(tmp), _internal_call=True)
            if not self.args.save_only_model:
                self._save_optimizer_and_scheduler(str(tmp))
                self._save_scaler(str(tmp))
                _save_rng_states(self, tmp)
            if main:
                for cb in [c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)]:
                    self.state.stateful_callbacks[cb.__class__.__name__] = cb.state()
                self.state.save_to_json(str(tmp / TRAINER_STATE_NAME))
                # training_args.bin is a full pickle of the config: nothing here loads it, and a checkpoint
                # should hold nothing that only an unsafe torch.load could read.
                (tmp / "training_args.bin").unlink(missing_ok=True)
            self.accelerator.wait_for_everyone()
            if main:
                ck.commit(tmp, final, meta={"global_step": step, "epoch": self.state.epoch,
                                            "max_steps": self.state.max_steps, "world_size": self.args.world_size})
                ck.rotate(final.parent, self.args.save_total_limit)
            self.accelerator.wait_for_everyone()
        except OSError as e:
            if main:
                ck.abort(tmp)
            previous = ck.latest_complete(final.parent)
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise ck.CheckpointError(
                f"could not write checkpoint {final.name}: {e.strerror or e} ({e.filename or final.parent}); "
                f"nothing was replaced: {kept}. Free disk space (or lower train.save_total_limit), then resume: "
                f"{self.resume_command}") from None
        except BaseException:
            if main:
                ck.abort(tmp)
            raise


def _save_rng_states(trainer, tmp: Path) -> None:
    """The Trainer's rng_state_<rank>.pth for every rank, written by the main process only.

    Each rank writes its own file with the Trainer's code into a private scratch directory; the bytes are gathered
    on rank 0, which puts them in the checkpoint. (The Trainer lets every rank write into the checkpoint itself: on
    several machines without shared storage, the other machines' states would land on their own disks and an exact
    resume would be impossible.)
    """
    import tempfile

    dist = torch.distributed
    if trainer.args.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        trainer._save_rng_state(str(tmp))
        return
    with tempfile.TemporaryDirectory(prefix="finetune-rng-") as scratch:
        trainer._save_rng_state(scratch)
        mine = {p.name: p.read_bytes() for p in Path(scratch).iterdir()}
    everyone: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, everyone, dst=0)
    if everyone is not None:
        for files in everyone:
            for name, data in files.items():
                (tmp / name).write_bytes(data)


class GuardedSFTTrainer(GuardMixin, SFTTrainer):
    """SFTTrainer whose checkpoints are atomic, which stops cleanly on a signal and guards against NaN."""


class _GuardCallback(TrainerCallback):
    def __init__(self, trainer: GuardMixin):
        self.t = trainer

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
        t = self.t
        what = None
        if t._bad_loss is not None:
            what = f"loss {t._bad_loss}"
        elif t.accelerator.scaler is None and optimizer is not None:
            # fp16's GradScaler skips inf steps on its own: only without it is a non-finite gradient ours to handle.
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
                what = "gradient norm " + str(float(torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))))
        t._bad_loss = None
        if _any_rank(what is not None, t):
            what = what or "value on another process"
            step = state.global_step + 1
            if t.on_nan == "skip_step":
                # No gradient, no update: AdamW leaves a parameter whose .grad is None untouched (moments too).
                optimizer.zero_grad(set_to_none=True)
                t.skipped_steps.append(step)
                log.warning("train: non-finite %s at step %d: step skipped (train.on_nan: skip_step; %d skipped so far)",
                            what, step, len(t.skipped_steps))
            else:
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteError(f"train: non-finite {what} at step {step}; stopped before applying it", step=step)

    def on_step_end(self, args, state, control, **kw):
        signum = int(_max_over_ranks(float(self.t.stop_signal or 0), self.t))
        if signum and state.global_step < state.max_steps:
            # A signal sent to one rank stops every rank at this step; each then reports it as its own.
            self.t.stop_signal = signum
            control.should_save = True
            control.should_training_stop = True


def _any_rank(flag: bool, trainer) -> bool:
    """All processes must agree on stopping or skipping, or DDP deadlocks at the next all-reduce."""
    return bool(_max_over_ranks(1.0 if flag else 0.0, trainer))


def _max_over_ranks(value: float, trainer) -> float:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([value], device=trainer.args.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())
