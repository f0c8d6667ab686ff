"""Generate pesc/recipes/data/tiny_instruct.jsonl (the demo data `pesc:tiny_instruct.jsonl`): ~300 short,
deterministic instruction rows in the `messages` format.

Tasks a tiny model can start to learn in a minute: arithmetic, capitals, letters, copying, reversing.
Run `python scripts/make_tiny_instruct.py` to rebuild the file (same output every time).
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Canada": "Ottawa", "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo",
    "Greece": "Athens", "Chile": "Santiago", "India": "New Delhi", "China": "Beijing", "Cuba": "Havana",
    "Poland": "Warsaw", "Ireland": "Dublin", "Austria": "Vienna", "Portugal": "Lisbon", "Sweden": "Stockholm",
}
WORDS = [
    "apple", "river", "stone", "cloud", "tiger", "green", "house", "light", "music", "paper",
    "table", "water", "bread", "chair", "dream", "earth", "flame", "grape", "heart", "lemon",
]
SYSTEM = "You are a helpful assistant. Answer briefly."


def arithmetic(rng):
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", f"{a} - {b} = {a - b}."


def capital(rng):
    country = rng.choice(sorted(CAPITALS))
    return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."


def first_letter(rng):
    word = rng.choice(WORDS)
    return f"What is the first letter of '{word}'?", f"The first letter of '{word}' is '{word[0]}'."


def spell(rng):
    word = rng.choice(WORDS)
    return f"Spell '{word}'.", " ".join(word.upper())


def copy(rng):
    words = " ".join(rng.sample(WORDS, 3))
    return f"Repeat after me: {words}", words


def reverse(rng):
    word = rng.choice(WORDS)
    return f"Reverse the word '{word}'.", word[::-1]


TASKS = [arithmetic, capital, first_letter, spell, copy, reverse]


def make_rows(n: int = 300, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": SYSTEM}] if i % 4 == 0 else []
        for _ in range(2 if i % 5 == 0 else 1):  # every fifth row is a two-turn conversation
            question, answer = rng.choice(TASKS)(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages})
    return rows


def write_jsonl(rows: list[dict], name: str) -> None:
    """The rows as JSON lines in pesc/recipes/data/NAME, the demo data shipped in the package."""
    out = Path(__file__).resolve().parents[1] / "pesc" / "recipes" / "data" / name
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes)")


def main() -> None:
    write_jsonl(make_rows(), "tiny_instruct.jsonl")


if __name__ == "__main__":
    main()
