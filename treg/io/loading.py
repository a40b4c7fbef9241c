"""One loader for every model a stage reads: causal LMs, tokenizers and reward models.

Each loader checks a local path before touching the hub (:func:`treg.io.fsutil.check_local_path`),
turns a load failure into one :class:`TregError` line naming the path and the option it came from,
resolves ``dtype="auto"`` once (bfloat16 on a GPU that supports it, float32 otherwise), passes
``trust_remote_code`` only when the user asked for it, and puts the model in eval mode on its device.
:func:`pad_token_id` is the single pad-id fallback (pad, then eos, then 0).
"""

from __future__ import annotations

from treg.errors import TregError
from treg.io.fsutil import check_local_path

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(dtype: str | None, device=None):
    """torch dtype for ``dtype`` (one of DTYPES; None = auto) on ``device``: auto is bf16 on a
    bf16-capable CUDA device, float32 elsewhere."""
    import torch
    dtype = dtype or "auto"
    if dtype not in DTYPES:
        raise TregError(f"unknown dtype '{dtype}' (choose {', '.join(DTYPES)})", field="dtype")
    if dtype == "auto":
        dev = torch.device(device) if device is not None else torch.device("cpu")
        cuda_bf16 = dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, dtype)


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_tokenizer(path: str, *, field: str | None = "model", trust_remote_code: bool = False):
    """``AutoTokenizer`` of ``path``, as saved (padding ids come from :func:`pad_token_id`)."""
    from transformers import AutoTokenizer
    check_local_path(path, field, what="model directory")
    extra = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    except (OSError, ValueError, TypeError) as err:
        raise TregError(f"cannot load a tokenizer ({_first_line(err)})", file=path, field=field) from None
    return tokenizer


def load_causal_lm(path: str, *, dtype: str | None = "auto", device=None, attn_implementation: str | None = None,
                   trust_remote_code: bool = False, field: str | None = "model", eval_mode: bool = True):
    """``AutoModelForCausalLM`` of ``path`` in ``dtype`` (see :func:`resolve_dtype`), moved to ``device``
    when one is given, in eval mode unless ``eval_mode=False``. Without a device (training: the Trainer
    places the model), ``dtype="auto"`` keeps the checkpoint's own dtype, as transformers' ``dtype="auto"``."""
    from transformers import AutoModelForCausalLM
    check_local_path(path, field, what="model directory")
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if trust_remote_code:
        extra["trust_remote_code"] = True
    try:
        torch_dtype = "auto" if device is None and (dtype or "auto") == "auto" else resolve_dtype(dtype, device)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra)
    except (OSError, ValueError, TypeError) as err:
        raise TregError(f"cannot load a causal LM ({_first_line(err)})", file=path, field=field) from None
    if device is not None:
        model = model.to(device)
    return model.eval() if eval_mode else model


def load_reward_model(path: str, *, dtype: str | None = "auto", device=None, trust_remote_code: bool = False,
                      field: str | None = "reward-model"):
    """``(model, loading_info)`` of a sequence-classification reward model, eval mode on ``device``
    (its tokenizer: :func:`load_tokenizer`)."""
    from transformers import AutoModelForSequenceClassification
    check_local_path(path, field, what="model directory")
    extra = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=resolve_dtype(dtype, device), output_loading_info=True, **extra)
    except (OSError, ValueError, TypeError) as err:
        raise TregError(f"cannot load a reward model ({_first_line(err)})", file=path, field=field) from None
    if device is not None:
        model = model.to(device)
    return model.eval(), info


def pad_token_id(tokenizer) -> int:
    """Any valid id works for padding (it is masked); prefer pad, then eos, then 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
