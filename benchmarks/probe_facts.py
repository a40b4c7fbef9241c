"""Write benchmarks/data/probe_facts.jsonl: small factual Q/A preference pairs for `treg probe` research.

Each pair: a one-sentence question, the correct one-sentence answer (chosen) and the same answer with
ONE planted error of the same kind (rejected): a capital swapped for another capital, a sum off by
1-3, a year swapped for another year, a fact word swapped for another of its kind. Deterministic
(fixed tables, ``random.Random(0)``); no model is needed. Usage::

    python benchmarks/probe_facts.py            # -> benchmarks/data/probe_facts.jsonl (100 pairs)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"),
            ("Austria", "Vienna"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Norway", "Oslo"),
            ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"), ("Hungary", "Budapest"),
            ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Cuba", "Havana"),
            ("Thailand", "Bangkok"), ("China", "Beijing"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
            ("Argentina", "Buenos Aires"), ("Denmark", "Copenhagen"), ("Belgium", "Brussels"),
            ("Turkey", "Ankara")]
YEARS = [  # (question, answer subject and verb, year)
    ("In what year did World War II end?", "World War II ended", 1945),
    ("In what year did the Berlin Wall fall?", "The Berlin Wall fell", 1989),
    ("In what year did the Titanic sink?", "The Titanic sank", 1912),
    ("In what year did Columbus first reach the Americas?", "Columbus first reached the Americas", 1492),
    ("In what year did the French Revolution begin?", "The French Revolution began", 1789),
    ("In what year did the first Moon landing happen?", "The first Moon landing happened", 1969),
    ("In what year did World War I begin?", "World War I began", 1914),
    ("In what year was the American Declaration of Independence signed?",
     "The Declaration of Independence was signed", 1776),
    ("In what year did the Soviet Union dissolve?", "The Soviet Union dissolved", 1991),
    ("In what year did euro coins enter circulation?", "Euro coins entered circulation", 2002)]
FACTS = [  # (question, answer with {}, right, wrong choices of the same kind)
    ("Which planet is known as the Red Planet?", "The Red Planet is {}.", "Mars", ["Venus", "Jupiter", "Saturn"]),
    ("What is the largest planet in the Solar System?", "The largest planet is {}.", "Jupiter",
     ["Mars", "Mercury", "Venus"]),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is {}.", "Au", ["Ag", "Fe", "Pb"]),
    ("What is the chemical symbol for iron?", "The chemical symbol for iron is {}.", "Fe", ["Au", "Cu", "Zn"]),
    ("What gas do plants absorb from the air?", "Plants absorb {} from the air.", "carbon dioxide",
     ["oxygen", "nitrogen", "helium"]),
    ("What is the freezing point of water in Celsius?", "Water freezes at {} degrees Celsius.", "0",
     ["10", "32", "100"]),
    ("How many legs does a spider have?", "A spider has {} legs.", "eight", ["six", "ten", "four"]),
    ("How many days are in a week?", "A week has {} days.", "seven", ["five", "six", "eight"]),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by {}.", "William Shakespeare",
     ["Charles Dickens", "Jane Austen", "Mark Twain"]),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by {}.", "Leonardo da Vinci",
     ["Vincent van Gogh", "Pablo Picasso", "Claude Monet"]),
    ("What is the largest ocean on Earth?", "The largest ocean is the {} Ocean.", "Pacific",
     ["Atlantic", "Indian", "Arctic"]),
    ("What is the hardest natural substance?", "The hardest natural substance is {}.", "diamond",
     ["gold", "iron", "quartz"]),
    ("Which animal is the largest mammal?", "The largest mammal is the {}.", "blue whale",
     ["elephant", "giraffe", "hippo"]),
    ("What is the boiling point of water in Celsius at sea level?", "Water boils at {} degrees Celsius.",
     "100", ["90", "80", "120"]),
    ("Which organ pumps blood through the body?", "The {} pumps blood through the body.", "heart",
     ["liver", "lung", "kidney"]),
    ("What is the main language spoken in Brazil?", "The main language of Brazil is {}.", "Portuguese",
     ["Spanish", "French", "Italian"]),
]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def pairs(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for country, city in CAPITALS:
        wrong = rng.choice([c for _, c in CAPITALS if c != city])
        out.append((f"What is the capital of {country}?", f"The capital of {country} is {{}}.", city, wrong))
    sums = set()
    while len(sums) < 36:
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        if (a, b) in sums:
            continue
        sums.add((a, b))
        out.append((f"What is {a} plus {b}?", f"{a} plus {b} is {{}}.", str(a + b),
                    str(a + b + rng.choice([-3, -2, -1, 1, 2, 3]))))
    for question, subject, year in YEARS:
        out.append((question, f"{subject} in {{}}.", str(year), str(year + rng.choice([-11, -7, -4, 3, 6, 13]))))
    for q, a, right, wrongs in FACTS:
        out.append((q, a, right, rng.choice(wrongs)))
    for a, b in rng.sample([(a, b) for a in range(2, 6) for b in range(1, 5)], 10):
        wrong = NUMBER_WORDS[a + b + rng.choice([-1, 1])]
        out.append((f"If you have {NUMBER_WORDS[a]} apples and get {NUMBER_WORDS[b]} more, how many do you have?",
                    "You have {} apples.", NUMBER_WORDS[a + b], wrong))
    return [{"prompt": q, "chosen": ans.format(right), "rejected": ans.format(wrong)} for q, ans, right, wrong in out]


def main() -> None:
    path = Path(__file__).parent / "data" / "probe_facts.jsonl"
    path.parent.mkdir(exist_ok=True)
    rows = pairs()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} pairs -> {path}")


if __name__ == "__main__":
    main()
