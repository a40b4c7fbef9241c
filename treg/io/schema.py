"""The annotated-dataset contract in one place: column names, dtypes, per-token vs per-pair.

An *annotated* dataset (``treg annotate``'s output, the trainer's input) is a ``datasets`` directory
plus ``treg_meta.json`` with ``stage == STAGE``. One row is one preference pair, already tokenized;
responses are tokenized once (METHOD.md §1):

==========================  ===========  =========  ==========================================
column                      type         per        contract
==========================  ===========  =========  ==========================================
prompt_input_ids            list[int]    pair       context ids, ending with the assistant header
chosen_input_ids            list[int]    token      response tokens only, len Tw >= 1
rejected_input_ids          list[int]    token      response tokens only, len Tl >= 1
chosen_token_rewards        list[f32]    token      r_hat per chosen token (METHOD.md §1), finite
rejected_token_rewards      list[f32]    token      r_hat per rejected token, finite
ref_chosen_logps            float64      pair       optional: sum_t log pi_ref(y_w,t | x, y_w,<t)
ref_rejected_logps          float64      pair       optional: same for y_l
ref_chosen_token_logps      list[f32]    token      optional: per-token log pi_ref, len Tw, finite
ref_rejected_token_logps    list[f32]    token      optional: per-token log pi_ref, len Tl, finite
source_index                int64        pair       extra: 0-based row of the annotate input
prompt_text, chosen_text,   string       pair       extra: the texts (for ``treg show``)
rejected_text
==========================  ===========  =========  ==========================================

Reward columns are required only when the run needs token rewards
(:func:`treg.method.losses.needs_token_rewards`); see :func:`required_columns`.
Used by :mod:`treg.io.data` (load/validate/collate), :mod:`treg.stages.annotate` (write),
:mod:`treg.stages.trainer`, :mod:`treg.stages.show` and :mod:`treg.toy.demo`.
"""

from __future__ import annotations

STAGE = "annotate"
SIDES = ("chosen", "rejected")
PROMPT = "prompt_input_ids"
IDS = {s: f"{s}_input_ids" for s in SIDES}
REWARDS = {s: f"{s}_token_rewards" for s in SIDES}
REF_SUM = {s: f"ref_{s}_logps" for s in SIDES}
REF_TOK = {s: f"ref_{s}_token_logps" for s in SIDES}
TEXT = {"prompt": "prompt_text", **{s: f"{s}_text" for s in SIDES}}
SOURCE_INDEX = "source_index"
REQUIRED = [PROMPT, IDS["chosen"], IDS["rejected"]]
REWARD_COLUMNS = [REWARDS["chosen"], REWARDS["rejected"]]
REF_COLUMNS = [REF_SUM["chosen"], REF_SUM["rejected"], REF_TOK["chosen"], REF_TOK["rejected"]]
PER_TOKEN = [*REWARD_COLUMNS, REF_TOK["chosen"], REF_TOK["rejected"]]  # one value per response token


def required_columns(*, need_token_rewards: bool) -> list[str]:
    """Columns a training run needs: ids always, r_hat when the run regularizes."""
    return REQUIRED + (REWARD_COLUMNS if need_token_rewards else [])


def features():
    """The ``datasets.Features`` of an annotated dataset as ``treg annotate`` writes it."""
    import datasets
    ints, f32 = datasets.Sequence(datasets.Value("int64")), datasets.Sequence(datasets.Value("float32"))
    cols = {SOURCE_INDEX: datasets.Value("int64"), **{c: datasets.Value("string") for c in TEXT.values()},
            PROMPT: ints}
    for side in SIDES:
        cols[IDS[side]] = ints
        cols[REWARDS[side]] = f32
        cols[REF_SUM[side]] = datasets.Value("float64")
        cols[REF_TOK[side]] = f32
    return datasets.Features(cols)
