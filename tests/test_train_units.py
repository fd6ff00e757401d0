"""Training pieces that need no cluster: config arithmetic, the DeepSpeed config, the mixture loader."""

from __future__ import annotations

import numpy as np
import pytest

from odyssey.config import load_config
from odyssey.errors import ConfigError
from train.config import TrainConfig, recipe_path
from train.engine import deepspeed_config
from train.mixture import MixtureLoader, TaskStream


def test_every_recipe_loads_and_its_batch_adds_up():
    for name in ("tiny-cpu", "tiny-fake-gpu", "small-cpu", "gpt-125m", "gpt-350m", "gpt-1.3b"):
        cfg = load_config(TrainConfig, recipe_path(name))
        workers = cfg.scaling.max_workers
        per_step = cfg.micro_batch_size * cfg.data.seq_len * workers * cfg.grad_accum_steps(workers)
        assert per_step == cfg.global_batch_tokens, name
        ds = deepspeed_config(cfg, cuda=cfg.scaling.use_gpu, world=workers)
        assert ds["train_batch_size"] * cfg.data.seq_len == cfg.global_batch_tokens


def test_an_elastic_run_keeps_its_global_batch_at_every_size_or_is_refused():
    cfg = load_config(
        TrainConfig, recipe_path("tiny-cpu"), ["scaling.workers=[1, 2]", "global_batch_tokens=4096"]
    )
    assert cfg.scaling.elastic and (cfg.scaling.min_workers, cfg.scaling.max_workers) == (1, 2)
    for world, accum in ((1, 4), (2, 2)):  # 4096 tokens = 32 sequences = world x accum x 8
        ds = deepspeed_config(cfg, cuda=False, world=world)
        assert ds["gradient_accumulation_steps"] == accum == cfg.grad_accum_steps(world)
        assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 8
    with pytest.raises(
        ConfigError,
        match=r"scaling.workers=\[2, 4\]: .* cannot be kept at 3 workers .* sizes that keep it: \[2, 4\]",
    ):
        load_config(
            TrainConfig, recipe_path("tiny-cpu"), ["scaling.workers=[2, 4]", "global_batch_tokens=4096"]
        )
    assert load_config(TrainConfig, recipe_path("tiny-cpu"), ["scaling.workers=[2, 2]"]).scaling.workers == 2
    assert "checkpoint" not in deepspeed_config(cfg, cuda=False, world=1)
    assert deepspeed_config(cfg, cuda=False, world=1, universal=True)["checkpoint"] == {
        "load_universal": True
    }


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
        (["scaling.workers=[2, 1]"], r"scaling: workers: \[min, max\] needs 1 <= min <= max, got \[2, 1\]"),
        (
            ["scaling.workers=[1, 2, 3]"],
            r"scaling.workers: expected an integer, got .* or expected 2 items, got 3",
        ),
        (["max_failures=-2"], r"max_failures must be >= 0, or -1 for no limit"),
        (["steps=16", "pause_at=[4, 16]"], r"pause_at: step 16 is not in 1..steps-1=15"),
        (
            ["storage=s3://bucket/runs"],
            r"storage='s3://bucket/runs': use a file-system path that every node sees",
        ),
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
    ds = deepspeed_config(cfg, cuda=False, world=2)
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


def loader(rank=0, world=1, state=None, sizes=(7, 30), sequences=8, micro_batch=2):
    """Every rank streams the same whole datasets (as data_config says): block values say which row."""
    shards = {"code": FakeShard(sizes[0]), "lm": FakeShard(sizes[1], 500)}
    taken = (state or {}).get("taken", {})
    streams = {t: TaskStream(s, t, 0, 4, len(s.rows), taken.get(t, 0)) for t, s in shards.items()}
    return MixtureLoader(streams, {"code": 0.5, "lm": 0.5}, sequences, micro_batch, rank, world, 0, state)


def rows_of(batches):
    out = []
    for inputs, targets, mask in batches:
        assert inputs.shape == targets.shape == mask.shape == (2, 4)
        out += inputs[:, 0].tolist()
    return out


def test_mixture_is_deterministic_and_resumes_exactly():
    a = loader()
    first = [rows_of(a.step_batches()) for _ in range(12)]  # several epochs of the 7-block task
    assert all(len(rows) == 8 for rows in first)
    again = loader()
    assert first == [rows_of(again.step_batches()) for _ in range(12)]
    b = loader()
    for _ in range(5):
        b.step_batches()
    resumed = loader(state=b.state())
    assert [rows_of(resumed.step_batches()) for _ in range(7)] == first[5:]
    assert a.sources["code"].shard.epochs >= 3  # the small task wrapped around
    code = [v for rows in first for v in rows if v < 500]  # in the order trained
    assert sorted(code[:7]) == sorted(code[7:14]) == list(range(7))  # an epoch: every row once
    assert code[:7] != code[7:14]  # each epoch shuffled with a seed of its own


@pytest.mark.parametrize("world", [2, 4])
def test_a_step_trains_the_same_rows_in_the_same_micro_batches_at_any_world_size(world):
    """The data side of resharding: at 1, 2 or 4 workers a step's global batch is the same rows, cut into
    the same micro-batches (rank r's are the r-th slice), and the position is one global state, so a run
    resumed at another size trains exactly the rows that come next: none twice, none skipped."""
    one = loader()
    many = [loader(rank=r, world=world) for r in range(world)]
    for _ in range(3):
        whole = one.step_batches()
        slices = [ld.step_batches() for ld in many]
        assert [rows_of([b]) for b in whole] == [rows_of([b]) for part in slices for b in part]
    states = [ld.state() for ld in many]
    assert all(s == one.state() for s in states) and one.state()["step"] == 3
    # Stop at 1 worker after 3 steps, go on at `world`: the continuation of the uninterrupted run.
    go_on = [loader(rank=r, world=world, state=one.state()) for r in range(world)]
    expected = [rows_of(one.step_batches()) for _ in range(4)]
    assert [rows_of(b for ld in go_on for b in ld.step_batches()) for _ in range(4)] == expected


def test_a_step_that_does_not_split_over_the_workers_is_refused():
    with pytest.raises(ValueError, match="8 sequences per step do not split into 3 x micro-batches of 2"):
        loader(world=3)


def test_the_cadence_of_logs_evaluations_and_checkpoints():
    from train.loop import Cadence

    c = Cadence(steps=10, log_every=3, eval_every=4, checkpoint_every=5)
    steps = range(1, 11)
    assert [s for s in steps if c.logs(s)] == [3, 6, 9, 10]  # the last step always
    assert [s for s in steps if c.saves(s)] == [5, 10]
    assert [s for s in steps if c.evaluates(s)] == [4, 5, 8, 10]  # every checkpoint is evaluated
    rungs = Cadence(steps=10, log_every=3, eval_every=4, checkpoint_every=5, checkpoint_at=frozenset({7}))
    assert [s for s in steps if rungs.saves(s)] == [5, 7, 10]
