"""An instruction-tuning length mix, generated offline: most examples short, a long tail.

Real instruction sets (Alpaca, Dolly, OpenAssistant) have prompt and response lengths close to log-normal:
a median of a few dozen words and a tail of long answers. We draw word counts from log-normals with a fixed
seed and fill them with words from a small vocabulary, so any tokenizer gives a realistic length spread.

    python bench/lengthmix.py --rows 400 --out data.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

WORDS = ("the of and to in is that it for as with was on be by this are from or at an which have not but "
         "can all will one has more their there were what when your they about would how also other into some "
         "model data train answer question explain write list give example function value number result first "
         "people time year way day thing world life hand part place case week company system program work "
         "python code error file return string print output input step method table name city country river "
         "because however therefore although while since before after during without within between").split()


def lengths(rows: int, seed: int = 0, prompt_median: float = 18, response_median: float = 45,
            prompt_sigma: float = 0.7, response_sigma: float = 1.0, max_words: int = 1200) -> list[tuple[int, int]]:
    """(prompt words, response words) per row: log-normal, capped."""
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        p = int(rng.lognormvariate(math.log(prompt_median), prompt_sigma)) + 3
        r = int(rng.lognormvariate(math.log(response_median), response_sigma)) + 1
        out.append((min(p, max_words // 4), min(r, max_words)))
    return out


def text(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    # Sentences of 8-20 words, so punctuation and capitals appear as in real text.
    out, i = [], 0
    while i < len(words):
        k = rng.randint(8, 20)
        sent = words[i:i + k]
        out.append(sent[0].capitalize() + " " + " ".join(sent[1:]) + "." if len(sent) > 1 else sent[0].capitalize() + ".")
        i += k
    return " ".join(out)


def rows(n: int, seed: int = 0, **kw) -> list[dict]:
    rng = random.Random(seed + 1)
    return [{"instruction": text(rng, p), "input": "", "output": text(rng, r)} for p, r in lengths(n, seed, **kw)]


def write(path: Path, n: int, seed: int = 0, **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(n, seed, **kw)), encoding="utf-8")
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    write(a.out, a.rows, a.seed)
    ls = sorted(p + r for p, r in lengths(a.rows, a.seed))
    print(f"wrote {a.rows} rows to {a.out}; words per row: p50 {ls[len(ls) // 2]}, p90 {ls[int(len(ls) * .9)]}, "
          f"max {ls[-1]}")
