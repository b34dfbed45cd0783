"""One training step of the default SmolLM2 run, in variants side by side: torch's LoRA dropout, finetune's lane
dropout (finetune/dropout.py, what CPU training uses), and torch.compile on each decoder layer ("regional").

The step: NF4 + LoRA r 16 on all linear layers, LoRA dropout 0.05 (the recipe default), one packed row of
60-250-token examples with per-example attention, forward + backward (the model's own full-logits loss here; the
same in every variant, so it only dilutes the ratios). One process; every variant's model is built alike (same
seed, same LoRA init); a compiled variant's first step (the compilation) is timed apart; then the variants
alternate over the repeats, in process CPU time, with a sample of the torch.mm peak (bench/mfu.py PeakSampler)
after every step, so each step's MFU is against the matmul speed of the same moment.

    python bench/step_variants.py                                # torch_dropout vs lane_dropout, 5 repeats
    python bench/step_variants.py --variants torch_dropout,compiled --repeats 3
"""

from __future__ import annotations

import argparse

import _common
import mfu
import packed_attention

VARIANTS = ("torch_dropout", "lane_dropout", "compiled")


def build(model_spec: str, threads: int, dropout: float, variant: str):
    import torch

    from finetune import attention
    from finetune.dropout import use_lane_dropout

    torch.manual_seed(0)  # the same LoRA init for every variant
    model = packed_attention.build(model_spec, threads, dropout)
    model.set_attn_implementation(attention.register())
    model.train()
    if variant == "lane_dropout":
        use_lane_dropout(model)
    elif variant == "compiled":
        for layer in model.get_base_model().model.layers:
            layer.compile()  # in place: one compiled code for all layers, parameters stay the model's own
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--variants", default="torch_dropout,lane_dropout")
    ap.add_argument("--row", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")

    import torch

    from finetune.plan import resolve_shape

    models = {v: build(args.model, args.threads, args.dropout, v) for v in variants}
    ids, pos, lengths = packed_attention.packed_row(args.row, next(iter(models.values())).config.vocab_size, 0)
    shape, _ = resolve_shape(args.model)
    sampler = mfu.PeakSampler(shape, threads=args.threads)
    fpt = mfu.flops_per_token(shape, 16, mfu.causal_keys(lengths) / sum(lengths))
    tokens = int(ids.shape[1])

    first = {}
    for v, m in models.items():  # warm-up; for a compiled variant this is the compilation
        torch.manual_seed(1)
        first[v] = round(packed_attention.step(m, ids, pos)[0], 1)
    seconds = {v: [] for v in variants}
    mfus = {v: [] for v in variants}
    losses = {}
    for rep in range(args.repeats):
        order = variants[rep % len(variants):] + variants[:rep % len(variants)]  # rotate: nobody always first
        for v in order:
            torch.manual_seed(100 + rep)
            s, losses[v] = packed_attention.step(models[v], ids, pos)
            peak = sampler.sample(seconds_per_shape=0.05)
            seconds[v].append(s)
            mfus[v].append(tokens * fpt / s / peak)
    med = {v: _common.median(x) for v, x in seconds.items()}
    base = variants[0]
    rows = [{"variant": v, "CPU-s per step (median)": round(med[v], 3),
             "per repeat": ", ".join(f"{x:.2f}" for x in seconds[v]),
             f"x {base} (median of per-repeat ratios)": round(_common.median(
                 [seconds[base][i] / seconds[v][i] for i in range(args.repeats)]), 3),
             "MFU paired (median)": round(_common.median(mfus[v]), 3), "first step CPU-s": first[v],
             "loss (last repeat)": round(losses[v], 6)} for v in variants]
    print(f"{tokens}-token row, {len(lengths)} examples, LoRA dropout {args.dropout}, {args.threads} thread(s)")
    print(_common.table(rows, list(rows[0])))
    print(_common.save("step-variants", {"args": vars(args), "row_tokens": tokens, "examples": len(lengths),
                                         "model_flops_per_token": round(fpt), "rows": rows,
                                         "seconds": seconds, "mfu_paired": mfus}, args.out))


if __name__ == "__main__":
    main()
