"""One loader for every model a stage reads: causal LMs, tokenizers and reward models.

Each loader checks a local path before touching the hub (:func:`treg.io.fsutil.check_local_path`),
turns a load failure into one :class:`TregError` line naming the path and the option it came from,
resolves ``dtype="auto"`` once (bfloat16 on a GPU that supports it, float32 otherwise), passes
``trust_remote_code`` only when the user asked for it, and puts the model in eval mode on its device.
:func:`pad_token_id` is the single pad-id fallback (pad, then eos, then 0).

Weights are safetensors only by default (:func:`check_weights`): a local directory holding only pickle
weights (``pytorch_model*.bin``, ``*.pt``) is refused with one line saying how to convert it
(``python -m treg.io.weights DIR``), since unpickling can run code. The explicit opt-in
(``--allow-pickle-weights``; TRegConfig ``allow_pickle_weights``) loads them with ``weights_only=True``.
"""

from __future__ import annotations

import pickle

from treg.errors import TregError
from treg.io.fsutil import check_local_path

DTYPES = ("auto", "float32", "bfloat16", "float16")
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_ALLOW_PICKLE = [False]  # the process-wide opt-in, set from a command's --allow-pickle-weights


def allow_pickle_weights(allow: bool | None = None) -> bool:
    """Set (when ``allow`` is given) and return whether pickle weights may be loaded (weights_only=True)."""
    if allow is not None:
        _ALLOW_PICKLE[0] = bool(allow)
    return _ALLOW_PICKLE[0]


def check_weights(path: str, field: str | None = "model") -> dict:
    """``from_pretrained`` keywords that keep a load safe: safetensors only, unless pickle weights were
    allowed; a local directory without safetensors but with pickle files is a one-line TregError."""
    import os
    from pathlib import Path
    if allow_pickle_weights():
        return {}
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir() and not any(p.glob("*.safetensors")):
        pickles = sorted(f.name for pattern in PICKLE_PATTERNS for f in p.glob(pattern))
        if pickles:
            raise TregError(f"only pickle weights ({', '.join(pickles[:3])}), which can run code when loaded; "
                            f"convert them with 'python -m treg.io.weights {path}' or pass --allow-pickle-weights "
                            "(loads them with weights_only=True)", file=str(path), field=field)
    return {"use_safetensors": True}


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


UNSAFE_PICKLE = "refused: the pickle weights hold more than tensors (loading them could run code)"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    if "Weights only load failed" in text or isinstance(err, pickle.UnpicklingError):
        return UNSAFE_PICKLE
    return (text.splitlines() or [type(err).__name__])[0]


def load_tokenizer(path: str, *, field: str | None = "model", trust_remote_code: bool = False,
                   model_weights: bool = True):
    """``AutoTokenizer`` of ``path``, as saved (padding ids come from :func:`pad_token_id`). The stages load
    the tokenizer first and the model later, so ``path``'s weights are checked here too (:func:`check_weights`),
    before any output is prepared; ``model_weights=False`` when only the tokenizer is wanted."""
    from transformers import AutoTokenizer
    check_local_path(path, field, what="model directory")
    if model_weights:
        check_weights(path, field)
    extra = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    except (OSError, ValueError, TypeError) as err:
        raise TregError(f"cannot load a tokenizer ({_first_line(err)})", file=path, field=field) from None
    return tokenizer


def _load_model(auto_class, path: str, what: str, *, field: str | None, dtype, device, trust_remote_code: bool,
                eval_mode: bool = True, **kwargs):
    """The skeleton every model load shares: path and weights checks, opt-in remote code, one-line errors,
    placement on ``device`` (when given) and eval mode. Returns ``from_pretrained``'s result."""
    check_local_path(path, field, what="model directory")
    extra = {**check_weights(path, field), **kwargs}
    if trust_remote_code:
        extra["trust_remote_code"] = True
    try:
        out = auto_class.from_pretrained(path, dtype=dtype, **extra)
    except (OSError, ValueError, TypeError, RuntimeError, pickle.UnpicklingError) as err:
        raise TregError(f"cannot load {what} ({_first_line(err)})", file=path, field=field) from None
    model = out[0] if isinstance(out, tuple) else out
    if device is not None:
        model = model.to(device)
    if eval_mode:
        model.eval()
    return (model, *out[1:]) if isinstance(out, tuple) else model


def load_causal_lm(path: str, *, dtype: str | None = "auto", device=None, attn_implementation: str | None = None,
                   trust_remote_code: bool = False, field: str | None = "model", eval_mode: bool = True,
                   **from_pretrained):
    """``AutoModelForCausalLM`` of ``path`` in ``dtype`` (see :func:`resolve_dtype`), moved to ``device``
    when one is given, in eval mode unless ``eval_mode=False``. Without a device (training: the Trainer
    places the model), ``dtype="auto"`` keeps the checkpoint's own dtype, as transformers' ``dtype="auto"``.
    ``from_pretrained``: further keywords for ``from_pretrained`` (e.g. a trainer's ``model_init_kwargs``)."""
    from transformers import AutoModelForCausalLM
    torch_dtype = "auto" if device is None and (dtype or "auto") == "auto" else resolve_dtype(dtype, device)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    extra.update(from_pretrained)
    return _load_model(AutoModelForCausalLM, path, "a causal LM", field=field, dtype=torch_dtype, device=device,
                       trust_remote_code=trust_remote_code, eval_mode=eval_mode, **extra)


def load_reward_model(path: str, *, dtype: str | None = "auto", device=None, trust_remote_code: bool = False,
                      field: str | None = "reward-model"):
    """``(model, loading_info)`` of a sequence-classification reward model, eval mode on ``device``
    (its tokenizer: :func:`load_tokenizer`)."""
    from transformers import AutoModelForSequenceClassification
    return _load_model(AutoModelForSequenceClassification, path, "a reward model", field=field,
                       dtype=resolve_dtype(dtype, device), device=device, trust_remote_code=trust_remote_code,
                       output_loading_info=True)


def pad_token_id(tokenizer) -> int:
    """Any valid id works for padding (it is masked); prefer pad, then eos, then 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
