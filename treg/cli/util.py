"""Small pieces every stage CLI shares: one-line argument errors and early checks of local paths."""

from __future__ import annotations

import argparse

from treg.errors import TregError
from treg.io.loading import DTYPES


# Ranges of the stage CLIs' numeric options by dest ("<prog>:<dest>" for one command only), checked with
# the finiteness of every float option at parse time (treg.validate.check_namespace), before any model loads.
CLI_RANGES = {
    "n": ">= 2; a preference pair needs at least 2 responses per prompt", "temperature": ">= 0",
    "treg sample:temperature": "> 0; 0 is greedy: all N responses would be identical", "top_p": "(0, 1]",
    "max_new_tokens": ">= 1", "batch_size": ">= 1", "shard_size": ">= 1", "limit": ">= 1; need at least 1 prompt",
    "seed": ">= 0", "bootstrap": ">= 1; resamples for the 95% interval",
    "tensor_parallel_size": ">= 1", "gpu_memory_utilization": "(0, 1]", "max_model_len": ">= 1",
    "min_margin": ">= 0", "beta": "> 0", "max_length": ">= 2", "batch_tokens": ">= 1",
    "index": ">= 0", "worst": ">= 1", "top": ">= 0", "seeds": ">= 1", "train_prompts": ">= 1",
    "n_samples": ">= 2", "eval_prompts": ">= 1", "eval_samples": ">= 1", "steps": ">= 1", "lrs": "> 0",
    "alphas": ">= 0", "simpo_beta": "> 0", "simpo_gamma": ">= 0", "tune_prompts": ">= 1", "threads": ">= 1",
    "lr": "> 0", "examples": ">= 1", "prompts": ">= 1",
}


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes (unknown or misspelled option, missing or invalid value, a number out
    of :data:`CLI_RANGES` or not finite) are a TregError: one line and exit 2 through the CLI instead of a
    usage dump. ``--help`` is unchanged. ``--allow-pickle-weights`` (:func:`add_weights_argument`) sets
    the process's opt-in of :func:`treg.io.loading.allow_pickle_weights`."""

    def error(self, message):
        raise TregError(f"{message} (see {self.prog} --help)")

    def parse_known_args(self, args=None, namespace=None):
        namespace, rest = super().parse_known_args(args, namespace)
        from treg.validate import check_namespace
        check_namespace(self, namespace, CLI_RANGES)
        if getattr(namespace, "allow_pickle_weights", False):
            from treg.io.loading import allow_pickle_weights
            allow_pickle_weights(True)
        return namespace, rest


def add_weights_argument(p: argparse.ArgumentParser) -> None:
    """``--allow-pickle-weights``, on every command that loads a model."""
    p.add_argument("--allow-pickle-weights", action="store_true",
                   help="load model directories that have only pickle weights (pytorch_model.bin) with "
                   "torch.load(weights_only=True); default: safetensors only (convert: python -m treg.io.weights DIR)")


def add_generation_arguments(p: argparse.ArgumentParser, *, temperature: float, top_p: float,
                             temperature_help: str) -> None:
    """Options shared by ``treg sample`` and ``treg generate``: decoding, backend and prompt source."""
    p.add_argument("--temperature", type=float, default=temperature, help=temperature_help)
    p.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling mass")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="maximum tokens per response")
    p.add_argument("--seed", type=int, default=0, help="base seed; each response gets its own seed from it")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf: batched transformers generate (CPU/CUDA); vllm: needs the vllm package")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs of the one vLLM engine (vllm backend; e.g. 8 on an 8-GPU node)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of each GPU's memory vLLM may take (vllm backend; default: vLLM's, 0.9)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="vLLM context length: prompt + response tokens (vllm backend; default: the model's)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per generate call (hf backend)")
    p.add_argument("--prompt-column", default=None,
                   help="prompt column (default: first of prompt, messages, instruction, turns)")
    p.add_argument("--split", default="train", help="split for datasets dirs with splits and hub datasets")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="model dtype; auto: bfloat16 on a GPU that supports it, else float32")
    p.add_argument("--no-chat-template", action="store_true",
                   help="plain 'Role:' text format instead of the tokenizer's chat template")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none either when stderr is not "
                   "a terminal)")
    add_weights_argument(p)


def check_device(device: str, field: str = "device") -> None:
    """TregError unless ``device`` names a torch device usable on this machine (``cuda`` without a GPU,
    a typo such as ``cpux``)."""
    import torch
    try:
        torch.empty(0, device=torch.device(device))
    except (RuntimeError, ValueError, AssertionError) as err:
        reason = (str(err).strip().splitlines() or ["unknown device"])[0]
        raise TregError(f"device '{device}' is not usable here ({reason})", field=field) from None


def process_state(device: str | None = None):
    """accelerate's ``PartialState`` for this process, initialised before any stage code asks for it.

    Under ``accelerate launch`` on a machine without a GPU (or with ``--device cpu``) the processes must
    join a CPU (gloo) process group; ``PartialState()`` alone would leave each process thinking it is
    alone. The state is a singleton, so later ``PartialState()`` calls see this one."""
    import torch
    from accelerate import PartialState
    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
