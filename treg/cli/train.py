"""train DPO/SimPO with token-level reward regularization (T-REG) on an annotated dataset.

``treg train --config run.yaml [--alpha 0.25 ...]`` or all options on the command line; every
TRegConfig field is an option (``treg train --help`` shows T-REG's and the most used ones,
``--help-all`` all). The data is validated against the model's
tokenizer before anything is written; at the end the model (or LoRA adapter) and tokenizer are
saved to ``--output_dir`` and one summary line is printed. Multi-GPU / multi-node: run it under
``accelerate launch -m treg.cli train ...`` (see docs/training.md).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

REQUIRED = ("model_name_or_path", "dataset_path", "output_dir")
HELP_FLAGS = ("-h", "--help", "--help-all")  # short grouped help / everything (treg.cli.train_help)


def save_final(trainer, output_dir: str) -> None:
    """Save model + tokenizer into a temp dir beside the checkpoints, then rename each file into place;
    with ``push_to_hub``, then upload those final files (only them) to the hub repository."""
    out = Path(output_dir)
    tmp = out / ".final-tmp"  # same path on every rank (DeepSpeed/FSDP saves are collective)
    if trainer.is_world_process_zero() and tmp.exists():
        shutil.rmtree(tmp)
    # _internal_call: Trainer.save_model would otherwise push_to_hub here — re-saving into output_dir and
    # uploading it with this temporary copy inside
    try:
        trainer.save_model(str(tmp), _internal_call=True)
    except BaseException as err:  # a full disk or file-size limit: leave no half-written .final-tmp behind
        if trainer.is_world_process_zero():
            shutil.rmtree(tmp, ignore_errors=True)
        from treg.boundary import os_error_of
        os_err = os_error_of(err, str(out)) if isinstance(err, Exception) else None
        if os_err is not None and os_err is not err:
            raise os_err from None
        raise
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        names = sorted(item.name for item in tmp.iterdir())
        for item in tmp.iterdir():
            dest = out / item.name
            if dest.is_dir() and item.is_dir():
                shutil.rmtree(dest)
            os.replace(item, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        if trainer.args.push_to_hub:
            from treg.stages.trainer import push_final
            push_final(trainer, out, names)


def shutdown() -> None:
    """Tear down torch.distributed, all ranks together. Call it after dropping every reference to the
    trainer: the DDP reducer must be freed while its process group still exists, otherwise a worker
    can hang or abort at exit (seen with gloo on CPU)."""
    import gc

    import torch.distributed as dist
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    from treg.stages.config import parse_config
    if any(a in HELP_FLAGS for a in argv):
        from treg.cli.train_help import render
        from treg.stages.config import config_parser
        print(render(config_parser("treg train"), full="--help-all" in argv), end="")
        return 0
    config = parse_config(argv, prog="treg train", require=REQUIRED)
    from treg.io.fsutil import check_writable
    check_writable(config.output_dir)  # a read-only output_dir: one line now, not after the training
    from treg.io.loading import allow_pickle_weights
    allow_pickle_weights(config.allow_pickle_weights)
    from treg.io.data import load_annotated, truncate_pairs

    from treg.io.loading import load_causal_lm, load_tokenizer
    from treg.method.losses import needs_token_rewards
    tokenizer = load_tokenizer(config.model_name_or_path, field="model_name_or_path")
    need_rewards = needs_token_rewards(config.alpha)
    train_data = load_annotated(config.dataset_path, tokenizer, need_rewards=need_rewards).dataset
    eval_data = None
    if config.eval_dataset_path:
        eval_data = load_annotated(config.eval_dataset_path, tokenizer, need_rewards=need_rewards).dataset
    for data in (train_data, eval_data):  # fail on truncation problems before any directory is created
        if data is not None:
            truncate_pairs(data.select_columns(["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]),
                           config.max_length, config.truncation_mode)
    model = load_causal_lm(config.model_name_or_path, dtype=config.dtype, attn_implementation=config.attn_implementation,
                           field="model_name_or_path", eval_mode=False)

    from treg.stages.trainer import TRegTrainer
    start = time.time()
    trainer = TRegTrainer(model, args=config, train_dataset=train_data, eval_dataset=eval_data,
                          processing_class=tokenizer)
    result = trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    save_final(trainer, config.output_dir)
    if trainer.is_world_process_zero():
        pairs = len(trainer.train_dataset)
        what = "LoRA adapter" if config.use_peft else "model"
        # after a resume, transformers' training_loss averages only the steps run now; the trainer adds the
        # steps before it from the checkpoint's record (trainer.run_loss), else the line says what it covers
        first = getattr(trainer, "_initial_global_step", 0) or 0
        if not first:
            loss = f"mean loss {result.training_loss:.4f}"
        elif trainer.run_loss is not None:
            loss = (f"resumed at step {first}, mean loss {trainer.run_loss:.4f} over steps 1-{result.global_step} "
                    f"({result.training_loss:.4f} over {first + 1}-{result.global_step})")
        else:
            loss = (f"resumed at step {first} (the checkpoint has no loss record of the steps before), mean loss "
                    f"{result.training_loss:.4f} over steps {first + 1}-{result.global_step}")
        print(f"treg train: {config.method}{'-REG' if need_rewards else ''} alpha={config.alpha:g} "
              f"{result.global_step} steps on {pairs} pairs ({trainer.dropped_pairs} dropped), "
              f"{loss}, {time.time() - start:.0f}s; {what} + tokenizer saved to {config.output_dir}")
    del trainer, model
    shutdown()
    return 0
