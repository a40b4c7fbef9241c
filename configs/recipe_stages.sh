#!/usr/bin/env bash
# The stages shared by the paper's recipes (configs/*/run.sh source this after setting RECIPE, MODEL,
# RM, ALPHA, RUN and NAME). Run a recipe's run.sh, not this file.
set -euo pipefail
: "${RECIPE:?set by a recipe run.sh}" "${MODEL:?}" "${RM:?}" "${ALPHA:?}" "${RUN:?}" "${NAME:?}"
MULTI="accelerate launch --config_file configs/accelerate/multi_gpu_8.yaml"
ZERO3="accelerate launch --config_file configs/accelerate/zero3_8gpu.yaml"

# 0. benchmark prompts: AlpacaEval 2 (805 instructions) and Arena-Hard v0.1 (500 questions)
mkdir -p data
[ -f data/alpaca_eval.json ] || huggingface-cli download tatsu-lab/alpaca_eval alpaca_eval.json \
    --repo-type dataset --local-dir data
[ -f data/arena-hard-v0.1/question.jsonl ] || { git clone --depth 1 https://github.com/lmarena/arena-hard-auto \
    data/arena-hard-auto && mkdir -p data/arena-hard-v0.1 && \
    cp data/arena-hard-auto/data/arena-hard-v0.1/question.jsonl data/arena-hard-v0.1/; }

# 1. on-policy samples: 5 per UltraFeedback prompt (SimPO's decoding: T 0.8, top-p 0.95)
treg sample --model "$MODEL" --prompts HuggingFaceH4/ultrafeedback_binarized --split train_prefs --dedupe \
    --n 5 --temperature 0.8 --top-p 0.95 --max-new-tokens 4096 --seed 42 --backend vllm --tensor-parallel-size 8 \
    --output "$RUN/samples"

# 2. ArmoRM scores; highest = chosen, lowest = rejected (custom code: review it, then trust it)
$MULTI -m treg score --samples "$RUN/samples" --reward-model "$RM" --trust-remote-code --output "$RUN/pairs"

# 3. token rewards by contrastive prompting + reference log-probs, with the starting model
$MULTI -m treg annotate --model "$MODEL" --dataset "$RUN/pairs" --template revision --dtype bfloat16 \
    --output "$RUN/annotated"

# 4. training (DPO-REG or SimPO-REG, as the recipe's train.yaml says) with DeepSpeed ZeRO-3 on 8 GPUs
$ZERO3 -m treg train --config "configs/$RECIPE/train.yaml" --alpha "$ALPHA" \
    --model_name_or_path "$MODEL" --dataset_path "$RUN/annotated" --output_dir "$RUN/model-a${ALPHA}"

# 5. benchmark outputs
treg generate --model "$RUN/model-a${ALPHA}" --prompts data/alpaca_eval.json --format alpaca_eval \
    --generator "$NAME" --temperature 0.9 --top-p 1.0 --max-new-tokens 4096 --backend vllm --tensor-parallel-size 8 \
    --output "$RUN/outputs/alpaca_eval-a${ALPHA}.json"
treg generate --model "$RUN/model-a${ALPHA}" --prompts data/arena-hard-v0.1/question.jsonl --format arena_hard \
    --generator "$NAME" --max-new-tokens 4096 --backend vllm --tensor-parallel-size 8 \
    --output "$RUN/outputs/arena_hard-a${ALPHA}.jsonl"

# 6. official judges (GPT-4; need OPENAI_API_KEY and the benchmark packages):
#    alpaca_eval --model_outputs $RUN/outputs/alpaca_eval-a${ALPHA}.json   (LC win rate vs GPT-4 Turbo)
#    Arena-Hard: copy the .jsonl to arena-hard-auto/data/arena-hard-v0.1/model_answer/$NAME.jsonl, then
#    python gen_judgment.py && python show_result.py in that repository.
#    A local proxy without an API: treg eval --outputs A --baseline B --judge "$RM" --trust-remote-code
