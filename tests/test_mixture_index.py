"""data.load=index: each rank reads only the rows it trains, from the token arrays beside the Parquet
shards, while the run's order of rows stays one global order: the same rows in the same places at 1, 2
or 4 workers, a resume at another world size continuing it exactly, every row once per epoch. Real
packed blocks (conftest's), real memory-mapped arrays; no Ray."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from odyssey.config import load_config
from odyssey.data import packing
from odyssey.errors import ConfigError
from odyssey.tasks import SPLITS, TASKS
from train import mixture
from train.config import TrainConfig, recipe_path
from train.mixture import MixtureLoader, TaskArray

SEQUENCES, MICRO_BATCH = 16, 2  # a step's rows split over 1, 2 or 4 ranks


def config(corpus_dir, *extra) -> TrainConfig:
    sets = [f"data.corpus={corpus_dir}", "data.prepare=false", f"micro_batch_size={MICRO_BATCH}", *extra]
    return load_config(TrainConfig, recipe_path("tiny-cpu"), sets)  # 2048 tokens: 16 rows of 128


def loaders(cfg: TrainConfig, world: int, state: dict | None = None) -> list[MixtureLoader]:
    """Every rank of a `world`-worker run, built in this process as the workers build theirs."""
    manifest = mixture.read_manifest(cfg)
    weights = mixture.mixture_tasks(cfg, manifest)
    rows = {t: manifest["counts"][t]["train"]["blocks"] for t in weights}
    return [mixture.make_loader(cfg, weights, rows, rank, world, state) for rank in range(world)]


def step_rows(ranks: list[MixtureLoader]) -> np.ndarray:
    """One step's rows of every rank, rank after rank: (SEQUENCES, seq_len) input ids."""
    return np.concatenate([inputs.numpy() for ld in ranks for inputs, _, _ in ld.step_batches()])


def run(ranks: list[MixtureLoader], steps: int) -> list[np.ndarray]:
    return [step_rows(ranks) for _ in range(steps)]


@pytest.fixture(scope="module")
def cfg(corpus_dir, blocks_dir):
    return config(corpus_dir)


@pytest.fixture(scope="module")
def uninterrupted(cfg):
    """12 steps of one worker: the run's order of rows."""
    return run(loaders(cfg, 1), 12)


@pytest.mark.parametrize("world", [2, 4])
def test_the_ranks_together_train_the_rows_of_one_worker_in_the_same_places(cfg, uninterrupted, world):
    assert cfg.data.load == "index"
    got = run(loaders(cfg, world), len(uninterrupted))
    for one, many in zip(uninterrupted, got, strict=True):
        assert one.shape == (SEQUENCES, 128) and np.array_equal(one, many)


@pytest.mark.parametrize("then", [1, 4])
def test_a_run_resumed_at_another_world_size_trains_the_rows_that_come_next(cfg, uninterrupted, then):
    two = loaders(cfg, 2)
    run(two, 5)
    states = [ld.state() for ld in two]
    assert states[0] == states[1] and states[0]["step"] == 5  # one position, whatever the rank
    resumed = loaders(cfg, then, states[0])
    for expected, got in zip(uninterrupted[5:], run(resumed, 7), strict=True):
        assert np.array_equal(expected, got)


def test_each_rank_reads_its_share_of_the_rows_and_no_more(cfg):
    row_bytes = 129 * (2 + 1)  # seq_len + 1 tokens: uint16 ids (vocabulary 2048) + uint8 mask
    steps = 6
    for world in (1, 2, 4):
        ranks = loaders(cfg, world)
        run(ranks, steps)
        assert [ld.bytes_read for ld in ranks] == [steps * SEQUENCES // world * row_bytes] * world


def test_every_row_of_an_epoch_is_trained_once_in_the_epoch_s_seeded_order(blocks_dir):
    """One task, more steps than it has rows: two epochs, each a permutation of its own."""
    task = "moderate"
    ids, _ = packing.open_arrays(blocks_dir, task, "train")
    rows = len(ids)
    steps = 2 * rows // SEQUENCES + 1
    ranks = [
        MixtureLoader({task: TaskArray(str(blocks_dir), task, 7, rows)}, {task: 1.0}, SEQUENCES, 2, r, 2, 7)
        for r in range(2)
    ]
    trained = np.concatenate(run(ranks, steps))[: 2 * rows]  # inputs: each row less its last token
    orders = [np.random.default_rng([7, TASKS.index(task), e]).permutation(rows) for e in (0, 1)]
    for epoch, order in enumerate(orders):
        got = trained[epoch * rows : (epoch + 1) * rows]
        assert np.array_equal(got, ids[order, :-1])
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, ids[:, :-1].tolist()))  # each row once
    assert not np.array_equal(orders[0], orders[1])


def test_the_arrays_are_the_parquet_shards_rows_in_order(blocks_dir):
    index = json.loads((blocks_dir / packing.ARRAYS).read_text())
    assert index["dtype"] == "uint16"
    for task in TASKS:
        for split in SPLITS:
            expected_ids, expected_mask = packing.read_blocks(blocks_dir, task, split)
            ids, mask = packing.open_arrays(blocks_dir, task, split)
            assert ids.dtype == np.uint16 and mask.dtype == np.uint8
            assert np.array_equal(ids, expected_ids) and np.array_equal(mask, expected_mask)
            shards = index["splits"][task][split]["shards"]
            starts = np.cumsum([0] + [s["rows"] for s in shards])
            assert [s["offset"] for s in shards] == starts[:-1].tolist() and starts[-1] == len(ids)


def test_blocks_packed_before_the_arrays_get_them_from_plan(cfg, blocks_dir, corpus_dir, tmp_path):
    old = tmp_path / "blocks"
    shutil.copytree(blocks_dir, old, ignore=shutil.ignore_patterns("*.npy", packing.ARRAYS))
    assert not (old / packing.ARRAYS).exists()
    mixture.plan(config(corpus_dir, f"data.blocks={old}"))
    assert (old / packing.ARRAYS).read_text() == (blocks_dir / packing.ARRAYS).read_text()
    for task in TASKS:
        for new, made in zip(
            packing.array_paths(old, task, "train"), packing.array_paths(blocks_dir, task, "train")
        ):
            assert new.read_bytes() == made.read_bytes()
    assert [p.name for p in old.rglob(".*")] == []  # no temporary file left behind


def test_a_worker_that_cannot_see_the_arrays_says_so(tmp_path):
    with pytest.raises(ConfigError, match=r"every node sees \(like storage\), or set data\.load=stream"):
        TaskArray(str(tmp_path), "code", 0, 10).start()


def test_load_memory_is_refused_naming_its_replacement(corpus_dir):
    with pytest.raises(ConfigError, match=r"data\.load: 'memory' was removed; use index"):
        config(corpus_dir, "data.load=memory")
