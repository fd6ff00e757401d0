"""Training pieces that need no cluster: config arithmetic, the DeepSpeed config, the mixture loader."""

from __future__ import annotations

import numpy as np
import pytest

from odyssey.config import load_config
from odyssey.errors import ConfigError
from train.config import TrainConfig, recipe_path
from train.data import MixtureLoader, TaskStream
from train.engine import deepspeed_config


def test_every_recipe_loads_and_its_batch_adds_up():
    for name in ("tiny-cpu", "tiny-fake-gpu", "small-cpu", "gpt-125m", "gpt-350m", "gpt-1.3b"):
        cfg = load_config(TrainConfig, recipe_path(name))
        per_step = cfg.micro_batch_size * cfg.data.seq_len * cfg.scaling.workers * cfg.grad_accum_steps
        assert per_step == cfg.global_batch_tokens, name
        ds = deepspeed_config(cfg, cuda=cfg.scaling.use_gpu)
        assert ds["train_batch_size"] * cfg.data.seq_len == cfg.global_batch_tokens


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["global_batch_tokens=3000"],
            r"global_batch_tokens=3000 is not a multiple of .* = 2048; use 2048 or 4096",
        ),
        (["deepspeed.zero_stage=4"], r"deepspeed.zero_stage: 4 .* is not one of 0, 1, 2, 3"),
        (["deepspeed.offload_params=true"], r"offload_params needs zero_stage 3"),
        (["scaling.workers=0"], r"workers must be >= 1"),
        (["scaling.backend=nccl"], r"backend nccl needs GPU workers: set use_gpu=true"),
        (["scaling.backend=mpi"], r"scaling.backend: 'mpi' .* is not one of 'auto', 'nccl', 'gloo'"),
        (["optim.lerning_rate=1"], r"unknown field 'optim.lerning_rate'"),
        (["data.mixture.translate=1"], r"mixture: unknown task 'translate'"),
    ],
)
def test_bad_configs_are_named_before_anything_starts(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, recipe_path("tiny-cpu"), overrides)
    with pytest.raises(ConfigError, match="no recipe 'tiny'"):
        recipe_path("tiny")


def test_deepspeed_config_follows_ours():
    cfg = load_config(
        TrainConfig,
        recipe_path("tiny-cpu"),
        [
            "deepspeed.zero_stage=3",
            "deepspeed.offload_optimizer=true",
            "deepspeed.offload_params=true",
            "deepspeed.precision=bf16",
            "global_batch_tokens=8192",
        ],
    )
    ds = deepspeed_config(cfg, cuda=False)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["overlap_comm"] is False  # CPU workers: no streams to overlap on
    assert ds["zero_optimization"]["offload_param"]["pin_memory"] is False
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_clipping"] == cfg.optim.grad_clip


class FakeShard:
    """A DataIterator over fixed rows: block i holds the value i in every position."""

    def __init__(self, n, start=0):
        self.rows = np.arange(start, start + n)
        self.epochs = 0

    def iter_batches(self, batch_size, batch_format, local_shuffle_buffer_size=None, local_shuffle_seed=None):
        self.epochs += 1
        rows = self.rows.copy()
        if local_shuffle_seed is not None:
            np.random.default_rng(local_shuffle_seed).shuffle(rows)
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            yield {
                "input_ids": [np.full(5, v, np.int32) for v in chunk],
                "loss_mask": [np.ones(5, np.uint8)] * len(chunk),
            }


def loader(rank=0, state=None, sizes=(7, 30)):
    shards = {"code": FakeShard(sizes[0], 1000 * rank), "lm": FakeShard(sizes[1], 1000 * rank + 500)}
    state = state or {}
    streams = {
        t: TaskStream(s, t, seed=0, shuffle_buffer=4, **state.get("streams", {}).get(t, {}))
        for t, s in shards.items()
    }
    return MixtureLoader(
        streams, {"code": 0.5, "lm": 0.5}, micro_batch=4, seed=0, micro_step=state.get("micro_step", 0)
    )


def rows_of(batch):
    inputs, targets, mask = batch
    assert inputs.shape == targets.shape == mask.shape == (4, 4)
    return inputs[:, 0].tolist()


def test_mixture_is_deterministic_and_resumes_exactly():
    a = loader()
    first = [rows_of(a.next()) for _ in range(12)]  # several epochs of the 7-block task
    again = loader()
    assert first == [rows_of(again.next()) for _ in range(12)]
    b = loader()
    for _ in range(5):
        b.next()
    resumed = loader(state=b.state())
    assert [rows_of(resumed.next()) for _ in range(7)] == first[5:]
    assert a.streams["code"].shard.epochs >= 3  # the small task wrapped around


def test_every_rank_draws_the_same_composition():
    """Ranks consume their shards in lock-step (streaming_split needs that at epoch ends)."""
    r0, r1 = loader(rank=0), loader(rank=1)
    for _ in range(10):
        tasks0 = ["code" if v % 1000 < 500 else "lm" for v in rows_of(r0.next())]
        tasks1 = ["code" if v % 1000 < 500 else "lm" for v in rows_of(r1.next())]
        assert tasks0 == tasks1
    assert r0.state()["streams"] == r1.state()["streams"]


def test_memory_mode_ranks_take_disjoint_rows_of_the_whole_dataset():
    streams = [TaskStream(FakeShard(10), "lm", seed=0, shuffle_buffer=4, stride=(2, rank)) for rank in (0, 1)]
    taken = [[int(s.take()[0][0]) for _ in range(5)] for s in streams]
    assert sorted(taken[0] + taken[1]) == list(range(10)) and not set(taken[0]) & set(taken[1])
