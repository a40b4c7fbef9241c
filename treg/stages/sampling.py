"""On-policy sampling: N responses per prompt under the chat template (METHOD.md §6).

Data contract (the samples dataset written by ``treg sample``; ``save_to_disk`` + treg_meta.json):

- ``prompt``: as given in the source (str, or a list of ``{role, content}`` messages);
- ``prompt_id`` (str): the source's ``prompt_id`` / ``question_id`` / ``uid`` / ``id`` field, else the 0-based
  row index;
- ``responses`` (list[str], N): decoded without special tokens, cut at the first stop token;
- ``response_tokens`` (list[int], N): generated tokens before the stop token;
- ``finish_reasons`` (list[str], N): ``"stop"`` (a stop token was generated) or ``"length"``.
Meta: ``stage: "sample"``, model, n, temperature, top_p, max_new_tokens, seed, backend, source,
``tokenizer_fingerprint``, counts, ``fingerprint`` (of everything that decides the output).

Reproducibility: every response ``j`` of prompt ``p`` has its own random stream, seeded by
``row_seed(seed, prompt_id, j)``. The ``hf`` backend samples by the Gumbel-max trick
(``argmax(logits / T + Gumbel noise)`` after top-p filtering is an exact draw from the
top-p-truncated softmax) with counter-based noise, a hash of (row seed, step, token): a response
does not depend on which other prompts share its batch, shard or process, nor on the device's random
generator (up to floating-point differences of padded batched forwards). Temperature 0 is greedy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

from treg.io.loading import load_causal_lm, load_tokenizer, pad_token_id
from treg.errors import TregError
from treg.io.meta import path_fingerprint  # noqa: F401  (re-exported: stages import it from here)

PROMPT_COLUMNS = ("prompt", "messages", "instruction", "turns")
ID_COLUMNS = ("prompt_id", "question_id", "uid", "id")  # uid: Arena-Hard v2 question files


@dataclass
class PromptRow:
    """A prompt to sample from. ``value`` is the prompt as given (str or messages); ``messages`` its
    normalized message list; ``row`` the 1-based source row used in error messages."""
    index: int
    row: int
    prompt_id: str
    value: Any
    messages: list[dict]
    extra: dict = field(default_factory=dict)


def load_prompt_rows(source: str, *, prompt_column: str | None = None, split: str = "train",
                     limit: int | None = None, dedupe: bool = False) -> tuple[list[PromptRow], str]:
    """Prompts from a JSONL/JSON/Parquet file, a ``datasets`` dir or a hub name (via treg.io.chat).

    The prompt column is ``prompt_column`` or the first of :data:`PROMPT_COLUMNS` present in the first
    row (``turns`` is Arena-Hard's ``[{"content": ...}]`` list: its contents become user turns).
    A repeated prompt id is an error, or with ``dedupe`` its later rows are dropped (and a line
    says how many). Returns ``(rows, label)``.
    """
    from treg.io.chat import normalize_messages, read_records
    records, label = read_records(source, split)
    if not records:
        raise TregError("no rows", file=label)
    if limit is not None:
        if limit < 1:
            raise TregError(f"--limit {limit}: need at least 1 prompt", field="limit")
        records = records[:limit]
    first = records[0][1]
    column = prompt_column or next((c for c in PROMPT_COLUMNS if c in first), None)
    if column is None:
        raise TregError(f"no prompt column (looked for {', '.join(PROMPT_COLUMNS)}; have "
                        f"{', '.join(first) or 'none'}); pass --prompt-column", file=label, row=records[0][0])
    id_col = next((c for c in ID_COLUMNS if c in first and c != column), None)
    rows, seen, dropped = [], set(), 0
    for index, (row, rec) in enumerate(records):
        if rec.get(column) is None:
            raise TregError("missing field", file=label, row=row, field=column)
        value = rec[column]
        if column == "turns" and isinstance(value, list):
            try:
                value = [{"role": "user", "content": t["content"]} for t in value]
            except (TypeError, KeyError):
                raise TregError("turns must be [{'content': ...}]", file=label, row=row, field=column) from None
        msgs = normalize_messages(value, file=label, row=row, field=column)
        if msgs[-1]["role"] == "assistant":
            raise TregError("a prompt must not end with an assistant turn", file=label, row=row, field=column)
        pid = str(rec[id_col]) if id_col and rec.get(id_col) is not None else str(index)
        if pid in seen:
            if dedupe:
                dropped += 1
                continue
            raise TregError(f"duplicate prompt id {pid!r} (pass --dedupe to keep the first)", file=label,
                            row=row, field=id_col or "index")
        seen.add(pid)
        extra = {k: v for k, v in rec.items() if k != column}
        rows.append(PromptRow(index=index, row=row, prompt_id=pid, value=value, messages=msgs, extra=extra))
    if dropped:
        print(f"treg: dropped {dropped} rows of {label} whose prompt id repeats an earlier row (--dedupe)")
    return rows, label


def row_seed(seed: int, prompt_id: str, j: int) -> int:
    """The seed of response ``j`` of prompt ``prompt_id``: independent of batch, shard and process."""
    digest = hashlib.sha256(f"{seed}\x1f{prompt_id}\x1f{j}".encode()).hexdigest()
    return int(digest[:15], 16)


_M32 = 0xFFFFFFFF


def _fmix32(x):
    """murmur3's 32-bit finalizer on an int64 tensor of uint32 values (products wrap mod 2**64; only
    their low 32 bits are kept, so the result is exact on every device)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def hashed_uniform(seeds, step: int, vocab: int, device=None):
    """Uniform noise in (0, 1), float64 ``(B, vocab)``: a pure function of (seed of row b, step, token).

    Counter-based (a hash, no generator state), so a row's noise is the same whatever else is in the
    batch, and the same on CPU and CUDA. 48 random bits per value.
    """
    import torch
    s = torch.as_tensor([int(v) for v in seeds], dtype=torch.int64, device=device)
    row = _fmix32(_fmix32((s & _M32) ^ 0x9E3779B9) ^ ((s >> 32) & _M32))
    key = _fmix32(row ^ ((step * 0x9E3779B9 + 0x7F4A7C15) & _M32))
    tok = torch.arange(vocab, dtype=torch.int64, device=device)
    a = _fmix32(key[:, None] ^ tok[None, :])
    b = _fmix32(a ^ 0x68E31DA4)
    return ((a >> 8).double() * 16777216.0 + (b >> 8).double() + 0.5) / 281474976710656.0


