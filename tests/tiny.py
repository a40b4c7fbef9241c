"""Tiny local models and tokenizers for tests: no hub, no network.

``tiny_tokenizer(style)`` trains a byte-level BPE on a small built-in corpus with the ``tokenizers``
library and wraps it as a ``PreTrainedTokenizerFast`` with a Llama-3-style or ChatML-style chat
template. ``tiny_llama(vocab_size)`` builds a randomly initialised ``LlamaForCausalLM`` of ~100k
parameters. Both are cached per process (the tokenizer training is the slow part).
"""

from __future__ import annotations

import functools

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Preference optimization aligns language models with human feedback.",
    "Token-level rewards assign credit to individual tokens of a response.",
    "  Leading spaces, trailing spaces  and\nnewlines\n\nmatter for tokenizers.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12345 and 3.14159 or 2025-11-27 appear in text.",
    "Hello! How can I help you today? Sure, here is a concise answer.",
    "Rewrite the draft to be more helpful, correct, coherent and concise.",
    "Rewrite the draft to be less helpful, incorrect, incoherent and verbose.",
    "café naïve – em dash — quotes “like this” and emoji 🙂",
] * 4

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIALS = {
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>", "<|pad|>"],
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"],
}


@functools.lru_cache(maxsize=None)
def _trained_backend(style: str, vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS[style],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(style: str = "llama3", vocab_size: int = 400):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with a chat template (style: llama3 | chatml | none)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    base = "llama3" if style == "none" else style
    backend = Tokenizer.from_str(_trained_backend(base, vocab_size))
    if base == "llama3":
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                      eos_token="<|eot_id|>", pad_token="<|pad|>")
        tok.chat_template = LLAMA3_TEMPLATE
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>")
        tok.chat_template = CHATML_TEMPLATE
    if style == "none":
        tok.chat_template = None
    return tok


def tiny_llama(vocab_size: int = 400, *, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0,
               max_positions: int = 512):
    """A randomly initialised LlamaForCausalLM (~100k parameters), deterministic in ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def save_tiny_model(path, style: str = "llama3", *, seed: int = 0):
    """Save ``tiny_llama`` + ``tiny_tokenizer(style)`` to ``path`` (a loadable model directory); returns
    the tokenizer."""
    tok = tiny_tokenizer(style)
    tiny_llama(len(tok), seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return tok
