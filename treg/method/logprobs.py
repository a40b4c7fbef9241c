"""Per-token log-probabilities without a (B, T, V) float32 logits tensor.

``chunked_token_logps(hidden, weight, targets)`` computes ``log softmax(hidden @ weight.T)[target]``
row-chunk by row-chunk inside a custom autograd Function: the forward keeps only one (chunk, V)
float32 logits tile alive at a time and saves its inputs plus an (N,) log-normaliser; the backward
recomputes each tile and turns it into the logits gradient in place. Peak extra memory is about
``chunk_size * V * 4`` bytes (two tiles with a softcap) instead of several ``N * V * 4``.

``model_token_logps(model, input_ids, attention_mask)`` runs the model's own forward (so wrappers such
as PEFT, DDP and gradient checkpointing behave as usual) with ``logits_to_keep=1``, captures the decoder
backbone's final hidden states with a forward hook, and applies ``chunked_token_logps`` with the output
embedding. The model's own last-position logits are used as a free self-check of the head (scale,
softcap); on any mismatch or an unsupported model it falls back, with a one-time warning, to the naive
``model(...).logits`` + ``log_softmax`` + ``gather`` path (``naive=True`` forces it).
"""

from __future__ import annotations

import inspect
import warnings
import weakref

import torch
from torch import Tensor, nn

__all__ = ["chunked_token_logps", "model_token_logps"]

IGNORE_INDEX = -100
VOCAB_BLOCK = 8192  # vocab entries per backward tile (bounds the float32 weight-gradient accumulator)
_HALF = (torch.bfloat16, torch.float16)
_mm_out_dtype_ok: dict[str, bool] = {}  # device type -> whether torch.mm(..., out_dtype=float32) works


# --------------------------------------------------------------------------------------------
# float32 matmuls from (possibly) half-precision operands
# --------------------------------------------------------------------------------------------
def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a (n, k) @ b (k, m) -> (n, m) float32. Half operands on CUDA use an fp32-output GEMM (no rounding
    of the product to bf16, no fp32 copy of b); elsewhere they are upcast."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    low = b.dtype if b.dtype in _HALF else a.dtype
    if a.device.type == "cuda" and _mm_out_dtype_ok.get("cuda", True):
        try:
            return torch.mm(a.to(low), b.to(low), out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            _mm_out_dtype_ok["cuda"] = False
    return a.float() @ b.float()


def _addmm_f32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (n, m) float32 += a (n, k) @ b (k, m), without a temporary (n, m) product where possible."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    low = b.dtype if b.dtype in _HALF else a.dtype
    if a.device.type == "cuda" and _mm_out_dtype_ok.get("cuda", True):
        try:
            torch.addmm(acc, a.to(low), b.to(low), out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):
            _mm_out_dtype_ok["cuda"] = False
    acc.addmm_(a.float(), b.float())


def _tile_logits(h: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None) -> Tensor:
    """h (n, H), weight (V, H) -> float32 logits (n, V), with bias and Gemma-2 softcap c*tanh(x/c)."""
    logits = _mm_f32(h, weight.t())
    if bias is not None:
        logits += bias.float()
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)  # final_logit_softcapping: c * tanh(logits / c)
    return logits


STATS = ("entropy", "mean_logit", "is_top1")  # optional no-grad per-token statistics (TRL's metric inputs)


