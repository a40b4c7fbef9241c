"""Plausible corruptions planted into a response, for ``treg probe`` (token-reward quality check).

A corruption replaces or inserts one short span of the response text and records where the planted
text lies (character span in the corrupted text), so that the probe can label exactly the tokens that
overlap it (:func:`planted_tokens`, from the tokenizer's offset mapping).

Strategies (``STRATEGIES``):

* ``number``   -- one run of digits swapped for another run of the same length whose first digit
  differs (``1889`` -> ``2642``; the toy world's ``a 3`` -> ``a 7``).
* ``entity``   -- one capitalised name that is not sentence-initial (``Paris``, ``New York``) swapped
  for another name with the same number of words taken from the same data (``pool``), absent from the
  response.
* ``negation`` -- ``not`` inserted after an auxiliary verb (``is`` -> ``is not``).
* ``offtopic`` -- an off-topic sentence appended after a sentence end (or the end of the text).

A strategy that finds nothing to corrupt in a response returns None; the probe then tries the next
strategy (in a seeded random order). Which strategies apply is a property of the data: on the toy
world only ``number`` does (its responses are key letters and digits; an English sentence is unknown
words to its tokenizer, which the probe refuses), on English data all four usually do.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

STRATEGIES = ("number", "entity", "negation", "offtopic")

AUXILIARIES = ("is", "are", "was", "were", "can", "will", "does", "do", "did", "has", "have", "had",
               "should", "could", "would", "must")
OFFTOPIC = (
    "By the way, my neighbour's cat enjoys jazz on Tuesdays.",
    "Bananas are an excellent source of potassium.",
    "The weather in Oslo is usually mild in spring.",
    "Remember to water the tomatoes twice a week.",
    "Chess was very popular in the town library last year.",
    "My favourite colour has always been teal.",
)

_NUMBER = re.compile(r"\d+")
_NAME = re.compile(r"\b[A-Z][a-z]+(?: [A-Z][a-z]+)*\b")
_AUX = re.compile(r"\b(" + "|".join(AUXILIARIES) + r")\b(?! not\b)(?!n't)")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


@dataclass(frozen=True)
class Corruption:
    """``text``: the corrupted response; ``span``: ``(start, end)`` of the planted text in it;
    ``original``: the text it replaced (``""`` for an insertion); ``planted``: ``text[start:end]``."""
    strategy: str
    text: str
    span: tuple[int, int]
    original: str
    planted: str


def _replace(strategy: str, text: str, start: int, end: int, new: str) -> Corruption:
    out = text[:start] + new + text[end:]
    return Corruption(strategy, out, (start, start + len(new)), text[start:end], new)


def _sentence_initial(text: str, start: int) -> bool:
    before = text[:start].rstrip()
    return not before or before[-1] in ".!?:\n\"'(" or text[:start].endswith("\n")


def names(text: str) -> list[tuple[int, int, str]]:
    """Capitalised names that are not sentence-initial: ``[(start, end, name), ...]``."""
    return [(m.start(), m.end(), m.group()) for m in _NAME.finditer(text) if not _sentence_initial(text, m.start())]


def name_pool(texts) -> list[str]:
    """Every distinct name (:func:`names`) in ``texts``, sorted: the entity strategy's replacements."""
    return sorted({n for t in texts for _, _, n in names(t)})


def corrupt(text: str, strategy: str, rng: random.Random, *, pool: list[str] = ()) -> Corruption | None:
    """One ``strategy`` corruption of ``text`` (positions and replacements drawn from ``rng``), or None."""
    if strategy == "number":
        found = list(_NUMBER.finditer(text))
        if not found:
            return None
        m = rng.choice(found)
        old, n = m.group(), len(m.group())
        while True:
            first = str(rng.randrange(1, 10)) if n > 1 else str(rng.randrange(10))
            new = first + "".join(str(rng.randrange(10)) for _ in range(n - 1))
            if new[0] != old[0]:  # the first planted token is already wrong
                return _replace(strategy, text, m.start(), m.end(), new)
    if strategy == "entity":
        found = names(text)
        rng.shuffle(found)
        lower = text.lower()
        for start, end, old in found:
            width = old.count(" ")
            options = [p for p in pool if p.count(" ") == width and p != old and p.lower() not in lower]
            if options:
                return _replace(strategy, text, start, end, rng.choice(options))
        return None
    if strategy == "negation":
        found = list(_AUX.finditer(text))
        if not found:
            return None
        m = rng.choice(found)
        return _replace(strategy, text, m.end(), m.end(), " not")
    if strategy == "offtopic":
        ends = [m.end() for m in _SENTENCE_END.finditer(text)] or [len(text.rstrip())]
        at = rng.choice(ends)
        return _replace(strategy, text, at, at, " " + rng.choice(OFFTOPIC))
    raise ValueError(f"unknown corruption strategy {strategy!r}")


def planted_tokens(offsets: list[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """Indices of the tokens whose character range overlaps ``span`` (an insertion's leading space
    belongs to it, so a token made of that space alone counts as planted too)."""
    s, e = span
    return [i for i, (a, b) in enumerate(offsets) if a < e and b > s]
