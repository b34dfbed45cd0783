"""Writes dpo_quickstart.jsonl: preference pairs for recipes/smollm2/135m_dpo_quickstart.yaml.

Every prompt asks for the answer as ONE WORD IN CAPITAL LETTERS. The chosen reply obeys ("PARIS"); the rejected
reply gives the right answer but breaks the instruction with a sentence ("The capital of France is Paris."), which
is what SmolLM2-135M-Instruct does. Deterministic: `python recipes/smollm2/data/make_dpo_quickstart_data.py`.
"""

import json
import random
from pathlib import Path

INSTRUCTION = "Answer with one word in capital letters."
NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
          "seventeen eighteen".split()
CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
            "Egypt": "Cairo", "Russia": "Moscow", "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm",
            "Finland": "Helsinki", "Ireland": "Dublin", "Portugal": "Lisbon", "Austria": "Vienna", "Peru": "Lima",
            "Kenya": "Nairobi", "Cuba": "Havana", "Poland": "Warsaw", "Hungary": "Budapest", "Denmark": "Copenhagen",
            "China": "Beijing", "Thailand": "Bangkok", "Belgium": "Brussels", "Chile": "Santiago"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "day": "night", "fast": "slow", "happy": "sad",
             "light": "dark", "open": "closed", "early": "late", "wet": "dry", "full": "empty", "hard": "soft",
             "high": "low", "old": "new", "rich": "poor", "strong": "weak", "thick": "thin", "loud": "quiet"}
COLOURS = {"a ripe banana": "yellow", "grass": "green", "the clear daytime sky": "blue", "snow": "white",
           "coal": "black", "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow", "a crow": "black",
           "milk": "white", "a strawberry": "red", "a lime": "green"}


def pairs():
    for country, city in CAPITALS.items():
        yield f"What is the capital of {country}?", city, f"The capital of {country} is {city}."
    for a in range(1, 10):
        for b in range(1, 10):
            if a + b <= 18 and (a + b) % 2 == a % 2:  # about half the sums: enough rows, not too many
                yield (f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", NUMBERS[a + b],
                       f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} equals {NUMBERS[a + b]}.")
    for word, opposite in OPPOSITES.items():
        yield f"What is the opposite of {word}?", opposite, f"The opposite of {word} is {opposite}."
    for thing, colour in COLOURS.items():
        yield f"What colour is {thing}?", colour, f"{thing[0].upper() + thing[1:]} is usually {colour}."


def main():
    rows = [{"prompt": f"{INSTRUCTION} {q}", "chosen": answer.upper(), "rejected": sentence}
            for q, answer, sentence in pairs()]
    random.Random(0).shuffle(rows)
    out = Path(__file__).with_name("dpo_quickstart.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} pairs -> {out}")


if __name__ == "__main__":
    main()
