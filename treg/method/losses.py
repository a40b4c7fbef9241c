"""The T-REG objective as pure tensor math (METHOD.md §2-§5). No transformers import.

Entry point: :func:`treg_loss`. Every pairwise loss here has the form ``link(z)`` with

    r(y)  = c(y) * ( sum_t logp(y_t) - logp_ref(y) )        # implicit sequence reward
    z     = r(y_w) - r(y_l) - gamma
    L_REG(x, y) = - sum_t c(y) * r_hat(y_t) * logp(y_t)      # METHOD.md §2, a SUM over tokens
    L     = link(z) + alpha * w * ( L_REG(y_w) + L_REG(y_l) ),   w = stopgrad(-d link / dz)

where ``c(y)`` is the method's own per-token reward scale: ``beta`` for DPO (METHOD.md §3) and
``beta/|y|`` with no reference for SimPO (METHOD.md §4). A method is therefore one small
:class:`PairwiseLoss` entry in :data:`PREFERENCE_LOSSES` and a sequence weighting one
:class:`Weighting` entry in :data:`WEIGHTINGS`: config choices, ``--help``, the trainer's decisions
(reference pass or not, margin allowed or not) and the docs tables all read these two registries.
Everything is computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LossOutput", "PairwiseLoss", "PREFERENCE_LOSSES", "Weighting", "WEIGHTINGS", "needs_token_rewards",
           "treg_loss"]


# --------------------------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------------------------
def _constant_scale(lengths: Tensor, beta: float) -> Tensor:
    return torch.full_like(lengths, beta)  # METHOD.md §3: c(y) = beta


def _length_scale(lengths: Tensor, beta: float) -> Tensor:
    return beta / lengths  # METHOD.md §4: c(y) = beta / |y|


@dataclass(frozen=True)
class PairwiseLoss:
    """One preference loss ``link(z, beta)`` of ``z = r(y_w) - r(y_l) - gamma``.

    ``token_scale(lengths, beta) -> c``: lengths (B,) float response lengths |y|; returns the
    per-token reward scale c (B,) so that r(y) = c * (sum_t logp_t - ref(y)) and the implicit
    token reward is c * (logp_t - ref_t). ``needs_ref``: whether ref(y) (summed reference
    log-probs) enters r(y), i.e. whether training needs a reference pass. ``uses_gamma``: whether a
    non-zero target margin is meaningful. ``link(z, beta)`` (B,) -> (B,) is the loss of z and
    ``link_weight(z, beta)`` its stop-gradient sequence weight ``-d link / dz`` (the general T-REG
    rule, METHOD.md §4), clipped at 0 where a loss pushes z back down. ``doc``: one line for
    ``--help`` and docs/losses.md; ``trl_loss_type``: the matching TRL name (DPOConfig.loss_type,
    or CPOConfig's for SimPO), the oracle its test compares against.
    """

    doc: str
    token_scale: Callable[[Tensor, float], Tensor]
    needs_ref: bool
    link: Callable[[Tensor, float], Tensor]
    link_weight: Callable[[Tensor, float], Tensor]
    uses_gamma: bool = False
    trl_loss_type: str | None = None


def _neg_logsigmoid(z: Tensor, beta: float) -> Tensor:
    return -F.logsigmoid(z)  # METHOD.md §3: L_DPO = -log sigmoid(z)


def _sigmoid_weight(z: Tensor, beta: float) -> Tensor:
    return torch.sigmoid(-z)  # METHOD.md §3-§4: w = sigmoid(-z) = -d(-log sigmoid z)/dz


def _ipo_link(z: Tensor, beta: float) -> Tensor:
    # IPO (Azar et al. 2023, Eq. 17; TRL loss_type="ipo"): (h - 1/(2 beta))^2 with h = z / beta
    return (z - 0.5) ** 2 / beta ** 2


def _ipo_weight(z: Tensor, beta: float) -> Tensor:
    return torch.clamp((1 - 2 * z) / beta ** 2, min=0)  # -d link/dz, 0 once z passes the 1/2 target


def _hinge_link(z: Tensor, beta: float) -> Tensor:
    return torch.relu(1 - z)  # SLiC hinge (TRL loss_type="hinge"): max(0, 1 - z)


def _hinge_weight(z: Tensor, beta: float) -> Tensor:
    return (z < 1).to(z.dtype)  # -d link/dz: 1 inside the margin, 0 beyond it


PREFERENCE_LOSSES: dict[str, PairwiseLoss] = {
    "dpo": PairwiseLoss(  # METHOD.md §3: r = beta * (logp(y) - logp_ref(y))
        doc="DPO: -log sigmoid(z), r = beta * (log pi(y) - log pi_ref(y)); needs a reference",
        token_scale=_constant_scale, needs_ref=True, link=_neg_logsigmoid, link_weight=_sigmoid_weight,
        trl_loss_type="sigmoid"),
    "simpo": PairwiseLoss(  # METHOD.md §4: r = (beta/|y|) * logp(y), no reference; margin gamma
        doc="SimPO: -log sigmoid(z - gamma), r = beta/|y| * log pi(y); no reference, margin gamma",
        token_scale=_length_scale, needs_ref=False, uses_gamma=True, link=_neg_logsigmoid,
        link_weight=_sigmoid_weight, trl_loss_type="simpo"),
    "ipo": PairwiseLoss(  # Azar et al. 2023 with TRL's per-token averaging: r = beta/|y| * (logp - ref)
        doc="IPO: (z - 1/2)^2 / beta^2, r = beta/|y| * (log pi(y) - log pi_ref(y)); needs a reference",
        token_scale=_length_scale, needs_ref=True, link=_ipo_link, link_weight=_ipo_weight,
        trl_loss_type="ipo"),
    "hinge": PairwiseLoss(  # SLiC (Zhao et al. 2023): max(0, 1 - z), r as DPO
        doc="hinge (SLiC): max(0, 1 - z), r = beta * (log pi(y) - log pi_ref(y)); needs a reference",
        token_scale=_constant_scale, needs_ref=True, link=_hinge_link, link_weight=_hinge_weight,
        trl_loss_type="hinge"),
}


@dataclass(frozen=True)
class Weighting:
    """How the per-pair regularizer weight w is computed from the detached z (B,)."""

    doc: str
    weight: Callable[[PairwiseLoss, Tensor, float], Tensor]


WEIGHTINGS: dict[str, Weighting] = {
    "sequence": Weighting(  # METHOD.md §3: w = stopgrad(-d link/dz), sigmoid(-z) for DPO/SimPO
        doc="w = stopgrad(-d link/dz) (sigmoid(-z) for DPO/SimPO): the paper's sequence weighting",
        weight=lambda spec, z, beta: spec.link_weight(z, beta)),
    "static": Weighting(  # METHOD.md §5 ablation: w = 1
        doc="w = 1: the static-weighting ablation (METHOD.md §5)",
        weight=lambda spec, z, beta: torch.ones_like(z)),
}


def needs_token_rewards(alpha: float) -> bool:
    """The single rule for whether a run needs r_hat columns (METHOD.md §3: alpha = 0 is plain DPO/SimPO)."""
    return alpha > 0


@dataclass
class LossOutput:
    """Result of :func:`treg_loss`.

    loss: scalar, mean of ``per_example`` over the B pairs (carries the gradient).
    per_example: (B,) pref + alpha * w * (L_REG(y_w) + L_REG(y_l)) (carries the gradient).
    pref_loss, reg_loss: (B,) detached pieces: link(z) and L_REG(y_w) + L_REG(y_l) (unweighted).
    chosen_seq_rewards, rejected_seq_rewards: (B,) detached implicit sequence rewards r(y) (TRL's
        rewards/chosen and rewards/rejected), not to be confused with the token rewards r_hat.
    seq_weight: (B,) detached w. metrics: Python floats (see docs/losses.md).
    """

    loss: Tensor
    per_example: Tensor
    pref_loss: Tensor
    reg_loss: Tensor
    chosen_seq_rewards: Tensor
    rejected_seq_rewards: Tensor
    seq_weight: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Validation helpers (each raises ValueError naming the argument)
# --------------------------------------------------------------------------------------------
def _as_mask(mask, name: str) -> Tensor:
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        raise ValueError(f"{name} must be a (B, T) tensor, got {getattr(mask, 'shape', type(mask))}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must be a bool (or 0/1 integer) tensor, got dtype {mask.dtype}")
        mask = mask.bool()
    empty = (~mask.any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"{name} row {int(empty[0])} has no response tokens (an empty response)")
    return mask


def _token_tensor(x, mask: Tensor, name: str) -> Tensor:
    """(B, T) float32 copy of x with masked-out positions set to 0; NaN/inf at masked-in ones raise."""
    if not isinstance(x, Tensor) or tuple(x.shape) != tuple(mask.shape):
        raise ValueError(f"{name} must have the shape of its mask {tuple(mask.shape)}, "
                         f"got {tuple(getattr(x, 'shape', ())) or type(x).__name__}")
    x = x.float()
    if not bool(torch.isfinite(x[mask]).all()):
        raise ValueError(f"{name} has NaN/inf at a response (mask=True) position")
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _seq_tensor(x, batch: int, name: str) -> Tensor:
    if not isinstance(x, Tensor) or tuple(x.shape) != (batch,):
        raise ValueError(f"{name} must be a ({batch},) tensor of SUMMED reference log-probs, "
                         f"got {tuple(getattr(x, 'shape', ())) or type(x).__name__}")
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has NaN/inf")
    return x


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------
def treg_loss(chosen_logps: Tensor, rejected_logps: Tensor, chosen_mask: Tensor, rejected_mask: Tensor,
              chosen_token_rewards: Tensor | None = None, rejected_token_rewards: Tensor | None = None,
              ref_chosen_logps: Tensor | None = None, ref_rejected_logps: Tensor | None = None, *,
              method: str = "dpo", beta: float = 0.1, gamma: float = 0.0, alpha: float = 0.0,
              weighting: str = "sequence", ref_chosen_token_logps: Tensor | None = None,
              ref_rejected_token_logps: Tensor | None = None) -> LossOutput:
    """T-REG preference loss (METHOD.md §3-§4) for B pairs; chosen has Tw tokens, rejected Tl.

    chosen_logps (B, Tw), rejected_logps (B, Tl): per-token policy log-probs (any float dtype;
        masked-out values are ignored, may be NaN). chosen_mask (B, Tw), rejected_mask (B, Tl):
        bool, True on response tokens; every row needs at least one.
    chosen_token_rewards (B, Tw), rejected_token_rewards (B, Tl): token rewards r_hat; required if
        needs_token_rewards(alpha).
    ref_chosen_logps (B,), ref_rejected_logps (B,): SUMMED reference log-probs; required for dpo.
    ref_chosen_token_logps (B, Tw), ref_rejected_token_logps (B, Tl): optional per-token reference
        log-probs, used only for the metric ``treg/credit_agreement``.
    method: key of PREFERENCE_LOSSES; weighting: key of WEIGHTINGS; beta > 0; alpha >= 0.
    """
    spec = PREFERENCE_LOSSES.get(method)
    if spec is None:
        raise ValueError(f"method must be one of {sorted(PREFERENCE_LOSSES)}, got {method!r}")
    weighting_spec = WEIGHTINGS.get(weighting)
    if weighting_spec is None:
        raise ValueError(f"weighting must be one of {sorted(WEIGHTINGS)}, got {weighting!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if gamma != 0 and not spec.uses_gamma:
        raise ValueError(f"gamma is not used by method {method!r}; got gamma={gamma} (leave it 0)")

    cm = _as_mask(chosen_mask, "chosen_mask")                       # (B, Tw) bool
    rm = _as_mask(rejected_mask, "rejected_mask")                   # (B, Tl) bool
    if cm.shape[0] != rm.shape[0]:
        raise ValueError(f"chosen_mask has batch {cm.shape[0]} but rejected_mask has {rm.shape[0]}")
    batch = cm.shape[0]
    lw = _token_tensor(chosen_logps, cm, "chosen_logps")            # (B, Tw) f32, 0 off-mask
    ll = _token_tensor(rejected_logps, rm, "rejected_logps")        # (B, Tl)

    if spec.needs_ref:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            missing = "ref_chosen_logps" if ref_chosen_logps is None else "ref_rejected_logps"
            raise ValueError(f"{missing} is required for method {method!r}")
        ref_w = _seq_tensor(ref_chosen_logps, batch, "ref_chosen_logps")    # (B,)
        ref_l = _seq_tensor(ref_rejected_logps, batch, "ref_rejected_logps")
    else:
        ref_w = ref_l = torch.zeros(batch, device=lw.device)

    has_rewards = chosen_token_rewards is not None or rejected_token_rewards is not None
    if needs_token_rewards(alpha) or has_rewards:
        if chosen_token_rewards is None or rejected_token_rewards is None:
            missing = "chosen_token_rewards" if chosen_token_rewards is None else "rejected_token_rewards"
            raise ValueError(f"{missing} is required (alpha={alpha}; pass both token-reward tensors)")
        rh_w = _token_tensor(chosen_token_rewards, cm, "chosen_token_rewards")  # (B, Tw) r_hat, 0 off-mask
        rh_l = _token_tensor(rejected_token_rewards, rm, "rejected_token_rewards")

    len_w, len_l = cm.sum(1).float(), rm.sum(1).float()             # (B,) |y|
    c_w, c_l = spec.token_scale(len_w, beta), spec.token_scale(len_l, beta)  # (B,) reward scale c(y)
    seq_w, seq_l = lw.sum(1), ll.sum(1)                             # (B,) sum_t logp(y_t)
    r_w = c_w * (seq_w - ref_w)                                     # METHOD.md §3/§4 implicit reward r(y_w)
    r_l = c_l * (seq_l - ref_l)                                     # (B,)
    z = r_w - r_l - gamma                                           # METHOD.md §3 / §4: z
    pref = spec.link(z, beta)                                       # METHOD.md §3: link(z), (B,)
    w = weighting_spec.weight(spec, z.detach(), beta).detach()      # METHOD.md §3: w = stopgrad(-dlink/dz)

    if has_rewards:
        reg = -(c_w * (rh_w * lw).sum(1)) - (c_l * (rh_l * ll).sum(1))  # METHOD.md §2: L_REG(y_w)+L_REG(y_l)
    else:
        reg = torch.zeros_like(pref)
    per_example = pref + alpha * w * reg if alpha > 0 else pref    # METHOD.md §3: L = link + a*w*(...)
    loss = per_example.mean()

    with torch.no_grad():  # one device->host transfer for all scalar metrics
        names = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "treg/pref_loss", "treg/reg_loss", "treg/seq_weight"]
        values = [r_w.mean(), r_l.mean(), (r_w > r_l).float().mean(), (r_w - r_l).mean(),
                  seq_w.mean(), seq_l.mean(), pref.mean(), reg.mean(), w.mean()]
        if has_rewards:
            names += ["treg/token_reward_mean_chosen", "treg/token_reward_mean_rejected"]
            values += [rh_w.sum() / len_w.sum(), rh_l.sum() / len_l.sum()]  # pooled over response tokens
        metrics = dict(zip(names, torch.stack(values).tolist()))
    if has_rewards:
        agreement = _credit_agreement(lw, ll, rh_w, rh_l, cm, rm, ref_chosen_token_logps, ref_rejected_token_logps)
        if agreement is not None:
            metrics["treg/credit_agreement"] = agreement

    return LossOutput(loss=loss, per_example=per_example, pref_loss=pref.detach(), reg_loss=reg.detach(),
                      chosen_seq_rewards=r_w.detach(), rejected_seq_rewards=r_l.detach(), seq_weight=w, metrics=metrics)


def _credit_agreement(lw: Tensor, ll: Tensor, rh_w: Tensor, rh_l: Tensor, cm: Tensor, rm: Tensor,
                      ref_w_tok: Tensor | None, ref_l_tok: Tensor | None) -> float | None:
    """METHOD.md §7: share of response tokens with r_hat != 0 where sign(logp_t - ref_t) == sign(r_hat_t).

    The implicit token reward is c(y) * (logp_t - ref_t) with c(y) > 0, so its sign is that of
    logp_t - ref_t. Returns None (metric omitted) without per-token reference log-probs or when no
    token has r_hat != 0. No gradient.
    """
    if ref_w_tok is None or ref_l_tok is None:
        return None
    with torch.no_grad():
        ref_w = _token_tensor(ref_w_tok, cm, "ref_chosen_token_logps")  # (B, Tw)
        ref_l = _token_tensor(ref_l_tok, rm, "ref_rejected_token_logps")  # (B, Tl)
        agree = total = 0
        for lp, ref, rh, mask in ((lw, ref_w, rh_w, cm), (ll, ref_l, rh_l, rm)):
            counted = mask & (rh != 0)
            agree += int((counted & (torch.sign(lp - ref) == torch.sign(rh))).sum())
            total += int(counted.sum())
    return agree / total if total else None
