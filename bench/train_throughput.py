"""Benchmark: training throughput of the `small` model, side by side in one run.

    python bench/train_throughput.py [--rounds 3] [--steps 14] [--micro-batch 4] [--only plain zero0-w1 ...]

Settings, on the same model shape, sequence length and data:
  - a plain single-process PyTorch loop (AdamW, no Ray, no DeepSpeed), all cores;
  - Ray Train + DeepSpeed ZeRO-0, ZeRO-2 and ZeRO-3 with 1 worker (all cores) and with 2 workers
    (one core each).
Each runs `--rounds` times, interleaved (the machines are shared and noisy), and reports tokens/s as
the median over rounds of each run's median step (after `--warmup` steps; a median shrugs off the
seconds another tenant takes from the cores, which a mean over the run would charge to one setting), MFU against the fp32 matmul peak this script measures
with all cores before any setting runs (one peak for all, so the settings compare), and peak resident
memory. Targets: DeepSpeed at 1 worker >= 0.95x the plain loop's tokens/s; the best
setting's MFU >= 60% of the measured peak. Writes bench/results/train_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from bench import report
from odyssey import cluster, flops

TARGET_RATIO, TARGET_MFU = 0.95, 0.60


def plain_loop(
    blocks_dir: str, seq_len: int, micro_batch: int, steps: int, warmup: int, threads: int
) -> dict:
    """The baseline, in a fresh process of its own (so its peak memory is its own)."""
    import numpy as np
    import torch

    from odyssey import optim
    from odyssey.data import packing
    from odyssey.model import ModelConfig, Transformer, pad_vocab
    from odyssey.tasks import TASKS

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    manifest = json.loads((Path(blocks_dir) / "manifest.json").read_text())
    ids = np.concatenate([packing.read_blocks(blocks_dir, t, "train")[0] for t in TASKS])
    cfg = ModelConfig.from_preset("small", vocab_size=pad_vocab(manifest["vocab_size"]), max_seq_len=seq_len)
    model = Transformer(cfg)
    opt = optim.adamw(model, 1e-3, 0.1)
    rng = np.random.default_rng(0)
    step_seconds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = torch.from_numpy(ids[rng.integers(len(ids), size=micro_batch)].astype(np.int64))
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step_seconds.append(time.perf_counter() - t0)
    return {
        "tokens_per_s": micro_batch * seq_len / statistics.median(step_seconds[warmup:]),
        "memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "flops_per_token": model.flops_per_token(seq_len),
        "params_M": model.num_params() / 1e6,
    }


def deepspeed_run(
    storage: str, corpus: str, stage: int, workers: int, micro_batch: int, steps: int, warmup: int
) -> dict:
    from odyssey.config import load_config
    from train import launch
    from train.config import TrainConfig, recipe_path

    threads = max(1, (os.cpu_count() or 1) // workers)
    seq_len = 512
    overrides = [
        f"name=zero{stage}-w{workers}",
        f"storage={storage}",
        f"data.corpus={corpus}",
        f"deepspeed.zero_stage={stage}",
        f"scaling.workers={workers}",
        f"scaling.cpus_per_worker={threads}",
        f"micro_batch_size={micro_batch}",
        f"global_batch_tokens={micro_batch * seq_len * workers}",
        f"steps={steps}",
        "log_every=1",  # a rate per step: the median over the steps after warm-up
        f"eval_every={steps}",
        f"checkpoint_every={steps}",
    ]
    summary = launch.run(load_config(TrainConfig, recipe_path("small-cpu"), overrides))
    metrics = [
        json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    return {
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in metrics[warmup:]),
        "memory_gb": max(m["memory_gb"] for m in metrics),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument(
        "--rounds", type=int, default=3, help="every setting this many times, interleaved; medians"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--data", default="runs/data/full", help="corpus directory (built when missing)")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="SETTING",
        help="a subset, e.g. plain zero0-w1: printed, not written to bench/results",
    )
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    import torch

    torch.set_num_threads(cores)
    peak = flops.measure_matmul_flops("fp32", n=2048, seconds=3.0)
    print(f"fp32 matmul peak, {cores} threads: {peak / 1e9:.1f} GFLOP/s", flush=True)

    # Data: the small-cpu recipe's (the full corpus at 512 tokens), prepared once.
    from odyssey.config import load_config
    from train import mixture
    from train.config import TrainConfig, recipe_path

    cfg = load_config(TrainConfig, recipe_path("small-cpu"), [f"data.corpus={args.data}"])
    mixture.prepare(cfg)
    blocks_dir = cfg.data.blocks_dir

    cluster.connect(num_cpus=cores + 3)  # up for every setting, the plain loop's included
    names = ["plain"] + [f"zero{stage}-w{workers}" for workers in (1, 2) for stage in (0, 2, 3)]
    if args.only:
        unknown = set(args.only) - set(names)
        if unknown or "plain" not in args.only:
            parser.error(f"--only: choose plain and any of {names[1:]} (got {sorted(unknown) or args.only})")
        names = [n for n in names if n in args.only]
    samples: dict[str, list[dict]] = {name: [] for name in names}
    flops_per_token = None
    with tempfile.TemporaryDirectory() as storage, mp.get_context("spawn").Pool(1) as pool:
        for round_ in range(args.rounds):  # interleaved rounds: every setting sees the same machine weather
            for name in names:
                if name == "plain":
                    r = pool.apply(
                        plain_loop, (blocks_dir, 512, args.micro_batch, args.steps, args.warmup, cores)
                    )
                    flops_per_token = r["flops_per_token"]
                else:
                    stage, workers = int(name[4]), int(name[-1])
                    r = deepspeed_run(
                        f"{storage}/{round_}",
                        args.data,
                        stage,
                        workers,
                        args.micro_batch,
                        args.steps,
                        args.warmup,
                    )
                samples[name].append(r)
                print(f"round {round_ + 1}: {name}: {r['tokens_per_s']:.0f} tokens/s", flush=True)
    results = {
        name: {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "memory_gb": max(r["memory_gb"] for r in runs),
            "runs": [round(r["tokens_per_s"]) for r in runs],
        }
        for name, runs in samples.items()
    }

    for r in results.values():
        r["mfu"] = flops.mfu(flops_per_token, r["tokens_per_s"], peak)
    if args.only:  # a partial run is for looking, not for the record (the targets compare every setting)
        for name, r in results.items():
            print(f"{name}: {r['tokens_per_s']:.0f} tokens/s, {r['memory_gb']:.2f} GB, MFU {r['mfu']:.3f}")
        return
    plain = samples["plain"][0]
    best_ds1 = max(r["tokens_per_s"] for k, r in results.items() if k.endswith("-w1"))
    ratio = best_ds1 / results["plain"]["tokens_per_s"]
    best = max((k for k in results if k != "plain"), key=lambda k: results[k]["mfu"])
    targets = {
        "deepspeed_1_worker_vs_plain": TARGET_RATIO,
        "best_mfu": TARGET_MFU,
        "ratio_met": ratio >= TARGET_RATIO,
        "mfu_met": results[best]["mfu"] >= TARGET_MFU,
    }
    figures = {
        "model": f"small ({plain['params_M']:.1f} M parameters), seq_len 512, micro-batch {args.micro_batch}",
        "peak_gflops_fp32": round(peak / 1e9, 1),
        "flops_per_token": flops_per_token,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "settings": {
            k: {kk: (round(vv, 4) if kk != "runs" else vv) for kk, vv in v.items()}
            for k, v in results.items()
        },
        # Every round's ratio: how far the machine's weather moves it, next to the median's verdict.
        "deepspeed_1_worker_vs_plain_per_round": [
            round(
                max(samples[k][i]["tokens_per_s"] for k in samples if k.endswith("-w1")) / p["tokens_per_s"],
                3,
            )
            for i, p in enumerate(samples["plain"])
        ],
        "deepspeed_1_worker_vs_plain": round(ratio, 3),
        "best": best,
    }
    table = [
        (
            name,
            f"{r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.0%}, {r['memory_gb']:.2f} GiB (runs: {r['runs']})",
            "",
        )
        for name, r in results.items()
    ]
    table += [
        (
            "DeepSpeed 1 worker (best stage) / plain loop",
            f"**{ratio:.2f}x**",
            f">= {TARGET_RATIO}x: {'met' if targets['ratio_met'] else 'NOT met'}",
        ),
        (
            f"best MFU ({best})",
            f"**{results[best]['mfu']:.0%}** of {peak / 1e9:.0f} GFLOP/s",
            f">= {TARGET_MFU:.0%}: {'met' if targets['mfu_met'] else 'NOT met'}",
        ),
    ]
    notes = (
        f"MFU = {flops_per_token / 1e6:.0f} MFLOP/token (6N + 12LDT) x tokens/s / the fp32 matmul peak measured "
        f"above with {cores} threads. Memory: peak resident set of the training process (max over workers)."
    )
    path = report.write("train_throughput", figures, targets, table, notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
