"""The toy's Hugging Face fast tokenizer: word level, one whitespace-separated word = one token.

Built locally with the ``tokenizers`` library (no training: the vocabulary is the toy world's word
list, fixed and ordered, so token ids never change). Wrapped as ``PreTrainedTokenizerFast`` with a
chat template, so it saves with ``save_pretrained`` and loads with ``AutoTokenizer.from_pretrained``.

Chat format (a rendered conversation is whitespace-separated words)::

    <s> <|system|> answer correctly and concisely <|end|> <|user|> inc a 3 b 7 <|end|> <|assistant|>

followed by the response words and ``<|end|>`` (the eos token). ``decode`` joins tokens with single
spaces, so ``decode(encode(text)) == " ".join(text.split())`` for in-vocabulary text; unknown words
become ``<unk>``.
"""

from __future__ import annotations

from treg.toy import world

SPECIALS = ["<pad>", "<s>", "<|end|>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
PAD, BOS, EOS, UNK = "<pad>", "<s>", "<|end|>", "<unk>"

# Words a user may reasonably put in a template for this toy, beyond the world's own words.
EXTRA_WORDS = ["rewrite", "the", "draft", "answer", "better", "worse", "query", "response", ":",
               "correctly", "incorrectly", "concisely", "verbosely", "and", "to", "be", "more", "less",
               "helpful", "unhelpful", "correct", "incorrect", "coherent", "incoherent", "concise",
               "verbose"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %} <|{{ m['role'] }}|> {{ m['content'] | trim }} <|end|>"
    "{% endfor %}{% if add_generation_prompt %} <|assistant|>{% endif %}"
)


def vocabulary() -> list[str]:
    """The ordered vocabulary (token id = position)."""
    words = list(SPECIALS)
    for group in (world.DIGITS, world.KEYS, sorted(world.TASKS), world.FILLERS,
                  world.SYSTEM_BETTER.split(), world.SYSTEM_WORSE.split(), EXTRA_WORDS):
        for w in group:
            if w not in words:
                words.append(w)
    return words


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` for the toy world (deterministic; no training)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS,
                                  unk_token=UNK, pad_token=PAD,
                                  additional_special_tokens=SPECIALS[4:], padding_side="left",
                                  model_max_length=128)
    tok.chat_template = CHAT_TEMPLATE
    return tok
