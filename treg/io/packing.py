"""Padding-free preference batches (``TRegConfig.padding_free``, docs/training.md "Padding-free").

:class:`PackedPairCollator` collates a batch exactly as :class:`treg.io.data.PairCollator` (same
truncation, same ``(2B, L)`` ``response_mask`` / ``token_rewards`` / ``ref_token_logps``, so the loss,
metrics and reference columns are untouched) and adds the packed form of its ``2B`` sequences: one row
``(1, N)``, ``N`` = the number of real tokens, with ``position_ids`` restarting at 0 for every sequence.
:func:`token_logps` runs the model on the packed row only (no padding token is computed) and scatters
the per-token log-probs back to the ``(2B, L)`` layout, so every caller (training step, evaluation,
precomputed and live reference) sees the tensor the padded path would have produced.

A model honours a packed row only if its attention keeps the sequences apart from ``position_ids``
alone. In transformers 5 the sdpa, eager and flex masks do (``masking_utils.find_packed_sequence_indices``,
used when ``attention_mask`` is None and there is no cache), and flash-attention uses varlen kernels
from the position ids. Anything else is refused with a one-line :class:`TregError` (field
``padding_free``): a static check (attention kernel, a ``position_ids`` argument) and, once per model,
a probe forward (two short random sequences packed vs. each one alone) that catches models whose mask
or positions ignore the packing -- never a silently wrong loss.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from treg.errors import TregError
from treg.io.data import PairCollator
from treg.method.logprobs import _unwrap, model_token_logps

__all__ = ["PACKED_ATTENTION", "PackedPairCollator", "check_packed_attention", "make_collator", "pack_batch",
           "token_logps"]

# Attention kernels whose mask (or varlen kernel) is built from packed position_ids in transformers 5.
# A kernel listed here is still probed once per model (check_packed_attention). sdpa runs as treg_varlen_sdpa
# on packed rows (varlen_sdpa): one sequence at a time instead of N x N scores under a block mask.
PACKED_ATTENTION = ("sdpa", "treg_varlen_sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3",
                    "flash_attention_4")
PACKED_KEYS = ("packed_input_ids", "packed_position_ids", "packed_index")


def pack_batch(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Add the packed form of a collated right-padded ``(2B, L)`` batch (returns the same dict).

    - ``packed_input_ids`` (1, N) long: the real tokens of the 2B rows, row after row
    - ``packed_position_ids`` (1, N) long: 0, 1, ... restarting at every sequence
    - ``packed_index`` (N,) long: flat index ``row * L + column`` of each packed token in the (2B, L) layout
    """
    mask = batch["attention_mask"].bool()
    index = mask.reshape(-1).nonzero().flatten()                          # row-major: sequences in order
    batch["packed_input_ids"] = batch["input_ids"].reshape(-1)[index][None]
    batch["packed_position_ids"] = (mask.long().cumsum(1) - 1).reshape(-1)[index][None]
    batch["packed_index"] = index
    return batch


@dataclass
class PackedPairCollator(PairCollator):
    """:class:`treg.io.data.PairCollator` + the packed row (:func:`pack_batch`). ``pad_to_multiple_of``
    only shapes the (2B, L) bookkeeping tensors; the model never sees padding."""

    def __call__(self, rows: list[dict]) -> dict[str, Tensor]:
        return pack_batch(super().__call__(rows))


def make_collator(args, pad_id: int) -> PairCollator:
    """The trainer's collator: packed when ``args.padding_free``, else padded."""
    cls = PackedPairCollator if getattr(args, "padding_free", False) else PairCollator
    return cls(pad_id, args.max_length, args.truncation_mode, args.pad_to_multiple_of)


def is_packed(batch) -> bool:
    return all(k in batch for k in PACKED_KEYS)


