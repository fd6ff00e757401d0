"""Benchmark: `odyssey demo` as a user runs it, and what ONNX Runtime costs in quality on its model.

    python bench/demo.py [--steps 400]

1. `odyssey demo` with the shipped settings (the tiny model, 400 steps on 2 workers with ZeRO-2, the
   whole test split evaluated) in a temporary directory, on a free port: seconds per stage and in all
   (its summary.json), what its evaluation measured, and its log (non-empty lines; lines that look like
   errors: tracebacks, error-level records).
2. The demo's trained model evaluated again on every task's whole test split with ONNX Runtime float32
   (the demo's own `model.onnx`) and with int8 weights (`--quantize int8`), beside the demo's torch
   figures: every metric side by side.
The day's machine speed goes with it (a torch fp32 matmul's GFLOP/s, all cores): timings scale with
it. Writes bench/results/demo.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# `python bench/demo.py` puts bench/ first on the path, where bench/onnx.py would shadow the onnx package
# (the int8 export imports it): the checkout instead.
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from bench import report  # noqa: E402 - after the path fix above
from odyssey import cluster, flops, logs  # noqa: E402

HEADLINE = ("lm.perplexity", "summarize.rouge_l", "moderate.macro_f1", "find.mrr", "code.parse_rate")


def run_demo(out: Path, steps: int) -> tuple[dict, str, float]:
    """(the demo's summary.json, its whole log, wall seconds) of `odyssey demo` in a fresh ODYSSEY_HOME."""
    env = {**os.environ, "ODYSSEY_HOME": str(out.parent / "home")}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS"):
        env.pop(name, None)
    settings = [f"out={out}", f"steps={steps}", f"port={cluster.free_port()}"]
    command = [sys.executable, "-m", "workflows", "demo", *[a for s in settings for a in ("--set", s)]]
    t0 = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"odyssey demo failed:\n{done.stderr[-4000:]}")
    return json.loads((out / "summary.json").read_text()), done.stdout + done.stderr, seconds


def onnx_quality(out: Path, summary: dict) -> dict[str, dict]:
    """The demo's metrics (torch) beside ONNX Runtime float32 and int8 on the same model and split."""
    from odyssey.evaluation.runner import evaluate
    from train.export import export

    corpus = out / "corpus"
    int8 = export(summary["run_dir"], out / "model-int8", best=True, onnx=True, quantize="int8")
    cluster.connect(num_cpus=os.cpu_count() or 2)
    try:
        ort = evaluate(summary["model"], corpus, backend="onnxruntime")["metrics"]
        ort_int8 = evaluate(int8, corpus, backend="onnxruntime")["metrics"]
    finally:
        cluster.disconnect()
    return {"torch": summary["metrics"], "onnxruntime": ort, "onnxruntime_int8": ort_int8}


def table(figures: dict) -> list[tuple[str, str, str]]:
    d, q = figures["demo"], figures["quality"]
    stages = ", ".join(f"{k} {v} s" for k, v in d["stages_s"].items())
    rows = [
        ("`odyssey demo` in all (wall; no set-up)", f"{d['wall_s']:.0f} s ({stages})", ""),
        ("training", f"{d['training']['steps']} steps, loss {d['training']['first_loss']} -> {d['training']['final_loss']}, "
         f"{d['training']['tokens_per_s']} tokens/s", ""),
        ("its log", f"{d['log_lines']} non-empty lines, {d['error_lines']} that look like errors", "0 error lines"),
    ]  # fmt: skip
    for name in HEADLINE:
        t, f, i = (q[b].get(name) for b in ("torch", "onnxruntime", "onnxruntime_int8"))
        rows.append((f"{name}: torch / ORT float32 / ORT int8", f"{t:.4f} / {f:.4f} / {i:.4f}", ""))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    peak = flops.measure_matmul_flops("fp32", n=2048, seconds=3.0)
    print(f"fp32 matmul, all cores: {peak / 1e9:.1f} GFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        summary, log, wall = run_demo(out, args.steps)
        print(f"demo: {wall:.0f} s, stages {summary['stages_s']}", flush=True)
        quality = onnx_quality(out, summary)
    lines = [line for line in log.splitlines() if line.strip()]
    figures = {
        "matmul_gflops": round(peak / 1e9, 1),
        "demo": {
            "wall_s": round(wall, 1),
            "seconds": summary["seconds"],
            "stages_s": summary["stages_s"],
            "training": summary["training"],
            "calls": summary["calls"],
            "log_lines": len(lines),
            "error_lines": sum(bool(logs.ERROR_LINE.search(line)) for line in lines),
        },
        "quality": quality,
    }
    targets = {"error_lines": 0, "every_call_status": 200}
    notes = (
        f"The machine's fp32 matmul that day: {figures['matmul_gflops']} GFLOP/s with all cores (timings "
        "scale with it). The demo's figures exclude `make demo`'s set-up (a fresh `.venv`) and include "
        "DeepSpeed's C++ op when it is not yet compiled (about 80 s, once per machine). Quality: every "
        "task's whole test split; the torch figures are the demo's own evaluation. A 1 M-parameter model "
        "trained for minutes answers with the right shapes and little sense: the figures show that every "
        "piece fits, and what a backend changes, not a useful model."
    )
    path = report.write("demo", figures, targets, table(figures), notes)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
