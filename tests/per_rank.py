"""`finetune plan RECIPE --accelerate-config recipes/accelerate/CONFIG --json` and its per-rank weight figures against
what the ranks of a 2-process CPU run held (issue 17), as tests/test_plan.py checks the single-process plan against
the bytes a loaded model allocates. Used by tests/test_distributed.py (DDP), tests/test_ranks_slow.py (FSDP2, ZeRO-3
on CPU ranks) and tests/test_ranks.py (ZeRO-3 computed, for machines without deepspeed)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from finetune.cli import app

CONFIGS = Path(__file__).resolve().parent.parent / "recipes" / "accelerate"


def plan_with_config(recipe: Path, config: str) -> dict:
    """The plan of `recipe` under a shipped accelerate config, as `finetune plan --json` prints it."""
    result = CliRunner().invoke(app, ["plan", str(recipe), "--accelerate-config", str(CONFIGS / config), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_per_rank(plan: dict, total: int, four_bit: int, quant_state: int | None, tolerance: int = 0) -> None:
    """The plan's per-rank figures equal what one rank held (finetune.distributed.held_parameter_bytes: all
    parameter bytes, the packed 4-bit part; plus the quantisation constants, no parameters, when measured) within
    `tolerance` bytes, and the table's weight lines are made of them (on the device, or 0 there when offloaded)."""
    held = plan["held_per_rank"]
    got = (held["parameter_bytes"], held["four_bit_bytes"], held["quant_state_bytes"])
    measured = (total, four_bit, got[2] if quant_state is None else quant_state)
    assert all(abs(g - m) <= tolerance for g, m in zip(got, measured)), \
        f"planned (parameters, 4-bit, constants) per rank {got}, measured {measured}"
    parts = {p["key"]: p["bytes"] for p in plan["parts"]}
    on_device = 0 if held["offloaded"] else 1
    assert parts["base"] == on_device * (held["four_bit_bytes"] + held["quant_state_bytes"])
    assert parts["kept"] + parts["lora"] == on_device * (held["parameter_bytes"] - held["four_bit_bytes"])
