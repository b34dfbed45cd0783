"""A Plan as the table `finetune plan` prints."""

from __future__ import annotations

from finetune.plan.estimator import Plan
from finetune.plan.sizes import fmt


def render(plan: Plan) -> str:
    s, sh = plan.setup, plan.shape
    lines = [f"model: {sh.name} ({sh.n_params() / 1e9:.2f}B parameters; shape from {plan.shape_source})",
             f"setup: seq {s.seq_len} x micro-batch {s.batch}, LoRA r={s.lora_r}, {s.optimizer}, compute {s.compute}, "
             f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}, "
             f"{s.num_processes} process(es), sharding {s.sharding}, per {'GPU' if s.device == 'cuda' else 'process'}"]
    width = max(len(p.label) for p in plan.parts)
    for p in plan.parts:
        lines.append(f"  {p.label.ljust(width)}  {fmt(p.bytes):>11}  {p.note}")
    peak = "peak allocated (cf. torch.cuda.max_memory_allocated)"
    lines.append(f"  {peak.ljust(width)}  {fmt(plan.peak_allocated):>11}")
    lines.append(f"  {'total needed'.ljust(width)}  {fmt(plan.total):>11}")
    lines.extend(plan.notes)
    if plan.gpu_memory is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"{verdict} in {fmt(plan.gpu_memory)} ({100 * plan.total / plan.gpu_memory:.0f}% used)")
        for a in plan.advice:
            lines.append(f"  - {a}")
    return "\n".join(lines)
