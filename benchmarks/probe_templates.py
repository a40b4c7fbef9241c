"""Template research for `treg probe` (issue 11, item 4; results in docs/annotate.md, "Probe").

Scores token rewards of several contrastive template designs (and post-hoc normalizations) with
``treg.stages.probe`` on benchmarks/data/probe_facts.jsonl (benchmarks/probe_facts.py), in one of two
labelings:

* ``--errors own``:   the pairs' OWN planted error (the tokens where rejected differs from chosen) is
  the "corrupted" span, rejected is the corrupted response (nothing is planted by the probe);
* ``--errors plant``: the probe's planted corruptions (number / entity / negation / off-topic) of chosen.

Designs are YAML templates: shipped names (revision, instruction, anchored) or files such as
``benchmarks/templates/*.yaml``. Normalizations act on ``d_t = lp_better - lp_worse`` per response before the
sigmoid: ``center`` (d - mean d), ``zscore`` ((d - mean d) / std d). Usage::

    python benchmarks/probe_templates.py --model DIR --errors own --n-pairs 60 \\
        --templates revision instruction anchored benchmarks/templates/judge.yaml ... [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from treg.method.corrupt import Corruption  # noqa: E402
from treg.stages.probe import MethodResult, Planted, metrics, plant, score_methods  # noqa: E402


def own_errors(rows, fmt) -> list[Planted]:
    """Planted = the character span where rejected differs from chosen (common prefix/suffix trimmed)."""
    from treg.method.corrupt import planted_tokens
    out = []
    for r in rows:
        a, b = r.chosen, r.rejected
        i = 0
        while i < min(len(a), len(b)) and a[i] == b[i]:
            i += 1
        j = 0
        while j < min(len(a), len(b)) - i and a[-1 - j] == b[-1 - j]:
            j += 1
        enc = fmt.tokenizer(b, add_special_tokens=False, return_offsets_mapping=True)
        idx = planted_tokens(enc["offset_mapping"], (i, len(b) - j))
        if idx:
            out.append(Planted(r, Corruption("own", b, (i, len(b) - j), a[i:len(a) - j], b[i:len(b) - j]),
                               idx, len(enc["input_ids"])))
    return out


def normalized(res: MethodResult, how: str) -> MethodResult:
    def norm(r):
        r = np.clip(np.asarray(r, dtype=np.float64), -0.4999999, 0.4999999)
        d = np.log((0.5 + r) / (0.5 - r))
        d = d - d.mean()
        if how == "zscore":
            d = d / (d.std() + 1e-6)
        return 1.0 / (1.0 + np.exp(-d)) - 0.5
    return MethodResult(f"{res.name}+{how}", {s: [norm(r) for r in v] for s, v in res.rewards.items()})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", default=str(Path(__file__).parent / "data" / "probe_facts.jsonl"))
    p.add_argument("--templates", nargs="+", default=["revision", "instruction"])
    p.add_argument("--errors", choices=("own", "plant"), default="own")
    p.add_argument("--n-pairs", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from treg.io.chat import ChatFormat, read_preference_rows
    from treg.method.templates import load_template
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    fmt = ChatFormat(tok)
    rows = read_preference_rows(args.dataset)
    if args.errors == "own":
        planted = own_errors(rows, fmt)
        if len(planted) > args.n_pairs:
            import random
            keep = sorted(random.Random(args.seed).sample(range(len(planted)), args.n_pairs))
            planted = [planted[i] for i in keep]
    else:
        planted = plant(rows, fmt, n_pairs=args.n_pairs, seed=args.seed)
    methods = [(f"contrastive:{Path(t).stem}", load_template(t)) for t in args.templates]
    t0 = time.perf_counter()
    planted, results = score_methods(model, tok, planted, methods=methods, fmt=fmt, batch_tokens=2048,
                                     max_length=None, seed=args.seed)
    seconds = time.perf_counter() - t0
    results += [normalized(r, how) for r in results if r.name.startswith("contrastive") for how in ("center", "zscore")]
    results += [normalized(r, "center") for r in results if r.name == "surprisal"]
    table = [metrics(planted, r, seed=args.seed) for r in results]
    print(f"{len(planted)} pairs, errors={args.errors}, {seconds:.0f} s scoring, torch threads {args.threads}, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'method':<36} {'AUROC [95% CI]':<22} {'agreement':<10} {'clean>bad':<10}")
    for r in table:
        ci = r["auroc_ci"]
        print(f"{r['method']:<36} {r['auroc']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]    {r['agreement']:<10.3f} "
              f"{r['clean_beats_corrupted']:<10.3f} {r['auroc_by_strategy'] if args.errors == 'plant' else ''}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "seconds": seconds, "results": table}, indent=1))


if __name__ == "__main__":
    main()