class _ChunkedTokenLogps(torch.autograd.Function):
    """hidden (N, H), weight (V, H), bias (V,) | None, targets (N,) int64 in [0, V) -> (N,) float32.

    ``stats``: None, or a dict that receives (N,) float32 ``entropy`` (of the next-token distribution),
    ``mean_logit`` (mean logit over the vocabulary) and ``is_top1`` (1.0 where the target is the first
    argmax), computed from the same tiles without gradient (one extra tile alive while it runs)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, chunk_size, stats=None):
        n_rows = hidden.shape[0]
        out = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)  # log sum_v exp(logit_v)
        if stats is not None:
            stats.update({k: torch.empty(n_rows, dtype=torch.float32, device=hidden.device) for k in STATS})
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n_rows, chunk_size):
                e = min(s + chunk_size, n_rows)
                logits = _tile_logits(hidden[s:e], weight, bias, softcap)           # (n, V) f32
                target_logit = logits.gather(1, targets[s:e, None])[:, 0]            # (n,)
                row_max = logits.amax(1, keepdim=True)                               # (n, 1)
                if stats is None:
                    lse[s:e] = row_max[:, 0] + logits.sub_(row_max).exp_().sum(1).log_()  # in place: one tile
                else:
                    stats["mean_logit"][s:e] = logits.mean(1)
                    stats["is_top1"][s:e] = (logits.argmax(1) == targets[s:e]).float()
                    shifted = logits.sub_(row_max)                                   # z - max, in place
                    p = shifted.exp()                                                # (n, V) unnormalised probs
                    total = p.sum(1)
                    log_total = total.log()
                    lse[s:e] = row_max[:, 0] + log_total
                    stats["entropy"][s:e] = log_total - p.mul_(shifted).sum(1) / total  # H = lse - E_p[z]
                    del p
                out[s:e] = target_logit - lse[s:e]                                   # log p(target)
                del logits  # free this tile before the next one is allocated
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.softcap, ctx.chunk_size = softcap, chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        """Tiles of (chunk_size rows) x (VOCAB_BLOCK vocab entries), vocab blocks outermost: the weight
        gradient of one block is complete after its inner loop, so only a (VOCAB_BLOCK, H) float32
        accumulator exists besides the (V, H) gradient in the weight's own dtype."""
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        softcap, chunk_size = ctx.softcap, ctx.chunk_size
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        (n_rows, width), vocab = hidden.shape, weight.shape[0]
        block = max(1, min(vocab, VOCAB_BLOCK))
        f32 = dict(dtype=torch.float32, device=hidden.device)
        g_all = grad_out.float()[:, None]                                     # (N, 1)
        grad_h = torch.zeros(n_rows, width, **f32) if need_h else None       # (N, H) f32 accumulator
        grad_w = torch.empty_like(weight) if need_w else None                # (V, H) weight dtype
        grad_b = torch.empty_like(bias) if need_b else None
        acc_w = torch.empty(block, width, **f32) if need_w else None         # one block, f32
        acc_b = torch.empty(block, **f32) if need_b else None
        cast = weight.dtype if weight.dtype in _HALF and hidden.device.type == "cuda" else None
        with torch.autocast(hidden.device.type, enabled=False):
            for v0 in range(0, vocab, block):
                v1 = min(v0 + block, vocab)
                w_blk, b_blk = weight[v0:v1], (bias[v0:v1] if bias is not None else None)
                if need_w:
                    acc_w[: v1 - v0].zero_()
                if need_b:
                    acc_b[: v1 - v0].zero_()
                for s in range(0, n_rows, chunk_size):
                    e = min(s + chunk_size, n_rows)
                    h, g = hidden[s:e], g_all[s:e]                           # (n, H), (n, 1)
                    z = _tile_logits(h, w_blk, b_blk, softcap)               # (n, vb) f32, recomputed
                    dcap = 1 - (z / softcap) ** 2 if softcap is not None else None  # d(c*tanh(y/c))/dy
                    grad_z = z.sub_(lse[s:e, None]).exp_().mul_(-g)          # -g * p_v (in place)
                    local = targets[s:e, None] - v0                          # target's column in block
                    inside = (local >= 0) & (local < v1 - v0)
                    grad_z.scatter_add_(1, local.clamp(0, v1 - v0 - 1), g * inside)  # + g at the target
                    if dcap is not None:
                        grad_z.mul_(dcap)
                    gz = grad_z.to(cast) if cast is not None else grad_z     # half operands for cuBLAS
                    if need_h:
                        _addmm_f32_(grad_h[s:e], gz, w_blk)                  # (n, H) += (n, vb) @ (vb, H)
                    if need_w:
                        _addmm_f32_(acc_w[: v1 - v0], gz.t(), h)             # (vb, H) += (vb, n) @ (n, H)
                    if need_b:
                        acc_b[: v1 - v0] += grad_z.sum(0)
                    del z, grad_z, gz, dcap  # free this tile before the next one is allocated
                if need_w:
                    grad_w[v0:v1].copy_(acc_w[: v1 - v0])
                if need_b:
                    grad_b[v0:v1].copy_(acc_b[: v1 - v0])
        return (grad_h.to(hidden.dtype) if need_h else None, grad_w, grad_b, None, None, None, None)


