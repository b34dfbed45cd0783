"""What training will see, for a person: `finetune data RECIPE` and the summary `finetune train` prints.

Supervised spans are highlighted in colour on a terminal and wrapped in [[...]] when piped, so the mask
can be checked by eye (and by grep) before any GPU time is spent.
"""

from __future__ import annotations

import sys


def _highlight(segments: list[list], color: bool) -> str:
    out = []
    for text, supervised in segments:
        if not supervised:
            out.append(text)
        elif color:
            out.append(f"\x1b[1;32m{text}\x1b[0m")
        else:
            out.append(f"[[{text}]]")
    return "".join(out)


def _fill(report: dict) -> str:
    ours = (report.get("steps") or {}).get("fill")
    trl = report.get("trl_packing_efficiency")
    return ((f", {100 * ours:.0f}% of max_length on average" if ours else "")
            + (f"; TRL's packing=True fills its blocks {100 * trl:.0f}%" if trl is not None else ""))


def steps_line(steps: dict) -> str:
    """What an optimizer step holds, packed and unpacked (data.packing.StepShape.to_dict)."""
    how = (f"packed into {steps['rows']} blocks of {steps['block_length']} tokens, "
           f"{steps['per_device']} x {steps['accum']} blocks a step" if steps["packed"]
           else f"{steps['per_device']} x {steps['accum']} examples a step")
    return (f"{steps['examples']} training examples, {how}: {steps['examples_per_step']} examples per step, "
            f"{steps['steps_per_epoch']} steps per epoch (unpacked: {steps['unpacked_steps_per_epoch']})")


def format_report(report: dict, color: bool | None = None, examples: int = 2) -> str:
    color = sys.stdout.isatty() if color is None else color
    rows = report.get("rows", {})
    pct = report.get("length_percentiles", {})
    skipped = report.get("skipped_rows", {"count": 0, "first": []})
    dropped = report.get("dropped", {"count": 0, "first": []})
    lines = [f"data: {rows.get('train')} train rows, {rows.get('held_out')} held out"
             + (" (from cache)" if report.get("cache", {}).get("hit") else "")]
    for split, by_source in report.get("rows_per_split_and_source", {}).items():
        for source, n in by_source.items():
            lines.append(f"  {split:<8} {n:>7}  {source}")
    lines += [
        f"tokens: {report.get('tokens')} in train, {100 * report.get('supervised_fraction', 0):.1f}% supervised",
        "length percentiles: " + ", ".join(f"{k} {v}" for k, v in pct.items()),
        *[f"  {part} tokens: " + ", ".join(f"{k} {v}" for k, v in p.items())
          for part, p in report.get("length_percentiles_by_part", {}).items()],
        *([f"length rule: {report['length_rule']}; truncated {report['truncation']}"] if "length_rule" in report else []),
        f"truncated: {report.get('truncated', 0)}; dropped: {dropped['count']}; skipped bad rows: {skipped['count']}",
        f"non-pad tokens per batch: 100% packed (padding-free blocks{_fill(report)}), "
        f"{100 * report.get('padded_efficiency', 0):.1f}% padded (no packing)",
        f"duplicates: {report.get('duplicates', {})}",
    ]
    if "steps" in report:
        lines.append("steps: " + steps_line(report["steps"]))
    for what, block in (("dropped", dropped), ("skipped", skipped)):
        for loc in block.get("first", [])[:3]:
            lines.append(f"  {what}: {loc}")
    for ex in report.get("examples", [])[:examples]:
        lines.append(f"--- example {ex['loc']} (supervised spans {'in green' if color else 'in [[...]]'})")
        lines.append(_highlight(ex["segments"], color))
    return "\n".join(lines)
