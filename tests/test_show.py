"""treg show: token pieces, HTML heat map (one coloured span per token), summary, CLI."""
import json
import os
import sys
from html.parser import HTMLParser

import datasets
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from tiny import save_tiny_model, tiny_tokenizer  # noqa: E402

from treg.cli import main as cli  # noqa: E402
from treg.stages.show import render_html, summary, token_pieces, worst_indices  # noqa: E402

ROWS = [{"prompt": "Hi <b>", "chosen": " Sure, <b>bold</b> & café 🙂", "rejected": "\nNo."},
        {"prompt": "Fox?", "chosen": "The quick brown fox.", "rejected": "The lazy dog dog dog."},
        {"prompt": "Sum?", "chosen": "12345", "rejected": "3.14159"}]


class Spans(HTMLParser):
    def __init__(self):
        super().__init__()
        self.spans, self._in, self.tags = [], None, []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "span" and attrs.get("class") == "tok":
            self._in = [attrs["style"], attrs["title"], ""]
            self.spans.append(self._in)

    def handle_endtag(self, tag):
        if tag == "span":
            self._in = None

    def handle_data(self, data):
        if self._in is not None:
            self._in[2] += data


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    root = tmp_path_factory.mktemp("show")
    tok = save_tiny_model(root / "m", "chatml")
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert cli(["annotate", "--model", str(root / "m"), "--dataset", str(root / "d.jsonl"), "--output",
                str(root / "ann"), "--no-progress", "--device", "cpu"]) == 0
    return root, tok, datasets.load_from_disk(str(root / "ann"))


def test_token_pieces_split_multibyte_and_join_exactly():
    tok = tiny_tokenizer("llama3")
    ids = tok("café 🙂 \n  x<|eot_id|>", add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tok, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == tok.decode(ids) == "café 🙂 \n  x<|eot_id|>"
    assert "" in pieces  # the emoji's bytes span several tokens: earlier ones carry no text


def test_html_one_coloured_span_per_token(annotated):
    _, tok, ds = annotated
    rows = ds.to_list()
    page = render_html(rows, tok)
    parser = Spans()
    parser.feed(page)
    n_tokens = sum(len(r[f"{s}_input_ids"]) for r in rows for s in ("chosen", "rejected"))
    assert len(parser.spans) == n_tokens
    rewards = [v for r in rows for s in ("chosen", "rejected") for v in r[f"{s}_token_rewards"]]
    for (style, title, _), r in zip(parser.spans, rewards):
        assert style.startswith("background:rgba(") and abs(float(title.split("=")[1]) - r) < 1e-4
        assert style.startswith("background:rgba(30,160,60" if r > 0 else "background:rgba(215,40,40")
    assert "b" not in parser.tags  # response text '<b>' is escaped, not markup
    assert "".join(t for *_, t in parser.spans[:len(rows[0]["chosen_input_ids"])]) == \
        " Sure, <b>bold</b> & café 🙂<|im_end|>"


def test_summary_and_worst(annotated):
    _, tok, ds = annotated
    stats = summary(ds, tok, top=3)
    flat = [v for r in ds["chosen_token_rewards"] for v in r]
    assert stats["chosen"]["tokens"] == len(flat)
    assert abs(stats["chosen"]["mean_reward"] - np.mean(flat)) < 1e-6
    assert abs(stats["chosen"]["positive_share"] - np.mean(np.array(flat) > 0)) < 1e-9
    neg = stats["most_negative_tokens"]
    assert 1 <= len(neg) <= 3 and all(t["mean_reward"] < 0 for t in neg)
    assert [t["mean_reward"] for t in neg] == sorted(t["mean_reward"] for t in neg)
    gaps = [np.mean(c) - np.mean(r) for c, r in zip(ds["chosen_token_rewards"], ds["rejected_token_rewards"])]
    assert worst_indices(ds, 2) == list(np.argsort(gaps)[:2])


def test_cli_show(annotated, capsys):
    root, _, ds = annotated
    page = root / "report" / "show.html"
    assert cli(["show", str(root / "ann"), "--worst", "2", "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert "most negative tokens" in out and "mean r_hat" in out
    parser = Spans()
    parser.feed(page.read_text())
    worst = worst_indices(ds, 2)
    assert len(parser.spans) == sum(len(ds[i][f"{s}_input_ids"]) for i in worst for s in ("chosen", "rejected"))
    assert cli(["show", str(root / "ann"), "--index", "7"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_cli_show_user_mistakes_one_line(annotated, tmp_path, capsys):
    """Misspelled flag, another tokenizer, an empty dataset: one line, exit 2 (no usage dump, no traceback)."""
    from treg.io.data import write_annotated
    root, _, ds = annotated
    assert cli(["show", str(root / "ann"), "--indx", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unrecognized arguments: --indx" in err
    other = tmp_path / "llama3"
    tiny_tokenizer("llama3").save_pretrained(other)
    assert cli(["show", str(root / "ann"), "--tokenizer", str(other)]) == 2  # would decode to garbage
    assert "field 'tokenizer_fingerprint'" in capsys.readouterr().err
    meta = json.loads((root / "ann" / "treg_meta.json").read_text())
    write_annotated(ds.select([]), tmp_path / "empty", {"tokenizer_fingerprint": meta["tokenizer_fingerprint"],
                                                        "model": str(root / "m")})
    assert cli(["show", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "empty dataset" in err


def _quadratic_pieces(tokenizer, ids):
    """The previous implementation (full decode of every prefix), as the reference."""
    pieces, prev = [], ""
    for k in range(len(ids)):
        text = tokenizer.decode(list(ids[:k + 1]), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd") or not text.startswith(prev):
            pieces.append("")
            continue
        pieces.append(text[len(prev):])
        prev = text
    return pieces


def _metaspace_tokenizer():
    """A SentencePiece-style (Metaspace, '▁' for spaces, no leading space on decode) fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog. café déjà vu"] * 20,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", *bytes_],
                                                show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.mark.parametrize("kind", ["llama3", "metaspace"])
def test_token_pieces_linear_and_equal_to_full_decoding(kind):
    tok = tiny_tokenizer("llama3") if kind == "llama3" else _metaspace_tokenizer()
    text = " ".join(["The quick brown fox, café 🙂 déjà\n  vu 12345 日本語 — x"] * 60)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 1000
    calls = []
    real = tok.decode

    def counting(part, **kw):
        calls.append(len(part))
        return real(part, **kw)

    tok.decode = counting
    pieces = token_pieces(tok, ids)
    work = sum(calls)
    calls.clear()
    assert pieces == _quadratic_pieces(tok, ids)  # the same pieces as decoding every prefix
    assert "".join(pieces) == real(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert work <= 12 * len(ids), work  # linear: a few tokens decoded per token (was ~len(ids)^2 / 2)
    assert sum(calls) > 100 * len(ids)
