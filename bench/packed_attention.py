"""Packed-row attention: sdpa over the whole row with transformers' block-diagonal mask vs once per example
(finetune/attention.py), on the training step of the builtin SmolLM2 (NF4 + LoRA r 16, all linear layers).

One process, the two modes interleaved over the repeats (so machine load hits both alike), one forward + backward
of the same packed row each time, timed in process CPU time. Also checks that both give the same loss.

    python bench/packed_attention.py                    # a 1024-token row of 60-250-token examples, 5 repeats
    python bench/packed_attention.py --row 2048 --repeats 3
"""

from __future__ import annotations

import argparse
import random
import time

import _common


def build(model_spec: str, threads: int, dropout: float = 0.0):
    import torch

    from finetune.hardware import choose_precision, detect_hardware
    from finetune.models import attach_lora, load_base, resolve_base
    from finetune.recipe import Recipe

    torch.set_num_threads(threads)
    recipe = Recipe.model_validate({"model": {"base": model_spec}, "quantization": {"compute_dtype": "float32"},
                                    "lora": {"r": 16, "alpha": 32, "dropout": dropout},
                                    "data": {"train": [{"path": __file__}]}, "output_dir": "unused"})
    hw = detect_hardware("cpu")
    model = attach_lora(load_base(recipe, resolve_base(recipe.model.base), choose_precision(recipe, hw), hw),
                        recipe, False)
    model.config.use_cache = False
    return model


def packed_row(row: int, vocab: int, seed: int):
    import torch

    rng = random.Random(seed)
    lengths, total = [], 0
    while True:
        n = rng.randint(60, 250)
        if total + n > row:
            break
        lengths.append(n)
        total += n
    ids = torch.tensor([[rng.randrange(vocab) for _ in range(total)]])
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, pos, lengths


def step(model, ids, pos) -> tuple[float, float]:
    started = time.process_time()
    out = model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return time.process_time() - started, float(out.loss)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--row", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from finetune import attention

    model = build(args.model, args.threads)
    ids, pos, lengths = packed_row(args.row, model.config.vocab_size, 0)
    modes = {"row_mask": "sdpa", "per_example": attention.register()}
    seconds = {m: [] for m in modes}
    losses = {}
    for rep in range(args.repeats + 1):  # the first round warms up and is not counted
        for mode in (list(modes) if rep % 2 == 0 else list(modes)[::-1]):
            model.set_attn_implementation(modes[mode])
            s, losses[mode] = step(model, ids, pos)
            if rep:
                seconds[mode].append(s)
    med = {m: _common.median(v) for m, v in seconds.items()}
    result = {"row_tokens": int(ids.shape[1]), "examples": len(lengths), "lengths": lengths,
              "cpu_s_per_step": {m: round(v, 3) for m, v in med.items()},
              "per_repeat": {m: [round(x, 3) for x in v] for m, v in seconds.items()},
              "speedup_per_example_vs_row_mask": round(med["row_mask"] / med["per_example"], 3),
              "loss": losses, "loss_abs_diff": abs(losses["row_mask"] - losses["per_example"]),
              "machine": _common.machine()}
    print(f"{ids.shape[1]}-token row, {len(lengths)} examples: row mask {med['row_mask']:.2f} CPU-s, per example "
          f"{med['per_example']:.2f} CPU-s per forward+backward ({result['speedup_per_example_vs_row_mask']}x); "
          f"loss {losses['row_mask']:.6f} vs {losses['per_example']:.6f}")
    print(_common.save("packed-attention", result))


if __name__ == "__main__":
    main()
