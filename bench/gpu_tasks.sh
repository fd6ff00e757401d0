#!/usr/bin/env bash
# GPU version of bench/tasks.py, one device call (under 10 minutes): gpt-125m, bf16, 1 GPU, trained for
# 6 minutes on the full corpus through the same Ray Train path (LM + contrastive loss), then every task
# evaluated on its test split beside its baselines (fusion weight chosen on val). Writes
# $OUT/gpu_tasks.json and .md (bench/results/ without $OUT), with the card's name.
# Prepare here first: bench/gpu_wheels.sh; then, with the device tool:
#   run(command="bash bench/gpu_tasks.sh", carry=[".whl"], timeout_s=590)
source "$(dirname "$0")/gpu_setup.sh"  # wheels in, card named, $out set
python3 bench/tasks.py --recipe gpt-125m --name gpu_tasks --minutes 6 --limit 200 --find-limit 1000 \
    --set data.corpus=/tmp/odyssey-data --set data.prepare=true --set data.prepare_preset=full \
    --set data.vocab_size=16384 --set storage=/tmp/odyssey-runs \
    --set scaling.workers=1 --set scaling.autoscaling=false --set deepspeed.zero_stage=2 \
    --set micro_batch_size=16 --set global_batch_tokens=65536 --set optim.warmup_steps=50 \
    --set contrastive.pairs_per_step=128 --set contrastive.passage_tokens=256
if [ "$out" != bench/results ]; then cp bench/results/gpu_tasks.json bench/results/gpu_tasks.md "$out"/; fi
python3 -c 'import torch; print("device:", torch.cuda.get_device_name())'