def chunked_token_logps(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                        softcap: float | None = None, chunk_size: int = 512, stats: dict | None = None) -> Tensor:
    """float32 ``log softmax(hidden @ weight.T + bias)[targets]`` computed ``chunk_size`` rows at a time.

    hidden: (N, H) or (B, T, H), any float dtype (bf16 is computed in fp32, gradients returned in the
    input dtype). weight: (V, H). bias: (V,) or None. targets: int, the leading shape of hidden; -100
    means ignore (output 0, no gradient). softcap: Gemma-2 ``final_logit_softcapping`` c, logits =
    c*tanh(logits/c). Returns float32 with the shape of targets. ``stats``: optional dict, filled with
    float32 tensors of targets' shape (0 at ignored targets, no gradient) named in :data:`STATS`.
    """
    if hidden.dim() < 2 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden (..., H) and weight (V, H) do not match: {tuple(hidden.shape)} vs "
                         f"{tuple(weight.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat_h = hidden.reshape(-1, hidden.shape[-1])                     # (N, H)
    flat_t = targets.reshape(-1).long()                               # (N,)
    keep = flat_t != IGNORE_INDEX
    bad = keep & ((flat_t < 0) | (flat_t >= weight.shape[0]))
    if bool(bad.any()):
        raise ValueError(f"targets must be in [0, {weight.shape[0]}) or -100, got {int(flat_t[bad][0])}")
    idx = keep.nonzero().flatten()                                    # rows actually scored
    rows = {} if stats is not None else None
    vals = _ChunkedTokenLogps.apply(flat_h.index_select(0, idx), weight, bias, flat_t[idx],
                                    None if softcap is None else float(softcap), int(chunk_size), rows)

    def spread(v: Tensor) -> Tensor:
        return torch.zeros(flat_t.shape, dtype=torch.float32, device=hidden.device).index_put((idx,), v) \
            .reshape(targets.shape)

    if stats is not None:
        stats.update({k: spread(v) for k, v in rows.items()})
    return spread(vals)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
