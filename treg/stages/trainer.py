"""``TRegTrainer``: a ``transformers.Trainer`` whose loss is T-REG (METHOD.md §3-§4).

One training step = one forward of the concatenated batch ``[chosen; rejected]`` (see
:class:`treg.io.data.PairCollator`) -> per-token log-probs ``(2B, L)`` via
:func:`treg.method.logprobs.model_token_logps` -> split -> :func:`treg.method.losses.treg_loss`. Everything else
(optimizer, schedule, gradient accumulation, checkpoints, resume, DDP/DeepSpeed/FSDP through
accelerate, report_to) is the stock Trainer. The constructor is ``trl.DPOTrainer`` 1.16's (names, order,
model names/paths, TRL-format datasets: :mod:`treg.stages.trl_data`), and the metrics include TRL's.

Reference log-probs (DPO only): taken from the data when present (``ref_*_logps`` columns);
otherwise, with ``precompute_ref_log_probs`` (default), computed once in ``__init__`` with the
initial model in eval mode and no grad (PEFT: adapters disabled) and stored as dataset columns,
so only the policy is held during training; token rewards missing with alpha > 0 are computed in
the same pass; cached on disk and resumable (:mod:`treg.stages.reference`). With
``precompute_ref_log_probs=False`` they are scored every step (PEFT: adapters disabled; full
fine-tuning: a frozen copy of the initial model).

Loss scaling: ``compute_loss`` returns the mean over the pairs of the micro-batch, so the
Trainer divides it by the accumulation steps (``loss_is_scaled_for_ga = False``, as TRL's
DPOTrainer); with equal micro-batches, k accumulated micro-batches of b pairs give the loss and
gradient of one batch of k*b pairs. Under DDP gradients are averaged over processes: the same
holds for the global batch.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import set_seed

from treg.stages.config import TRegConfig
from treg.stages.trl_data import check_args, eval_list, map_eval, prepare_dataset, resolve_model
from treg.io.data import truncate_pairs
from treg.io.schema import IDS, PROMPT, REF_SUM, REF_TOK, REWARD_COLUMNS, SIDES
from treg.errors import TregError
from treg.io.loading import pad_token_id
from treg.method.losses import PREFERENCE_LOSSES, treg_loss
from treg.io.packing import make_collator, token_logps

logger = logging.getLogger(__name__)

# Fixed order so that every process gathers the same vector (a metric a process lacks weighs 0).
METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy",
               "treg/pref_loss", "treg/reg_loss", "treg/seq_weight", "treg/token_reward_mean_chosen",
               "treg/token_reward_mean_rejected", "treg/credit_agreement")
_TOKENS = "_tokens"  # non-pad tokens of a training micro-batch: summed into the cumulative ``num_tokens``
RUN_LOSS_FILE = "treg_run_loss.json"  # in each checkpoint: summed loss of steps 1..N (whole-run summaries)
_COLUMNS = [PROMPT, *IDS.values(), *REWARD_COLUMNS, *REF_SUM.values(), *REF_TOK.values()]


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def lora_config(args: TRegConfig):
    """The LoRA config described by ``args`` (``use_peft`` and ``lora_*`` fields)."""
    try:
        from peft import LoraConfig
    except ImportError:
        from treg.extras import install_hint
        raise TregError(f"use_peft needs the optional package 'peft': {install_hint('peft')}", field="use_peft") \
            from None
    targets = args.lora_target_modules or ["all-linear"]
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets[0] if targets == ["all-linear"] else targets, task_type="CAUSAL_LM")


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (``nn.Dropout`` modules and attention-dropout floats), as TRL."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def push_final(trainer, output_dir, names: list[str]) -> None:
    """Upload the final model files ``names`` (top-level entries of ``output_dir``) to the repository
    the Trainer created (``hub_model_id``), and nothing else of ``output_dir`` (no checkpoints, no
    temporary copies). Waits for checkpoint pushes still running first."""
    from huggingface_hub import upload_folder
    trainer._finish_current_push()
    allow = [p for n in names for p in (n, f"{n}/**")]
    upload_folder(repo_id=trainer.hub_model_id, folder_path=str(output_dir), allow_patterns=allow,
                  commit_message="End of training", token=trainer.args.hub_token,
                  revision=trainer.args.hub_revision)


def check_report_to(args) -> None:
    """A ``report_to`` integration, DeepSpeed or Liger kernels asked for but not installed is a user
    mistake (one line naming the extra that installs it), not a traceback."""
    from transformers.integrations import get_available_reporting_integrations
    from treg.extras import available, install_hint
    wanted = [args.report_to] if isinstance(args.report_to, str) else list(args.report_to or [])
    installed = set(get_available_reporting_integrations())
    for name in wanted:
        if name not in ("none", "all") and name not in installed:
            raise TregError(f"'{name}' is not installed ({install_hint(name)}), or drop it from report_to",
                            field="report_to")
    if getattr(args, "deepspeed", None) and not available("deepspeed"):
        raise TregError(f"deepspeed is set but the optional package 'deepspeed' is not installed: "
                        f"{install_hint('deepspeed')}", field="deepspeed")
    if getattr(args, "use_liger_kernel", False) and not available("liger_kernel"):
        raise TregError(f"use_liger_kernel needs the optional package 'liger-kernel': {install_hint('liger_kernel')}",
                        field="use_liger_kernel")


class TRegTrainer(Trainer):
    """Trainer for DPO/SimPO with token-level reward regularization; a drop-in for ``trl.DPOTrainer`` 1.16.

    The arguments are ``trl.DPOTrainer``'s, in its order. ``model``: a model, or a name/path loaded with
    ``args.model_init_kwargs`` (and ``quantization_config``). ``ref_model``: optional reference; default:
    the initial policy (PEFT: adapters disabled), scored once before training (``precompute_ref_log_probs``)
    or every step. ``args``: a :class:`TRegConfig` (``TRegConfig.from_dpo_config`` converts a DPOConfig;
    None: defaults, output in ``<model name>-TReg``). ``train_dataset`` / ``eval_dataset``: a TRL
    preference dataset in any TRL format (:mod:`treg.stages.trl_data`) or treg's annotated dataset;
    truncation to ``args.max_length`` happens here (pairs it empties are dropped and counted in
    ``self.dropped_pairs`` and the ``data/dropped_pairs`` log entry). ``processing_class``: the tokenizer
    (default: loaded from the model's name/path). ``data_collator``: default :class:`PairCollator` (a
    custom one gets treg's rows and must return its keys). ``peft_config``: optional; built from
    ``args.use_peft``/``lora_*`` when not given. ``compute_metrics``, ``callbacks``, ``optimizers``: as Trainer.
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean over pairs

    def __init__(self, model, ref_model=None, args: TRegConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None):
        if isinstance(ref_model, TrainingArguments):
            raise TregError("got the config as ref_model: TRegTrainer takes trl.DPOTrainer's arguments (model, "
                            "ref_model, args, data_collator, train_dataset, ...); pass args= and train_dataset= "
                            "by name", field="ref_model")
        args = check_args(args, model)
        if train_dataset is None:
            raise TregError("train_dataset is required", field="train_dataset")
        check_report_to(args)
        set_seed(args.seed)  # LoRA init and anything else drawn while building draws from the global RNG
        model, processing_class = resolve_model(model, args, processing_class, quantization_config)
        if ref_model is not None and ref_model is model:
            raise TregError("model and ref_model are the same object; omit ref_model to use the initial model",
                            field="ref_model")
        pad_id = pad_token_id(processing_class)
        num_proc = args.dataset_num_proc
        train_dataset = prepare_dataset(train_dataset, processing_class, num_proc=num_proc, name="train")
        eval_dataset = map_eval(eval_dataset, lambda d, n: prepare_dataset(d, processing_class, num_proc=num_proc,
                                                                            name=n))
        if peft_config is None and args.use_peft:
            peft_config = lora_config(args)
        if peft_config is not None:
            if is_peft_model(model):
                raise TregError("the model is already a PeftModel and a peft_config is given (give one)",
                                field="peft_config")
            from peft import get_peft_model
            model = get_peft_model(model, peft_config)
        if args.disable_dropout:
            disable_dropout(model)
            if ref_model is not None:
                disable_dropout(ref_model)
        if is_peft_model(model) and args.gradient_checkpointing:
            model.enable_input_require_grads()
        if args.use_liger_kernel:  # layer kernels only: the fused LM-head loss would replace the forward
            args.liger_kernel_config = {**(args.liger_kernel_config or {}), "fused_linear_cross_entropy": False}
        train_dataset, self.dropped_pairs = truncate_pairs(train_dataset, args.max_length, args.truncation_mode)
        eval_dataset = map_eval(eval_dataset, lambda d, n: truncate_pairs(d, args.max_length,
                                                                           args.truncation_mode)[0])
        needs_ref = PREFERENCE_LOSSES[args.method].needs_ref
        in_data = all(REF_SUM[s] in d.column_names for d in (train_dataset, *eval_list(eval_dataset))
                      for s in SIDES)
        if ref_model is None and needs_ref and not in_data and not args.precompute_ref_log_probs \
                and not is_peft_model(model):
            ref_model = copy.deepcopy(model)  # full fine-tuning scored against the reference every step
        collator = data_collator or make_collator(args, pad_id)  # PairCollator, or PackedPairCollator (padding_free)
        super().__init__(model=model, args=args, data_collator=collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers)
        self._metrics = {m: defaultdict(lambda: [0.0, 0.0]) for m in ("train", "eval")}  # key -> [sum v*w, sum w]
        self._total_train_tokens = 0
        self._resumed_loss, self.run_loss = (0.0, 0), None  # see train()
        self.ref_model = None
        if ref_model is not None and needs_ref:
            ref_model = ref_model.eval().requires_grad_(False)
            self.ref_model = self.accelerator.prepare_model(ref_model.to(self.args.device), evaluation_mode=True)
        # Reference log-probs and token rewards the data lacks (treg.stages.reference; no-op when none is missing)
        self.train_dataset = self._add_reference(self.train_dataset, "train")
        self.eval_dataset = map_eval(self.eval_dataset, lambda d, n: self._add_reference(d, n))

    # ---------------------------------------------------------------------------------------
    # log-probs and the reference
    # ---------------------------------------------------------------------------------------
    def _token_logps(self, model, batch, stats: dict | None = None) -> torch.Tensor:
        """(2B, L) float32 log p(ids[t] | ids[<t]) at response positions of the collated batch, 0 elsewhere;
        padded or packed (padding_free: computed on the packed row, scattered back to (2B, L)). ``stats``:
        filled with per-token entropy / mean logit / top-1 (treg.method.logprobs.STATS)."""
        return token_logps(model, batch, chunk_size=self.args.logprob_chunk_size or 512,
                           naive=self.args.logprob_chunk_size == 0, stats=stats)

    def _reference_context(self, model):
        """The initial model: PEFT adapters off; otherwise the model itself (before training)."""
        return model.disable_adapter() if is_peft_model(model) else contextlib.nullcontext()

    @torch.no_grad()
    def _reference_logps(self, batch) -> torch.Tensor:
        """(2B, L) reference per-token log-probs, zero outside the response mask."""
        if self.ref_model is not None:
            logps = self._token_logps(self.ref_model, batch)
        else:
            model = self.accelerator.unwrap_model(self.model)
            with self._reference_context(model):
                logps = self._token_logps(model, batch)
        return logps * batch["response_mask"]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """As Trainer.evaluate; a dataset passed here is truncated and given reference log-probs first."""
        if eval_dataset is not None and not isinstance(eval_dataset, (str, dict)):
            eval_dataset = prepare_dataset(eval_dataset, self.processing_class, num_proc=self.args.dataset_num_proc,
                                           name="eval")
            eval_dataset, _ = truncate_pairs(eval_dataset, self.args.max_length, self.args.truncation_mode)
            eval_dataset = self._add_reference(eval_dataset, "eval")
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                metric_key_prefix=metric_key_prefix)

    def _add_reference(self, dataset, name: str):
        """Reference log-probs (+ token rewards when alpha > 0 and the data has none) that ``dataset`` lacks:
        computed once, cached on disk, resumable, lockstep under ZeRO-3/FSDP (treg.stages.reference)."""
        from treg.stages.reference import add_reference
        return add_reference(self, dataset, name)

    # ---------------------------------------------------------------------------------------
    # the loss
    # ---------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean T-REG loss over the B pairs of ``inputs`` (collated ``[chosen; rejected]``)."""
        args = self.args
        stats = {}
        logps = self._token_logps(model, inputs, stats)           # (2B, L): logp(y_t) at response positions
        b = logps.shape[0] // 2
        mask = inputs["response_mask"].bool()                      # (2B, L)
        rewards = inputs.get("token_rewards")                      # (2B, L) r_hat or None
        ref_tok = inputs.get("ref_token_logps")                    # (2B, L) or None
        ref_w, ref_l = inputs.get(REF_SUM["chosen"]), inputs.get(REF_SUM["rejected"])  # (B,) or None
        if PREFERENCE_LOSSES[args.method].needs_ref and ref_w is None:  # live reference (no precompute)
            ref_tok = self._reference_logps(inputs)
            ref_w, ref_l = ref_tok[:b].sum(1), ref_tok[b:].sum(1)

        def halves(x):  # rows [chosen; rejected] -> (chosen, rejected); None stays None
            return (None, None) if x is None else (x[:b], x[b:])

        ref_tok_w, ref_tok_l = halves(ref_tok)
        out = treg_loss(*halves(logps), *halves(mask), *halves(rewards),  # METHOD.md §3 (dpo) / §4 (simpo)
                        ref_w, ref_l, method=args.method, beta=args.beta, gamma=args.gamma, alpha=args.alpha,
                        weighting=args.weighting, ref_chosen_token_logps=ref_tok_w, ref_rejected_token_logps=ref_tok_l)
        # What each metric is a mean over: pairs, except the token-pooled ones (losses.py).
        weights = {"treg/token_reward_mean_chosen": mask[:b].sum(), "treg/token_reward_mean_rejected": mask[b:].sum()}
        if rewards is not None:
            weights["treg/credit_agreement"] = (mask & (rewards != 0)).sum()
        self._trl_metrics(inputs, stats, mask, b, out.metrics, weights, training=model.training)
        self._record("train" if model.training else "eval", out.metrics, weights, pairs=b)
        return (out.loss, out) if return_outputs else out.loss

    @staticmethod
    def _trl_metrics(inputs, stats, mask, b: int, metrics: dict, weights: dict, *, training: bool) -> None:
        """TRL 1.16 DPOTrainer's extra metrics, pooled over response tokens: ``entropy`` (chosen and rejected),
        ``logits/chosen`` / ``logits/rejected`` (mean logit over the vocabulary), ``mean_token_accuracy``
        (chosen tokens that are the argmax); plus this micro-batch's non-pad tokens for ``num_tokens``."""
        m = mask.float()
        n_w, n_l = m[:b].sum(), m[b:].sum()
        pooled = {"entropy": ((stats["entropy"] * m).sum(), n_w + n_l),   # (sum over tokens, token count)
                  "logits/chosen": ((stats["mean_logit"] * m)[:b].sum(), n_w),
                  "logits/rejected": ((stats["mean_logit"] * m)[b:].sum(), n_l),
                  "mean_token_accuracy": ((stats["is_top1"] * m)[:b].sum(), n_w)}
        for key, (total, count) in pooled.items():  # tensors: no extra device sync (see _record)
            metrics[key], weights[key] = total / count.clamp(min=1), count
        if training:
            tokens = inputs["attention_mask"].sum().float()
            metrics[_TOKENS], weights[_TOKENS] = tokens, 1

    def _record(self, mode: str, metrics: dict[str, float], weights: dict, *, pairs: int) -> None:
        """Accumulate ``(sum of value * weight, sum of weight)`` per metric over micro-batches, steps and
        processes, so that a logged value is the mean over everything it covers: k accumulated
        micro-batches give the big batch's value, and token-pooled metrics stay pooled over tokens.
        ``weights``: metric -> count it averages over (default ``pairs``); absent metrics weigh 0. Values and
        weights may be floats or 0-d tensors (one device-to-host transfer for all of them)."""
        keys = [*METRIC_KEYS, _TOKENS] + sorted(k for k in metrics if k not in (*METRIC_KEYS, _TOKENS))
        device = self.accelerator.device
        w = torch.stack([torch.as_tensor(weights.get(k, pairs) if k in metrics else 0, dtype=torch.float32)
                         .to(device) for k in keys])
        v = torch.stack([torch.as_tensor(metrics.get(k, 0.0), dtype=torch.float32).to(device) for k in keys])
        both = torch.stack([v * w, w])                                   # (2, K)
        if self.accelerator.num_processes > 1:
            both = self.accelerator.gather(both[None]).sum(0)
        for key, (vw, wt) in zip(keys, both.t().tolist()):
            if key == _TOKENS:
                self._total_train_tokens += int(vw)  # summed over processes
            elif wt > 0:  # the metric exists for this step
                acc = self._metrics[mode][key]
                acc[0] += vw
                acc[1] += wt

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the metrics since the last log (weighted means, see ``_record``), then log."""
        mode = "train" if self.model.training else "eval"
        metrics = {key: vw / wt for key, (vw, wt) in self._metrics[mode].items()}
        metrics["num_tokens"] = float(self._total_train_tokens)  # cumulative training tokens, as TRL
        if mode == "train":
            metrics["data/dropped_pairs"] = float(self.dropped_pairs)
        else:
            metrics = {f"eval_{key}": v for key, v in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the loss; with ``compute_metrics`` (and not ``prediction_loss_only``) also the logits of
        an extra forward (2B, L, V) and ``input_ids`` as labels, as TRL."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
            if prediction_loss_only or self.compute_metrics is None:
                return loss.detach(), None, None
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           use_cache=False).logits
        return loss.detach(), logits, inputs["input_ids"]

    # ---------------------------------------------------------------------------------------
    # the whole run's mean loss across resumes
    # ---------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        """As Trainer; also records in the checkpoint the summed loss of every step so far (this run's logged
        and unlogged loss plus what the run resumed from), so that a resumed run can report the whole run."""
        unlogged = float(self.accelerator.gather(self._tr_loss.detach()[None]).mean())  # collective: every rank
        total = self._resumed_loss[0] + self._total_loss_scalar + unlogged
        super()._save_checkpoint(model, trial)
        if self.is_world_process_zero():
            from treg.io.fsutil import atomic_write_text
            folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            atomic_write_text(folder / RUN_LOSS_FILE, json.dumps({"loss_sum": total, "steps": self.state.global_step}))

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        """As Trainer.train; afterwards ``self.run_loss`` is the mean loss over every step of the run, the
        steps before a resume included (None when the checkpoint resumed from has no record of them)."""
        self._resumed_loss = (0.0, 0)
        if resume_from_checkpoint:
            from transformers.trainer_utils import get_last_checkpoint
            folder = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True \
                else resume_from_checkpoint
            try:
                saved = json.loads((Path(folder) / RUN_LOSS_FILE).read_text())
                self._resumed_loss = (float(saved["loss_sum"]), int(saved["steps"]))
            except (OSError, TypeError, ValueError, KeyError):
                self._resumed_loss = (float("nan"), -1)
        result = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                               ignore_keys_for_eval=ignore_keys_for_eval)
        prior, steps = self._resumed_loss
        now = self.state.global_step - steps
        total = prior + result.training_loss * now
        self.run_loss = total / self.state.global_step if self.state.global_step and math.isfinite(total) else None
        return result

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(_COLUMNS)
