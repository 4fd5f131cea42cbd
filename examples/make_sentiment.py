"""Generate the small sentiment data set that `loraq train` uses by default.

Every sentence is made here from templates and word lists, so the data set is original and the
script is deterministic: running it again rewrites byte-identical files. It writes

    examples/sentiment_train.tsv   2000 labelled sentences
    examples/sentiment_eval.tsv     500 labelled sentences (no sentence also in train)

and the same two files into src/loraq/train/defaults/, the copy that ships inside the package so
that `loraq train` works from any folder. Each file is tab-separated with a header `text<TAB>label`
and labels `positive` / `negative`.

About one sentence in eight is negated ("was not bad at all", "was not great") so that the task
is not solved by spotting single words; the rest are plainly positive or negative reviews of
films, restaurants, hotels, gadgets, books and services.

Usage: python examples/make_sentiment.py
"""

from __future__ import annotations

import random
from pathlib import Path

SEED = 20240531
N_TRAIN = 2000
N_EVAL = 500

SUBJECTS = {
    "film": [
        "the movie",
        "this film",
        "the plot",
        "the soundtrack",
        "the acting",
        "the ending",
        "the lead actor",
        "the script",
        "the sequel",
        "the cinematography",
        "the dialogue",
    ],
    "food": [
        "the pasta",
        "the soup",
        "the dessert",
        "the coffee",
        "the pizza",
        "the service",
        "the waiter",
        "the menu",
        "the breakfast",
        "the curry",
        "the bread",
        "the salad",
    ],
    "hotel": [
        "the hotel room",
        "the bed",
        "the reception staff",
        "the view",
        "the pool",
        "the location",
        "the bathroom",
        "the check-in",
        "the lobby",
        "the room service",
    ],
    "gadget": [
        "the battery",
        "the screen",
        "this phone",
        "the keyboard",
        "the camera",
        "the speaker",
        "the charger",
        "the headphones",
        "the laptop",
        "the app",
    ],
    "book": [
        "the novel",
        "this book",
        "the final chapter",
        "the main character",
        "the writing",
        "the translation",
        "the story",
        "the cover",
        "the audiobook narrator",
    ],
    "service": [
        "the delivery",
        "the customer support",
        "the repair",
        "the train ride",
        "the haircut",
        "the online store",
        "the refund process",
        "the course",
        "the tour guide",
        "the gym",
    ],
}

POS_ADJ = [
    "wonderful",
    "excellent",
    "delightful",
    "fantastic",
    "superb",
    "lovely",
    "brilliant",
    "charming",
    "impressive",
    "outstanding",
    "pleasant",
    "terrific",
    "flawless",
    "marvelous",
    "great",
    "good",
    "enjoyable",
    "fabulous",
    "first-rate",
    "splendid",
]
NEG_ADJ = [
    "terrible",
    "awful",
    "dreadful",
    "disappointing",
    "horrible",
    "mediocre",
    "poor",
    "boring",
    "sloppy",
    "frustrating",
    "unpleasant",
    "dismal",
    "bad",
    "lousy",
    "painful",
    "useless",
    "annoying",
    "broken",
    "tedious",
    "miserable",
]
ADVERBS = [
    "",
    "",
    "really ",
    "truly ",
    "remarkably ",
    "quite ",
    "very ",
    "surprisingly ",
    "genuinely ",
    "absolutely ",
    "rather ",
    "incredibly ",
]
POS_VERBS = [
    "I loved",
    "We adored",
    "I really enjoyed",
    "My family liked",
    "I was thrilled with",
    "We were delighted by",
    "I was impressed by",
    "I can't stop praising",
]
NEG_VERBS = [
    "I hated",
    "We regretted",
    "I could not stand",
    "My family disliked",
    "I was fed up with",
    "We were let down by",
    "I was annoyed by",
    "I complained about",
]
POS_CLOSE = [
    "worth every penny",
    "I will definitely come back",
    "highly recommended",
    "ten out of ten",
    "it made my day",
    "I would do it again",
    "a real pleasure",
    "better than I expected",
    "I already told my friends",
    "five stars from me",
]
NEG_CLOSE = [
    "a total waste of money",
    "never again",
    "avoid it if you can",
    "what a letdown",
    "it ruined my day",
    "I want my money back",
    "worse than I expected",
    "I warned my friends",
    "one star is too many",
    "not worth the price",
]
INTROS = [
    "",
    "",
    "",
    "",
    "Honestly, ",
    "To be fair, ",
    "After a long week, ",
    "Last Friday, ",
    "In short, ",
    "Overall, ",
    "As a regular customer, ",
    "On my second visit, ",
    "Compared to last year, ",
    "Well, ",
]
TIMES = [
    "",
    "",
    "",
    " this time",
    " from the start",
    " the whole time",
    " once again",
    " in the end",
]


