"""TRL drop-in inputs: preference datasets in Python (tokenized as TRL 1.16 does) and model names.

``TRegTrainer`` accepts, besides treg's annotated datasets (:mod:`treg.io.schema`, returned unchanged),
any ``datasets.Dataset`` in one of TRL's preference formats:

=========================  ===============================================================
standard, explicit prompt  ``prompt``, ``chosen``, ``rejected``: strings
standard, implicit prompt  ``chosen``, ``rejected``: strings that share the prompt as prefix
conversational, explicit   ``prompt``, ``chosen``, ``rejected``: lists of ``{role, content}``
conversational, implicit   ``chosen``, ``rejected``: whole conversations sharing the prompt turns
pre-tokenized (TRL names)  ``prompt_ids``, ``chosen_ids``, ``rejected_ids``: renamed only
=========================  ===============================================================

Optional columns ``tools`` (list or JSON string) and ``chat_template_kwargs`` (dict) reach the chat
template as in TRL. :func:`prepare_dataset` follows TRL 1.16 ``DPOTrainer._prepare_dataset`` step for
step, so both trainers train on the same token ids (tests/test_trl_dropin.py):

1. implicit prompt: the prompt is the longest common prefix of chosen and rejected (characters for
   strings, whole messages for conversations); with strings, a space just before the divergence goes to
   the responses. When one side is a prefix of the other, TRL's loop stops one element early; so does this.
2. standard (string) data: ``eos_token`` is appended to chosen and rejected unless already there; the
   prompt is tokenized as plain text, *not* wrapped in the chat template.
3. conversational data: ``apply_chat_template(prompt, add_generation_prompt=True)`` and
   ``apply_chat_template(prompt + response)``; no eos is added (the template closes the turn).
4. the response starts where the tokenized prompt and prompt+response first differ (a template that
   renders the prompt differently alone, or a token merge across the boundary, moves it left).

The output has treg's columns ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` plus
``prompt_text``, ``chosen_text``, ``rejected_text`` (as ``treg annotate`` writes them); TRL's input
columns are dropped, any other column is kept. A dataset that is neither format is one
:class:`TregError` naming the missing or odd column.

Also here: the trainer's other TRL-style inputs: :func:`check_args` (``args=None`` defaults, a DPOConfig
passed as is refused with the conversion to use), :func:`map_eval` (an eval dataset or a dict of them) and
:func:`resolve_model` (a model name/path and the tokenizer, as ``trl.DPOTrainer`` resolves them).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from treg.errors import TregError
from treg.io.schema import IDS, PROMPT, REQUIRED, SIDES, TEXT

if TYPE_CHECKING:
    from treg.stages.config import TRegConfig

logger = logging.getLogger(__name__)

TRL_TOKENIZED = {"prompt_ids": PROMPT, "chosen_ids": IDS["chosen"], "rejected_ids": IDS["rejected"]}
TRL_INPUT = ("prompt", "chosen", "rejected", "tools", "chat_template_kwargs")
_WARNED: list = []  # the prompt/response boundary warning is given once per process


def is_annotated(dataset) -> bool:
    """Whether ``dataset`` already has treg's tokenized pair columns."""
    return all(c in dataset.column_names for c in REQUIRED)


