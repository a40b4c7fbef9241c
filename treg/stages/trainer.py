"""``TRegTrainer``: a ``transformers.Trainer`` whose loss is T-REG (METHOD.md §3-§4).

One training step = one forward of the concatenated batch ``[chosen; rejected]`` (see
:class:`treg.io.data.PairCollator`) -> per-token log-probs ``(2B, L)`` via
:func:`treg.method.logprobs.model_token_logps` -> split -> :func:`treg.method.losses.treg_loss`. Everything else
(optimizer, schedule, gradient accumulation, checkpoints, resume, DDP/DeepSpeed/FSDP through
accelerate, report_to) is the stock Trainer.

Reference log-probs (DPO only): taken from the data when present (``ref_*_logps`` columns);
otherwise, with ``precompute_ref_log_probs`` (default), computed once in ``__init__`` with the
initial model in eval mode and no grad (PEFT: adapters disabled) and stored as dataset columns,
so only the policy is held during training. With ``precompute_ref_log_probs=False`` they are
scored every step (PEFT: adapters disabled; full fine-tuning: a frozen copy of the initial model).

Loss scaling: ``compute_loss`` returns the mean over the pairs of the micro-batch, so the
Trainer divides it by the accumulation steps (``loss_is_scaled_for_ga = False``, as TRL's
DPOTrainer); with equal micro-batches, k accumulated micro-batches of b pairs give the loss and
gradient of one batch of k*b pairs. Under DDP gradients are averaged over processes: the same
holds for the global batch.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import defaultdict

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import set_seed

from treg.stages.config import TRegConfig
from treg.io.data import PairCollator, response_window, truncate_pairs
from treg.io.schema import IDS, PROMPT, REF_SUM, REF_TOK, REWARD_COLUMNS, SIDES, required_columns
from treg.errors import TregError
from treg.io.loading import pad_token_id
from treg.method.losses import PREFERENCE_LOSSES, needs_token_rewards, treg_loss
from treg.io.packing import make_collator, token_logps

logger = logging.getLogger(__name__)

# Fixed order so that every process gathers the same vector (a metric a process lacks weighs 0).
METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "treg/pref_loss", "treg/reg_loss", "treg/seq_weight", "treg/token_reward_mean_chosen",
               "treg/token_reward_mean_rejected", "treg/credit_agreement")
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
    """Trainer for DPO/SimPO with token-level reward regularization.

    ``train_dataset`` / ``eval_dataset``: validated annotated datasets (:func:`treg.io.data.load_annotated`);
    truncation to ``args.max_length`` happens here (pairs it empties are dropped and counted in
    ``self.dropped_pairs`` and the ``data/dropped_pairs`` log entry). ``processing_class``: the
    tokenizer (for its pad id; saved with checkpoints). ``peft_config``: optional; built from
    ``args.use_peft``/``lora_*`` when not given.
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean over pairs

    def __init__(self, model, args: TRegConfig, train_dataset, eval_dataset=None, processing_class=None,
                 callbacks=None, optimizers=(None, None), peft_config=None):
        if processing_class is None:
            raise ValueError("TRegTrainer needs processing_class (the tokenizer) for its pad token id")
        pad_id = pad_token_id(processing_class)
        need = required_columns(need_token_rewards=needs_token_rewards(args.alpha))
        missing = [c for c in need if c not in train_dataset.column_names]
        if missing:
            why = f"alpha={args.alpha} needs token rewards" if missing[0] in REWARD_COLUMNS else "not an annotated dataset"
            raise TregError(f"{why}; the dataset has no '{missing[0]}' (run 'treg annotate'"
                            f"{', or set alpha 0' if missing[0] in REWARD_COLUMNS else ''})", field=missing[0])
        check_report_to(args)
        if peft_config is None and args.use_peft:
            peft_config = lora_config(args)
        if peft_config is not None:
            from peft import get_peft_model
            set_seed(args.seed)  # LoRA init draws from the global RNG
            model = get_peft_model(model, peft_config)
        if args.disable_dropout:
            disable_dropout(model)
        if is_peft_model(model) and args.gradient_checkpointing:
            model.enable_input_require_grads()
        train_dataset, self.dropped_pairs = truncate_pairs(train_dataset, args.max_length, args.truncation_mode)
        if eval_dataset is not None:
            eval_dataset, _ = truncate_pairs(eval_dataset, args.max_length, args.truncation_mode)
        needs_ref = PREFERENCE_LOSSES[args.method].needs_ref
        in_data = all(REF_SUM[s] in d.column_names for d in (train_dataset, eval_dataset) if d is not None
                      for s in SIDES)
        live_copy = None  # full fine-tuning scored against the reference every step: a frozen copy
        if needs_ref and not in_data and not args.precompute_ref_log_probs and not is_peft_model(model):
            live_copy = copy.deepcopy(model).eval().requires_grad_(False)
        collator = make_collator(args, pad_id)  # PairCollator, or PackedPairCollator with padding_free
        super().__init__(model=model, args=args, data_collator=collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers)
        self._metrics = {m: defaultdict(lambda: [0.0, 0.0]) for m in ("train", "eval")}  # key -> [sum v*w, sum w]
        self.ref_model = None
        if live_copy is not None:
            self.ref_model = self.accelerator.prepare_model(live_copy.to(self.args.device), evaluation_mode=True)
        if needs_ref and args.precompute_ref_log_probs:
            self.train_dataset = self._add_reference(self.train_dataset, "train")
            if self.eval_dataset is not None:
                self.eval_dataset = self._add_reference(self.eval_dataset, "eval")

    # ---------------------------------------------------------------------------------------
    # log-probs and the reference
    # ---------------------------------------------------------------------------------------
    def _token_logps(self, model, batch) -> torch.Tensor:
        """(2B, L) float32 log p(ids[t] | ids[<t]) at response positions of the collated batch, 0 elsewhere."""
        # padded or packed (padding_free: computed on the packed row, scattered back to (2B, L))
        return token_logps(model, batch, chunk_size=self.args.logprob_chunk_size or 512,
                           naive=self.args.logprob_chunk_size == 0)

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
            eval_dataset, _ = truncate_pairs(eval_dataset, self.args.max_length, self.args.truncation_mode)
            if PREFERENCE_LOSSES[self.args.method].needs_ref and self.args.precompute_ref_log_probs:
                eval_dataset = self._add_reference(eval_dataset, "eval")
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                metric_key_prefix=metric_key_prefix)

    def _add_reference(self, dataset, name: str):
        """Add ref_{chosen,rejected}_logps (+ per-token) columns unless present: one no-grad pass.

        Each process scores every ``world``-th row; rows are gathered so all processes hold the
        full columns. Per-token values are stored per response token (0 where truncation cut it).
        """
        if all(REF_SUM[s] in dataset.column_names for s in SIDES):
            return dataset
        if self.state.global_step > 0 and not is_peft_model(self.accelerator.unwrap_model(self.model)):
            raise TregError(f"the {name} dataset has no reference log-probs and the policy has already been "
                            "trained; pass it before training or add ref_*_logps columns",
                            field="precompute_ref_log_probs")
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            raise TregError("with DeepSpeed ZeRO-3, store reference log-probs in the data first "
                            "('treg annotate' writes ref_*_logps)", field="precompute_ref_log_probs")
        dataset = dataset.remove_columns([c for c in (*REF_SUM.values(), *REF_TOK.values())
                                          if c in dataset.column_names])
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        rows = list(range(rank, len(dataset), world))
        loader = DataLoader(dataset.select(rows), batch_size=self.args.precompute_ref_batch_size
                            or self.args.per_device_eval_batch_size, collate_fn=self.data_collator)
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        results, at = [], 0
        max_len, mode = self.args.max_length, self.args.truncation_mode
        with self.accelerator.autocast():
            for batch in loader:
                batch = {k: v.to(self.args.device) for k, v in batch.items()}
                tok = self._reference_logps(batch).float().cpu()   # (2B, L)
                b = tok.shape[0] // 2
                for i in range(b):
                    row = dataset[rows[at + i]]
                    out = {"index": rows[at + i]}
                    for k, side in enumerate(SIDES):
                        values = np.zeros(len(row[IDS[side]]), dtype=np.float32)
                        pos0, lo, hi = response_window(len(row[PROMPT]), len(values), max_len, mode)
                        values[lo:hi] = tok[k * b + i, pos0 + lo:pos0 + hi].numpy()
                        out[REF_TOK[side]] = values
                        out[REF_SUM[side]] = float(tok[k * b + i].sum())  # == sum(values)
                    results.append(out)
                at += b
        model.train(was_training)
        if world > 1:
            from accelerate.utils import gather_object
            results = gather_object(results)
        results.sort(key=lambda r: r["index"])
        for column in (*REF_SUM.values(), *REF_TOK.values()):
            dataset = dataset.add_column(column, [r[column] for r in results])
        logger.info("computed reference log-probs for %d %s pairs", len(results), name)
        return dataset

    # ---------------------------------------------------------------------------------------
    # the loss
    # ---------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean T-REG loss over the B pairs of ``inputs`` (collated ``[chosen; rejected]``)."""
        args = self.args
        logps = self._token_logps(model, inputs)                  # (2B, L): logp(y_t) at response positions
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
        self._record("train" if model.training else "eval", out.metrics, weights, pairs=b)
        return (out.loss, out) if return_outputs else out.loss

    def _record(self, mode: str, metrics: dict[str, float], weights: dict, *, pairs: int) -> None:
        """Accumulate ``(sum of value * weight, sum of weight)`` per metric over micro-batches, steps and
        processes, so that a logged value is the mean over everything it covers: k accumulated
        micro-batches give the big batch's value, and token-pooled metrics stay pooled over tokens.
        ``weights``: metric -> count it averages over (default ``pairs``); absent metrics weigh 0."""
        keys = list(METRIC_KEYS) + sorted(k for k in metrics if k not in METRIC_KEYS)
        device = self.accelerator.device
        w = torch.stack([torch.as_tensor(weights.get(k, pairs) if k in metrics else 0, dtype=torch.float32)
                         .to(device) for k in keys])
        v = torch.tensor([metrics.get(k, 0.0) for k in keys], dtype=torch.float32, device=device)
        both = torch.stack([v * w, w])                                   # (2, K)
        if self.accelerator.num_processes > 1:
            both = self.accelerator.gather(both[None]).sum(0)
        for key, (vw, wt) in zip(keys, both.t().tolist()):
            if wt > 0:  # the metric exists for this step
                acc = self._metrics[mode][key]
                acc[0] += vw
                acc[1] += wt

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the metrics since the last log (weighted means, see ``_record``), then log."""
        mode = "train" if self.model.training else "eval"
        metrics = {key: vw / wt for key, (vw, wt) in self._metrics[mode].items()}
        if mode == "train":
            metrics["data/dropped_pairs"] = float(self.dropped_pairs)
        else:
            metrics = {f"eval_{key}": v for key, v in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the loss only (no logits; the batch has no labels)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(_COLUMNS)
