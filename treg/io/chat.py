"""Reading prompts / preference pairs and tokenizing them with exact token alignment (METHOD.md §1).

Public API (stable; reused by ``treg sample`` / ``treg score``):

* ``read_records(source, split="train") -> (records, label)`` -- raw dict rows from a JSONL / JSON /
  Parquet file, a local ``datasets`` directory (``save_to_disk``) or a hub name
  (``datasets.load_dataset(name, split=split)``). ``label`` is the file name used in errors.
* ``normalize_messages(value, *, file, row, field) -> list[dict]`` -- a string becomes
  ``[{"role": "user", "content": s}]``; a list of ``{role, content}`` string dicts is validated.
* Prompt files for sampling/generation are read by ``treg.stages.sampling.load_prompt_rows`` (on top of
  ``read_records`` / ``normalize_messages``).
* ``read_preference_rows(source, split="train") -> list[PreferenceRow]`` (and ``preference_rows(
  records)`` for in-memory dicts) -- TRL's preference
  formats: standard (``prompt``/``chosen``/``rejected`` strings), conversational (``prompt`` as
  messages, ``chosen``/``rejected`` as message lists whose final turn is the assistant's) and
  implicit-prompt conversational (no ``prompt``; the shared prefix of ``chosen``/``rejected`` is it).
* ``ChatFormat(tokenizer, use_chat_template=True)`` with ``context_ids(messages) -> list[int]``
  (the conversation rendered by the chat template, ending with the generation prompt / assistant
  header) and ``response_ids(text) -> list[int]`` (the response tokenized ONCE, without special
  tokens, followed by ``end_of_turn_ids``). A scored sequence is always
  ``context_ids(...) + response_ids(...)``: the response ids are never re-tokenized in context.
* ``messages_to_text(messages) -> str`` -- the prompt as plain text (for template ``{query}``).

Row numbers in errors are 1-based record numbers (for JSONL files: line numbers).

End of turn (decision): ``end_of_turn_ids`` are the tokens the chat template writes right after an
assistant message's content, cut after the first special token (Llama-3: ``<|eot_id|>``; ChatML:
``<|im_end|>`` without the trailing newline; Gemma: ``<end_of_turn>``). If the template writes no
special token there, the tokenizer's EOS is used. So the trainer learns to stop.

Plain format (``use_chat_template=False``, documented in docs/annotate.md): each message is written
as ``"<Role>:\\n<content>\\n\\n"`` (Role capitalised), then ``"Assistant:\\n"``; BOS is prepended if
the tokenizer has one; the response is followed by EOS if the tokenizer has one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from treg.errors import TregError
from treg.io.fsutil import read_text_strict

_SENTINEL = "TREGRESPONSESENTINEL7431"


@dataclass
class PreferenceRow:
    """One preference pair; ``prompt`` is a message list, ``chosen``/``rejected`` are response texts."""
    index: int
    row: int
    prompt: list[dict]
    chosen: str
    rejected: str


# ----------------------------------------------------------------------------------------- reading
def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    out = []
    for lineno, line in enumerate(read_text_strict(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise TregError(f"malformed JSON ({err.msg} at column {err.colno})",
                            file=str(path), row=lineno) from None
        if not isinstance(obj, dict):
            raise TregError("each line must be a JSON object", file=str(path), row=lineno)
        out.append((lineno, obj))
    return out


def read_records(source: str | os.PathLike, split: str = "train") -> tuple[list[tuple[int, dict]], str]:
    """Rows of ``source`` as ``[(row_number, dict), ...]`` plus a label for error messages."""
    path = Path(source)
    label = str(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            return _read_jsonl(path), label
        if suffix == ".json":
            try:
                data = json.loads(read_text_strict(path))
            except json.JSONDecodeError as err:
                if err.msg == "Extra data":  # JSON Lines saved as .json
                    return _read_jsonl(path), label
                raise TregError(f"malformed JSON ({err.msg} at line {err.lineno})", file=label) from None
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise TregError("a .json source must be a list of objects", file=label)
            return list(enumerate(data, 1)), label
        if suffix == ".parquet":
            import pyarrow.parquet as pq
            return list(enumerate(pq.read_table(path).to_pylist(), 1)), label
        raise TregError(f"unsupported file type '{suffix}' (use .jsonl, .json or .parquet)", file=label)
    if path.is_dir():
        import datasets
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise TregError("not a datasets directory (save_to_disk)", file=label) from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise TregError(f"no split '{split}' (have: {', '.join(ds)})", file=label)
            ds = ds[split]
        return list(enumerate(ds.to_list(), 1)), label
    if str(source).startswith((".", "/", "~")) or str(source).endswith((".jsonl", ".json", ".parquet")):
        raise TregError("no such file or directory", file=label)
    import datasets  # a hub dataset name (never used in tests)
    try:
        ds = datasets.load_dataset(str(source), split=split)
    except Exception as err:  # noqa: BLE001 - any hub failure is a user-facing error
        raise TregError(f"could not load dataset: {type(err).__name__}: {err}".splitlines()[0],
                        file=label) from None
    return list(enumerate(ds.to_list(), 1)), label


# ----------------------------------------------------------------------------------- normalising
def normalize_messages(value, *, file: str, row: int, field: str) -> list[dict]:
    """A prompt string or a list of ``{role, content}`` messages -> a validated message list."""
    if isinstance(value, str):
        if not value.strip():
            raise TregError("empty text", file=file, row=row, field=field)
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise TregError("expected a string or a non-empty list of {role, content} messages",
                        file=file, row=row, field=field)
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) \
                or not isinstance(msg.get("content"), str):
            raise TregError(f"message {i} must be an object with string 'role' and 'content'",
                            file=file, row=row, field=field)
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _require(rec: dict, key: str, file: str, row: int):
    if key not in rec or rec[key] is None:
        raise TregError("missing field", file=file, row=row, field=key)
    return rec[key]


def _split_response(value, *, file: str, row: int, field: str) -> tuple[list[dict], str]:
    """chosen/rejected -> (messages before the response, response text)."""
    if isinstance(value, str):
        prefix, text = [], value
    else:
        msgs = normalize_messages(value, file=file, row=row, field=field)
        if msgs[-1]["role"] != "assistant":
            raise TregError(f"the last turn is '{msgs[-1]['role']}', not the assistant's",
                            file=file, row=row, field=field)
        prefix, text = msgs[:-1], msgs[-1]["content"]
    if not text.strip():
        raise TregError("empty response", file=file, row=row, field=field)
    return prefix, text


def read_preference_rows(source: str | os.PathLike, split: str = "train") -> list[PreferenceRow]:
    """Preference pairs in any of TRL's formats (see module docstring); raises TregError on bad rows."""
    records, label = read_records(source, split)
    return preference_rows(records, label)