def _is_messages(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def _kind(value, column: str, row: int, where: str) -> str:
    """``"text"`` or ``"messages"``; anything else is a one-line error naming the column."""
    if isinstance(value, str):
        return "text"
    if _is_messages(value):
        return "messages"
    shown = type(value).__name__ if not isinstance(value, list) else f"list of {type(value[0]).__name__}" \
        if value else "empty list"
    raise TregError(f"expected a string or a list of {{role, content}} messages (TRL preference format), got "
                    f"{shown}", file=where, row=row, field=column)


def check_format(dataset, name: str = "train") -> str:
    """The format of a TRL preference dataset: ``"text"`` or ``"messages"`` (TregError otherwise)."""
    where = f"{name} dataset"
    cols = dataset.column_names
    if "image" in cols or "images" in cols:
        raise TregError("vision preference data is not supported by treg", file=where,
                        field="image" if "image" in cols else "images")
    missing = [c for c in ("chosen", "rejected") if c not in cols]
    if missing:
        if len(missing) == 2:
            hint = " (an unpaired prompt/completion/label dataset is KTO's format)" if "label" in cols else ""
            raise TregError(f"not a preference dataset: needs 'chosen' and 'rejected' (TRL format) or "
                            f"{', '.join(REQUIRED)} ('treg annotate'); has {', '.join(cols) or 'no columns'}{hint}",
                            file=where, field="chosen")
        raise TregError(f"missing column (has {', '.join(cols)})", file=where, field=missing[0])
    if len(dataset) == 0:
        raise TregError("empty dataset: no preference pairs", file=where)
    table = dataset.with_format("arrow")[:]
    for column in ("prompt", "chosen", "rejected"):
        if column in cols and table[column].null_count:
            import pyarrow.compute as pc
            row = int(pc.index(pc.is_null(table[column]), True).as_py())
            raise TregError("missing value (null)", file=where, row=row, field=column)
    first = dataset[0]
    kind = _kind(first["chosen"], "chosen", 0, where)
    for column in ("rejected", "prompt"):
        if column in cols and _kind(first[column], column, 0, where) != kind:
            raise TregError(f"'{column}' is {_kind(first[column], column, 0, where)} but 'chosen' is {kind}: "
                            "TRL needs one format for prompt, chosen and rejected", file=where, row=0, field=column)
    return kind


def split_prompt(chosen, rejected):
    """TRL's implicit-prompt split: ``(prompt, chosen_rest, rejected_rest)`` (see the module docstring)."""
    shared = min(len(chosen), len(rejected))
    if shared == 0:
        raise TregError("empty chosen or rejected: no prompt to extract", field="chosen" if not chosen else "rejected")
    cut = shared - 1  # where TRL's loop leaves its index when it finds no difference
    for i in range(shared):
        if chosen[i] != rejected[i]:
            cut = i - 1 if chosen[i - 1] == " " else i  # i - 1 == -1 reads the last element, as in TRL
            break
    return chosen[:cut], chosen[cut:], rejected[cut:]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _template_ids(tokenizer, messages, **kwargs) -> list[int]:
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    except (ValueError, TypeError, KeyError) as err:
        raise TregError(f"cannot apply the tokenizer's chat template ({str(err).splitlines()[0]})",
                        field="processing_class") from None
    return list(out["input_ids"])


def _messages_text(messages: list[dict]) -> str:
    from treg.io.chat import messages_to_text
    return messages_to_text(messages)


def tokenize_pair(example: dict, tokenizer, *, add_eos: bool = True) -> dict:
    """One TRL example (explicit prompt) -> treg's id and text columns, as TRL 1.16 tokenizes it."""
    prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
    if _is_messages(chosen):
        tools = example.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
        prompt_ids = _template_ids(tokenizer, prompt, add_generation_prompt=True, **kwargs)
        full = {s: _template_ids(tokenizer, prompt + r, **kwargs) for s, r in zip(SIDES, (chosen, rejected))}
        texts = {"prompt": _messages_text(prompt), "chosen": "".join(m.get("content") or "" for m in chosen),
                 "rejected": "".join(m.get("content") or "" for m in rejected)}
    else:
        eos = tokenizer.eos_token
        texts = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if add_eos and eos:
            chosen, rejected = (r if r.endswith(eos) else r + eos for r in (chosen, rejected))
        prompt_ids = list(tokenizer(text=prompt)["input_ids"])
        full = {s: list(tokenizer(text=prompt + r)["input_ids"]) for s, r in zip(SIDES, (chosen, rejected))}
    cut = min(common_prefix(prompt_ids, full[s]) for s in SIDES)
    if cut < len(prompt_ids) and not _WARNED:
        _WARNED.append(True)
        logger.warning("the tokenized prompt is not a prefix of prompt + response (chat template or a token "
                       "merge at the boundary); the response starts where they diverge, as in TRL (said once)")
    out = {PROMPT: prompt_ids[:cut], **{IDS[s]: full[s][cut:] for s in SIDES}}
    out.update({TEXT[k]: v for k, v in texts.items()})
    return out


def prepare_dataset(dataset, tokenizer, *, num_proc: int | None = None, name: str = "train"):
    """treg's pair columns from a TRL preference dataset, or ``dataset`` itself when it already has them."""
    from datasets import Dataset, IterableDataset
    if isinstance(dataset, IterableDataset):
        raise TregError("an IterableDataset is not supported; pass a map-style datasets.Dataset "
                        "(e.g. Dataset.from_list or load_dataset without streaming)", field=f"{name}_dataset")
    if not isinstance(dataset, Dataset):
        raise TregError(f"expected a datasets.Dataset, got {type(dataset).__name__}", field=f"{name}_dataset")
    if is_annotated(dataset):
        return dataset
    if all(c in dataset.column_names for c in TRL_TOKENIZED):
        return dataset.rename_columns(TRL_TOKENIZED)
    check_format(dataset, name)
    if "prompt" not in dataset.column_names:
        def extract(example):
            prompt, chosen, rejected = split_prompt(example["chosen"], example["rejected"])
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        dataset = dataset.map(extract, num_proc=num_proc, desc=f"Extracting prompt from {name} dataset")
    drop = [c for c in TRL_INPUT if c in dataset.column_names]
    dataset = dataset.map(tokenize_pair, fn_kwargs={"tokenizer": tokenizer}, remove_columns=drop, num_proc=num_proc,
                          desc=f"Tokenizing {name} dataset")
    from treg.io.data import validate
    validate(dataset, file=f"{name} dataset", need_rewards=False)
    return dataset


# ------------------------------------------------------------------------------------------- trainer inputs
def check_args(args, model) -> "TRegConfig":
    """``args`` as a TRegConfig: None -> defaults (output ``<model name>-TReg``, as TRL's ``<name>-DPO``)."""
    from transformers import TrainingArguments

    from treg.stages.config import TRegConfig
    if args is None:
        name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
        return TRegConfig(output_dir=f"{(str(name).rstrip('/').split('/')[-1] or 'model')}-TReg")
    if isinstance(args, TRegConfig):
        return args
    if hasattr(args, "loss_type") and isinstance(args, TrainingArguments):
        raise TregError("args is a trl.DPOConfig; convert it with TRegConfig.from_dpo_config(args, alpha=...)",
                        field="args")
    raise TregError(f"args must be a TRegConfig, got {type(args).__name__}", field="args")


def eval_list(eval_dataset) -> list:
    if eval_dataset is None:
        return []
    return list(eval_dataset.values()) if isinstance(eval_dataset, dict) else [eval_dataset]


def map_eval(eval_dataset, fn):
    """Apply ``fn(dataset, name)`` to an eval dataset or to each of a dict of them (names ``eval`` / keys)."""
    if eval_dataset is None or isinstance(eval_dataset, str):
        return eval_dataset
    if isinstance(eval_dataset, dict):
        return {key: fn(d, key) for key, d in eval_dataset.items()}
    return fn(eval_dataset, "eval")


# ------------------------------------------------------------------------------------------- models
def _dtype_name(dtype) -> str | None:
    """``model_init_kwargs["dtype"]`` (a string or a torch dtype) -> a treg dtype name."""
    if dtype is None or isinstance(dtype, str):
        return dtype
    return str(dtype).replace("torch.", "")


def resolve_model(model, args, processing_class=None, quantization_config=None):
    """``(model, tokenizer)`` as ``trl.DPOTrainer`` resolves them: ``model`` may be a name or path, loaded
    with ``args.model_init_kwargs`` (+ ``quantization_config``) through :func:`treg.io.loading.load_causal_lm`;
    the tokenizer, when not given, is loaded from the model's name or path."""
    from treg.io.loading import load_causal_lm, load_tokenizer
    kwargs = dict(args.model_init_kwargs or {})
    if isinstance(model, str):
        if quantization_config is not None:
            if "quantization_config" in kwargs:
                raise TregError("quantization_config is given both to the trainer and in model_init_kwargs "
                                "(give it once)", field="quantization_config")
            kwargs["quantization_config"] = quantization_config
        dtype = _dtype_name(kwargs.pop("dtype", kwargs.pop("torch_dtype", None))) or args.dtype
        attn = kwargs.pop("attn_implementation", None) or args.attn_implementation
        trust = bool(kwargs.pop("trust_remote_code", args.trust_remote_code))
        path = model
        model = load_causal_lm(path, dtype=dtype, attn_implementation=attn, trust_remote_code=trust, field="model",
                               eval_mode=False, **kwargs)
    else:
        if quantization_config is not None:
            raise TregError("quantization_config applies only when the model is given as a name or path "
                            "(this one is already loaded)", field="quantization_config")
        if kwargs:
            logger.warning("model_init_kwargs is ignored: the model is already loaded")
        path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if processing_class is None:
        if not path:
            raise TregError("pass processing_class (the tokenizer): the model has no name or path to load it from",
                            field="processing_class")
        processing_class = load_tokenizer(path, field="model", trust_remote_code=args.trust_remote_code,
                                          model_weights=False)
    return model, processing_class
