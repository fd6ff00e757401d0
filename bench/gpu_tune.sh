#!/usr/bin/env bash
# GPU check of µP transfer, one device call (under 9 minutes): the gpt-350m-mup --transfer flow at
# reduced steps. A proxy sweep of 4 trials (a 256-wide µP proxy of gpt-350m, learning rate only, 1 GPU
# each, one at a time, successive halving), then the target recipe it writes (gpt-350m under µP with the
# proxy's best learning rate) for a few hundred steps. Writes $OUT/gpu_tune.json (or bench/results/).
# Prepare here first: bench/gpu_wheels.sh; then, with the device tool:
#   run(command="bash bench/gpu_tune.sh", carry=[".whl"], timeout_s=570)
# What to read: the sweep's trials (halving stopped 3 of 4 early), and the target's loss falling from its
# first evaluation with the transferred learning rate (no divergence at 4x the proxy's width).
source "$(dirname "$0")/gpu_setup.sh"  # wheels in, card named, $out set
data=/tmp/odyssey-data runs=/tmp/odyssey-runs
python3 -m odyssey -q data build --out $data --preset tiny
python3 -m odyssey -q tokenizer train --corpus $data --vocab-size 8192
python3 -m odyssey -q data pack --corpus $data --seq-len 1024
python3 -m tune --config gpt-350m-mup --transfer \
    --set storage=$runs/tune --set name=gpu-mup --set train.data.corpus=$data \
    --set train.steps=120 --set train.eval_every=15 --set train.checkpoint_every=120 \
    --set train.optim.warmup_steps=10 --set train.global_batch_tokens=65536 --set train.micro_batch_size=8 \
    --set 'space={optim.lr: {choice: [3.0e-3, 6.0e-3, 1.2e-2, 2.4e-2]}}' \
    --set budget.trials=4 --set scheduler.grace_fraction=0.25 --set scheduler.reduction_factor=2 \
    --set trial.cpus_per_worker=4 --set trial.max_concurrent=1 | tee /tmp/tune.out
python3 -m train --config $runs/tune/gpu-mup/best-target.yaml \
    --set storage=$runs --set name=gpu-mup-target --set scaling.autoscaling=false --set steps=300 \
    --set eval_every=50 --set checkpoint_every=300 --set log_every=25 | tee /tmp/target.out
python3 - "$out/gpu_tune.json" <<'PY'
import json, sys, torch
sweep = json.loads(open("/tmp/tune.out").read().strip().splitlines()[-1])
target = json.loads(open("/tmp/target.out").read().strip().splitlines()[-1])
r = {"device": torch.cuda.get_device_name(), "sweep": sweep, "target": target,
     "target_loss_fell": target["final_loss"] < target["first_loss"]}
print(json.dumps(r, indent=2))
open(sys.argv[1], "w").write(json.dumps(r, indent=2) + "\n")
PY
