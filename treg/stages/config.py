"""``TRegConfig``: ``transformers.TrainingArguments`` + the T-REG method fields (docs/training.md).

Names shared with TRL 1.16 ``DPOConfig`` mean the same thing there and here: ``beta``, ``loss_type``
(mapped to ``method`` through the registry's ``trl_loss_type``), ``max_length`` (default 1024),
``truncation_mode``, ``precompute_ref_log_probs``, ``precompute_ref_batch_size``, ``disable_dropout``,
``model_init_kwargs``, ``trust_remote_code``, ``dataset_num_proc``, ``label_smoothing`` /
``loss_weights`` (only their no-op values), ``learning_rate`` (1e-6), ``logging_steps`` (10).
``bf16`` and ``activation_checkpointing`` (alias ``gradient_checkpointing``) default to TRL's "on" when
training on a GPU and to off on CPU. Deliberate differences (the table "Coming from TRL" in
docs/training.md): ``precompute_ref_log_probs`` defaults to True (the reference is never held in
memory) and ``remove_unused_columns`` to False (the collator needs every column).
:meth:`TRegConfig.from_dpo_config` converts a ``trl.DPOConfig``.

:func:`parse_config` reads a YAML file and applies command-line overrides on top of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments

from treg.errors import TregError
from treg.io.loading import DTYPES
from treg.io.packing import PACKED_ATTENTION
from treg.method.losses import PREFERENCE_LOSSES, WEIGHTINGS
from treg.validate import check_fields

# Ranges of numeric fields (treg.validate.in_range); every field's type and finiteness is checked from its
# annotation, these add the bounds. Checked before TrainingArguments' own __post_init__ and any model load.
RANGES = {
    "learning_rate": "> 0", "beta": "> 0", "gamma": ">= 0", "alpha": ">= 0", "max_length": ">= 2",
    "pad_to_multiple_of": ">= 1", "precompute_ref_batch_size": ">= 1", "logprob_chunk_size": ">= 0",
    "lora_r": ">= 1", "lora_alpha": "> 0", "lora_dropout": "[0, 1)", "num_train_epochs": "> 0",
    "max_steps": ">= -1", "per_device_train_batch_size": ">= 1", "per_device_eval_batch_size": ">= 1",
    "gradient_accumulation_steps": ">= 1", "weight_decay": ">= 0", "max_grad_norm": ">= 0",
    "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)", "adam_epsilon": "> 0", "warmup_steps": ">= 0",
    "logging_steps": "> 0", "save_steps": "> 0", "eval_steps": "> 0", "seed": ">= 0", "data_seed": ">= 0",
    "save_total_limit": ">= 0", "dataloader_num_workers": ">= 0", "dataset_num_proc": ">= 1",
}


# TRL DPOConfig names TRegConfig accepts besides its own and TrainingArguments' (`treg train --help` names them
# on one line; --help-all shows their help)
TRL_NAMES = ("loss_type", "label_smoothing", "loss_weights", "model_init_kwargs", "trust_remote_code",
             "dataset_num_proc")


def _f(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


def _choices_help(intro: str, registry: dict) -> str:
    """``--help`` text listing a registry's entries with their one-line docs (the registry is the source)."""
    return intro + " " + "; ".join(f"{name}: {entry.doc}" for name, entry in registry.items()) + "."


