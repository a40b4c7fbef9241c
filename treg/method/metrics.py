"""Small numeric helpers shared by the probe and the toy's credit analysis (pure numpy)."""

from __future__ import annotations

import numpy as np


def auroc(positive_scores, negative_scores) -> float | None:
    """P(random positive > random negative), ties 1/2 (Mann-Whitney U with average ranks); None if a
    class is empty."""
    pos = np.asarray(positive_scores, dtype=np.float64)
    neg = np.asarray(negative_scores, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return None
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    bounds = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts, ends = np.concatenate([[0], bounds]), np.concatenate([bounds, [scores.size]])
    ranks = np.empty(scores.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2.0) / (pos.size * neg.size))