_WARNED: set[str] = set()
_NAIVE_MODELS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP/DeepSpeed (``.module``), torch.compile (``._orig_mod``) and PEFT (``get_base_model``)."""
    for _ in range(8):
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "get_decoder"):
            model = model.module
        elif callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config"):
            model = model.get_base_model()
        else:
            break
    return model


def _config_value(config, name: str):
    for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
        value = getattr(cfg, name, None) if cfg is not None else None
        if value is not None:
            return value
    return None


def _resolve_head(model: nn.Module):
    """-> (decoder module, head weight (V, H), bias | None, softcap | None, hidden scale) or a reason str."""
    base = _unwrap(model)
    if not callable(getattr(base, "get_decoder", None)) or not callable(getattr(base, "get_output_embeddings", None)):
        return f"{type(base).__name__} has no get_decoder()/get_output_embeddings()"
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward has no logits_to_keep argument"
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if decoder is base or not isinstance(head, nn.Linear):
        return f"unsupported decoder/head layout ({type(head).__name__} output embedding)"
    weight = head.weight
    if weight.dim() != 2 or weight.numel() == 0 or type(weight.data) is not torch.Tensor:
        return "the output embedding weight is sharded or not a plain tensor (FSDP/ZeRO-3)"
    config = getattr(base, "config", None)
    scale = 1.0
    if _config_value(config, "logit_scale") is not None:        # Cohere: logits * logit_scale
        scale *= float(_config_value(config, "logit_scale"))
    if _config_value(config, "logits_scaling") is not None:     # Granite: logits / logits_scaling
        scale /= float(_config_value(config, "logits_scaling"))
    return decoder, weight, head.bias, _config_value(config, "final_logit_softcapping"), scale


def _position_kwargs(attention_mask: Tensor) -> dict:
    """Right padding: let the model derive positions (arange). Left padding: positions from the mask."""
    left_padded = bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any())
    if not left_padded:
        return {}
    return {"position_ids": (attention_mask.long().cumsum(1) - 1).clamp(min=0)}


def cache_argument(model: nn.Module) -> str:
    """The forward's KV-cache keyword: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    params = inspect.signature(_unwrap(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _naive_token_logps(model, input_ids, attention_mask, targets, extra, stats=None) -> Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).logits
    logits = logits[:, -input_ids.shape[1]:-1].float()                             # (B, L-1, V)
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    ignored = targets == IGNORE_INDEX
    if stats is not None:
        with torch.no_grad():
            zero = torch.zeros((), device=lp.device)
            values = {"entropy": -(logp.exp() * logp).sum(-1), "mean_logit": logits.mean(-1),
                      "is_top1": (logits.argmax(-1) == targets).float()}
            stats.update({k: torch.cat([torch.zeros_like(v[:, :1]), torch.where(ignored, zero, v)], 1)
                          for k, v in values.items()})
    return torch.where(ignored, torch.zeros_like(lp), lp)


