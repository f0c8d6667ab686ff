"""Generate pesc/recipes/data/tiny_two_tasks.jsonl: ~240 one-turn rows of two task types for LoRAMoE (the recipe
loramoe-tiny).

Each row carries its type in a `task_type` column: `knowledge` for the closed-book questions (capitals:
world knowledge, LoRAMoE's type 1) and `task` for the rest (arithmetic, letters, spelling, copying,
reversing: type 0). The questions are those of scripts/make_tiny_instruct.py. Run
`python scripts/make_tiny_two_tasks.py` to rebuild the file (same output every time).
"""

import random

from make_tiny_instruct import TASKS, capital, write_jsonl


def make_rows(n: int = 240, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    others = [task for task in TASKS if task is not capital]
    rows = []
    for i in range(n):
        knowledge = i % 2 == 0  # half and half, interleaved
        question, answer = (capital if knowledge else rng.choice(others))(rng)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages, "task_type": "knowledge" if knowledge else "task"})
    return rows


def main() -> None:
    write_jsonl(make_rows(), "tiny_two_tasks.jsonl")


if __name__ == "__main__":
    main()
