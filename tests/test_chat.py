"""treg/io/chat.py: reading TRL preference formats and exact token alignment (METHOD.md §1)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from tiny import tiny_tokenizer  # noqa: E402

from treg.io.chat import ChatFormat, messages_to_text, read_preference_rows  # noqa: E402
from treg.errors import TregError  # noqa: E402

TRICKY = [" leading space", "\nstarts with a newline", "\n\n  two newlines and spaces", "ing merges",
          "Sure, here is 12345.", "café 🙂 – done", "trailing space "]


@pytest.mark.parametrize("style", ["llama3", "chatml"])
def test_response_alignment_byte_level_bpe(style):
    tok = tiny_tokenizer(style)
    fmt = ChatFormat(tok)
    eot = tok.eos_token
    assert fmt.end_of_turn_ids == [tok.eos_token_id]  # cut after the first special token
    prompt = [{"role": "user", "content": "Hello! How can I help you today?"}]
    ctx = fmt.context_ids(prompt)
    ctx_text = tok.decode(ctx)
    assert ctx_text == tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    for text in TRICKY:
        resp = fmt.response_ids(text)
        # the response tokens decode to exactly the text + end of turn, and appending them to the
        # context leaves both parts intact
        assert tok.decode(resp) == text + eot
        assert tok.decode(ctx + resp) == ctx_text + text + eot
        assert resp[:-1] == tok(text, add_special_tokens=False)["input_ids"]


def test_characters_merging_across_the_boundary_stay_split():
    tok = tiny_tokenizer("llama3")
    # a template whose generation prompt ends with a space: " " + "the" would merge into " the"
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|eot_id|>{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    fmt = ChatFormat(tok)
    ctx = fmt.context_ids([{"role": "user", "content": "Hi"}])
    resp = fmt.response_ids("the end")
    joined = tok(tok.decode(ctx) + "the end", add_special_tokens=False)["input_ids"]
    assert joined != ctx + resp[:-1]  # naive re-tokenization moves the boundary ...
    assert resp[:-1] == tok("the end", add_special_tokens=False)["input_ids"]  # ... we never do
    assert tok.decode(ctx + resp) == "user: Hi<|eot_id|>assistant: the end<|eot_id|>"


def test_multi_turn_context_and_query_text():
    tok = tiny_tokenizer("chatml")
    fmt = ChatFormat(tok)
    conv = [{"role": "system", "content": "Be concise."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Add 2 and 3"}]
    ctx = fmt.context_ids(conv)
    assert tok.decode(ctx) == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert tok.decode(ctx).endswith("<|im_start|>assistant\n")
    assert messages_to_text(conv) == ("System: Be concise.\n\nUser: Hi\n\nAssistant: Hello!\n\n"
                                      "User: Add 2 and 3")
    assert messages_to_text(conv[1:2]) == "Hi"


def test_no_chat_template_needs_explicit_plain_format():
    tok = tiny_tokenizer("none")
    with pytest.raises(TregError, match="no-chat-template"):
        ChatFormat(tok)
    fmt = ChatFormat(tok, use_chat_template=False)
    ctx = fmt.context_ids([{"role": "user", "content": "Hi"}])
    assert tok.decode(ctx) == "<|begin_of_text|>User:\nHi\n\nAssistant:\n"
    assert tok.decode(fmt.response_ids("Hello")) == "Hello<|eot_id|>"


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_read_trl_formats(tmp_path):
    conv_p = [{"role": "user", "content": "Q2"}]
    rows = [
        {"prompt": "Q1", "chosen": "good", "rejected": "bad"},
        {"prompt": conv_p, "chosen": [{"role": "assistant", "content": "g"}],
         "rejected": [{"role": "assistant", "content": "b"}]},
        {"chosen": conv_p + [{"role": "assistant", "content": "g3"}],
         "rejected": conv_p + [{"role": "assistant", "content": "b3"}]},
        {"prompt": "Q2", "chosen": conv_p + [{"role": "assistant", "content": "g4"}],
         "rejected": conv_p + [{"role": "assistant", "content": "b4"}]},
    ]
    got = read_preference_rows(_write_jsonl(tmp_path / "d.jsonl", rows))
    assert [(r.prompt, r.chosen, r.rejected) for r in got] == [
        ([{"role": "user", "content": "Q1"}], "good", "bad"), (conv_p, "g", "b"), (conv_p, "g3", "b3"),
        (conv_p, "g4", "b4")]
    assert [r.row for r in got] == [1, 2, 3, 4]
    (tmp_path / "d.json").write_text(json.dumps(rows[:1]))
    assert read_preference_rows(str(tmp_path / "d.json"))[0].chosen == "good"
    from treg.stages.sampling import load_prompt_rows  # the one prompt reader (sample, generate)
    assert load_prompt_rows(_write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "id": 7}]))[0][0].extra == {"id": 7}


@pytest.mark.parametrize("bad, row, field, msg", [
    ('{"prompt": "q", "chosen": "a", "rejected": ', 2, None, "malformed JSON"),
    ({"prompt": "q", "chosen": "a"}, 2, "rejected", "missing field"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, 2, "chosen", "empty response"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "x"}],
      "rejected": [{"role": "assistant", "content": "y"}]}, 2, "chosen", "not the assistant"),
    ({"chosen": "a", "rejected": "b"}, 2, "prompt", "missing field"),
])
def test_bad_rows_name_file_row_field(tmp_path, bad, row, field, msg):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, bad])
    with pytest.raises(TregError, match=msg) as info:
        read_preference_rows(path)
    assert (info.value.file, info.value.row, info.value.field) == (path, row, field)
