"""Benchmark: what each layer between a plain PyTorch loop and a Ray Train run costs, side by side.

    python bench/train_overhead.py [--rounds 3] [--steps 12]

The same `small` model, batches and thread count (all cores) through four layers, each in a fresh
process, interleaved over rounds (medians of per-step times, the machines are shared and noisy):
  plain      torch AdamW loop, main thread of its own process
  deepspeed  + DeepSpeed ZeRO-0 engine (gloo, world size 1), same process layout
  ray-actor  + inside a Ray actor, the step loop on a thread of its own (as Ray Train runs it)
  ray-train  + Ray Train itself: controller, Ray Data loader, metrics, checkpoint (the real `train`)
Each ratio to `plain` says what that layer adds. Writes bench/results/train_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from bench import report
from bench.train_throughput import deepspeed_run
from odyssey import cluster

LAYERS = ("plain", "deepspeed", "ray-actor", "ray-train")
MICRO_BATCH, SEQ_LEN = 4, 512


def _resolved_config(corpus: str):
    from odyssey.config import load_config, to_dict
    from train import launch
    from train.config import TrainConfig, recipe_path

    cfg = load_config(
        TrainConfig,
        recipe_path("small-cpu"),
        [
            f"data.corpus={corpus}",
            "deepspeed.zero_stage=0",
            "scaling.workers=1",
            f"scaling.cpus_per_worker={os.cpu_count() or 1}",
            f"micro_batch_size={MICRO_BATCH}",
            f"global_batch_tokens={MICRO_BATCH * SEQ_LEN}",
        ],
    )
    cfg = launch.resolve(cfg)[0]
    return cfg, to_dict(cfg.model)


def median_step_rate(layer: str, corpus: str, steps: int, warmup: int) -> float:
    """tokens/s of the median step after warm-up, with or without the DeepSpeed engine."""
    import numpy as np
    import torch

    from odyssey import optim
    from odyssey.config import from_dict
    from odyssey.data import packing
    from odyssey.model import ModelConfig, Transformer
    from odyssey.tasks import TASKS

    torch.set_num_threads(os.cpu_count() or 1)
    cfg, model_dict = _resolved_config(corpus)
    model_cfg = from_dict(ModelConfig, model_dict)
    if layer == "plain":
        torch.manual_seed(cfg.seed)
        model = Transformer(model_cfg)
        opt = optim.adamw(model, cfg.optim.lr, cfg.optim.weight_decay)

        def step(x, y, m):
            loss = model(x, y, m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()

    else:
        import deepspeed
        import torch.distributed as dist

        from train.engine import build_engine

        if not dist.is_initialized():
            os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            os.environ["MASTER_PORT"] = str(cluster.free_port())
            deepspeed.init_distributed("gloo")
        engine, model, _ = build_engine(cfg, model_cfg, world=1)

        def step(x, y, m):
            loss = engine(x, y, m)
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary():  # what train/loop.py does at ZeRO-0 fp32
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            engine.step()

    blocks = [packing.read_blocks(cfg.data.blocks_dir, t, "train") for t in TASKS]
    ids = np.concatenate([b[0] for b in blocks])
    mask = np.concatenate([b[1] for b in blocks])
    rng = np.random.default_rng(0)
    seconds = []
    for _ in range(steps):
        rows = rng.integers(len(ids), size=MICRO_BATCH)
        batch = torch.from_numpy(ids[rows].astype(np.int64))
        loss_mask = torch.from_numpy(mask[rows].astype(np.bool_))
        t0 = time.perf_counter()
        step(batch[:, :-1], batch[:, 1:], loss_mask[:, 1:])
        seconds.append(time.perf_counter() - t0)
    return MICRO_BATCH * SEQ_LEN / statistics.median(seconds[warmup:])


def on_a_thread(*args) -> float:
    out = {}
    thread = threading.Thread(target=lambda: out.update(rate=median_step_rate(*args)))
    thread.start()
    thread.join()
    return out["rate"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--data", default="runs/data/full", help="corpus directory (built when missing)")
    args = parser.parse_args()

    from odyssey.config import load_config
    from train import mixture
    from train.config import TrainConfig, recipe_path

    mixture.prepare(load_config(TrainConfig, recipe_path("small-cpu"), [f"data.corpus={args.data}"]))
    cores = os.cpu_count() or 1
    cluster.connect(num_cpus=cores + 3)
    import ray

    @ray.remote(num_cpus=cores)
    class Actor:
        def rate(self, *a) -> float:
            return on_a_thread(*a)

    samples: dict[str, list[float]] = {layer: [] for layer in LAYERS}
    work = (args.data, args.steps, args.warmup)
    with tempfile.TemporaryDirectory() as storage:
        for round_ in range(args.rounds):
            for layer in LAYERS:
                if layer == "ray-actor":
                    actor = Actor.remote()
                    rate = ray.get(actor.rate.remote("deepspeed", *work))
                    ray.kill(actor)
                elif layer == "ray-train":
                    rate = deepspeed_run(
                        f"{storage}/{round_}", args.data, 0, 1, MICRO_BATCH, args.steps, args.warmup
                    )["tokens_per_s"]
                else:
                    with mp.get_context("spawn").Pool(1) as pool:  # a fresh process per run
                        rate = pool.apply(median_step_rate, (layer, *work))
                samples[layer].append(rate)
                print(f"round {round_ + 1}: {layer}: {rate:.0f} tokens/s", flush=True)

    medians = {layer: statistics.median(runs) for layer, runs in samples.items()}
    figures = {
        "model": f"small, seq_len {SEQ_LEN}, micro-batch {MICRO_BATCH}, {cores} threads, ZeRO-0",
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "tokens_per_s": {k: round(v, 1) for k, v in medians.items()},
        "runs": {k: [round(r) for r in v] for k, v in samples.items()},
        "vs_plain": {k: round(v / medians["plain"], 3) for k, v in medians.items()},
        "vs_plain_per_round": {
            k: [round(r / p, 3) for r, p in zip(v, samples["plain"], strict=True)] for k, v in samples.items()
        },
    }
    table = [
        (layer, f"{medians[layer]:,.0f} tokens/s ({figures['vs_plain'][layer]:.2f}x plain)", "")
        for layer in LAYERS
    ]
    table.append(("per round, vs plain", str(figures["vs_plain_per_round"]), ""))
    notes = "Each layer adds to the one above it; the ratio to `plain` is what everything above costs."
    path = report.write("train_overhead", figures, {}, table, notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
