"""AlpacaEval 2's length-controlled (LC) win rate, computed as ``alpaca_eval==0.6.6`` computes it.

This is a line-for-line port of ``alpaca_eval.metrics.glm_winrate.get_length_controlled_winrate``
(and its helpers ``_get_featurized_data`` and ``fit_LogisticRegressionCV``) without pandas / patsy:

- preference ``p`` in [0, 1]: the probability that the model (``--outputs``) beats the baseline
  (AlpacaEval's ``preference - 1``, a tie = 0.5);
- features, no intercept: ``tanh(std_delta_len)`` with ``std_delta_len = (len_baseline - len_model) /
  sd`` (characters; ``sd`` with ddof=1, as pandas), ``instruction_difficulty``, and
  ``not_gamed_baseline`` (1 for the model's rows);
- fit: scikit-learn ``LogisticRegressionCV(penalty="l1", solver="liblinear", fit_intercept=False,
  random_state=123)``, each row duplicated as a y=1 row weighted ``p`` and a y=0 row weighted ``1 - p``,
  ``Cs`` chosen by 5-fold ``GroupKFold`` (a row's two copies in one group) on a continuous log loss;
- ``length_controlled_v1`` also trains on the two "gamed" baselines' annotations (``not_gamed_baseline``
  = 0), each weighted ``lambda / 2`` with ``lambda = 0.2`` (regularization toward the baseline);
- LC win rate = mean over instructions of the predicted preference at ``std_delta_len = 0``, in %;
  standard error = the SEM of those predictions (ddof=1), in %.

AlpacaEval reads ``instruction_difficulty`` and the gamed annotations from its hub file ``df_gamed.csv``
(dataset ``tatsu-lab/alpaca_eval``); an instruction's difficulty is looked up by its position in the
evaluation set (0..804). treg never downloads it: give that file (``treg eval --lc-gamed``) for
``length_controlled_v1``, else treg uses AlpacaEval's ``length_controlled_minimal`` GLM (length and
baseline terms only, no regularization), which needs neither and is what works offline.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from treg.errors import TregError

GLMS = {  # name -> (uses instruction difficulty, regularize-to-baseline lambda); as alpaca_eval's GLM_INFO
    "length_controlled_v1": (True, 0.2),
    "length_controlled_noreg": (True, None),
    "length_controlled_minimal": (False, None),
}
N_SPLITS = 5


@dataclass
class Gamed:
    """AlpacaEval's ``df_gamed.csv``: the gamed baselines' rows and per-instruction difficulty."""
    preference: np.ndarray  # in [0, 1], as stored
    std_delta_len: np.ndarray
    difficulty: np.ndarray  # per gamed row
    index: np.ndarray  # instruction position per gamed row
    not_gamed: np.ndarray  # per gamed row (False in AlpacaEval's file)

    def difficulty_of(self, index: Sequence[int]) -> np.ndarray:
        """Difficulty per instruction position, from the first gamed row of each ``index`` (as
        ``df_gamed.drop_duplicates("index")``)."""
        table: dict[int, float] = {}
        for i, d in zip(self.index.tolist(), self.difficulty.tolist()):
            table.setdefault(int(i), d)
        missing = [i for i in index if int(i) not in table]
        if missing:
            raise TregError(f"instruction position {missing[0]} has no difficulty in the --lc-gamed file "
                            f"(it covers {len(table)} instructions; AlpacaEval's covers its 805, in order)")
        return np.array([table[int(i)] for i in index], dtype=float)


def read_gamed(path: str) -> Gamed:
    """Read AlpacaEval's ``df_gamed.csv`` (columns ``index, preference, std_delta_len,
    instruction_difficulty, not_gamed_baseline``; ``model`` and others ignored)."""
    p = Path(path)
    if not p.is_file():
        raise TregError("no such file", file=path)
    need = ("index", "preference", "std_delta_len", "instruction_difficulty", "not_gamed_baseline")
    cols: dict[str, list] = {k: [] for k in need}
    from treg.io.fsutil import read_text_strict
    with io.StringIO(read_text_strict(p, what="CSV file"), newline="") as f:
        reader = csv.DictReader(f)
        for k in need:
            if k not in (reader.fieldnames or []):
                raise TregError("not AlpacaEval's df_gamed.csv: missing column", file=path, field=k)
        for row_no, r in enumerate(reader, start=2):
            try:
                cols["index"].append(int(float(r["index"])))
                for k in ("preference", "std_delta_len", "instruction_difficulty"):
                    cols[k].append(float(r[k]) if r[k] != "" else math.nan)
                cols["not_gamed_baseline"].append(r["not_gamed_baseline"].strip().lower() in ("true", "1", "1.0"))
            except ValueError:
                raise TregError("non-numeric value", file=path, row=row_no) from None
    return Gamed(preference=np.array(cols["preference"]), std_delta_len=np.array(cols["std_delta_len"]),
                 difficulty=np.array(cols["instruction_difficulty"]), index=np.array(cols["index"]),
                 not_gamed=np.array(cols["not_gamed_baseline"], dtype=bool))


def _logloss_continuous(y_true, y_pred, true_prob, true_sample_weight=None):
    """alpaca_eval's CV score: log loss against the continuous preference (weighted, mean over rows)."""
    y_true = np.where(y_true == 1, true_prob, 1 - true_prob)
    y_pred = np.clip(y_pred, 1e-15, 1 - 1e-15)
    ll = y_true * np.log(y_pred) + (1 - y_true) * np.log(1 - y_pred)
    if true_sample_weight is not None:
        ll = ll * true_sample_weight
    return -np.mean(ll)


