"""The downstream tasks (task_type `task`): twelve short synthetic tasks with one exact answer each, in the
spirit of scripts/make_tiny_two_tasks.py but scaled up, and the training mix (downstream rows plus a small share of
knowledge rows). Everything is drawn from a seeded random.Random: the same seed gives the same files.
"""

import random

WORDS = """
apple river stone cloud tiger green house light music paper table water bread chair dream earth flame grape heart
lemon garden pencil window silver candle basket forest island market rocket shadow spring summer winter autumn
planet bridge castle dragon feather guitar hammer jacket kettle ladder mirror needle orange pepper rabbit saddle
ticket tunnel velvet wallet yellow zipper anchor bottle button carpet circle copper dinner engine finger flower
garlic hollow insect jungle kitten letter meadow monkey number object parrot pillow puzzle quiet record ribbon
salad school sister spider statue sugar thunder tomato turtle valley violin wagon whistle wizard blanket cactus
""".split()


def _word(rng):
    return rng.choice(WORDS)


def add(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", str(a + b)


def subtract(rng):
    a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
    return f"What is {a} - {b}?", str(a - b)


def multiply(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"What is {a} times {b}?", str(a * b)


def double(rng):
    a = rng.randint(11, 499)
    return f"What is double {a}?", str(2 * a)


def reverse(rng):
    word = _word(rng)
    return f"Reverse the word '{word}'.", word[::-1]


def length(rng):
    word = _word(rng)
    return f"How many letters are in the word '{word}'?", str(len(word))


def last_letter(rng):
    word = _word(rng)
    return f"What is the last letter of '{word}'?", word[-1]


def spell(rng):
    word = _word(rng)
    return f"Spell '{word}' with spaces between the letters.", " ".join(word)


def sort_numbers(rng):
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    return f"Sort from smallest to largest: {', '.join(map(str, numbers))}", ", ".join(map(str, sorted(numbers)))


def largest(rng):
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    return f"Which number is the largest: {', '.join(map(str, numbers))}?", str(max(numbers))


def next_in_sequence(rng):
    start, step = rng.randint(1, 30), rng.randint(2, 9)
    terms = [start + i * step for i in range(4)]
    return f"What number comes next: {', '.join(map(str, terms))}?", str(start + 4 * step)


def alphabetical(rng):
    words = rng.sample(WORDS, 3)
    return f"Put these words in alphabetical order: {', '.join(words)}", ", ".join(sorted(words))


TASKS = [add, subtract, multiply, double, reverse, length, last_letter, spell, sort_numbers, largest,
         next_in_sequence, alphabetical]


def task_row(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "task_type": "task"}


def eval_items(per_task: int, seed: int) -> list[dict]:
    """`per_task` distinct questions of every task: {task, question, answer}."""
    rng = random.Random(seed)
    items = []
    for task in TASKS:
        seen = set()
        while len(seen) < per_task:
            question, answer = task(rng)
            if question not in seen:
                seen.add(question)
                items.append({"task": task.__name__, "question": question, "answer": answer})
    return items


def training_mix(rows: int, knowledge_rows: list[dict], knowledge_share: float, held_out: set[str],
                 seed: int) -> list[dict]:
    """`rows` rows: round(rows * knowledge_share) knowledge rows (the given ones, cycled in a shuffled order) and
    downstream rows of every task in turn, none of whose questions is in `held_out`; shuffled."""
    rng = random.Random(seed)
    n_knowledge = round(rows * knowledge_share) if knowledge_rows else 0
    knowledge = []
    while len(knowledge) < n_knowledge:
        knowledge += rng.sample(knowledge_rows, len(knowledge_rows))
    mix = knowledge[:n_knowledge]
    while len(mix) < rows:
        question, answer = TASKS[len(mix) % len(TASKS)](rng)
        if question not in held_out:
            mix.append(task_row(question, answer))
    rng.shuffle(mix)
    return mix
