#!/usr/bin/env bash
# GPU benchmark, one device call (under 8 minutes): gpt-350m, bf16, DeepSpeed ZeRO-2, 1 GPU, through
# the same Ray Train path as every run. Prints tokens/s and MFU (peak from odyssey/flops.py's table)
# and writes $OUT/gpu_train.json (or bench/results/gpu_train.json without $OUT).
# Prepare here first: bench/gpu_wheels.sh; then, with the device tool:
#   run(command="bash bench/gpu_train.sh", carry=[".whl"], timeout_s=540)
# Target: MFU >= 45% on an H100.
source "$(dirname "$0")/gpu_setup.sh"  # wheels in, card named, $out set
data=/tmp/odyssey-data
python3 -m odyssey -q data build --out $data --preset tiny
python3 -m odyssey -q tokenizer train --corpus $data --vocab-size 8192
python3 -m odyssey -q data pack --corpus $data --seq-len 1024
python3 -m train --config gpt-350m \
    --set storage=/tmp/odyssey-runs --set data.corpus=$data \
    --set scaling.workers=1 --set scaling.autoscaling=false --set micro_batch_size=8 \
    --set global_batch_tokens=65536 --set steps=40 --set log_every=10 --set eval_every=40 \
    --set checkpoint_every=40 --set optim.warmup_steps=10 | tee /tmp/train.out
tail -1 /tmp/train.out | python3 -c '
import json, sys, torch
s = json.loads(sys.stdin.read())
r = {"device": torch.cuda.get_device_name(), "model": "gpt-350m", "precision": "bf16", "zero_stage": 2,
     "tokens_per_s": s["tokens_per_s"], "mfu": s["mfu"], "target_mfu": 0.45, "met": s["mfu"] >= 0.45, "summary": s}
print(json.dumps(r, indent=2))
open(sys.argv[1], "w").write(json.dumps(r, indent=2) + "\n")
' "$out/gpu_train.json"
