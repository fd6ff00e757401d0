"""Resharding a ZeRO-1 checkpoint, engine to engine: 2 DeepSpeed workers over gloo train and save, the
checkpoint goes through `checkpoint.to_universal`, 1 worker loads it with `checkpoint.load(universal=True)`
and goes on. (ZeRO-2 and ZeRO-3 are resharded inside real Ray Train runs in test_train.py; this covers
the remaining stage without a cluster: plain processes, the same engine and checkpoint code.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from odyssey.cluster import free_port
from odyssey.config import load_config
from odyssey.model import tiny
from train.config import TrainConfig, recipe_path

STEPS, SAVE_AT = 6, 3


def batch(step: int, micro: int):
    """Micro-batch `micro` (of 8 sequences) of the step's 16: counting runs from random starts, seeded by
    the step, so that the model learns fast and a fresh one is far off."""
    starts = torch.randint(0, 256, (16, 1), generator=torch.Generator().manual_seed(step))
    ids = ((starts + torch.arange(33)) % 256)[micro * 8 : (micro + 1) * 8]
    return ids[:, :-1], ids[:, 1:], torch.ones(8, 32, dtype=torch.bool)


def worker(rank: int, world: int, port: int, out: str, resume: bool) -> None:
    import logging

    import deepspeed
    import torch.distributed as dist

    from train import checkpoint
    from train.engine import build_engine

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    deepspeed.init_distributed("gloo")
    torch.set_num_threads(1)
    cfg = load_config(
        TrainConfig,
        recipe_path("tiny-cpu"),
        ["deepspeed.zero_stage=1", "data.seq_len=32", "global_batch_tokens=512", "micro_batch_size=8"],
    )
    model_cfg = tiny()
    model_cfg.vocab_size, model_cfg.max_seq_len = 256, 32
    engine, _, _ = build_engine(cfg, model_cfg, world, universal=resume)
    start = 0
    if resume:
        checkpoint.load(engine, Path(out) / "ckpt", universal=True, local_rank=rank)
        start = SAVE_AT
    losses = []
    for step in range(start, STEPS):
        total = torch.zeros(())
        for micro in range(rank * (2 // world), (rank + 1) * (2 // world)):  # this rank's slice of the step
            loss = engine(*batch(step, micro))
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        dist.all_reduce(total)
        losses.append(float(total) / 2)
        if not resume and step + 1 == SAVE_AT:
            engine.save_checkpoint(os.path.join(out, "ckpt"), tag=checkpoint.TAG)
    if rank == 0:
        with open(os.path.join(out, f"losses-{world}.json"), "w") as f:
            json.dump(losses, f)


def test_a_zero1_checkpoint_of_two_workers_resumes_on_one_through_the_universal_format(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), False), nprocs=2)
    mp.spawn(worker, args=(1, free_port(), str(tmp_path), True), nprocs=1)
    full = json.loads((tmp_path / "losses-2.json").read_text())
    resumed = json.loads((tmp_path / "losses-1.json").read_text())
    assert len(resumed) == STEPS - SAVE_AT
    assert abs(full[0] - full[SAVE_AT]) > 0.1  # a fresh model's loss is far from the resumed one's
    assert resumed == pytest.approx(full[SAVE_AT:], rel=1e-4), (full, resumed)
