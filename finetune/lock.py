"""One writer per run directory: `OUTPUT_DIR/.finetune.lock`.

The lock is an flock on that file, so the kernel drops it when its holder dies, even from kill -9 or a lost
machine. The file itself only carries who holds it (pid, host, command) for the error message. A file that
exists but is not locked was left by a process that died: it is taken over and reported as a stale lock.
Standard library only, so a holder is cheap to start (the tests use that).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from finetune.errors import UserError

LOCK_NAME = ".finetune.lock"


class LockedError(UserError):
    """Another live process is writing this run directory."""


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, run: Path):
        self.path = Path(run) / LOCK_NAME
        self.fd: int | None = None
        self.stale: dict | None = None
        """What a dead holder had written, when we took over its lock (None otherwise)."""

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('started', '?')}"
                raise LockedError(
                    f"{self.path.parent}: another finetune process ({who}: {holder.get('command', '?')}) is writing "
                    f"this output_dir; wait for it to finish, stop it, or choose another output_dir") from None
            # The previous holder may have unlinked the file between our open and our flock: then we hold a lock
            # on a file nobody else will ever open. Start again on the file now at the path.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read(fd)
            if previous:
                previous["alive"] = _alive(previous.get("pid")) if previous.get("host") == socket.gethostname() else None
                self.stale = previous
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # unlink while still holding the flock, so nobody takes a lock on a dying file
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        body = json.loads(raw) if raw else {}
        return body if isinstance(body, dict) else {"raw": raw[:200]}
    except (OSError, ValueError):
        return {}
