"""Writes the growing data set's prompt pool (`mlx_mtpd/data/prompts_pool.jsonl`):
thousands of training prompts, deterministic, none on a held-out topic.

Topic x template questions and instructions, code in several languages,
arithmetic with fresh numbers, rewriting of given text, and two-turn
conversations whose second turn edits the first answer (the answer itself is
the backbone's, filled in by `gen-data` from earlier data).  The project's
evaluation and benchmark topics (`make_prompts.py`) never appear.

    python scripts/make_pool.py
    python scripts/make_pool.py --multi-turn data/tokens   # data/prompts_multiturn.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_prompts, beside this script
from make_prompts import TEMPLATES, TOPICS, build  # noqa: E402

MORE_TOPICS = [
    "the Eiffel Tower", "rivers", "owls", "the Internet of Things", "pizza", "the Great Barrier Reef",
    "quantum computing", "the Milky Way", "hot air balloons", "the Aztecs", "sharks", "poetry",
    "football", "the piano", "robots", "snow", "cats", "dogs", "the human skeleton", "magnets",
    "clouds", "the Sahara", "ants", "the camera", "electricity", "volunteering", "the Moon",
    "Mars", "comets", "the ancient Greeks", "the Maya", "castles", "knights", "pirates",
    "the telephone", "radio", "television", "video games", "chocolate", "rice", "potatoes",
    "the olive tree", "whales", "dolphins", "butterflies", "spiders", "frogs", "forests",
    "wetlands", "the Arctic", "Antarctica", "the Himalayas", "the Nile", "the Amazon river",
    "languages", "writing systems", "maps", "compasses", "clocks", "calendars", "money",
    "banks", "taxes", "voting", "democracy", "the United Nations", "newspapers", "museums",
    "architecture", "bridges", "skyscrapers", "tunnels", "roads", "cars", "motorcycles",
    "ships", "rockets", "the International Space Station", "telescopes", "gravity", "atoms",
    "DNA", "cells", "bacteria", "viruses", "nutrition", "exercise", "running", "swimming",
    "yoga", "tennis", "basketball", "baseball", "cycling races", "mountaineering", "camping",
    "fishing", "cooking pasta", "baking cookies", "soup", "spices", "fermentation", "wine",
    "beer brewing", "composting", "houseplants", "trees", "flowers", "seeds", "soil",
    "water purification", "plumbing", "carpentry", "painting", "sculpture", "photography",
    "film making", "theater", "opera", "rock music", "classical music", "drums", "guitars",
    "dance", "fashion", "cotton", "silk", "glass making", "pottery", "paper", "pencils",
    "email", "passwords", "smartphones", "computers", "operating systems", "databases",
    "spreadsheets", "open source software", "programming languages", "algorithms",
    "sorting algorithms", "search engines", "social media", "online shopping", "budgeting",
    "saving money", "job interviews", "public speaking", "time management", "habits",
    "learning a new language", "reading", "libraries of the ancient world", "mythology",
    "fairy tales", "superheroes", "the Olympic torch", "birthdays", "holidays", "weddings",
    "neighbors", "teamwork", "leadership", "curiosity", "patience", "honesty", "humor",
]

MORE_TEMPLATES = [
    "Tell me about {t}.", "Write a short paragraph about {t}.", "Describe {t} in three sentences.",
    "What are the pros and cons of {t}?", "Give me a fun fact about {t}.",
    "Write a short dialogue between two friends talking about {t}.",
    "Write a limerick about {t}.", "Write a tweet about {t}.", "Write a short speech about {t}.",
    "What questions would a child ask about {t}? Answer two of them.",
    "Write a list of five words related to {t}, with a one-line definition each.",
    "Write a short news headline and summary about {t}.",
    "How would you explain {t} to someone from the year 1800?",
    "Write a short blog post introduction about {t}.",
    "Give three reasons why {t} matter.", "What is the future of {t}?",
    "Write a short story for children about {t}.", "Describe a day in the life of someone who loves {t}.",
]

CODE_TASKS = [
    "reverses a string", "checks whether a number is even", "returns the largest number in a list",
    "counts how many times a character appears in a string", "computes the average of a list of numbers",
    "returns the n-th Fibonacci number", "checks whether a string is a palindrome",
    "converts a temperature from Fahrenheit to Celsius", "removes all spaces from a string",
    "returns the second largest number in a list", "checks whether a year is a leap year",
    "counts the words in a sentence", "returns the factorial of a number", "merges two dictionaries",
    "finds the common elements of two lists", "capitalizes the first letter of every word",
    "returns the length of the longest word in a sentence", "checks whether a list is sorted",
    "computes the sum of the squares of a list", "converts a list of strings to upper case",
    "returns all even numbers from a list", "finds the index of an item in a list",
    "rotates a list by k positions", "counts the lines of a text", "checks whether a number is prime",
    "returns the minimum and maximum of a list", "converts binary to decimal",
    "computes a power by repeated multiplication",
    "splits a list into chunks of size n", "returns the unique items of a list",
]
LANGUAGES = ["Python", "JavaScript", "Go", "Rust", "C", "Java", "TypeScript", "Ruby"]
CODE_FORMS = [
    "Write a {lang} function that {task}.",
    "Write a {lang} function that {task}, with a short docstring or comment.",
    "Show how to write a {lang} function that {task}, and explain it briefly.",
]

REWRITE_SOURCES = [
    "The meeting has been moved to Thursday at three because the manager is traveling.",
    "Our team finished the project two weeks early and under budget.",
    "Please remember to bring your laptop and a charger to the workshop tomorrow.",
    "The new park in the city center has a playground, a pond and many benches.",
    "I think that we should maybe try to start the presentation a little bit earlier.",
    "The recipe needs two eggs, a cup of flour, a cup of milk and a pinch of salt.",
    "Customers can return any item within thirty days if they keep the receipt.",
    "The library will be closed on Monday for cleaning and will reopen on Tuesday.",
    "He was very tired after the long trip, but he still went to the dinner.",
    "The software update fixes several bugs and makes the app start faster.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The train to the airport leaves every twenty minutes from platform four.",
    "She planted tomatoes, basil and peppers in her small garden this spring.",
    "Regular exercise improves mood, focus and energy during the day.",
    "The museum offers free entry on the first Sunday of every month.",
    "Our office will switch to a new email system next week.",
]
REWRITE_FORMS = [
    "Rewrite this sentence in a formal tone: {s}", "Rewrite this sentence in a friendly, casual tone: {s}",
    "Make this sentence shorter: {s}", "Turn this sentence into a question: {s}",
    "Rewrite this as a bulleted list: {s}", "Repeat this sentence exactly, then translate it into simple English: {s}",
    "Correct any mistakes and repeat the sentence: {s}", "Write this sentence in the past tense: {s}",
    "Rewrite this sentence for a ten-year-old: {s}", "Put this sentence in quotation marks and explain it: {s}",
]

FOLLOW_UPS = [
    "Now repeat your answer exactly.", "Make your answer shorter.", "Rewrite your answer as a bulleted list.",
    "Repeat your answer, but in a more formal tone.", "Now summarize your answer in one sentence.",
    "Repeat the first sentence of your answer.", "Rewrite your answer for a ten-year-old.",
]
CODE_FOLLOW_UPS = [
    "Now repeat the function exactly, but rename it.", "Add comments to the code and repeat it.",
    "Add type hints to the function and repeat it.", "Repeat the code exactly.",
]


def arithmetic(rng: random.Random, n: int):
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        kind = rng.randrange(6)
        if kind == 0:
            out.append(f"What is {a} plus {b * 7}?")
        elif kind == 1:
            out.append(f"What is {a} times {b}?")
        elif kind == 2:
            out.append(f"What is {b}% of {a * 10}?")
        elif kind == 3:
            out.append(f"Solve for x: {b}x + {a} = {a + b * rng.randint(2, 20)}.")
        elif kind == 4:
            out.append(f"A book costs ${a} and is {rng.choice([10, 20, 25, 50])}% off. What is the sale price?")
        else:
            out.append(f"If a car travels {a} km in {b} minutes, what is its average speed in km/h?")
    return out


def build_pool(seed: int = 0):
    """Single-turn prompts (old training prompts first) and two-turn follow-up templates."""
    sets = build()
    held_out = set(build_held_out())
    rng = random.Random(seed)
    topics = [t for t in TOPICS if t not in held_out] + [t for t in MORE_TOPICS if t not in held_out]
    templates = [tpl for kind in TEMPLATES.values() for tpl in kind] + MORE_TEMPLATES
    new = [tpl.format(t=t) for t in topics for tpl in templates]
    new += [f.format(lang=lang, task=task) for task in CODE_TASKS for lang in LANGUAGES for f in CODE_FORMS]
    new += arithmetic(rng, 400)
    new += [f.format(s=s) for s in REWRITE_SOURCES for f in REWRITE_FORMS]
    seen = set(sets["train"])
    new = [p for p in dict.fromkeys(new) if p not in seen]
    rng.shuffle(new)
    return sets["train"] + new


def build_multi_turn(dataset: Path, tokenizer, pool, max_answer_tokens: int = 200):
    """Two-turn conversations: a pool prompt, the backbone's own greedy answer
    to it from the data set, and a follow-up that asks to repeat, shorten or
    edit that answer (the turns where drafting from the conversation pays)."""
    from mlx_mtpd.training.dataset import iter_records, job_id

    by_id = {job_id([{"role": "user", "content": p}], 0.0): p for p in pool}
    out = []
    for rec in iter_records(dataset):
        prompt = by_id.get(rec["id"])
        answer = rec["tokens"][rec["prompt_len"]:]
        if prompt is None or not rec["stopped"] or len(answer) > max_answer_tokens + 1:
            continue
        code = any(w in prompt for w in ("function", "code", "script", "query", "command"))
        options = CODE_FOLLOW_UPS if code else FOLLOW_UPS
        follow = options[int(rec["id"][:8], 16) % len(options)]
        out.append([{"role": "user", "content": prompt},
                    {"role": "assistant", "content": tokenizer.decode(answer[:-1]).strip()},
                    {"role": "user", "content": follow}])
    return out


POOL = Path(__file__).resolve().parents[1] / "mlx_mtpd" / "data" / "prompts_pool.jsonl"  # shipped (distill)


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--multi-turn", default=None, metavar="DATASET",
                    help="Write data/prompts_multiturn.jsonl from this token data set's greedy answers.")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1] / "data"
    root.mkdir(exist_ok=True)
    if args.multi_turn:
        from mlx_mtpd.utils import load

        _, tokenizer, _ = load(None)
        pool = [json.loads(x)["prompt"] for x in POOL.read_text().splitlines()]
        convs = build_multi_turn(Path(args.multi_turn), tokenizer, pool)
        tmp = root / ".prompts_multiturn.jsonl.tmp"
        tmp.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs))
        tmp.rename(root / "prompts_multiturn.jsonl")
        print("multi-turn", len(convs))
        return
    pool = build_pool()
    bad = [p for p in pool for t in build_held_out() if t in p]
    assert not bad, bad[:3]
    with open(POOL, "w") as f:
        for p in pool:
            f.write(json.dumps({"prompt": p}) + "\n")
    print("pool", len(pool))


def build_held_out():
    rng = random.Random(0)
    topics = TOPICS[:]
    rng.shuffle(topics)
    return topics[int(0.7 * len(topics)):]


if __name__ == "__main__":
    main()