def token_logps(model: nn.Module, batch: dict[str, Tensor], *, chunk_size: int = 512,
                naive: bool = False, stats: dict | None = None) -> Tensor:
    """(2B, L) float32 log p(ids[t] | ids[<t]) at the response positions of a collated batch, 0 elsewhere.

    A packed batch (:class:`PackedPairCollator`) is computed on its packed row and scattered back to
    (2B, L); a padded one as before. Differentiable w.r.t. the model's parameters. ``stats``: as
    :func:`treg.method.logprobs.model_token_logps`, (2B, L) either way."""
    if not is_packed(batch):
        return model_token_logps(model, batch["input_ids"], batch["attention_mask"],
                                 positions=batch["response_mask"].bool(), chunk_size=chunk_size, naive=naive,
                                 stats=stats)
    index = batch["packed_index"]
    wanted = batch["response_mask"].reshape(-1)[index].bool()[None]        # (1, N): no head on prompt tokens
    packed_stats = {} if stats is not None else None
    with varlen_sdpa(model):
        check_packed_attention(model)
        lp = model_token_logps(model, batch["packed_input_ids"], None, positions=wanted, chunk_size=chunk_size,
                               naive=naive, position_ids=batch["packed_position_ids"],
                               stats=packed_stats)  # (1, N)
    shape = batch["response_mask"].shape

    def unpack(values: Tensor) -> Tensor:  # (1, N) -> (2B, L), 0 at padding
        out = torch.zeros(shape[0] * shape[1], dtype=values.dtype, device=values.device)
        return out.index_put((index,), values[0]).reshape(shape)

    if stats is not None:
        stats.update({k: unpack(v) for k, v in packed_stats.items()})
    return unpack(lp)


# --------------------------------------------------------------------------------------------
# sdpa, one sequence at a time
# --------------------------------------------------------------------------------------------
VARLEN_SDPA = "treg_varlen_sdpa"
_last_segments: list = [None, None]  # (position_ids tensor, its segments): computed once per forward, not per layer


def _segments(position_ids: Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of the sequences in one packed row of position ids (a new one wherever diff != 1)."""
    if _last_segments[0] is position_ids:
        return _last_segments[1]
    cuts = ((torch.diff(position_ids[0]) != 1).nonzero().flatten() + 1).tolist()
    bounds = list(zip([0, *cuts], [*cuts, position_ids.shape[-1]]))
    _last_segments[:] = [position_ids, bounds]
    return bounds


def varlen_sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                  is_causal=None, **kwargs):
    """transformers' sdpa attention, but a packed row (batch 1, position ids restarting) is attended one
    sequence at a time with ``is_causal`` (sum of n_i^2 scores instead of N^2 under a block-diagonal mask).
    Anything else (padded rows, sliding-window layers, decoding) is plain sdpa with the model's mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    pos = kwargs.get("position_ids")
    n = query.shape[2]
    plain = (pos is None or pos.dim() != 2 or pos.shape[0] != 1 or query.shape[0] != 1 or key.shape[2] != n
             or pos.shape[-1] != n or getattr(module, "sliding_window", None) is not None)
    bounds = None if plain else _segments(pos)
    if bounds is None or len(bounds) == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    outs = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, dropout=dropout,
                                   scaling=scaling, is_causal=True, **kwargs)[0] for s, e in bounds]
    return torch.cat(outs, 1), None                                      # (1, N, heads, head_dim)


def _register_varlen() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    if VARLEN_SDPA not in AttentionInterface._global_mapping:
        AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, sdpa_mask)