@dataclass
class TRegConfig(TrainingArguments):
    """TrainingArguments plus the method, data, reference, PEFT and model-loading fields."""

    # -- overridden TrainingArguments defaults (see module docstring)
    learning_rate: float = _f(1e-6, "Initial AdamW learning rate (DPOConfig default 1e-6).")
    logging_steps: float = _f(10, "Log every X update steps (int, or a float in [0, 1) = ratio of all steps).")
    remove_unused_columns: bool = _f(False, "Keep False: the pair collator needs every dataset column.")
    bf16: bool | None = _f(None, "bf16 mixed precision. Default: on when training on a GPU that supports it "
                                 "(as TRL), off on CPU.")
    activation_checkpointing: bool | None = _f(None, "Recompute activations in the backward to save memory. "
                                                     "Default: on when training on a GPU (as TRL), off on CPU.",
                                               nargs="?", const=True)

    # -- model and data
    model_name_or_path: str | None = _f(None, "Policy model to train (local directory or hub id); the "
                                              "reference is this model before training.")
    dtype: str = _f("auto", "dtype the model weights are loaded in (mixed precision is bf16/fp16).",
                    choices=list(DTYPES))
    attn_implementation: str | None = _f(None, "Attention kernel for from_pretrained (eager, sdpa, flash_attention_2; "
                                               "default: transformers' choice; SimPO's Gemma-2: eager).")
    dataset_path: str | None = _f(None, "Annotated training dataset directory (written by 'treg annotate').")
    eval_dataset_path: str | None = _f(None, "Annotated evaluation dataset directory (optional).")
    max_length: int | None = _f(1024, "Max tokens of prompt + response per sequence; longer ones are cut "
                                      "as in TRL DPOConfig (see truncation_mode). None: no truncation.")
    truncation_mode: str = _f("keep_start", "keep_start: keep the first max_length tokens (pairs whose prompt "
                                            "fills max_length are dropped); keep_end: keep the last ones.",
                              choices=["keep_start", "keep_end"])
    pad_to_multiple_of: int | None = _f(None, "Pad batch length to a multiple of this (e.g. 8 on tensor cores).")
    padding_free: bool = _f(False, "Pack each batch in one row: no padding computed.")

    # -- the method (METHOD.md §3-§5)
    method: str = _f("dpo", _choices_help("Pairwise loss (treg.method.losses.PREFERENCE_LOSSES).", PREFERENCE_LOSSES),
                     choices=list(PREFERENCE_LOSSES))
    beta: float = _f(0.1, "beta: scale of the implicit reward (DPO 0.1 typical; SimPO uses e.g. 2-10).")
    gamma: float = _f(0.0, "Target margin gamma (absolute, not gamma/beta) for methods that use one (simpo); "
                           "must stay 0 for the others.")
    alpha: float = _f(0.25, "Weight of the token-level regularizer L_REG (0 = plain DPO/SimPO; the paper "
                            "searches 0.1, 0.25, 0.5).")
    weighting: str = _f("sequence", _choices_help("Per-pair weight w of the regularizer.", WEIGHTINGS),
                        choices=list(WEIGHTINGS))

    # -- reference log-probs
    precompute_ref_log_probs: bool = _f(True, "Compute reference log-probs once before training (when the data "
                                              "lacks them) so only the policy is held in memory. False: score "
                                              "the reference every step (PEFT: adapters off; else a frozen copy).")
    precompute_ref_batch_size: int | None = _f(None, "Pairs per forward of the reference pass (default: a "
                                                     "token budget, 2048 on CPU, 16384 on GPUs).")
    ref_cache_dir: str | None = _f(None, "Reference-pass cache, re-used by reruns (default: output_dir/ref_cache).")
    logprob_chunk_size: int = _f(512, "Token rows per output-head chunk: no whole (B, T, V) float32 logits; "
                                      "0 = full logits (faster on a GPU if memory allows).")
    disable_dropout: bool = _f(True, "Turn dropout off in the policy (as TRL DPOConfig does).")

    # -- PEFT / LoRA
    use_peft: bool = _f(False, "Train a LoRA adapter instead of all weights (needs 'peft').")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA scaling alpha.")
    lora_dropout: float = _f(0.0, "LoRA dropout (forced to 0 when disable_dropout is set).")
    lora_target_modules: list[str] | None = _f(None, "Module names to adapt (default: all linear layers "
                                                     "except the LM head).")

    # -- TRL DPOConfig names (docs/training.md "Coming from TRL"; `treg train --help-all` lists them)
    loss_type: list[str] | None = _f(None, "TRL's name of the method (DPOConfig.loss_type; sigmoid = dpo); "
                                           "default: the method's.")
    label_smoothing: float = _f(0.0, "TRL DPOConfig name; only 0 (no smoothing) is supported.")
    loss_weights: list[float] | None = _f(None, "TRL DPOConfig name; only one loss of weight 1.")
    model_init_kwargs: dict | str | None = _f(None, "from_pretrained keywords (dtype, revision, ...) for a model "
                                                    "given to the trainer by name or path.")
    trust_remote_code: bool = _f(False, "Let a model given by name or path run its own code.")
    dataset_num_proc: int | None = _f(None, "Processes for tokenizing a TRL-format dataset.")

    # -- safety
    allow_pickle_weights: bool = _f(False, "Also load pickle-only model dirs (pytorch_model.bin), weights_only=True; "
                                           "default: safetensors only (convert: python -m treg.io.weights DIR).")

    def __post_init__(self):
        if isinstance(self.loss_type, str):  # DPOConfig accepts one name or a list
            self.loss_type = [self.loss_type]
        if isinstance(self.model_init_kwargs, str):  # from the command line / YAML as JSON
            try:
                self.model_init_kwargs = json.loads(self.model_init_kwargs)
            except json.JSONDecodeError as err:
                raise TregError(f"not a JSON object ({err})", field="model_init_kwargs") from None
        check_fields(self, RANGES)
        self._trl_names()
        self._device_defaults()
        checks = [
            (self.method in PREFERENCE_LOSSES, "method",
             f"unknown method '{self.method}' (choose {', '.join(PREFERENCE_LOSSES)})"),
            (self.weighting in WEIGHTINGS, "weighting",
             f"unknown weighting '{self.weighting}' (choose {', '.join(WEIGHTINGS)})"),
            (self.dtype in DTYPES, "dtype", f"unknown dtype '{self.dtype}' (choose {', '.join(DTYPES)})"),
            (self.truncation_mode in ("keep_start", "keep_end"), "truncation_mode",
             f"unknown truncation_mode '{self.truncation_mode}' (choose keep_start, keep_end)"),
            (not self.padding_free or self.attn_implementation in (None, *PACKED_ATTENTION), "padding_free",
             f"padding_free needs an attention that separates packed sequences ({', '.join(PACKED_ATTENTION)}), "
             f"not attn_implementation '{self.attn_implementation}'"),
            (self.gamma == 0 or self.method not in PREFERENCE_LOSSES or PREFERENCE_LOSSES[self.method].uses_gamma,
             "gamma", f"gamma={self.gamma} but method '{self.method}' has no target margin (leave gamma at 0)"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise TregError(message, field=name)
        if self.lora_target_modules is None and self.use_peft:
            self.lora_target_modules = ["all-linear"]
        super().__post_init__()

    def _trl_names(self) -> None:
        """DPOConfig's loss fields: ``loss_type`` -> ``method`` via the registry; the rest only at no-op values."""
        if self.loss_type is not None:
            if len(self.loss_type) != 1:
                raise TregError(f"loss_type {self.loss_type}: combining several losses is not supported "
                                "(give one)", field="loss_type")
            by_trl = {e.trl_loss_type: name for name, e in PREFERENCE_LOSSES.items() if e.trl_loss_type}
            wanted = self.loss_type[0]
            if wanted not in by_trl:
                raise TregError(f"loss_type '{wanted}' has no treg method (supported: "
                                f"{', '.join(f'{t} ({m})' for t, m in by_trl.items())})", field="loss_type")
            default_method = next(f.default for f in dataclasses.fields(TRegConfig) if f.name == "method")
            if self.method not in (default_method, by_trl[wanted]):
                raise TregError(f"loss_type '{wanted}' means method '{by_trl[wanted]}' but method is "
                                f"'{self.method}' (set one of them)", field="loss_type")
            self.method = by_trl[wanted]
        if self.label_smoothing != 0:
            raise TregError(f"label_smoothing={self.label_smoothing} is not implemented (TRL 1.16 uses it only "
                            "for loss types treg lacks); leave it 0", field="label_smoothing")
        if self.loss_weights is not None and list(self.loss_weights) != [1.0]:
            raise TregError(f"loss_weights {self.loss_weights}: only one loss of weight 1 is supported",
                            field="loss_weights")

    def _device_defaults(self) -> None:
        """TRL's bf16 / activation-checkpointing defaults (on) when training on a GPU; off on CPU."""
        import torch
        gpu = not self.use_cpu and torch.cuda.is_available()
        if self.bf16 is None:
            self.bf16 = gpu and not self.fp16 and torch.cuda.is_bf16_supported()
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = gpu

    @classmethod
    def from_dpo_config(cls, dpo_config, **overrides) -> "TRegConfig":
        """A TRegConfig with every field of a ``trl.DPOConfig`` (``overrides``, e.g. ``alpha=...``, on top).

        A DPOConfig field treg does not have is accepted only at DPOConfig's default value (it then changes
        nothing); otherwise one TregError names it. TRL's resolved values (e.g. ``bf16``) are copied as such.
        """
        return cls(**dpo_config_kwargs(dpo_config, cls, overrides))


def _declared_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def dpo_config_kwargs(dpo_config, cls=TRegConfig, overrides: dict | None = None) -> dict:
    """``cls(**kwargs)`` arguments equivalent to ``dpo_config`` (see :meth:`TRegConfig.from_dpo_config`).

    A field at DPOConfig's declared default is passed as declared (so TRL's own defaults carry over, e.g.
    ``precompute_ref_log_probs=False``), any other as its value (so what DPOConfig resolved, e.g.
    ``bf16=True`` unless fp16, stays). A non-default field ``cls`` lacks is a TregError naming it."""
    overrides = dict(overrides or {})
    ours = {f.name for f in dataclasses.fields(cls) if f.init}
    for name in overrides:
        if name not in ours:
            raise TregError("unknown TRegConfig field", field=name)
    dpo_fields = [f for f in dataclasses.fields(dpo_config) if f.init]
    kwargs = {}
    for f in dpo_fields:
        value, default = getattr(dpo_config, f.name), _declared_default(f)
        changed = value != default
        if f.name not in ours:
            if changed:
                raise TregError(f"DPOConfig.{f.name}={value!r} has no treg equivalent (leave it at {default!r})",
                                field=f.name)
            continue
        if dataclasses.is_dataclass(value) and not isinstance(value, type):  # e.g. AcceleratorConfig -> dict
            value = dataclasses.asdict(value)
        kwargs[f.name] = getattr(value, "value", value) if changed else default  # enums -> their value
    if "method" in overrides and "loss_type" not in overrides:
        kwargs.pop("loss_type", None)  # the override names the method
    kwargs.update(overrides)
    return kwargs


class _Parser(HfArgumentParser):
    """An HfArgumentParser whose errors are TregErrors (one line, exit 2) instead of usage dumps."""

    def error(self, message):
        raise TregError(message)


def config_parser(prog: str = "treg train") -> HfArgumentParser:
    """The parser behind ``treg train``: every TRegConfig field as ``--name`` with its help text."""
    parser = _Parser(TRegConfig, prog=prog, description="Train DPO/SimPO with token-level reward "
                     "regularization (T-REG). Options come from --config YAML, then the command line.")
    parser.add_argument("--config", default=None, help="YAML file of TRegConfig fields; command-line "
                        "options override it.")
    return parser


def parse_config(argv: list[str], prog: str = "treg train", require: tuple[str, ...] = ()) -> TRegConfig:
    """``--config run.yaml`` (optional) then ``--field value`` overrides -> a validated TRegConfig.

    Unknown YAML keys, unreadable YAML and invalid values raise :class:`TregError` naming the
    file and key; so does a field of ``require`` given neither in the YAML nor on the command line.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = config_parser(prog)
    from_yaml = load_yaml(known.config) if known.config else {}
    given = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    for name in require:
        if name not in given and from_yaml.get(name) is None and "-h" not in argv and "--help" not in argv:
            raise TregError(f"--{name} is required (on the command line or in the --config YAML)", field=name)
    parser.set_defaults(**from_yaml)
    try:
        parsed = parser.parse_args_into_dataclasses(argv, look_for_args_file=False, return_remaining_strings=True)
        config, unknown = parsed[0], parsed[-1]  # (TRegConfig, [namespace of --config], remaining strings)
    except TregError as err:  # argparse ("argument --alpha: invalid float value: 'abc'") or check_fields
        match = re.match(r"argument --([\w-]+)", err.bare_message)
        name = match.group(1).replace("-", "_") if match else err.field
        if name in from_yaml and not any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv):
            raise TregError(err.bare_message.split(": ", 1)[-1] if match else err.bare_message,
                            file=known.config, field=name) from None
        raise
    except (ValueError, TypeError) as err:  # TrainingArguments.__post_init__ (YAML or command line)
        raise TregError(str(err).splitlines()[0], file=known.config) from None
    if unknown:
        raise TregError(f"unknown option(s) {' '.join(unknown)} (see '{prog} --help')")
    return config


def load_yaml(path: str) -> dict:
    """Read a YAML mapping of TRegConfig fields; TregError on a missing file, bad YAML or unknown key."""
    from treg.io.fsutil import read_yaml_mapping
    data = read_yaml_mapping(path)
    names = {f.name for f in dataclasses.fields(TRegConfig) if f.init}
    for key in data:
        if key not in names:
            raise TregError("unknown option (see 'treg train --help')", file=path, field=str(key))
    return data
