#!/usr/bin/env bash
# The paper's Llama-3-8B-Instruct DPO-REG recipe, stage by stage (the same as
# `treg pipeline --config configs/llama3-8b-instruct-dpo-reg/pipeline.yaml`, spelled out).
# Run from the repository root on one node with 8 GPUs (H100 80GB class), with `pip install -e .[trl]`,
# `pip install vllm` and access to the gated meta-llama model. Every stage is resumable: rerun the
# script after an interruption and finished work is kept. Costs: docs/recipes.md.
# Not run in this project's CI (no GPU, no hub access there).
set -euo pipefail

MODEL=${MODEL:-meta-llama/Meta-Llama-3-8B-Instruct}
RM=${RM:-RLHFlow/ArmoRM-Llama3-8B-v0.1}
ALPHA=${ALPHA:-0.25}                  # the paper searches {0.1, 0.25, 0.5}
RUN=${RUN:-runs/llama3-8b-instruct-dpo-reg}
NAME=${NAME:-llama3-8b-instruct-dpo-reg-a${ALPHA}}
RECIPE=llama3-8b-instruct-dpo-reg

source "$(dirname "$0")/../recipe_stages.sh"
