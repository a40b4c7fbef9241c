"""GPU check of the reference pass at scale (issue 12), driven by benchmarks/gpu_check.sh.

Subcommands (``python benchmarks/gpu_check.py CMD OUT``):

* ``setup``: a 1B-shaped random-init Llama (Llama-3.2-1B sizes: hidden 2048, 16 layers, 32 heads / 8 KV heads,
  vocab 128256, tied head) saved in bf16 with the test tokenizer, and N text pairs (about 256 + 256 tokens).
* ``treg``: under the launcher's DeepSpeed ZeRO-3 config: TRegTrainer (alpha from ``ALPHA``, default 0) ->
  reference pass (timed; a second run re-uses the cache) and ``STEPS`` optimizer steps; prints step time and
  ``torch.cuda.max_memory_allocated``.
* ``trl``: the same with ``trl.DPOTrainer`` (``precompute_ref_log_probs=True``) on the same texts.
* ``report``: one table from OUT/results.jsonl.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

STEPS = int(os.environ.get("STEPS", "8"))
PAIRS = int(os.environ.get("PAIRS", "64"))
BATCH = int(os.environ.get("BATCH", "4"))


def texts(n: int):
    from tiny import CORPUS
    out = []
    for i in range(n):
        body = lambda k, m: " ".join(CORPUS[(i * 7 + k + j) % 10] for j in range(m))  # noqa: E731
        out.append({"prompt": body(0, 20), "chosen": body(3, 20), "rejected": body(5, 18)})
    return out


def setup(out: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from tiny import tiny_tokenizer
    tok = tiny_tokenizer("llama3")
    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True,
                      max_position_embeddings=8192, bos_token_id=0, eos_token_id=4, pad_token_id=5)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(f"{out}/model")
    tok.save_pretrained(f"{out}/model")
    with open(f"{out}/pairs.json", "w") as fh:
        json.dump(texts(PAIRS), fh)


def _record(out: str, row: dict) -> None:
    print(json.dumps(row), flush=True)
    with open(f"{out}/results.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _common(out: str, name: str) -> dict:
    return dict(output_dir=f"{out}/{name}", max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=1e-6,
                logging_steps=1, save_strategy="no", report_to="none", bf16=True, gradient_checkpointing=True,
                max_length=1024, seed=0, use_cpu=os.environ.get("GPU_CHECK_CPU") == "1")


def run_treg(out: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from treg.io.chat import ChatFormat
    from treg.stages.config import TRegConfig
    from treg.stages.trainer import TRegTrainer
    alpha = float(os.environ.get("ALPHA", "0"))
    tok = AutoTokenizer.from_pretrained(f"{out}/model")
    pairs = json.load(open(f"{out}/pairs.json"))
    fmt = ChatFormat(tok, use_chat_template=False)
    data = Dataset.from_dict({
        "prompt_text": [p["prompt"] for p in pairs], "chosen_text": [p["chosen"] for p in pairs],
        "rejected_text": [p["rejected"] for p in pairs],
        "prompt_input_ids": [fmt.context_ids([{"role": "user", "content": p["prompt"]}]) for p in pairs],
        "chosen_input_ids": [fmt.response_ids(p["chosen"]) for p in pairs],
        "rejected_input_ids": [fmt.response_ids(p["rejected"]) for p in pairs]})
    args = TRegConfig(**_common(out, "treg"), alpha=alpha, ref_cache_dir=f"{out}/ref_cache", dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(f"{out}/model", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer = TRegTrainer(model, args=args, train_dataset=data, processing_class=tok)
    ref_s = time.perf_counter() - t0
    info = trainer.reference_info.get("train", {})
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    _record(out, {"trainer": f"treg alpha={alpha}", "zero3": trainer.is_deepspeed_enabled,
                  "reference_pass_s": round(ref_s, 2), "reference_reused": info.get("reused"),
                  "reference_forwards": info.get("forwards"), "step_s": round(train_s / STEPS, 3),
                  "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                  "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h][:3]})


def run_trl(out: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    tok = AutoTokenizer.from_pretrained(f"{out}/model")
    data = Dataset.from_list(json.load(open(f"{out}/pairs.json")))
    args = DPOConfig(**_common(out, "trl"), precompute_ref_log_probs=True, beta=0.1)
    model = AutoModelForCausalLM.from_pretrained(f"{out}/model", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    ref_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    _record(out, {"trainer": "trl DPOTrainer", "zero3": trainer.is_deepspeed_enabled,
                  "reference_pass_s": round(ref_s, 2), "step_s": round(train_s / STEPS, 3),
                  "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                  "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h][:3]})


def report(out: str) -> None:
    rows = [json.loads(line) for line in open(f"{out}/results.jsonl")]
    print("| trainer | ZeRO-3 | reference pass s | reused | step s | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['trainer']} | {r['zero3']} | {r['reference_pass_s']} | {r.get('reference_reused', '')} | "
              f"{r['step_s']} | {r['peak_mem_gib']} |")


if __name__ == "__main__":
    cmd, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    {"setup": setup, "treg": run_treg, "trl": run_trl, "report": report}[cmd](out)
