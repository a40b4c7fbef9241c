"""Trainer benchmark: step time and peak memory of TRegTrainer (DPO, DPO-REG) vs TRL 1.16 DPOTrainer.

Same random-init Llama, same random pre-tokenized pairs, batch, optimizer and precomputed reference
log-probs (random values; the timing does not depend on them) for every run. Each run is a child
process (so peak memory is per run: ``ru_maxrss`` on CPU, ``torch.cuda.max_memory_allocated`` on
CUDA); the step time is the median over ``--steps`` optimizer steps after ``--warmup``.

    python benchmarks/bench_trainer.py                                   # tiny CPU default
    python benchmarks/bench_trainer.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16 \
        --heads 16 --vocab 128256 --batch 8 --prompt 256 --response 512
    python benchmarks/bench_trainer.py --model "$(treg model path smollm2-135m-instruct)" \
        --batch 2 --prompt 32 --response 64 --steps 3 --warmup 1 --rounds 1   # a real checkpoint

Prints a markdown table (copied into docs/benchmarks.md, section "trainer").
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _child import report, run_child  # benchmarks/_child.py (the script's own directory is on sys.path)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="model weight dtype (bfloat16 also turns on bf16 mixed precision)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--vocab", type=int, default=2048, help="vocabulary size")
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per pair")
    p.add_argument("--response", type=int, default=64, help="tokens per response")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    p.add_argument("--gradient-checkpointing", action="store_true", help="turn on activation checkpointing")
    p.add_argument("--rounds", type=int, default=3,
                   help="run the variants in turn this many times; report each one's best median (noise guard)")
    p.add_argument("--model", default=None,
                   help="a local checkpoint (its weights and vocabulary) instead of the random-init Llama")
    p.add_argument("--child", default=None, choices=["dpo", "reg", "trl"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_data(args):
    import torch
    from datasets import Dataset
    g = torch.Generator().manual_seed(0)
    n = args.batch * (args.steps + args.warmup)
    ids = lambda k: torch.randint(3, args.vocab, (n, k), generator=g).tolist()  # noqa: E731
    floats = lambda k: (torch.rand(n, k, generator=g) - 0.5).tolist()  # noqa: E731
    ref_tok = lambda: (-torch.rand(n, args.response, generator=g) * 5).tolist()  # noqa: E731
    rows = {"prompt_input_ids": [[1] + r for r in ids(args.prompt - 1)], "chosen_input_ids": ids(args.response),
            "rejected_input_ids": ids(args.response), "chosen_token_rewards": floats(args.response),
            "rejected_token_rewards": floats(args.response), "ref_chosen_token_logps": ref_tok(),
            "ref_rejected_token_logps": ref_tok()}
    rows["ref_chosen_logps"] = [sum(r) for r in rows["ref_chosen_token_logps"]]
    rows["ref_rejected_logps"] = [sum(r) for r in rows["ref_rejected_token_logps"]]
    return Dataset.from_dict(rows)


def child(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from tokenizers import Tokenizer, models

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=args.prompt + args.response,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if args.model:  # the real checkpoint; the data are random ids below its vocabulary
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    else:
        model = LlamaForCausalLM(cfg).to(getattr(torch, args.dtype))
    vocab = {f"t{i}": i for i in range(args.vocab)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  pad_token="t0", bos_token="t1", eos_token="t2")
    data = make_data(args)
    times: list[float] = []
    cuda = args.device == "cuda"

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    common = dict(output_dir=f"/tmp/treg-bench-{os.getpid()}", max_steps=args.steps + args.warmup,
                  per_device_train_batch_size=args.batch, learning_rate=1e-5, logging_steps=10**6, seed=0,
                  save_strategy="no", report_to="none", use_cpu=not cuda, disable_tqdm=True, beta=0.1,
                  bf16=args.dtype == "bfloat16", gradient_checkpointing=args.gradient_checkpointing,
                  max_length=None, dataloader_num_workers=0)
    if args.child == "trl":
        from trl import DPOConfig, DPOTrainer

        class PreTokenized(DPOTrainer):  # TRL 1.16 always tokenizes text; feed it our token ids instead
            def _prepare_dataset(self, dataset, *a, **k):
                return dataset

            def _precompute_ref_logps(self, dataset, name, batch_size):
                return dataset

        trl_data = data.select_columns(["prompt_input_ids", "chosen_input_ids", "rejected_input_ids",
                                        "ref_chosen_logps", "ref_rejected_logps"]).rename_columns(
            {"prompt_input_ids": "prompt_ids", "chosen_input_ids": "chosen_ids", "rejected_input_ids": "rejected_ids"})
        trainer = PreTokenized(model, args=DPOConfig(precompute_ref_log_probs=True, **common),
                               train_dataset=trl_data, processing_class=tok, callbacks=[Clock()])
    else:
        from treg.stages.config import TRegConfig
        from treg.stages.trainer import TRegTrainer
        trainer = TRegTrainer(model, args=TRegConfig(alpha=0.25 if args.child == "reg" else 0.0, **common), train_dataset=data,
                              processing_class=tok, callbacks=[Clock()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = sorted(times[args.warmup:])
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_ms": 1000 * timed[len(timed) // 2], "peak_mib": peak}


def main(argv=None) -> int:
    args = parse(argv)
    if args.model:
        import json as _json
        cfg = _json.loads(open(os.path.join(args.model, "config.json")).read())
        args.vocab, args.hidden, args.layers = cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]
    if args.child:
        report(child(args))
        return 0
    raw = sys.argv[1:] if argv is None else list(argv)
    mem = "peak GPU MiB (allocated)" if args.device == "cuda" else "peak RSS MiB (process)"
    print(f"device={args.device} dtype={args.dtype} hidden={args.hidden} layers={args.layers} "
          f"vocab={args.vocab} batch={args.batch} pairs, prompt={args.prompt} response={args.response} tokens, "
          f"median of {args.steps} steps after {args.warmup} warm-up, best of {args.rounds} interleaved rounds\n")
    print(f"| run | step ms | {mem} |\n|---|---:|---:|", flush=True)
    names = {"dpo": "TRegTrainer DPO (alpha 0)", "reg": "TRegTrainer DPO-REG (alpha 0.25)",
             "trl": "TRL 1.16 DPOTrainer"}
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for _ in range(args.rounds):  # interleaved, so slow phases of a shared machine hit every variant
        for which in names:
            got, error = run_child(__file__, [*raw, "--child", which])
            if got is None:
                failed[which] = error
                continue
            best = results.setdefault(which, got)
            best["step_ms"] = min(best["step_ms"], got["step_ms"])
            best["peak_mib"] = max(best["peak_mib"], got["peak_mib"])
    for which, name in names.items():
        if which in results:
            print(f"| {name} | {results[which]['step_ms']:.1f} | {results[which]['peak_mib']:.0f} |", flush=True)
        else:
            print(f"| {name} | failed: {failed.get(which, '?')} | |")
    if "reg" in results and "dpo" in results:
        r, d = results["reg"], results["dpo"]
        print(f"| **DPO-REG / DPO step time** (target <= 1.03) | {r['step_ms'] / d['step_ms']:.3f} | |")
    if "trl" in results and "dpo" in results:
        d, t = results["dpo"], results["trl"]
        print(f"| **treg DPO / TRL DPO** step time, memory (targets <= 1.0) | {d['step_ms'] / t['step_ms']:.3f} | "
              f"{d['peak_mib'] / t['peak_mib']:.3f} |")
    return 0 if len(results) == len(names) else 1

if __name__ == "__main__":
    sys.exit(main())
