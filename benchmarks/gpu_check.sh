#!/usr/bin/env bash
# GPU check of issue 12's reference pass at scale; run from the repository root on one CUDA GPU with
# deepspeed and trl installed (pip install -e .[trl] deepspeed). Not runnable on CPU: accelerate enables
# DeepSpeed only on accelerators. About 10 minutes on one H100-class GPU.
#   1. ZeRO-3 (configs/deepspeed/zero3.json, one process): treg reference pass + STEPS steps on a 1B-shaped
#      random-init Llama in bf16, then the same run again (the reference pass must re-use its cache:
#      reference_forwards 0), then alpha 0.25 with in-trainer token rewards;
#   2. trl.DPOTrainer with precompute_ref_log_probs on the same model, data and ZeRO-3 config.
# Prints step time and torch.cuda.max_memory_allocated per run and a table for docs/benchmarks.md.
set -euo pipefail
OUT=${OUT:-/tmp/treg_gpu_check}
export PYTHONPATH=${PYTHONPATH:-$PWD} TQDM_DISABLE=1
rm -rf "$OUT" && mkdir -p "$OUT"
cat > "$OUT/zero3_1gpu.yaml" <<YAML
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: $PWD/configs/deepspeed/zero3.json
  zero3_init_flag: true
machine_rank: 0
mixed_precision: null
num_machines: 1
num_processes: 1
use_cpu: false
YAML
python benchmarks/gpu_check.py setup "$OUT"
launch() { timeout 900 accelerate launch --config_file "$OUT/zero3_1gpu.yaml" benchmarks/gpu_check.py "$@" "$OUT"; }
launch treg                      # reference pass computed under ZeRO-3, then the steps
launch treg                      # same settings: the cache is re-used (no reference forward)
ALPHA=0.25 launch treg           # token rewards computed in the same pass (new cache key)
launch trl                       # TRL DPOTrainer, precompute_ref_log_probs=True
python benchmarks/gpu_check.py report "$OUT"
