"""Writes this project's own prompt sets (train / eval / bench) deterministically.

Topics are split three ways first, so the evaluation and benchmark prompts
share no topic with the training prompts.

    python scripts/make_prompts.py   # into mlx_mtpd/data/
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = [
    "volcanoes", "black holes", "honeybees", "the French Revolution", "photosynthesis",
    "the stock market", "climate change", "the human heart", "electric cars", "coffee",
    "the Roman Empire", "machine learning", "the water cycle", "chess", "the Moon landing",
    "vaccines", "the internet", "sleep", "the Great Wall of China", "rainbows",
    "earthquakes", "the printing press", "dinosaurs", "solar panels", "jazz music",
    "the Amazon rainforest", "octopuses", "inflation", "the Renaissance", "glaciers",
    "bread baking", "recycling", "the immune system", "airplanes", "tea ceremonies",
    "the Olympic Games", "coral reefs", "batteries", "the theory of evolution", "penguins",
    "cryptography", "the Silk Road", "meditation", "tides", "gardening",
    "the periodic table", "bicycles", "ancient Egypt", "wind turbines", "friendship",
    "thunderstorms", "the violin", "time zones", "the human brain", "deserts",
    "submarines", "origami", "the Industrial Revolution", "mushrooms", "lighthouses",
    "public libraries", "the speed of light", "wolves", "board games", "antibiotics",
    "mountains", "the Titanic", "bees and flowers", "satellites", "cheese making",
    "the Pythagorean theorem", "hurricanes", "trains", "elephants", "the ocean floor",
    "renewable energy", "the Vikings", "microscopes", "the seasons", "kindness",
]

TEMPLATES = {
    "question": [
        "What are {t}?", "Why are {t} important?", "How do {t} work?",
        "What is the most surprising fact about {t}?", "What should everyone know about {t}?",
        "What are common misconceptions about {t}?",
    ],
    "instruction": [
        "Give me three tips related to {t}.", "List five facts about {t}.",
        "Summarize the history of {t} in a few sentences.",
        "Create a short quiz with three questions about {t}.",
        "Write a step-by-step guide for a beginner interested in {t}.",
    ],
    "writing": [
        "Write a short poem about {t}.", "Write the opening paragraph of a story involving {t}.",
        "Write a haiku about {t}.", "Write a short letter to a friend about {t}.",
        "Write a product description for a children's book about {t}.",
    ],
    "explanation": [
        "Explain {t} to a ten-year-old.", "Explain {t} in one paragraph.",
        "Explain the science behind {t}.", "Compare {t} with something from everyday life.",
    ],
}

CODE = [
    "Write a Python function that reverses a string.",
    "Write a Python function that checks whether a number is prime.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Write a Python function that counts the vowels in a sentence.",
    "Write a Python function that merges two sorted lists.",
    "Write a Python function that removes duplicates from a list while keeping order.",
    "Write a Python function that converts Celsius to Fahrenheit.",
    "Write a Python class for a simple bank account with deposit and withdraw methods.",
    "Write a Python function that finds the largest word in a sentence.",
    "Write a Python function that computes the factorial of a number.",
    "Write a JavaScript function that capitalizes every word in a string.",
    "Write a SQL query that selects the ten most recent orders from an orders table.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that flattens a nested list.",
    "Write a Python script that reads a text file and prints the number of lines.",
    "Write a Python function that returns the sum of the digits of an integer.",
    "Explain what a Python list comprehension is, with an example.",
    "Explain the difference between a list and a tuple in Python.",
    "Write a Python function that sorts a list of dictionaries by a key.",
    "Write a Python function that counts word frequencies in a text.",
    "Write a bash command that finds all .txt files in a folder.",
    "Explain what recursion is, with a short Python example.",
    "Write a Python function that checks if two words are anagrams.",
    "Write a Python function that returns the greatest common divisor of two numbers.",
]

MATH = [
    "What is 17 times 23?", "What is 15% of 240?", "If a train travels 60 km in 45 minutes, what is its speed in km/h?",
    "What is the square root of 144?", "Solve for x: 3x + 7 = 22.", "What is 1234 + 5678?",
    "How many minutes are in a week?", "What is the area of a circle with radius 3?",
    "A shirt costs $40 and is 25% off. What is the sale price?", "What is 2 to the power of 10?",
    "Convert 5 miles to kilometers.", "What is the average of 4, 8, 15, 16, 23 and 42?",
]


def build(seed: int = 0):
    rng = random.Random(seed)
    topics = TOPICS[:]
    rng.shuffle(topics)
    n = len(topics)
    splits = {"train": topics[: int(0.7 * n)], "eval": topics[int(0.7 * n) : int(0.85 * n)],
              "bench": topics[int(0.85 * n) :]}
    out = {}
    for name, ts in splits.items():
        prompts = [tpl.format(t=t) for t in ts for kind in TEMPLATES.values() for tpl in kind]
        rng.shuffle(prompts)
        out[name] = prompts
    code, math = CODE[:], MATH[:]
    rng.shuffle(code)
    rng.shuffle(math)
    out["train"] = out["train"][:380] + code[:16] + math[:8]
    out["eval"] = out["eval"][:54] + code[16:20] + math[8:10]
    out["bench"] = out["bench"][:26] + code[20:24] + math[10:12]
    for v in out.values():
        rng.shuffle(v)
    return out


def main():
    here = Path(__file__).resolve().parents[1] / "mlx_mtpd" / "data"
    for name, prompts in build().items():
        with open(here / f"prompts_{name}.jsonl", "w") as f:
            for p in prompts:
                f.write(json.dumps({"prompt": p}) + "\n")
        print(name, len(prompts))


if __name__ == "__main__":
    main()
