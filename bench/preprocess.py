"""Tokenisation throughput, and the speed-up of a second run served from the fingerprinted cache.

`finetune.data.prepare(recipe, tok, template)` reads the rows, checks them, renders the chat template, builds
assistant-only labels and splits off held-out rows; the result is cached under a fingerprint of the recipe's
data section, the data files, the tokenizer and the template. The first call tokenises (and stores); the second
finds the cache. Each repeat uses a fresh, empty cache directory.

    python bench/preprocess.py                      # 2000 rows of the length mix, SmolLM2's tokenizer, 3 repeats
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import _common
import lengthmix
import yaml


def main():
    ap = argparse.ArgumentParser(description="tokenisation examples/s and cached re-run speed-up")
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from finetune.data import prepare
    from finetune.models import load_tokenizer, resolve_base
    from finetune.recipe import load_recipe
    from finetune.templates import load_template

    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    data = lengthmix.write(work / "mix.jsonl", args.rows, seed=0)
    recipe_path = work / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "model": {"base": args.model}, "data": {"train": [{"path": str(data)}], "template": "chatml", "held_out": 20},
        "output_dir": str(work / "run")}))
    recipe = load_recipe(recipe_path)
    tok = load_tokenizer(recipe, resolve_base(recipe.model.base))  # resolve_base converts the GGUF once, before timing
    template = load_template(recipe.data.template, tok)

    runs = []
    for rep in range(args.repeats):
        os.environ["FINETUNE_CACHE"] = str(work / f"cache-{rep}")  # an empty cache: the first call must tokenise
        t0 = time.perf_counter()
        first = prepare(recipe, tok, template)
        t1 = time.perf_counter()
        second = prepare(recipe, tok, template)
        t2 = time.perf_counter()
        assert not first.report["cache"]["hit"] and second.report["cache"]["hit"], "the cache did not behave"
        assert [list(x) for x in first.train["input_ids"]] == [list(x) for x in second.train["input_ids"]]
        n = first.report["rows"]["train"] + first.report["rows"]["held_out"]
        runs.append({"repeat": rep, "rows": n, "first_s": round(t1 - t0, 3), "second_s": round(t2 - t1, 4),
                     "examples_per_s": round(n / (t1 - t0), 1), "speedup": round((t1 - t0) / (t2 - t1), 1),
                     "tokens": first.report["tokens"]})
        print(runs[-1], flush=True)
    summary = [{"rows": runs[0]["rows"], "tokens": runs[0]["tokens"],
                "first call s (median)": _common.median([r["first_s"] for r in runs]),
                "examples/s (median)": _common.median([r["examples_per_s"] for r in runs]),
                "cached call s (median)": _common.median([r["second_s"] for r in runs]),
                "speed-up (median)": _common.median([r["speedup"] for r in runs]), "repeats": len(runs)}]
    print(_common.table(summary, list(summary[0])))
    print(f"results: {_common.save('preprocess', {'args': vars(args), 'runs': runs, 'summary': summary}, args.out)}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
