"""SIGTERM/SIGINT handling for training: the first signal asks for a clean stop, the second aborts at once.

Standard library only. The trainer side (finishing the step, writing the checkpoint) is in guard.py; this
module only records the request, which the trainer reads at the next step end.
"""

from __future__ import annotations

import os
import signal
import threading


class StopOnSignal:
    """First SIGTERM/SIGINT: finish the current optimizer step, checkpoint, stop. Second: abort at once.

    `trainer` needs two attributes: `stop_signal` (set here, read at each step end) and `resume_command`.

    Aborting at once is safe because a save is atomic: the worst case is a staging directory, which is ignored and
    cleaned up by the next run. `on_abort` releases the run lock on the way out.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, trainer, on_abort=None):
        self.trainer = trainer
        self.on_abort = on_abort
        self._previous: dict = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.trainer.stop_signal is None:
            self.trainer.stop_signal = signum
            _say(f"\nfinetune: {name}: finishing the current step and writing a checkpoint "
                 "(send it again to abort at once)\n")
            return
        _say(f"\nfinetune: second {name}: aborting now; the last complete checkpoint is kept. Resume with:\n  "
             f"{self.trainer.resume_command}\n")
        if self.on_abort is not None:
            try:
                self.on_abort()
            except Exception:  # noqa: BLE001 - we are exiting regardless
                pass
        os._exit(128 + signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()


def _say(text: str) -> None:
    """Write straight to fd 2: the signal may arrive while the main thread is inside a print to sys.stderr, and
    a buffered write from the handler would then fail as a reentrant call."""
    try:
        os.write(2, text.encode("utf-8", "replace"))
    except OSError:
        pass
