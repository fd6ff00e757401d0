"""Peak FLOPs of the hardware, for an honest MFU: achieved model FLOPs / what the device could do.

MFU = flops_per_token (Transformer.flops_per_token: 6N + 12LDT) x tokens/s / (peak per device x devices).
GPUs: the vendor's dense peak for the training precision (no sparsity). CPUs have no useful spec
sheet number, so their peak is measured: a warm square matmul in the training dtype, timed.
"""

from __future__ import annotations

import time

import torch

# Dense tensor-core TFLOP/s per device by training precision; fp32 means TF32 matmuls where the
# hardware has them. More specific names first: the first substring of the device name that matches wins.
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},  # SXM
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "GH200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "fp32": 1100.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gpu_peak_flops(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s of one GPU from the table, or None when the device or precision is not in it."""
    for key, peaks in GPU_PEAK_TFLOPS.items():
        if key in device_name:
            tflops = peaks.get(precision)
            return tflops * 1e12 if tflops else None
    return None


def measure_matmul_flops(
    precision: str = "fp32", n: int = 1024, seconds: float = 1.0, trials: int = 5, device: str = "cpu"
) -> float:
    """FLOP/s of warm (n x n) @ (n x n) matmuls in this process, with its current thread count: the
    best of `trials` timings over `seconds` in all (a peak is a maximum; other work only lowers it)."""
    dtype = DTYPES[precision]
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):  # warm-up: thread pools, caches, clocks
        a @ b
    best = 0.0
    for _ in range(trials):
        reps, t0 = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            if device != "cpu":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds / trials:
                break
        best = max(best, 2.0 * n**3 * reps / elapsed)
    return best


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation in [0, 1]: achieved / peak (peak summed over all devices)."""
    return flops_per_token * tokens_per_s / peak_flops if peak_flops > 0 else 0.0
