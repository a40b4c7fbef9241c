"""Output formats of ``treg generate``: one :class:`OutputFormat` entry per benchmark file format.

``treg generate --format`` choices and help, the suffix check and docs/evaluation.md's table read
:data:`OUTPUT_FORMATS`. Adding a format = one entry (a ``render(records, generator) -> str``) + its test.

- ``alpaca_eval``: one JSON list ``[{"instruction", "output", "generator", "dataset"}]`` — what
  AlpacaEval 2 reads as ``--model_outputs`` (its loader is ``pandas.read_json`` on the file).
- ``arena_hard``: JSON Lines in Arena-Hard-Auto's model-answer schema (``gen_answer.py``):
  ``{"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [{"content",
  "token_len"}]}], "tstamp", "conv_metadata": {"token_len", "header_count", "list_count",
  "bold_count"}}``. ``token_len`` counts tokens of *our* tokenizer (Arena-Hard uses tiktoken's
  gpt-3.5 encoding; it only enters its optional style control). Arena-Hard v0.1's
  ``load_model_answers`` names the model by the file name, so write ``model_answer/<generator>.jsonl``.
- ``jsonl``: ``{"prompt_id", "prompt", "output", "generator", "n_tokens", "finish_reason"}`` per line.

Each record given to a renderer: ``prompt`` (str or messages), ``prompt_id`` (str), ``output`` (str),
``n_tokens`` (int), ``finish_reason`` (str) and optionally ``dataset`` (str, AlpacaEval's subset name).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from treg.errors import TregError
from treg.io.meta import stable_hash


def markdown_counts(text: str) -> dict:
    """Markdown element counts in Arena-Hard's ``conv_metadata`` layout (code blocks excluded)."""
    text = re.sub(r"```[^`]*```", "", text)
    return {
        "header_count": {f"h{k}": len(re.findall(rf"^#{{{k}}}\s", text, re.MULTILINE)) for k in range(1, 7)},
        "list_count": {"ordered": len(re.findall(r"^\s*\d+\.\s", text, re.MULTILINE)),
                       "unordered": len(re.findall(r"^\s*[-*+]\s", text, re.MULTILINE))},
        "bold_count": {"**": len(re.findall(r"\*\*[^*\n]+\*\*", text)),
                       "__": len(re.findall(r"__[^_\n]+__", text))},
    }


def prompt_text(prompt) -> str:
    """The instruction text of a prompt: the string itself, or the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else str(prompt[-1]["content"])


def _alpaca_eval(records: Sequence[dict], generator: str) -> str:
    rows = [{"instruction": prompt_text(r["prompt"]), "output": r["output"], "generator": generator,
             "dataset": r.get("dataset") or "treg"} for r in records]
    return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"


def _arena_hard(records: Sequence[dict], generator: str) -> str:
    now = time.time()
    lines = []
    for r in records:
        lines.append(json.dumps({
            "question_id": r["prompt_id"],
            "answer_id": stable_hash([generator, r["prompt_id"], r["output"]]),
            "model_id": generator,
            "choices": [{"index": 0, "turns": [{"content": r["output"], "token_len": r["n_tokens"]}]}],
            "tstamp": now,
            "conv_metadata": {"token_len": r["n_tokens"], **markdown_counts(r["output"])},
        }, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def _jsonl(records: Sequence[dict], generator: str) -> str:
    return "".join(json.dumps({"prompt_id": r["prompt_id"], "prompt": r["prompt"], "output": r["output"],
                               "generator": generator, "n_tokens": r["n_tokens"],
                               "finish_reason": r["finish_reason"]}, ensure_ascii=False) + "\n"
                   for r in records)


@dataclass(frozen=True)
class OutputFormat:
    """A benchmark file format: ``render(records, generator) -> text``; ``suffix`` the file name must end
    in ('' = any), because the benchmark's own loader picks its reader by it."""

    doc: str
    render: Callable[[Sequence[dict], str], str]
    suffix: str = ""


OUTPUT_FORMATS: dict[str, OutputFormat] = {
    "alpaca_eval": OutputFormat("AlpacaEval 2 --model_outputs: one JSON list", _alpaca_eval, ".json"),
    "arena_hard": OutputFormat("Arena-Hard-Auto v0.1 model_answer/<generator>.jsonl (named by the file)",
                               _arena_hard, ".jsonl"),
    "jsonl": OutputFormat("treg's rows: prompt_id, prompt, output, generator, n_tokens, finish_reason", _jsonl),
}


def format_records(records: Sequence[dict], fmt: str, generator: str) -> str:
    """Serialise generated records into the text of a benchmark file in format ``fmt``."""
    if fmt not in OUTPUT_FORMATS:
        raise TregError(f"unknown output format {fmt!r}; choose one of {', '.join(OUTPUT_FORMATS)}", field="format")
    return OUTPUT_FORMATS[fmt].render(records, generator)
