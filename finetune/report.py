"""report.md and loss.png, rebuilt from the files in the run directory.

Every stage calls `write_report(run)` when it finishes; the report reads only files (never another stage's
objects), so it is always the truth about what is on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.data_view import steps_line


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def plot_loss(run: Path) -> Path | None:
    """loss.png: training loss per step, and held-out loss where it was computed."""
    logs = read_jsonl(run / "train_log.jsonl")
    train = [(r["step"], r["loss"]) for r in logs if "loss" in r and "step" in r]
    held = [(r["step"], r["eval_loss"]) for r in logs if "eval_loss" in r and "step" in r]
    if not train and not held:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.5)
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss", lw=1.5)
    margin = [(r["step"], r["rewards/margins"]) for r in logs if "rewards/margins" in r and "step" in r]
    if margin:  # preference runs: the reward margin (chosen minus rejected) on the same axes
        ax.plot(*zip(*margin), "--", label="reward margin (chosen - rejected)", lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss" + (" / margin" if margin else ""))
    ax.set_title(run.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out


PREFERENCE_METRICS = (("rewards/margins", "reward margin"), ("rewards/accuracies", "reward accuracy (chosen preferred)"),
                      ("logps/chosen", "chosen log-prob"), ("logps/rejected", "rejected log-prob"))
"""What TRL's preference trainers log per step (DPO, KTO, ORPO, SimPO), first -> last in report.md."""


def _preference_lines(train_rows: list[dict], held: list[dict]) -> list[str]:
    lines = []
    for key, label in PREFERENCE_METRICS:
        rows = [r for r in train_rows if key in r]
        held_rows = [r for r in held if f"eval_{key}" in r]
        if rows:
            lines.append(f"- {label}: {_fmt(rows[0][key])} → {_fmt(rows[-1][key])}"
                         + (f"; held-out {_fmt(held_rows[-1][f'eval_{key}'])}" if held_rows else ""))
    return lines


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _held_out_loss(held: list[dict]) -> str:
    """"; held-out loss first → last" over the evaluations made, or the one value (and its step) if one."""
    if not held:
        return ""
    if len(held) == 1:
        return f"; held-out loss {_fmt(held[0]['eval_loss'])} (step {held[0].get('step')})"
    return f"; held-out loss {_fmt(held[0]['eval_loss'])} → {_fmt(held[-1]['eval_loss'])}"


def write_report(run: Path) -> Path:
    run = Path(run)
    manifest = _load(run / "manifest.json")
    data = _load(run / "data_report.json")
    logs = read_jsonl(run / "train_log.jsonl")
    plot_loss(run)
    lines = [f"# Run report: {run.name}", ""]
    if manifest:
        lines += ["## Run", "",
                  f"- base model: `{manifest.get('base', {}).get('spec')}`",
                  f"- device: {manifest.get('device')}; compute dtype: {manifest.get('precision', {}).get('compute_dtype')}; "
                  f"optimizer: {manifest.get('precision', {}).get('optimizer')}",
                  *([f"- gradient checkpointing {manifest['precision']['gradient_checkpointing_why']}"]
                    if "gradient_checkpointing_why" in manifest.get("precision", {}) else []),
                  f"- template: `{manifest.get('template')}`",
                  f"- finetune {manifest.get('versions', {}).get('finetune')}, transformers {manifest.get('versions', {}).get('transformers')}, "
                  f"peft {manifest.get('versions', {}).get('peft')}, trl {manifest.get('versions', {}).get('trl')}", ""]
    if data:
        lines += ["## Data", "",
                  f"- rows: {data.get('rows', {}).get('train')} train, {data.get('rows', {}).get('held_out')} held out",
                  f"- tokens: {data.get('tokens')} ({_fmt(100 * data.get('supervised_fraction', 0))}% supervised)",
                  f"- truncated: {data.get('truncated', 0)}; dropped: {data.get('dropped', {}).get('count', 0)}; "
                  f"skipped bad rows: {data.get('skipped_rows', {}).get('count', 0)}",
                  f"- duplicates: {data.get('duplicates', {})}",
                  f"- length percentiles: {data.get('length_percentiles')}",
                  *([f"- packed blocks filled {_fmt(data['steps'].get('fill') or 0)} of max_length on average; TRL's "
                     f"packing=True would fill {_fmt(data.get('trl_packing_efficiency', 0))}"]
                    if (data.get("steps") or {}).get("packed") else []),
                  *([f"- steps: {steps_line(data['steps'])}"] if "steps" in data else []), ""]
    train_rows = [r for r in logs if "loss" in r]
    if train_rows:
        first, last = train_rows[0], train_rows[-1]
        summary = next((r for r in reversed(logs) if "train_runtime" in r), {})
        held = [r for r in logs if "eval_loss" in r]
        lines += ["## Training", "",
                  f"- steps: {last.get('step')}; loss {_fmt(first['loss'])} → {_fmt(last['loss'])}"
                  + _held_out_loss(held),
                  *_preference_lines(train_rows, held),
                  f"- runtime: {_fmt(summary.get('train_runtime', 0))} s", "", "![loss](loss.png)", ""]
    events = manifest.get("events", [])
    warnings = manifest.get("warnings", [])
    if events or warnings:
        lines += ["## Events and fallbacks", ""]
        lines += [f"- warning: {w}" for w in warnings]
        lines += [f"- {e.get('time')}: {e.get('kind')}: "
                  + ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("time", "kind")) for e in events]
        lines.append("")
    for section in REPORT_SECTIONS:
        lines += section(run)
    out = run / "report.md"
    out.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return out


def _fidelity_section(run: Path) -> list[str]:
    fid = _load(run / "merged" / "fidelity.json")
    if not fid:
        return []
    return ["## Merge fidelity", "", f"- {fid.get('summary', json.dumps(fid))}", ""]


def _verify_section(run: Path) -> list[str]:
    ver = _load(run / "export" / "verify.json")
    if not ver:
        return []
    lines = ["## Export verification (llama.cpp)", "", f"- {ver.get('summary', json.dumps(ver))}", ""]
    table = (ver.get("ladder") or {}).get("table")
    if table:  # the fidelity ladder: what each GGUF type costs the fine-tune (finetune.export.fidelity)
        lines += ["### Fidelity ladder", "", table.strip(), ""]
    return lines


def _eval_section(run: Path) -> list[str]:
    md = run / "eval" / "table.md"
    if not md.is_file():
        return []
    return ["## Evaluation (base vs fine-tuned)", "", md.read_text(encoding="utf-8").strip(), "",
            "Details: [eval/report.md](eval/report.md)", ""]


# Later stages add their section by writing a file this list knows how to read.
REPORT_SECTIONS = [_fidelity_section, _verify_section, _eval_section]
