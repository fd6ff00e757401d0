#!/usr/bin/env bash
# The Hugging Face export served by vLLM on the GPU, its greedy tokens compared with ours (bench/gpu_hf.py):
# one device call, ~3 minutes (untested on a GPU: no device was lent when it was written).
# vLLM's wheel (~400 MB) cannot travel in the 64 MiB carry: the machine's image must have vllm, and
# this script says so within seconds when it has not.
# Prepare here first: bench/gpu_wheels.sh; then, with the device tool:
#   run(command="bash bench/gpu_hf.sh", carry=[".whl"], timeout_s=400)
# Writes $OUT/gpu_hf.json and .md (bench/results/ without $OUT), with the card's name.
source "$(dirname "$0")/gpu_setup.sh"  # wheels in, card named, $out set
python3 -c 'import vllm, torch; assert torch.cuda.is_available(); print("vllm", vllm.__version__)' || {
    echo "this machine's image has no vllm (or no GPU): bench/gpu_hf.py needs both" >&2; exit 3; }
python3 bench/gpu_hf.py --device cuda
if [ "$out" != bench/results ]; then cp bench/results/gpu_hf.json bench/results/gpu_hf.md "$out"/; fi
