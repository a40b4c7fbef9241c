"""Token-reward quality against the toy's ground truth: ROC-AUC of a token reward.

A token reward ``r`` (one float per response token) is judged by how well it ranks the verifier's
``correct`` tokens above the ``incorrect`` and ``filler`` ones. The response's end-of-turn token(s)
(after the last word) carry no ground-truth label and are left out.

AUROC is computed with the rank (Mann-Whitney U) formula, ties counted as one half:
``AUC = (sum of positive ranks - P(P+1)/2) / (P * N)`` with average ranks for ties.
"""

from __future__ import annotations

import numpy as np

from treg.method.metrics import auroc  # noqa: F401  (credit.auroc: the toy's API)
from treg.toy import world


def token_labels(query: str, response: str) -> list[str]:
    """Ground-truth label per response word (= per toy token): ``correct`` / ``incorrect`` / ``filler``."""
    return list(world.verify(query, response).labels)


def collect(queries, responses, token_rewards) -> dict[str, list[float]]:
    """Group token rewards by ground-truth label.

    ``token_rewards[i]`` holds one float per response token of ``responses[i]`` (its words, then the
    end-of-turn tokens, which are ignored); a shorter list is a programming error.
    """
    groups: dict[str, list[float]] = {label: [] for label in world.LABELS}
    for query, response, rewards in zip(queries, responses, token_rewards):
        labels = token_labels(query, response)
        if len(rewards) < len(labels):
            raise ValueError(f"{len(rewards)} token rewards for a {len(labels)}-word response")
        for label, r in zip(labels, rewards):
            groups[label].append(float(r))
    return groups


def quality(queries, responses, token_rewards) -> dict:
    """AUROCs of a token reward: correct vs (incorrect + filler), vs incorrect, vs filler; label counts."""
    g = collect(queries, responses, token_rewards)
    return {
        "auroc": auroc(g["correct"], g["incorrect"] + g["filler"]),
        "auroc_vs_incorrect": auroc(g["correct"], g["incorrect"]),
        "auroc_vs_filler": auroc(g["correct"], g["filler"]),
        "mean": {label: (float(np.mean(v)) if v else None) for label, v in g.items()},
        "count": {label: len(v) for label, v in g.items()},
    }
