"""Generate the quickstart dataset: extract a person's name, age and city from a sentence as strict JSON.

SmolLM2-135M-Instruct is poor at this out of the box (it chats instead of answering in the exact format),
and a few minutes of QLoRA on a CPU fixes it, so the before/after difference is easy to see.
Deterministic: `python make_quickstart_data.py` rewrites quickstart.jsonl byte for byte.
"""

import json
import random
from pathlib import Path

NAMES = ["Ann", "Bob", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam",
         "Mona", "Nils", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wen", "Yusuf", "Zoe"]
CITIES = ["Oslo", "Paris", "Lima", "Cairo", "Tokyo", "Berlin", "Madrid", "Nairobi", "Toronto", "Sydney",
          "Dublin", "Lisbon", "Seoul", "Quito", "Vienna", "Prague", "Accra", "Hanoi", "Denver", "Porto"]
PATTERNS = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "Living in {city}, {name} just turned {age}.",
    "{name} ({age}) moved to {city} last year.",
    "At {age}, {name} calls {city} home.",
    "Our new colleague {name} is {age} and is based in {city}.",
    "{city} resident {name} celebrated a {age}th birthday today.",
    "Age {age}, city {city}, name {name}.",
]
INSTRUCTION = "Extract the person's name, age and city from the text. Answer with JSON only."


def rows(n: int, seed: int = 1234) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 89)
        text = rng.choice(PATTERNS).format(name=name, age=age, city=city)
        answer = json.dumps({"name": name, "age": age, "city": city})
        out.append({"instruction": INSTRUCTION, "input": text, "output": answer})
    return out


if __name__ == "__main__":
    here = Path(__file__).parent
    with open(here / "quickstart.jsonl", "w", encoding="utf-8") as f:
        for r in rows(240):
            f.write(json.dumps(r) + "\n")
