"""``treg train --help`` (T-REG's fields and the most used TrainingArguments, in groups; < 120 lines)
and ``treg train --help-all`` (every option). Rendered from the ``treg train`` parser itself
(:func:`treg.stages.config.config_parser`), so help texts, choices and defaults are the fields' own;
each option is listed once (not its dash-spelled alias nor the ``--no_<flag>`` negation of a boolean)
with its default said once."""

from __future__ import annotations

import argparse
import re
import dataclasses
import shutil
import textwrap

# T-REG's own fields, by group; a TRegConfig field not named here lands in "Other T-REG options"
TREG_GROUPS = {
    "Model and data": ["model_name_or_path", "dataset_path", "eval_dataset_path", "dtype", "attn_implementation",
                       "max_length", "truncation_mode", "pad_to_multiple_of"],
    "Method (T-REG)": ["method", "beta", "gamma", "alpha", "weighting"],
    "Reference log-probs": ["precompute_ref_log_probs", "precompute_ref_batch_size", "ref_cache_dir", "logprob_chunk_size",
                            "disable_dropout"],
    "LoRA (needs treg[peft])": ["use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"],
}
COMMON_GROUPS = {
    "Training (most used TrainingArguments)": [
        "output_dir", "num_train_epochs", "max_steps", "per_device_train_batch_size",
        "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio",
        "weight_decay", "max_grad_norm", "bf16", "activation_checkpointing", "seed"],
    "Logging, saving, hub, scale-out": [
        "logging_steps", "report_to", "eval_strategy", "eval_steps", "save_strategy", "save_steps",
        "save_total_limit", "resume_from_checkpoint", "push_to_hub", "hub_model_id", "deepspeed",
        "use_liger_kernel"],
}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """``{dest: action}`` for every option but help and the ``--no_<flag>`` negations of booleans."""
    out = {}
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction) or not a.option_strings:
            continue
        if a.option_strings[0].startswith("--no_") and a.dest != a.option_strings[0][2:]:
            continue  # --no_x stores False into x: the same field as --x
        out.setdefault(a.dest, a)
    return out


def _entry(a: argparse.Action, width: int, *, brief: bool) -> list[str]:
    name = a.option_strings[0]
    if a.choices:
        name += " {" + ",".join(map(str, a.choices)) + "}"
    elif a.nargs == "?" and a.const is True:
        name += " [BOOL]"
    elif a.nargs not in (0,):
        name += " " + a.dest.upper() if a.metavar is None else f" {a.metavar}"
    text = " ".join((a.help or "").split())
    if brief:  # the first sentence ("e.g. x" is not an end)
        text = re.split(r"(?<=[a-z0-9)`])\. (?=[A-Z`])", text, maxsplit=1)[0].rstrip(".") + "."
    if "default" not in text.lower() and a.default is not None and a.default != argparse.SUPPRESS:
        text += f" (default: {a.default})"
    col = 34
    head = f"  {name}"
    lines = textwrap.wrap(text, width=max(40, width - col)) or [""]
    if len(head) > col - 2:
        return [head] + [" " * col + ln for ln in lines]
    return [head.ljust(col) + lines[0]] + [" " * col + ln for ln in lines[1:]]


def render(parser: argparse.ArgumentParser, *, full: bool) -> str:
    from transformers import TrainingArguments

    from treg.stages.config import TRL_NAMES, TRegConfig
    width = min(120, shutil.get_terminal_size((110, 24)).columns)
    opts = _options(parser)
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    fields = [f for f in dataclasses.fields(TRegConfig) if f.init and f.name not in base and f.name in opts]
    trl = [f.name for f in fields if f.name in TRL_NAMES]  # DPOConfig's names: one line here, all in --help-all
    own = [f.name for f in fields if f.name not in trl]
    groups = {title: [n for n in names if n in opts] for title, names in TREG_GROUPS.items()}
    named = {n for names in groups.values() for n in names}
    other = [n for n in own if n not in named]
    if other:
        groups["Other T-REG options"] = other
    groups["Config file"] = ["config"]
    if full:
        groups["TRL DPOConfig names"] = trl
        shown = {n for names in groups.values() for n in names}
        groups["All TrainingArguments (transformers)"] = [d for d in opts if d not in shown]
    else:
        groups.update({t: [n for n in names if n in opts] for t, names in COMMON_GROUPS.items()})
    lines = ["usage: treg train --config run.yaml [--FIELD VALUE ...]   (or every field on the command line)", "",
             "Train DPO/SimPO with token-level reward regularization (T-REG). Options come from --config YAML,",
             "then the command line (`--field value`; booleans: `--flag`, `--flag false` or `--no_flag`).", ""]
    for title, names in groups.items():
        if not names:
            continue
        lines.append(f"{title}:")
        for n in names:
            lines += _entry(opts[n], width, brief=not full and n not in own + trl)
        lines.append("")
    if not full:
        lines += textwrap.wrap("TRL DPOConfig names also accepted: " + ", ".join(f"--{n}" for n in trl) + ".",
                               width=width)
        lines.append(f"This lists {sum(len(v) for v in groups.values())} of {len(opts)} options; "
                     "`treg train --help-all` prints every TrainingArguments field.")
    return "\n".join(lines).rstrip() + "\n"
