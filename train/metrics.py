"""What a run tells while it trains: a progress line with ETA, metrics.jsonl and TensorBoard events in
the run directory (rank 0 writes them), and the throughput figures: tokens/s, MFU, peak memory."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from odyssey import flops
from odyssey.progress import Progress


def console(line: str) -> None:
    """One line on the worker's stderr, which Ray streams to the driver and the job's logs. Not `print`:
    Ray Train patches it in workers to log as well as print, which shows every line twice."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def peak_flops_per_device(precision: str, cuda: bool, override_tflops: float | None) -> float:
    """The peak MFU divides by. GPU: the table; CPU: a matmul timed here, with this worker's threads."""
    if override_tflops:
        return override_tflops * 1e12
    if cuda:
        name = torch.cuda.get_device_name()
        peak = flops.gpu_peak_flops(name, precision)
        if peak is None:
            raise ValueError(
                f"no peak FLOPs known for {name!r} at {precision}; set peak_tflops in the config"
            )
        return peak
    return flops.measure_matmul_flops("fp32" if precision == "fp32" else "bf16", seconds=1.0)


def memory_gb(cuda: bool) -> float:
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class RunLog:
    """Rank 0's record of the run. Appends across restarts: a resumed run continues the same files."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool):
        self.enabled, self.run_dir = enabled, run_dir
        self.progress = Progress(total_steps, emit=console)
        self.t_last, self.step_last = time.perf_counter(), start_step
        self.writer = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (lives with the run)
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def interval_seconds(self) -> float:
        """Seconds of training since the last `mark` (the caller synchronises first)."""
        return max(time.perf_counter() - self.t_last, 1e-9)

    def mark(self, step: int) -> None:
        """Start the next interval here: evaluation, checkpoints and reports stay out of the rates."""
        self.t_last, self.step_last = time.perf_counter(), step

    def write(self, step: int, tokens: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        shown = {k: metrics[k] for k in ("loss", "contrastive_loss", "lr", "mfu") if k in metrics}
        self.progress.update(step, tokens, **shown)

    def event(self, kind: str, **fields) -> None:
        """One line in events.jsonl (and on the console) for what changed the run: a start, a resume."""
        if not self.enabled:
            return
        record = {"event": kind, "time": round(time.time(), 3), **fields}
        with open(self.run_dir / "events.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        shown = {
            k: v
            for k, v in fields.items()
            if k not in ("nodes", "pids", "launch") and v not in (None, [], False)
        }
        console(f"{kind}: " + ", ".join(f"{k} {v}" for k, v in shown.items()))

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.writer.close()
