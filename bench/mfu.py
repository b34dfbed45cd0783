"""Model FLOPs of a QLoRA step, the matmul peak this machine reaches at the model's own shapes, and a profile table.

Model FLOPs per token (forward + backward of a LoRA step over a frozen 4-bit base; gradient-checkpointing
recomputation and the loss's skipped prompt positions are not counted: the same figure for every arm):

    N_base = layers x sum over the 7 projections of in x out     (frozen, dequantised to the compute dtype)
    N_head = vocab x hidden                                      (frozen lm_head)
    N_lora = layers x sum over adapted projections of r x (in + out)
    forward   2 (N_base + N_head + N_lora) + 4 layers x hidden x ctx       (QK^T and AV over ctx keys)
    backward  2 (N_base + N_head)   (input gradients only: the base is frozen)
              + 4 N_lora            (input and weight gradients)
              + 8 layers x hidden x ctx                                     (twice the attention forward)
    total     4 (N_base + N_head) + 6 N_lora + 12 layers x hidden x ctx

ctx is the mean number of keys a token attends to in its own example (causal: (n + 1) / 2 over an example of n
tokens), counted from the batches themselves (attention_mask rows, or position_ids restarting at 0 when packed).
Padding and the cross-example attention of a packed row are work the hardware does, not model FLOPs.

Peak: `torch.mm` at the model's shapes ([tokens, in] @ [in, out] for every projection and the lm_head, weighted by
their FLOPs), in the compute dtype and the bench's thread count, measured in process CPU time like the
throughput itself, so MFU = achieved model FLOP per CPU-second / peak FLOP per CPU-second.
"""

from __future__ import annotations

import time
from collections import defaultdict


def flops_per_token(shape, lora_r: int, ctx: float) -> float:
    n_base = shape.layers * sum(a * b for _, a, b in shape.linears())
    n_head = shape.vocab * shape.hidden
    n_lora = shape.layers * sum(lora_r * (a + b) for _, a, b in shape.linears())
    attn = shape.heads * shape.hd
    return 4 * (n_base + n_head) + 6 * n_lora + 12 * shape.layers * attn * ctx


def causal_keys(lengths) -> int:
    """Sum over tokens of the keys each attends to, for examples of these lengths (causal, within an example)."""
    return sum(n * (n + 1) // 2 for n in lengths)


def example_lengths(inputs) -> list[int]:
    """The lengths of the examples in one batch: attention_mask rows (padded) or position_ids runs (packed)."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        return [int(x) for x in mask.sum(1)]
    pos = inputs["position_ids"].flatten().tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [b - a for a, b in zip(starts, starts[1:]) if b > a]


class PeakSampler:
    """torch.mm at the model's shapes, measured again and again with the same tensors: one sample is FLOP per
    CPU-second FLOP-weighted over the shapes (each projection counted once per layer, the lm_head once).

    On a shared machine the same torch.mm runs at 65-93 GFLOP per CPU-second from one second to the next (one
    thread, this machine, 2026-12-03), so a peak measured once, before or after a run, can be 30% off the speed
    matmul had while the run's steps ran. Sampling it between the steps and dividing by the samples' median makes
    MFU a ratio of two speeds measured side by side."""

    def __init__(self, shape, tokens: int = 1024, threads: int = 1, dtype: str = "float32"):
        import torch

        torch.set_num_threads(threads)
        dt = getattr(torch, dtype)
        self.cases = []
        for a, b in [(a, b) for _, a, b in shape.linears()] + [(shape.hidden, shape.vocab)]:
            x, w = torch.randn(tokens, a, dtype=dt), torch.randn(a, b, dtype=dt)
            out = torch.empty(tokens, b, dtype=dt)
            torch.mm(x, w, out=out)  # warm
            self.cases.append((x, w, out, 1 if b == shape.vocab else shape.layers))  # projections: once per layer

    def sample(self, seconds_per_shape: float = 0.3) -> float:
        import torch

        flops = seconds = 0.0
        for x, w, out, count in self.cases:
            t, n = time.process_time(), 0
            while n == 0 or time.process_time() - t < seconds_per_shape:
                torch.mm(x, w, out=out)
                n += 1
            flops += 2 * x.shape[0] * x.shape[1] * w.shape[1] * count
            seconds += (time.process_time() - t) / n * count
        return flops / seconds


def matmul_peak(shape, tokens: int = 1024, threads: int = 1, dtype: str = "float32", repeats: int = 3) -> dict:
    """FLOP per CPU-second of torch.mm at the model's shapes (best of `repeats`), FLOP-weighted over the shapes."""
    sampler = PeakSampler(shape, tokens, threads, dtype)
    best = max(sampler.sample() for _ in range(repeats))
    return {"peak_flops_per_cpu_s": best, "tokens": tokens, "threads": threads, "dtype": dtype}


BUCKETS = ("matmul", "dequantise", "attention", "elementwise / other", "optimizer")
_MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::baddbmm", "aten::linear", "aten::addmv")


def _bucket(evt) -> str:
    names = []
    e = evt
    while e is not None:
        names.append(e.name)
        e = e.cpu_parent
    joined = " ".join(names).lower()
    if "optimizer.step" in joined or "optimizer.zero_grad" in joined:
        return "optimizer"
    if "scaled_dot_product" in joined or "flash_attention" in joined:
        return "attention"
    if evt.name in _MATMUL:  # also the mm inside bitsandbytes' gemm_4bit: the dequantised weight's matmul
        return "matmul"
    if "dequantize" in joined or "bitsandbytes" in joined:
        return "dequantise"
    return "elementwise / other"


def profile_table(prof) -> list[dict]:
    """Self CPU time of every operator, in the buckets above: anything under the optimizer's step or the attention
    kernel counts there; every other mm/addmm/bmm is a matmul (including the one bitsandbytes' gemm_4bit runs on
    the dequantised weight); the rest of a bitsandbytes op (dequantising, copies) is dequantise."""
    totals = defaultdict(float)
    ops = defaultdict(lambda: defaultdict(float))
    for evt in prof.events():
        if evt.self_cpu_time_total > 0:
            b = _bucket(evt)
            totals[b] += evt.self_cpu_time_total
            ops[b][evt.name] += evt.self_cpu_time_total
    all_us = sum(totals.values()) or 1.0
    top = {b: ", ".join(f"{n} {t / 1e6:.1f}" for n, t in sorted(ops[b].items(), key=lambda x: -x[1])[:4])
           for b in BUCKETS}
    return [{"bucket": b, "self CPU s": round(totals[b] / 1e6, 2), "share": round(totals[b] / all_us, 3),
             "largest operators (s)": top[b]} for b in BUCKETS]
