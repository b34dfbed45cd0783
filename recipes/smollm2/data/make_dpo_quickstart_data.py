"""Writes dpo_quickstart.jsonl: preference pairs for recipes/smollm2/135m_dpo_quickstart.yaml.

Every prompt asks for the answer as ONE WORD IN CAPITAL LETTERS, about things a 135M model knows (capitals, opposites,
colours, plurals, animal sounds; no arithmetic, which it cannot do). The chosen reply obeys ("PARIS"); the rejected
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
PLURALS = {"mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men", "woman": "women",
           "goose": "geese", "person": "people", "box": "boxes", "city": "cities", "leaf": "leaves", "knife": "knives",
           "cat": "cats", "dog": "dogs", "bus": "buses", "baby": "babies"}
SOUNDS = {"a cow": "moo", "a dog": "woof", "a cat": "meow", "a sheep": "baa", "a duck": "quack", "a lion": "roar",
          "a snake": "hiss", "a pig": "oink", "an owl": "hoot", "a bee": "buzz"}
PROBES = [  # other kinds of question, for the format task (no reference: is the reply one capitalised word?)
    "What is the largest planet in the solar system?", "What do bees make?", "What is frozen water called?",
    "Which animal is known as the king of the jungle?", "What do you call a baby dog?", "What is the first month of "
    "the year?", "What do plants need from the sun?", "What is the day after Monday?", "What gas do people breathe "
    "in?", "What is the colour of a fire truck?", "What season comes after winter?", "What do cows drink?",
    "What colour are most clouds?", "What is a young cat called?", "What do you use to write on a "
    "blackboard?", "Which star is closest to Earth?"]


def pairs():
    for country, city in CAPITALS.items():
        yield f"What is the capital of {country}?", city, f"The capital of {country} is {city}."
    for word, opposite in OPPOSITES.items():
        yield f"What is the opposite of {word}?", opposite, f"The opposite of {word} is {opposite}."
    for thing, colour in COLOURS.items():
        yield f"What colour is {thing}?", colour, f"{thing[0].upper() + thing[1:]} is usually {colour}."
    for word, plural in PLURALS.items():
        yield f"What is the plural of {word}?", plural, f"The plural of {word} is {plural}."
    for animal, sound in SOUNDS.items():
        yield f"What sound does {animal} make?", sound, f"{animal[0].upper() + animal[1:]} says {sound}."


def main():
    rows = [{"prompt": f"{INSTRUCTION} {q}", "chosen": answer.upper(), "rejected": sentence}
            for q, answer, sentence in pairs()]
    random.Random(0).shuffle(rows)
    out = Path(__file__).with_name("dpo_quickstart.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} pairs -> {out}")
    probes = Path(__file__).with_name("dpo_format_probe.jsonl")
    probes.write_text("".join(json.dumps({"question": f"{INSTRUCTION} {q}"}) + "\n" for q in PROBES), encoding="utf-8")
    print(f"{len(PROBES)} format probes -> {probes}")


if __name__ == "__main__":
    main()