def _sentence(rng: random.Random, label: str) -> str:
    """One review sentence with the given label ("positive" or "negative")."""
    pos = label == "positive"
    subj = rng.choice(SUBJECTS[rng.choice(sorted(SUBJECTS))])
    adj = rng.choice(POS_ADJ if pos else NEG_ADJ)
    adj2 = rng.choice(POS_ADJ if pos else NEG_ADJ)
    adv = rng.choice(ADVERBS)
    close = rng.choice(POS_CLOSE if pos else NEG_CLOSE)
    intro = rng.choice(INTROS)
    when = rng.choice(TIMES)
    verb_is = rng.choice(["was", "is", "felt", "seemed"])
    kind = rng.random()
    if kind < 0.12:
        # Negation: the opposite adjective, negated.
        other = rng.choice(NEG_ADJ if pos else POS_ADJ)
        tail = " at all" if pos else rng.choice(["", " at all", " in any way"])
        text = f"{intro}{subj} was not {other}{tail}{when}"
        text += "." if rng.random() < 0.5 else f", {close}."
    elif kind < 0.35:
        text = f"{intro}{subj} {verb_is} {adv}{adj}{when}."
    elif kind < 0.55:
        text = f"{intro}{subj} {verb_is} {adv}{adj} and {adj2}, {close}."
    elif kind < 0.72:
        verb = rng.choice(POS_VERBS if pos else NEG_VERBS)
        if intro and not verb.startswith("I "):
            verb = verb[0].lower() + verb[1:]
        text = f"{intro}{verb} {subj}{when}, {close}."
    elif kind < 0.86:
        text = f"{intro}{subj} {verb_is} {adv}{adj}{when} - {close}."
    else:
        article = "an" if adj[0] in "aeiou" else "a"
        noun = subj.split(" ", 1)[1]
        text = f"What {article} {adj} {noun}! {close[0].upper()}{close[1:]}."
    text = " ".join(text.split())
    return text[0].upper() + text[1:]


def make(seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL):
    """Return (train, eval) lists of (text, label) with balanced labels and no shared text."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[tuple[str, str]] = []
    target = n_train + n_eval
    while len(rows) < target:
        label = "positive" if len(rows) % 2 == 0 else "negative"
        text = _sentence(rng, label)
        if text in seen:
            continue
        seen.add(text)
        rows.append((text, label))
    rng.shuffle(rows)
    return rows[:n_train], rows[n_train:]


def write_tsv(path: Path, rows) -> None:
    """Write rows as `text<TAB>label` with a header line."""
    lines = ["text\tlabel"] + [f"{text}\t{label}" for text, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    """Write the train and eval files into examples/ and the packaged defaults folder."""
    here = Path(__file__).resolve().parent
    train, evaluation = make()
    targets = [here, here.parent / "src" / "loraq" / "train" / "defaults"]
    for folder in targets:
        if not folder.parent.exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        write_tsv(folder / "sentiment_train.tsv", train)
        write_tsv(folder / "sentiment_eval.tsv", evaluation)
        print(f"wrote {len(train)} train and {len(evaluation)} eval sentences to {folder}")


if __name__ == "__main__":
    main()
