"""Write the preference pairs of ``smollm2_dpo.yaml``: answers that follow an instruction's format
(one word, capitals, JSON, yes/no, a three-item list) are chosen over answers with the same
content that ignore it. Chat-message records; the facts of the eval file are not in training.

    python examples/make_format_pairs.py      # writes format_pairs_{train,eval}.jsonl here
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: (question, one-word answer, the same answer as a full sentence)
FACTS = [
    ("What colour is the sky on a clear day?", "Blue", "On a clear day the sky looks blue."),
    ("What is the capital of France?", "Paris", "The capital of France is the city of Paris."),
    ("Which planet is known as the red planet?", "Mars", "The red planet is Mars."),
    ("What do bees make?", "Honey", "Bees make honey from the nectar of flowers."),
    ("What is frozen water called?", "Ice", "When water freezes it becomes ice."),
    ("Which animal is known as the king of the jungle?", "Lion", "The lion is called the king."),
    ("What is the largest ocean on Earth?", "Pacific", "The largest ocean is the Pacific."),
    ("Which gas do plants take in from the air?", "CO2", "Plants take in carbon dioxide."),
    ("What is the opposite of hot?", "Cold", "The opposite of hot is cold."),
    ("How many legs does a spider have?", "Eight", "A spider has eight legs."),
    ("What is the main language spoken in Brazil?", "Portuguese", "Brazilians speak Portuguese."),
    ("Which metal is liquid at room temperature?", "Mercury", "Mercury is a liquid metal."),
    ("What do cows drink?", "Water", "Cows drink water, not milk."),
    ("Which star is closest to Earth?", "Sun", "The closest star to Earth is the Sun."),
    ("What is the fastest land animal?", "Cheetah", "The cheetah is the fastest land animal."),
    ("Which instrument has 88 keys?", "Piano", "A standard piano has 88 keys."),
    ("What is the tallest animal?", "Giraffe", "The giraffe is the tallest animal alive."),
    ("Which organ pumps blood?", "Heart", "The heart pumps blood around the body."),
    ("What is the capital of Japan?", "Tokyo", "Tokyo is the capital city of Japan."),
    ("How many days are in a week?", "Seven", "There are seven days in a week."),
]
#: (yes/no question, answer, a hedging answer that never says yes or no)
YES_NO = [
    ("Is the Earth round?", "Yes", "Well, it is roughly a sphere, slightly flattened."),
    ("Can fish breathe air like we do?", "No", "Most fish take oxygen from water instead."),
    ("Is ice colder than steam?", "Yes", "Ice sits below freezing while steam is hot."),
    ("Do spiders have six legs?", "No", "Spiders have a different number of legs."),
    ("Is Paris in France?", "Yes", "Paris is the French capital city."),
    ("Can penguins fly?", "No", "Penguins use their wings for swimming."),
    ("Is the Sun a star?", "Yes", "The Sun is a medium-sized star."),
    ("Is a tomato a vegetable to botanists?", "No", "Botanists call it a fruit."),
    ("Does water boil at 100 C at sea level?", "Yes", "At sea level that is its boiling point."),
    ("Is the Moon bigger than the Earth?", "No", "The Moon is about a quarter as wide."),
]
#: (question asking for three things, three items)
LISTS = [
    ("Name three primary colours.", ["red", "blue", "yellow"]),
    ("Name three fruits.", ["apple", "banana", "cherry"]),
    ("Name three planets.", ["Mercury", "Venus", "Mars"]),
    ("Name three farm animals.", ["cow", "pig", "sheep"]),
    ("Name three musical instruments.", ["piano", "violin", "drum"]),
    ("Name three European capitals.", ["Paris", "Rome", "Madrid"]),
    ("Name three kinds of weather.", ["rain", "snow", "wind"]),
    ("Name three shapes.", ["circle", "square", "triangle"]),
    ("Name three school subjects.", ["maths", "history", "art"]),
    ("Name three vegetables.", ["carrot", "potato", "pea"]),
]


def pair(instruction: str, question: str, chosen: str, rejected: str) -> dict:
    """One chat-message preference record."""
    return {
        "prompt": [{"role": "user", "content": f"{question} {instruction}"}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def pairs_of(facts, yes_no, lists) -> list[dict]:
    """Every format's pairs over the given facts."""
    out = []
    for q, word, sentence in facts:
        out.append(pair("Answer with one word.", q, f"{word}.", sentence))
        out.append(pair("Answer in capital letters only.", q, sentence.upper(), sentence))
        out.append(pair('Answer in JSON with the key "answer".', q, json.dumps({"answer": word}),
                        sentence))  # fmt: skip
    for q, answer, hedge in yes_no:
        out.append(pair("Answer yes or no.", q, f"{answer}.", hedge))
    for q, items in lists:
        listed = "\n".join(f"- {item}" for item in items)
        prose = f"Some examples are {items[0]}, {items[1]} and also {items[2]}."
        out.append(pair("Reply as a list: one item per line, each starting with '- '.", q,
                        listed, prose))  # fmt: skip
    return out


def main() -> None:
    rng = random.Random(0)
    held = {name: set(rng.sample(range(len(rows)), max(2, len(rows) // 5)))
            for name, rows in (("facts", FACTS), ("yes_no", YES_NO), ("lists", LISTS))}  # fmt: skip

    def split(name, rows, keep_held):
        return [r for i, r in enumerate(rows) if (i in held[name]) == keep_held]

    for part, keep_held in (("train", False), ("eval", True)):
        rows = pairs_of(split("facts", FACTS, keep_held), split("yes_no", YES_NO, keep_held),
                        split("lists", LISTS, keep_held))  # fmt: skip
        rng.shuffle(rows)
        path = HERE / f"format_pairs_{part}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{path.name}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
