"""The toy world: keyed digit-list tasks with known per-token correctness.

A *query* is ``"<task> k1 d1 k2 d2 ..."``: a task word and ``n`` (5-8) items, each a key letter
(``a``, ``b``, ... in order) followed by a digit. The *reference answer* lists the items again,
``"k1 f(d1) k2 f(d2) ..."``, with ``f`` the task's element-wise transform (``rev`` lists the items
in reverse key order, unchanged). Responses are 10-16 tokens long while only every second token (the
digit) is decisive, so a response is long relative to the tokens that decide its quality.

A *response* may contain filler words (``um``, ``well``, ...): the conciseness failure.

Three system prompts shape the policy the toy checkpoint is trained to imitate:

======== ========================================= ===================================
tag      system message                            data the checkpoint imitates
======== ========================================= ===================================
better   ``answer correctly and concisely``        no errors, no filler
plain    (no system message)                       moderate error and filler rates
worse    ``answer incorrectly and verbosely``      many errors, much filler
======== ========================================= ===================================

The verifier (:func:`verify`) is the exact evaluation judge: per-token labels (``correct`` /
``incorrect`` / ``filler``), the sequence reward and exact match. :func:`proxy_reward` is the
*training* reward, a deliberately imperfect proxy of it (it sees only the first part of the answer,
likes length, and is noisy), the stand-in for a reward model such as ArmoRM judged by a stronger
evaluator.

All text is whitespace-separated words; the toy tokenizer maps one word to one token.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

TASKS: dict[str, str] = {
    "copy": "repeat every item",
    "inc": "add 1 to every digit (9 -> 0)",
    "dec": "subtract 1 from every digit (0 -> 9)",
    "neg": "replace every digit d by 9 - d",
    "rev": "repeat the items in reverse key order",
}
KEYS = [chr(ord("a") + i) for i in range(8)]
DIGITS = [str(d) for d in range(10)]
FILLERS = ["um", "uh", "well", "so", "like", "basically", "okay", "hmm"]
MIN_ITEMS, MAX_ITEMS = 5, 8

SYSTEM_BETTER = "answer correctly and concisely"
SYSTEM_WORSE = "answer incorrectly and verbosely"
SYSTEMS = {"better": SYSTEM_BETTER, "worse": SYSTEM_WORSE, "plain": None}

# Behaviour the checkpoint is trained to imitate: (per-digit error rate, per-item filler rate).
STYLE_RATES: dict[str, tuple[float, float]] = {
    "better": (0.0, 0.0),
    "plain": (0.10, 0.06),
    "worse": (0.45, 0.35),
}

FILLER_COST = 0.1      # eval reward lost per filler word
PROXY_VISIBLE = 0.6    # share of the items the proxy (training) reward sees
PROXY_NOISE = 0.05     # std of the proxy reward's deterministic noise
PROXY_LENGTH_BONUS = 0.02  # proxy reward gained per visible word: a reward model's verbosity bias

LABELS = ("correct", "incorrect", "filler")


def _transform(task: str, digit: int) -> int:
    if task == "inc":
        return (digit + 1) % 10
    if task == "dec":
        return (digit - 1) % 10
    if task == "neg":
        return 9 - digit
    return digit  # copy, rev


@dataclass(frozen=True)
class Problem:
    """One task instance: ``task`` word and ``items`` as (key, digit) pairs in key order."""

    task: str
    items: tuple[tuple[str, int], ...]

    @property
    def query(self) -> str:
        """The user message: ``"inc a 3 b 7 ..."``."""
        return " ".join([self.task] + [f"{k} {d}" for k, d in self.items])

    def expected(self) -> list[tuple[str, int]]:
        """The reference answer as (key, digit) pairs in output order."""
        items = list(reversed(self.items)) if self.task == "rev" else list(self.items)
        return [(k, _transform(self.task, d)) for k, d in items]

    @property
    def reference(self) -> str:
        """The reference answer text (correct, no filler)."""
        return " ".join(f"{k} {d}" for k, d in self.expected())


def parse_query(query: str) -> Problem:
    """Inverse of :attr:`Problem.query`; raises ``ValueError`` on a malformed query."""
    words = query.split()
    if not words or words[0] not in TASKS or len(words) % 2 != 1:
        raise ValueError(f"not a toy query: {query!r}")
    items = []
    for i in range(1, len(words), 2):
        key, digit = words[i], words[i + 1]
        if key not in KEYS or digit not in DIGITS:
            raise ValueError(f"not a toy query: {query!r}")
        items.append((key, int(digit)))
    return Problem(words[0], tuple(items))


def random_problem(rng: random.Random) -> Problem:
    task = rng.choice(sorted(TASKS))
    n = rng.randint(MIN_ITEMS, MAX_ITEMS)
    return Problem(task, tuple((KEYS[i], rng.randrange(10)) for i in range(n)))


def messages(problem_or_query, style: str = "plain") -> list[dict]:
    """Chat messages for a query under a style tag (``better`` / ``plain`` / ``worse``)."""
    query = problem_or_query.query if isinstance(problem_or_query, Problem) else str(problem_or_query)
    system = SYSTEMS[style]
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": query}]


def sample_response(problem: Problem, style: str, rng: random.Random) -> str:
    """A response drawn from the style's behaviour (``STYLE_RATES``): the checkpoint's SFT data."""
    err, fill = STYLE_RATES[style]
    words: list[str] = []
    for key, digit in problem.expected():
        if rng.random() < fill:
            words += rng.sample(FILLERS, rng.randint(1, 2))
        value = digit
        if rng.random() < err:
            value = rng.choice([d for d in range(10) if d != digit])
        words += [key, str(value)]
    return " ".join(words)


@dataclass(frozen=True)
class Verdict:
    """The exact verifier's judgement of one response.

    ``labels[i]`` is the label of the i-th response word (``LABELS``); ``reward`` =
    correct digits / max(n_items, digits given) - ``FILLER_COST`` * fillers; ``exact`` is True iff
    the response equals the reference answer word for word.
    """

    labels: tuple[str, ...]
    reward: float
    exact: bool
    n_correct: int
    n_filler: int
    length: int


def _label_words(problem: Problem, words: list[str]) -> tuple[list[str], int, int]:
    """Labels by stream alignment: the non-filler words must equal ``k1 v1 k2 v2 ...`` in order."""
    stream = [w for kv in problem.expected() for w in (kv[0], str(kv[1]))]
    labels, pos, n_values, n_correct = [], 0, 0, 0
    for word in words:
        if word in FILLERS:
            labels.append("filler")
            continue
        ok = pos < len(stream) and word == stream[pos]
        if pos % 2 == 1:
            n_values += 1
            n_correct += ok
        labels.append("correct" if ok else "incorrect")
        pos += 1
    return labels, n_values, n_correct


def verify(query: str | Problem, response: str) -> Verdict:
    """The exact evaluation verifier (METHOD.md §6's judge stand-in): labels, reward, exact match."""
    problem = query if isinstance(query, Problem) else parse_query(query)
    words = response.split()
    labels, n_values, n_correct = _label_words(problem, words)
    n_items = len(problem.items)
    n_filler = labels.count("filler")
    reward = n_correct / max(n_items, n_values) - FILLER_COST * n_filler
    return Verdict(tuple(labels), float(reward), words == problem.reference.split(), n_correct,
                   n_filler, len(words))


def _noise(query: str, response: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\x00{query}\x00{response}".encode()).digest()
    u1 = (int.from_bytes(digest[:8], "big") + 1) / 2.0**64
    u2 = int.from_bytes(digest[8:16], "big") / 2.0**64
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)  # Box-Muller N(0, 1)


def proxy_reward(query: str | Problem, response: str, *, seed: int = 0) -> float:
    """The *training* reward: an imperfect proxy of :func:`verify`'s reward, with three documented flaws.

    1. Partial view: it judges only the response words up to the end of the first
       ``ceil(PROXY_VISIBLE * n)`` items; errors and filler later on are invisible to it.
    2. Verbosity bias: instead of a filler penalty it *adds* ``PROXY_LENGTH_BONUS`` per visible word
       (reward models are known to prefer longer answers), so filler words raise it.
    3. Noise: N(0, ``PROXY_NOISE``), a deterministic function of (seed, query, response).

    Score = correct digits among the visible items / visible items + bonus * visible words + noise.
    """
    problem = query if isinstance(query, Problem) else parse_query(query)
    words = response.split()
    labels, _, _ = _label_words(problem, words)
    visible = math.ceil(PROXY_VISIBLE * len(problem.items))
    seen, nonfill, correct, n_words = 0, 0, 0, 0
    for label in labels:
        n_words += 1
        if label == "filler":
            continue
        if nonfill % 2 == 1:
            seen += 1
            correct += label == "correct"
        nonfill += 1
        if seen >= visible:
            break
    score = correct / visible + PROXY_LENGTH_BONUS * n_words
    return float(score + PROXY_NOISE * _noise(problem.query, response, seed))
