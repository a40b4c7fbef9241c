#!/usr/bin/env bash
# The paper's Gemma-2-9B-it SimPO-REG recipe, stage by stage (the same as
# `treg pipeline --config configs/gemma2-9b-it-simpo-reg/pipeline.yaml`, spelled out).
# Run from the repository root on one node with 8 GPUs (H100 80GB class), with `pip install -e .[trl]`,
# `pip install vllm` and access to the gated google/gemma-2-9b-it model. Every stage is resumable: rerun the
# script after an interruption and finished work is kept. Costs: docs/recipes.md.
# Not run in this project's CI (no GPU, no hub access there).
set -euo pipefail

MODEL=${MODEL:-google/gemma-2-9b-it}
RM=${RM:-RLHFlow/ArmoRM-Llama3-8B-v0.1}
ALPHA=${ALPHA:-0.25}                  # the paper searches {0.1, 0.25, 0.5}
RUN=${RUN:-runs/gemma2-9b-it-simpo-reg}
NAME=${NAME:-gemma2-9b-it-simpo-reg-a${ALPHA}}
RECIPE=gemma2-9b-it-simpo-reg

source "$(dirname "$0")/../recipe_stages.sh"