@contextlib.contextmanager
def varlen_sdpa(model: nn.Module):
    """While inside: a model on ``sdpa`` uses :func:`varlen_sdpa_attention_forward` (the same masks, so the
    same values; restored on exit, so a saved config still says sdpa). Not under gradient checkpointing:
    the backward's recomputation runs outside and must save what the forward saved, so there sdpa keeps
    the packed block mask (same values, N^2 work)."""
    base = _unwrap(model)
    configs = {id(m.config): m.config for m in base.modules()
               if getattr(getattr(m, "config", None), "_attn_implementation", None) == "sdpa"}
    checkpointing = getattr(base, "is_activation_checkpointing", None)  # transformers >= 5.x name
    if checkpointing is None:
        checkpointing = getattr(base, "is_gradient_checkpointing", False)
    if not configs or checkpointing:
        yield
        return
    _register_varlen()
    for config in configs.values():
        config._attn_implementation = VARLEN_SDPA
    try:
        yield
    finally:
        for config in configs.values():
            config._attn_implementation = "sdpa"
        _last_segments[:] = [None, None]


# --------------------------------------------------------------------------------------------
# Can this model honour a packed row?
# --------------------------------------------------------------------------------------------
_CHECKED: "weakref.WeakKeyDictionary[nn.Module, str | None]" = weakref.WeakKeyDictionary()


def _refuse(reason: str) -> TregError:
    return TregError(f"padding_free: {reason}; use padding_free false (or another attn_implementation)",
                     field="padding_free")


def check_packed_attention(model: nn.Module) -> None:
    """Raise a one-line TregError (field ``padding_free``) unless ``model`` keeps packed sequences apart.

    Static: the attention kernel is one of :data:`PACKED_ATTENTION` and ``forward`` takes ``position_ids``.
    Probe (once per model, no grad, eval mode): two random sequences packed into one row must give the
    same log-probs as each sequence alone (fp32: 1e-4; half precision: within a tenth of what attending
    across the boundary changes)."""
    base = _unwrap(model)
    if base not in _CHECKED:
        _CHECKED[base] = _static_reason(base) or _probe_reason(model, base)
    if _CHECKED[base] is not None:
        raise _refuse(_CHECKED[base])


def _static_reason(base: nn.Module) -> str | None:
    name = type(base).__name__
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return f"{name} takes no position_ids, so it cannot restart positions per sequence"
    impl = getattr(getattr(base, "config", None), "_attn_implementation", None)
    if impl not in PACKED_ATTENTION:
        return (f"{name} uses attention '{impl}', which does not separate packed sequences "
                f"(supported: {', '.join(PACKED_ATTENTION)})")
    return None


@torch.no_grad()
def _probe_reason(model: nn.Module, base: nn.Module) -> str | None:
    param = next(base.parameters())
    vocab = int(getattr(base.get_output_embeddings(), "out_features", 0) or base.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (n,), generator=g).to(param.device) for n in (7, 5))

    def logsm(ids: Tensor, pos: Tensor | None) -> Tensor:
        kw = {"position_ids": pos[None]} if pos is not None else {"attention_mask": torch.ones_like(ids)[None]}
        out = model(input_ids=ids[None], use_cache=False, **kw).logits[0]
        return torch.log_softmax(out.float(), -1)

    arange = lambda n: torch.arange(n, device=param.device)  # noqa: E731
    was_training = model.training
    model.eval()
    try:
        packed = logsm(torch.cat([first, second]), torch.cat([arange(7), arange(5)]))
        alone = torch.cat([logsm(first, None), logsm(second, None)])
        joined = logsm(torch.cat([first, second]), None)      # what a mask ignoring the packing computes
    except Exception as err:  # noqa: BLE001 - any failure means: not usable packed
        return f"{type(base).__name__} failed on a packed row ({type(err).__name__}: {str(err)[:120]})"
    finally:
        model.train(was_training)
    diff = float((packed - alone).abs().max())
    full = param.dtype == torch.float32 and not torch.is_autocast_enabled(param.device.type)
    tol = 1e-4 if full else 0.1 * float((joined - alone).abs().max())
    if not diff <= tol:  # also NaN
        return (f"{type(base).__name__} with attention '{base.config._attn_implementation}' mixes packed "
                f"sequences (log-prob difference {diff:.3g} vs. unpacked)")
    return None
