#!/usr/bin/env bash
# GPU version of bench/serve_load.py, one device call (under 9 minutes): gpt-350m shape (random weights,
# max_seq_len 512), bf16, the LanguageModel replica on 1 GPU, the whole app over loopback. Streamed
# /v1/completions of the mixed workload at 1-128 closed-loop clients, continuous vs static scheduling
# in the same engine, plus /v1/moderate batched vs unbatched and the latency floor.
# Goal: continuous vs static output tokens/s >= 2x at 64 clients (and the CPU bench's targets).
# Writes $OUT/gpu_serve.json, .md and .png (bench/results/ without $OUT), with the card's name.
# Prepare here first: bench/gpu_wheels.sh; then, with the device tool:
#   run(command="bash bench/gpu_serve.sh", carry=[".whl"], timeout_s=590)
# Time (estimated, untested on a GPU): ~2 min of setup (wheels, corpus, tokenizer, model, Ray, latency
# floor), then per level 10 s of streamed load per mode + 5 s of /v1/moderate per engine (+ the requests
# in flight), 9 redeploys of the app (each replaces the replicas: ~10-15 s): ~7 min in all.
source "$(dirname "$0")/gpu_setup.sh"  # wheels in, card named, $out set
# Fail in seconds, not minutes in, when the image lacks what the app and the load generator import.
python3 -c 'import ray.serve, fastapi, starlette, uvicorn, httpx, aiohttp, torch; assert torch.cuda.is_available()'
python3 bench/serve_load.py --preset gpt-350m --device cuda --dtype bfloat16 --levels 1,8,32,64,128 \
    --seconds 10 --name gpu_serve
if [ "$out" != bench/results ]; then
    cp bench/results/gpu_serve.json bench/results/gpu_serve.md "$out"/
    if [ -f bench/results/gpu_serve.png ]; then cp bench/results/gpu_serve.png "$out"/; fi
fi
python3 -c 'import torch; print("device:", torch.cuda.get_device_name())'