def _fit_cv(X: np.ndarray, p: np.ndarray, sample_weight: np.ndarray | None):
    """alpaca_eval's ``fit_LogisticRegressionCV(is_ytrue_proba=True, n_splits=5)``."""
    import sklearn
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import make_scorer
    from sklearn.model_selection import GroupKFold
    n = len(p)
    groups = np.concatenate([np.arange(n), np.arange(n)])
    X_dup = np.concatenate([X, X], axis=0)
    y_dup = np.concatenate([np.ones(n, dtype=int), np.zeros(n, dtype=int)])
    true_prob = np.concatenate([p, 1 - p])
    if sample_weight is None:
        true_sample_weight, weight = None, true_prob
    else:
        true_sample_weight = np.concatenate([sample_weight, sample_weight])
        weight = true_prob * true_sample_weight
    with sklearn.config_context(enable_metadata_routing=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn >= 1.8 deprecates penalty="l1"; kept to match alpaca_eval
        scorer = make_scorer(_logloss_continuous, response_method="predict_proba", greater_is_better=False
                             ).set_score_request(true_sample_weight=True, true_prob=True)
        model = LogisticRegressionCV(cv=GroupKFold(n_splits=N_SPLITS), scoring=scorer, random_state=123, dual=False,
                                     penalty="l1", solver="liblinear", n_jobs=None, fit_intercept=False)
        model.set_fit_request(sample_weight=True)
        model.fit(X_dup, y_dup, sample_weight=weight, groups=groups, true_sample_weight=true_sample_weight,
                  true_prob=true_prob)
    return model


def lc_win_rate(preference: Sequence[float], len_model: Sequence[int], len_baseline: Sequence[int], *,
                gamed: Gamed | None = None, glm: str | None = None) -> dict:
    """AlpacaEval 0.6.6's LC win rate of the model over the baseline (see the module docstring).

    ``preference[i]`` in [0, 1] is the model's win (1), tie (0.5) or loss (0) on instruction ``i`` — the
    position that indexes AlpacaEval's difficulty. ``glm`` defaults to ``length_controlled_v1`` when
    ``gamed`` is given, else ``length_controlled_minimal``. Returns ``{"lc_win_rate", "lc_standard_error",
    "lc_glm", "lc_weights", "lc_note"}`` (rates in %; ``lc_win_rate`` None when it cannot be fitted).
    """
    glm = glm or ("length_controlled_v1" if gamed is not None else "length_controlled_minimal")
    if glm not in GLMS:
        raise TregError(f"unknown LC model {glm!r}; choose one of {', '.join(GLMS)}", field="lc-glm")
    use_difficulty, lam = GLMS[glm]
    if use_difficulty and gamed is None:
        raise TregError(f"{glm} needs instruction difficulty: give AlpacaEval's df_gamed.csv (--lc-gamed)",
                        field="lc-glm")
    p = np.asarray(preference, dtype=float)
    n = len(p)
    delta = np.asarray(len_baseline, dtype=float) - np.asarray(len_model, dtype=float)
    sd = float(np.std(delta, ddof=1)) if n > 1 else 0.0
    out = {"lc_glm": glm, "lc_win_rate": None, "lc_standard_error": None, "lc_weights": None}
    if n < N_SPLITS:
        return {**out, "lc_note": f"{glm}: needs >= {N_SPLITS} prompts for its {N_SPLITS}-fold CV"}
    if not sd > 0:
        return {**out, "lc_note": f"{glm}: every pair has the same length difference (no length contrast to fit)"}
    difficulty = gamed.difficulty_of(range(n)) if gamed is not None else np.zeros(n)
    # design matrix in patsy's column order: tanh(std_delta_len), instruction_difficulty, not_gamed_baseline
    X = np.stack([np.tanh(delta / sd), difficulty, np.ones(n)], axis=1)
    X_test = np.stack([np.zeros(n), difficulty, np.ones(n)], axis=1)
    if not use_difficulty:
        X, X_test = X[:, [0, 2]], X_test[:, [0, 2]]
    weight = None
    if lam:
        Xg = np.stack([np.tanh(gamed.std_delta_len), gamed.difficulty, gamed.not_gamed.astype(float)], axis=1)
        keep = ~np.isnan(gamed.preference)  # alpaca_eval drops rows without a preference
        X = np.concatenate([Xg[keep], X], axis=0)
        p = np.concatenate([gamed.preference[keep], p])
        # "divided by 2 because there are two gamed baselines"
        weight = np.concatenate([np.where(gamed.not_gamed[keep], 1.0, lam / 2), np.ones(n)])
    model = _fit_cv(X, p, weight)
    pred = model.predict_proba(X_test)[:, 1]
    names = ["np.tanh(std_delta_len)", "instruction_difficulty", "not_gamed_baseline.astype(float)"]
    if not use_difficulty:
        names = [names[0], names[2]]
    source = "difficulty and gamed baselines from --lc-gamed" if gamed is not None else \
        "offline: no instruction difficulty or gamed baselines"
    return {**out, "lc_win_rate": 100 * float(pred.mean()),
            "lc_standard_error": 100 * float(np.std(pred, ddof=1) / math.sqrt(n)),
            "lc_weights": dict(zip(names, map(float, model.coef_[0]))),
            "lc_note": f"AlpacaEval 0.6.6 {glm} ({source})"}