def preference_rows(records, label: str = "<rows>") -> list[PreferenceRow]:
    """In-memory records (dicts, or ``(row_number, dict)`` pairs) -> validated ``PreferenceRow``s."""
    records = [r if isinstance(r, tuple) else (i, r) for i, r in enumerate(records, 1)]
    if not records:
        raise TregError("no rows", file=label)
    out = []
    for index, (row, rec) in enumerate(records):
        c_prefix, chosen = _split_response(_require(rec, "chosen", label, row), file=label, row=row,
                                           field="chosen")
        r_prefix, rejected = _split_response(_require(rec, "rejected", label, row), file=label,
                                             row=row, field="rejected")
        if c_prefix != r_prefix:
            raise TregError("chosen and rejected conversations differ before the final turn",
                            file=label, row=row, field="rejected")
        if "prompt" in rec and rec["prompt"] is not None:
            prompt = normalize_messages(rec["prompt"], file=label, row=row, field="prompt")
            if c_prefix and c_prefix[:len(prompt)] == prompt:
                prompt = c_prefix  # chosen repeats the whole conversation
            else:
                prompt = prompt + c_prefix
        elif c_prefix:
            prompt = c_prefix  # implicit prompt: the shared prefix
        else:
            raise TregError("missing field (needed unless chosen/rejected are conversations)",
                            file=label, row=row, field="prompt")
        out.append(PreferenceRow(index=index, row=row, prompt=prompt, chosen=chosen, rejected=rejected))
    return out


def messages_to_text(messages: list[dict]) -> str:
    """A single user turn -> its content; otherwise ``"Role: content"`` blocks joined by blank lines."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


# --------------------------------------------------------------------------------- tokenization
class ChatFormat:
    """Context / response tokenization for one tokenizer (see module docstring for the contract)."""

    def __init__(self, tokenizer, *, use_chat_template: bool = True, file: str | None = None):
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template
        if use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise TregError("the tokenizer has no chat template; pass --no-chat-template to use the "
                            "plain 'Role:' text format", file=file, field="chat_template")
        self.end_of_turn_ids = self._end_of_turn() if use_chat_template else self._eos_ids()

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _eos_ids(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [] if eos is None else [int(eos)]

    def _render(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as err:  # noqa: BLE001 - e.g. templates that reject a system role
            if messages and messages[0]["role"] == "system" and len(messages) > 1:
                merged = [{"role": messages[1]["role"],
                           "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}]
                return self._render(merged + messages[2:], add_generation_prompt=add_generation_prompt)
            raise TregError(f"the chat template failed: {type(err).__name__}: {err}".splitlines()[0],
                            field="chat_template") from None

    def _end_of_turn(self) -> list[int]:
        text = self._render([{"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": _SENTINEL}], add_generation_prompt=False)
        pos = text.find(_SENTINEL)
        if pos < 0:
            return self._eos_ids()
        ids = self._encode(text[pos + len(_SENTINEL):])
        special = {i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
        special |= set(self.tokenizer.all_special_ids)
        for k, tid in enumerate(ids):
            if tid in special:
                return ids[:k + 1]
        return self._eos_ids()

    def context_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` followed by the generation prompt (assistant header)."""
        if self.use_chat_template:
            return self._encode(self._render(messages, add_generation_prompt=True))
        bos = [] if self.tokenizer.bos_token_id is None else [int(self.tokenizer.bos_token_id)]
        text = "".join(f"{m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages)
        return bos + self._encode(text + "Assistant:\n")

    def response_ids(self, text: str) -> list[int]:
        """The response tokenized once (no special tokens) + ``end_of_turn_ids``."""
        return self._encode(text) + self.end_of_turn_ids


def context_ids(tokenizer, messages: list[dict], *, use_chat_template: bool = True) -> list[int]:
    """Functional shortcut for ``ChatFormat(tokenizer, ...).context_ids(messages)``."""
    return ChatFormat(tokenizer, use_chat_template=use_chat_template).context_ids(messages)


def response_ids(tokenizer, text: str, *, use_chat_template: bool = True) -> list[int]:
    """Functional shortcut for ``ChatFormat(tokenizer, ...).response_ids(text)``."""
    return ChatFormat(tokenizer, use_chat_template=use_chat_template).response_ids(text)