def model_token_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, *, chunk_size: int = 512,
                      naive: bool = False, positions: Tensor | None = None, prefix=None,
                      position_ids: Tensor | None = None, stats: dict | None = None) -> Tensor:
    """float32 (B, L): out[:, t] = log p(input_ids[:, t] | input_ids[:, :t]); out[:, 0] = 0 and 0 where
    attention_mask is 0 (also at a left-padded row's first real token, which has no context).
    Differentiable w.r.t. the model's parameters. input_ids, attention_mask: (B, L), right or left padded.

    positions: optional (B, L) bool, the tokens whose log-probs are wanted (e.g. response tokens);
    the others come back as 0 and the output head is not evaluated there at all, which skips the
    (hidden x vocab) work on prompt tokens. Without it every real token is scored.

    prefix: optional ``(cache, prefix_mask)``: the rows continue a KV cache (a transformers ``Cache``
    holding B rows of P positions; ``prefix_mask`` (B, P) marks its real positions, right padded).
    ``input_ids`` must then be right padded; positions continue from each row's real prefix length
    (treg.method.seqscore's shared-context path).

    position_ids: optional (B, L), packed rows (treg.io.packing): several sequences per row, each
    starting at position 0; ``attention_mask`` must be None (the model separates the sequences from
    the positions) and a token is scored when its position is > 0 (its context is in its sequence).

    stats: optional dict, filled with (B, L) float32 no-grad tensors aligned like the output (0 where
    the output is 0): ``entropy``, ``mean_logit`` and ``is_top1`` (see :data:`STATS`), from the same
    head tiles (no extra forward, no (B, T, V) logits on the chunked path)."""
    batch, length = input_ids.shape
    if position_ids is not None:
        if attention_mask is not None or prefix is not None:
            raise ValueError("position_ids (packed rows) go without attention_mask and prefix")
        scored = position_ids[:, 1:] > 0                                          # token has context
    else:
        scored = (attention_mask[:, 1:] != 0) & (attention_mask[:, :-1] != 0)    # token and its context
    if positions is not None:
        if tuple(positions.shape) != (batch, length):
            raise ValueError(f"positions must have shape {(batch, length)}, got {tuple(positions.shape)}")
        scored = scored & positions[:, 1:].bool()
    targets = input_ids[:, 1:].masked_fill(~scored, IGNORE_INDEX)                 # (B, L-1)
    if position_ids is not None:
        extra = {"position_ids": position_ids}
    elif prefix is None:
        extra = _position_kwargs(attention_mask)
    else:                                        # (B, P) cached positions, then these L tokens
        cache, prefix_mask = prefix
        start = prefix_mask.long().sum(1, keepdim=True)                            # (B, 1) real prefix lengths
        extra = {"position_ids": start + torch.arange(length, device=input_ids.device)[None],
                 cache_argument(model): cache}
        attention_mask = torch.cat([prefix_mask.to(attention_mask.dtype), attention_mask], 1)  # (B, P + L)
    zero_col = torch.zeros(batch, 1, dtype=torch.float32, device=input_ids.device)
    parts = None
    if not naive:
        parts = _NAIVE_MODELS.get(model) or _resolve_head(model)
        if isinstance(parts, str):
            _warn_once(f"treg.method.logprobs: using full logits (more memory) for {type(model).__name__}: {parts}")
            parts = None
    if parts is None:
        return torch.cat([zero_col, _naive_token_logps(model, input_ids, attention_mask, targets, extra, stats)], 1)

    decoder, weight, bias, softcap, scale = parts
    captured: list[Tensor] = []

    def hook(_module, _args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = decoder.register_forward_hook(hook)
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1, **extra)
    finally:
        handle.remove()
    hidden = captured[-1][:, -length:]                                  # (B, L, H); drop virtual tokens
    if scale != 1.0:
        hidden = hidden * scale                                         # scale*(h @ W.T) == (scale*h) @ W.T
    reason = _head_mismatch(out.logits[:, -1], hidden[:, -1], weight, bias, softcap)
    if reason is not None:
        _NAIVE_MODELS[model] = reason
        _warn_once(f"treg.method.logprobs: using full logits (more memory) for {type(model).__name__}: {reason}")
        if prefix is not None:  # the forward above appended these tokens to the cache: drop them again
            prefix[0].crop(-length)  # negative: "remove this many" in every transformers 5.x
        return torch.cat([zero_col, _naive_token_logps(model, input_ids, attention_mask, targets, extra, stats)], 1)
    rows = {} if stats is not None else None
    lp = chunked_token_logps(hidden[:, :-1], weight, targets, bias=bias, softcap=softcap, chunk_size=chunk_size,
                             stats=rows)
    if stats is not None:
        stats.update({k: torch.cat([zero_col, v], 1) for k, v in rows.items()})
    return torch.cat([zero_col, lp], 1)


def _head_mismatch(model_logits: Tensor, h_last: Tensor, weight: Tensor, bias, softcap) -> str | None:
    """Compare the model's own last-position log-softmax (B, V) with ours; a reason string if they differ."""
    with torch.no_grad():
        ref = torch.log_softmax(model_logits.float(), -1)
        with torch.autocast(h_last.device.type, enabled=False):
            ours = torch.log_softmax(_tile_logits(h_last, weight, bias, softcap), -1)
        if ref.shape != ours.shape:
            return f"the model's logits have shape {tuple(ref.shape)}, the head gives {tuple(ours.shape)}"
        half = (model_logits.dtype != torch.float32 or weight.dtype != torch.float32
                or h_last.dtype != torch.float32 or torch.is_autocast_enabled(h_last.device.type))
        atol, rtol = (0.25, 0.02) if half else (2e-3, 1e-4)
        err = (ours - ref).abs() - rtol * ref.abs()
        worst = float(err.max()) if err.numel() else 0.0
    if not worst <= atol:  # also catches NaN
        return f"its head is not a plain linear projection (log-prob mismatch {worst:.3g}; unknown logit transform?)"
    return None
