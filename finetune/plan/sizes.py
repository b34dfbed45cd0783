"""Byte units, reading a size the user typed and writing one back, and the planner's error."""

from __future__ import annotations

import re

from finetune.errors import UserError

GIB = 1024 ** 3
MIB = 1024 ** 2


class PlanError(UserError):
    """The plan cannot be made (unknown model shape, bad size string); the message says how to fix it."""


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*$", re.I)


def parse_size(text: str) -> int:
    """'24GiB', '24GB', '80G', '40960MiB' -> bytes. A bare number is GiB.

    GB is read as GiB, as GPU makers use it: a "24GB" RTX 4090 has 24564 MiB, an "80GB" A100 has 80 GiB."""
    m = _SIZE.match(text)
    if not m:
        raise PlanError(f"--gpu-memory: cannot read {text!r}; write e.g. 24GiB, 80GB or 48")
    value, unit = float(m.group(1)), (m.group(2) or "GiB").upper()
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    if unit == "B":
        return int(value)
    return int(value * 1024 ** powers[unit[0]])


def fmt(n: int) -> str:
    """Bytes as GiB (from a quarter GiB up) or MiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB // 4 else f"{n / MIB:.1f} MiB"