class GumbelSampler:
    """A ``LogitsProcessor`` that turns greedy decoding into per-row seeded sampling.

    ``scores (B, V)`` -> ``scores / T`` with tokens outside the top-p nucleus set to -inf, plus
    Gumbel noise ``-log(-log(u))`` with ``u = hashed_uniform(seeds, step, V)``. ``argmax`` of the
    result is a sample from the truncated softmax (Gumbel-max trick). The step counter advances once
    per call, i.e. once per generated token.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        if temperature <= 0:
            raise ValueError("GumbelSampler needs temperature > 0 (use greedy decoding for 0)")
        self.seeds, self.temperature, self.top_p = list(seeds), float(temperature), float(top_p)
        self.step = 0

    def __call__(self, input_ids, scores):
        import torch
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
            probs = sorted_scores.softmax(dim=-1)
            # drop a token when the mass before it already exceeds top_p (the top token always stays)
            drop_sorted = (probs.cumsum(dim=-1) - probs) > self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        u = hashed_uniform(self.seeds, self.step, scores.shape[-1], device=scores.device)
        self.step += 1
        return scores + (-torch.log(-torch.log(u))).float()


def stop_token_ids(model, tokenizer, chat) -> list[int]:
    """Tokens that end a response: the chat template's end-of-turn token, EOS, and the model's
    ``generation_config.eos_token_id`` (which may be a list, as for Llama-3-Instruct). ``model`` may
    also be a ``GenerationConfig`` or None."""
    ids = set()
    if chat.end_of_turn_ids:
        ids.add(int(chat.end_of_turn_ids[-1]))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", model), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    if not ids:
        raise TregError("the tokenizer has no EOS / end-of-turn token: generation could not stop")
    return sorted(ids)


def hf_generate(model, tokenizer, contexts: Sequence[list[int]], seeds: Sequence[int], *, stop_ids: list[int],
                temperature: float, top_p: float, max_new_tokens: int, batch_size: int,
                progress=None) -> list[dict]:
    """Generate one response per context with ``model.generate`` (left padding, batched).

    ``contexts[i]`` are prompt token ids (ending with the assistant header) and ``seeds[i]`` the
    seed of that response. Batches are formed over contexts sorted by length (less padding).
    Returns per context ``{"text", "n_tokens", "finish_reason"}``. ``progress(k)`` is called after
    each batch with the number of responses done.
    """
    import torch
    from transformers import GenerationConfig, LogitsProcessorList
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    order = sorted(range(len(contexts)), key=lambda i: (-len(contexts[i]), i))
    results: list[dict | None] = [None] * len(contexts)
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                               pad_token_id=pad, num_beams=1)
    stop = set(stop_ids)
    for start in range(0, len(order), batch_size):
        group = order[start:start + batch_size]
        width = max(len(contexts[i]) for i in group)
        ids = torch.tensor([[pad] * (width - len(contexts[i])) + list(contexts[i]) for i in group], device=device)
        mask = torch.tensor([[0] * (width - len(contexts[i])) + [1] * len(contexts[i]) for i in group],
                            device=device)
        procs = LogitsProcessorList()
        if temperature > 0:
            procs.append(GumbelSampler([seeds[i] for i in group], temperature, top_p))
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                                 logits_processor=procs)
        for k, i in enumerate(group):
            gen = out[k, width:].tolist()
            cut = next((t for t, tok in enumerate(gen) if tok in stop), None)
            toks = gen if cut is None else gen[:cut]
            results[i] = {"text": tokenizer.decode(toks, skip_special_tokens=True), "n_tokens": len(toks),
                          "finish_reason": "length" if cut is None else "stop"}
        if progress is not None:
            progress(len(group))
    return results


def vllm_engine(model_path: str, *, dtype: str | None = None, tensor_parallel_size: int = 1,
                gpu_memory_utilization: float | None = None, max_model_len: int | None = None):
    """A ``vllm.LLM`` for ``model_path`` (bf16 by default; ``tensor_parallel_size`` GPUs;
    ``gpu_memory_utilization`` and ``max_model_len`` passed to vLLM when given, else vLLM's defaults).
    The vLLM path is not run in this project (no GPU / vllm in CI)."""
    from treg.extras import require
    vllm = require("vllm", what="--backend vllm")
    if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
        raise TregError("--gpu-memory-utilization must be in (0, 1]", field="gpu_memory_utilization")
    if max_model_len is not None and max_model_len < 1:
        raise TregError("--max-model-len must be >= 1", field="max_model_len")
    if tensor_parallel_size < 1:
        raise TregError("--tensor-parallel-size must be >= 1", field="tensor_parallel_size")
    extra = {k: v for k, v in (("gpu_memory_utilization", gpu_memory_utilization),
                               ("max_model_len", max_model_len)) if v is not None}
    return vllm.LLM(model=model_path, dtype="bfloat16" if dtype in (None, "auto") else dtype, tensor_parallel_size=tensor_parallel_size, **extra)


def vllm_generate(llm, contexts: Sequence[list[int]], seeds: Sequence[int], *, stop_ids: list[int],
                  temperature: float, top_p: float, max_new_tokens: int) -> list[dict]:
    """Same contract as :func:`hf_generate`, on a :func:`vllm_engine`. One request per response with its
    own ``SamplingParams(seed=...)``, as the SimPO recipe seeds each of its samples; prompts are passed
    as token ids so the chat template is applied once, here."""
    from vllm import SamplingParams
    params = [SamplingParams(n=1, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                             max_tokens=max_new_tokens, seed=s, stop_token_ids=stop_ids,
                             skip_special_tokens=True) for s in seeds]
    outs = llm.generate([{"prompt_token_ids": list(c)} for c in contexts], params)
    stop, results = set(stop_ids), []
    for o in outs:
        c = o.outputs[0]
        results.append({"text": c.text, "n_tokens": sum(t not in stop for t in c.token_ids),
                        "finish_reason": "length" if c.finish_reason == "length" else "stop"})
    return results


# --------------------------------------------------------------------------- the `treg sample` run



def load_generation_config(model_path: str):
    """The model's ``GenerationConfig`` (for its EOS ids), or None when it has none."""
    from transformers import GenerationConfig
    try:
        return GenerationConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return None


def load_policy(model_path: str, *, dtype: str | None = None, device=None):
    """``(model, tokenizer)`` for generation: eval mode, dtype auto (bf16 on a capable GPU, else fp32)."""
    if device is None:
        from accelerate import PartialState
        device = PartialState().device
    tokenizer = load_tokenizer(model_path, field="model")
    return load_causal_lm(model_path, dtype=dtype or "auto", device=device, field="model"), tokenizer


def sample(model_path: str, prompts: str, output: str, *, n: int = 5, temperature: float = 0.8,
           top_p: float = 0.95, max_new_tokens: int = 1024, seed: int = 0, backend: str = "hf",
           batch_size: int = 16, prompt_column: str | None = None, split: str = "train",
           shard_size: int = 64, overwrite: bool = False, use_chat_template: bool = True,
           dtype: str | None = None, limit: int | None = None, progress: bool = True,
           after_shard=None, dedupe: bool = False, tensor_parallel_size: int = 1,
           gpu_memory_utilization: float | None = None, max_model_len: int | None = None) -> dict:
    """Run ``treg sample`` (see module docstring); returns the meta written beside the dataset.

    Resumable: shards of ``shard_size`` prompts are written atomically under ``output/.shards``; a
    rerun with the same settings continues, with other settings it is refused unless ``overwrite``.
    Under ``accelerate launch`` each process samples the shards ``i % world == rank`` (hf backend).
    ``after_shard(i)`` is called after each shard is written (tests record the resumed shards with it).
    ``tensor_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``: the one vLLM engine's
    settings (vllm backend; see :func:`vllm_engine`).
    """
    from accelerate import PartialState
    from treg.io.chat import ChatFormat
    from treg.io.meta import stable_hash, tokenizer_fingerprint
    from treg.io.shards import ShardedWriter
    if n < 2:
        raise TregError(f"--n {n}: at least 2 responses per prompt are needed to form a preference pair",
                        field="n")
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1 or batch_size < 1 or shard_size < 1:
        raise TregError("need temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1, batch/shard size >= 1")
    if temperature == 0:
        raise TregError("--temperature 0 is greedy: all N responses would be identical", field="temperature")
    if backend not in ("hf", "vllm"):
        raise TregError(f"unknown backend {backend!r} (hf | vllm)", field="backend")
    rows, label = load_prompt_rows(prompts, prompt_column=prompt_column, split=split, limit=limit, dedupe=dedupe)
    state = PartialState()
    if backend == "vllm":
        from treg.extras import available, install_hint
        if not available("vllm"):
            raise TregError(f"--backend vllm needs the optional package 'vllm': {install_hint('vllm')}; or use "
                            "--backend hf", field="backend")
        if state.num_processes > 1:
            raise TregError("--backend vllm runs as one process (use --tensor-parallel-size), not under "
                            "accelerate launch", field="backend")
    tokenizer = load_tokenizer(model_path, field="model")  # the model itself is loaded only if there is work left
    chat = ChatFormat(tokenizer, use_chat_template=use_chat_template, file=model_path)
    stops = stop_token_ids(load_generation_config(model_path), tokenizer, chat)
    settings = {"stage": "sample", "model": path_fingerprint(model_path),
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                "prompts": stable_hash([(r.prompt_id, r.messages) for r in rows]), "n": n,
                "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
                "backend": backend, "shard_size": shard_size, "use_chat_template": use_chat_template}
    writer = ShardedWriter.for_rows(output, rows, shard_size=shard_size, settings=settings, state=state,
                                    overwrite=overwrite)
    pending = writer.pending_shards()
    model = load_policy(model_path, dtype=dtype, device=state.device)[0] if pending and backend == "hf" else None
    llm = vllm_engine(model_path, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                      gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len) \
        if pending and backend == "vllm" else None
    bar = None
    if progress and pending and state.is_main_process:
        from treg.progress import progress_bar
        bar = progress_bar(writer.pending_rows() * n, "sample", "resp")

    def work(i: int, shard: list) -> list[dict]:
        contexts = [chat.context_ids(r.messages) for r in shard for _ in range(n)]
        seeds = [row_seed(seed, r.prompt_id, j) for r in shard for j in range(n)]
        if backend == "hf":
            outs = hf_generate(model, tokenizer, contexts, seeds, stop_ids=stops, temperature=temperature,
                               top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               progress=bar.update if bar else None)
        else:
            outs = vllm_generate(llm, contexts, seeds, stop_ids=stops, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens)
            if bar:
                bar.update(len(outs))
        out_rows = []
        for k, r in enumerate(shard):
            got = outs[k * n:(k + 1) * n]
            out_rows.append({"prompt": r.value if isinstance(r.value, str) else r.messages,
                             "prompt_id": r.prompt_id, "responses": [g["text"] for g in got],
                             "response_tokens": [g["n_tokens"] for g in got],
                             "finish_reasons": [g["finish_reason"] for g in got]})
        return out_rows

    writer.run(work, after_shard=after_shard)
    if bar:
        bar.close()
    meta = {"stage": "sample", "model": model_path, "source": label, "n": n, "temperature": temperature,
            "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed, "backend": backend,
            "tokenizer_fingerprint": settings["tokenizer_fingerprint"], "prompts": len(rows),
            "use_chat_template": use_chat_template}
    writer.finalize(meta)
    return {**meta, "fingerprint": writer.fingerprint}
