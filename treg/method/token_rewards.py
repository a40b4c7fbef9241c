"""Token-reward sources: where r_hat (one value in [-0.5, 0.5] per response token) comes from.

One :class:`TokenRewardSource` entry per source in :data:`TOKEN_REWARD_SOURCES`; ``treg annotate
--source`` choices and help, the annotate stage's model passes and recorded settings, the demo's
ablations and docs/annotate.md's table all read it. Every source also gets the reference model's
log-probs of each response under the plain prompt (``("plain", "ref")``, the ``ref_*`` columns);
``scores`` lists the other (context, model) passes its rule reads. Pure numpy, no model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

PLAIN_REF = ("plain", "ref")  # every source: reference log-probs under the plain prompt x
# Registry keys, named once for the code that picks a source by its role (the demo's ablation table)
CONTRASTIVE, DPO_IMPLICIT, DPO_SFT = "contrastive", "dpo", "sft-chosen"


def sigmoid_half(x: np.ndarray) -> np.ndarray:
    """sigmoid(x) - 0.5 in float64, returned as float32 (METHOD.md §1)."""
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64))) - 0.5).astype(np.float32)


@dataclass(frozen=True)
class TokenRewardSource:
    """One way to compute r_hat for a response of ``n`` tokens.

    ``rule(lp, side, beta, n)``: ``lp`` maps (context, model) -> per-token log-probs (float32, n) of
    this response for every pass in ``(PLAIN_REF, *scores)``; ``side`` is "chosen" or "rejected".
    ``scores``: the extra passes (context in plain | better | worse, model in ref | dpo).
    ``needs_template``: contexts better/worse come from a contrastive template;
    ``needs_dpo_model``: a trained DPO policy is scored (``--dpo-model``); ``uses_beta``: the rule reads beta.
    """

    doc: str
    rule: Callable[[dict, str, float, int], np.ndarray]
    scores: tuple[tuple[str, str], ...] = ()
    needs_template: bool = False
    needs_dpo_model: bool = False
    uses_beta: bool = False

    @property
    def needs_model(self) -> bool:
        """False when r_hat follows from the data alone (then no model pass is needed for it)."""
        return bool(self.scores)

    def rewards(self, lp: dict, side: str, beta: float, n: int) -> np.ndarray:
        return self.rule(lp, side, beta, n)


def _contrastive(lp: dict, side: str, beta: float, n: int) -> np.ndarray:
    return sigmoid_half(lp[("better", "ref")] - lp[("worse", "ref")])  # METHOD.md §1


def _dpo(lp: dict, side: str, beta: float, n: int) -> np.ndarray:
    # METHOD.md §5 "DPO-reward regularizer": sigmoid(beta * (log pi_dpo - log pi_ref)) - 0.5
    return sigmoid_half(beta * (lp[("plain", "dpo")].astype(np.float64) - lp[PLAIN_REF]))


def _sft_chosen(lp: dict, side: str, beta: float, n: int) -> np.ndarray:
    return np.full(n, 0.5 if side == "chosen" else 0.0, dtype=np.float32)  # METHOD.md §5 DPO-SFT


TOKEN_REWARD_SOURCES: dict[str, TokenRewardSource] = {
    CONTRASTIVE: TokenRewardSource(
        doc="sigmoid(log p(y_t | x_better) - log p(y_t | x_worse)) - 0.5 with a contrastive template (the paper)",
        rule=_contrastive, scores=(("better", "ref"), ("worse", "ref")), needs_template=True),
    DPO_IMPLICIT: TokenRewardSource(
        doc="sigmoid(beta * (log pi_dpo(y_t) - log pi_ref(y_t))) - 0.5 from a trained DPO policy (ablation)",
        rule=_dpo, scores=(("plain", "dpo"),), needs_dpo_model=True, uses_beta=True),
    DPO_SFT: TokenRewardSource(
        doc="+0.5 on every chosen token, 0 on rejected: DPO-SFT (ablation, use with weighting static)",
        rule=_sft_chosen),
}
