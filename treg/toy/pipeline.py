"""The data stages of the demo on the toy world, through the project's own stage APIs.

``prompts`` -> ``sample_responses`` (treg.stages.sampling.hf_generate, seeded per response) ->
``make_pairs`` (treg.stages.scoring.make_pair with the toy's *proxy* reward) -> ``annotate_pairs``
(treg.stages.annotate.annotate with the toy's contrastive template) -> training (treg.toy.demo) ->
``evaluate`` (samples judged by the *exact* verifier).

Data shapes: a prompt is ``{"prompt_id": str, "prompt": [{"role": "user", "content": query}]}``;
a pair row is TRL's conversational preference format as written by ``treg.stages.scoring.make_pair``.
"""

from __future__ import annotations

import random

from treg.toy import world


def prompts(n: int, seed: int, *, exclude: set[str] | None = None, prefix: str = "p") -> list[dict]:
    """``n`` distinct plain-prompt rows drawn with ``random.Random(seed)``, skipping ``exclude`` queries."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows = []
    while len(rows) < n:
        query = world.random_problem(rng).query
        if query in seen:
            continue
        seen.add(query)
        rows.append({"prompt_id": f"{prefix}{len(rows)}", "prompt": world.messages(query, "plain")})
    return rows


def reference_pairs(n: int, seed: int = 0) -> list[dict]:
    """``n`` pairs in TRL's standard format for ``treg probe`` on the toy: chosen = the reference answer,
    rejected = a ``worse``-style sample (errors and filler), drawn with ``random.Random(seed)``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = world.random_problem(rng)
        out.append({"prompt": p.query, "chosen": p.reference, "rejected": world.sample_response(p, "worse", rng)})
    return out


def query_of(prompt) -> str:
    """The toy query of a prompt given as text or as messages (the last user turn)."""
    if isinstance(prompt, str):
        return prompt
    return [m["content"] for m in prompt if m["role"] == "user"][-1]


def proxy_reward_fn(prompt, response: str) -> float:
    """``treg score --reward-fn treg.toy.pipeline:proxy_reward_fn``: the toy's training reward."""
    return world.proxy_reward(query_of(prompt), response)


def verifier_reward_fn(prompt, response: str) -> float:
    """``treg score --reward-fn treg.toy.pipeline:verifier_reward_fn``: the exact verifier's reward."""
    return world.verify(query_of(prompt), response).reward


def sample_responses(model, tok, rows: list[dict], *, n: int, seed: int, temperature: float = 1.0,
                     max_new_tokens: int = 40, batch_size: int = 512) -> list[list[str]]:
    """``n`` responses per prompt row; response j of prompt p uses seed ``row_seed(seed, p, j)``, so
    the draws do not depend on batching and are shared by every policy evaluated with this seed."""
    from treg.io.chat import ChatFormat
    from treg.stages.sampling import hf_generate, row_seed, stop_token_ids
    chat = ChatFormat(tok)
    contexts = [chat.context_ids(r["prompt"]) for r in rows for _ in range(n)]
    seeds = [row_seed(seed, r["prompt_id"], j) for r in rows for j in range(n)]
    outs = hf_generate(model, tok, contexts, seeds, stop_ids=stop_token_ids(model, tok, chat),
                       temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens,
                       batch_size=batch_size)
    texts = [" ".join(o["text"].split()) for o in outs]
    return [texts[i * n:(i + 1) * n] for i in range(len(rows))]


def make_pairs(rows: list[dict], responses: list[list[str]], *, reward_seed: int) -> tuple[list[dict], dict]:
    """Best/worst pairs under the proxy reward (METHOD.md §6); returns (pairs, PairStats dict)."""
    from treg.stages.scoring import PairStats, make_pair
    stats = PairStats()
    pairs = []
    for row, resp in zip(rows, responses):
        query = query_of(row["prompt"])
        scores = [world.proxy_reward(query, r, seed=reward_seed) for r in resp]
        pair = make_pair({**row, "responses": resp}, scores, 0.0, stats)
        if pair is not None:
            pairs.append(pair)
    return pairs, stats.as_dict()


def annotate_pairs(model, tok, pairs: list[dict], *, source: str = "contrastive", dpo_model=None,
                   beta: float = 0.1):
    """Token rewards + reference log-probs for ``pairs`` (treg.stages.annotate; the toy template)."""
    from treg.stages.annotate import annotate
    from treg.method.templates import load_template
    from treg.toy import template_path
    from treg.method.token_rewards import TOKEN_REWARD_SOURCES
    template = load_template(template_path("instruction")) if TOKEN_REWARD_SOURCES[source].needs_template else "revision"
    return annotate(model, tok, pairs, template=template, source=source, dpo_model=dpo_model, beta=beta,
                    progress=False)


def evaluate(model, tok, rows: list[dict], *, n: int, seed: int, temperature: float = 1.0) -> list[dict]:
    """``n`` temperature samples per held-out prompt, each judged by the exact verifier.

    Returns one record per response: ``prompt_id``, ``query``, ``sample``, ``response``, ``reward``,
    ``exact``, ``length`` (words) and ``n_filler``.
    """
    responses = sample_responses(model, tok, rows, n=n, seed=seed, temperature=temperature)
    records = []
    for row, resp in zip(rows, responses):
        query = query_of(row["prompt"])
        for j, r in enumerate(resp):
            v = world.verify(query, r)
            records.append({"prompt_id": row["prompt_id"], "query": query, "sample": j, "response": r,
                            "reward": v.reward, "exact": bool(v.exact), "length": v.length,
                            "n_filler": v.n_filler})
    return records


def summarize(records: list[dict]) -> dict:
    """Mean verifier reward, exact-match rate and mean length (words) of evaluation records."""
    n = max(len(records), 1)
    return {"reward": sum(r["reward"] for r in records) / n, "exact_match": sum(r["exact"] for r in records) / n,
            "length": sum(r["length"] for r in records) / n, "n": len(records)}
