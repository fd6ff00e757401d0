"""Training data: packed blocks (odyssey/data/packing.py) streamed to the workers by Ray Data.

Driver side: one Ray Dataset per task of the mixture. data.load = stream: read lazily from the Parquet
shards and split across workers (`streaming_split`, equal shards, order preserved so that the split is
deterministic). data.load = memory: read by the driver; every worker streams it whole and keeps every
world-th row (no split coordinators to start: small corpora start in seconds). The few validation blocks are read on
the driver and handed to every worker with the config.

Worker side: a `MixtureLoader` draws each micro-batch's composition (which task each row comes from)
from the mixture weights with an RNG seeded by (seed, micro-step) alone. Every rank draws the same
composition, so every rank consumes its shards in lock-step: all ranks reach the end of a task's
epoch together (streaming_split requires that), and the data position is a few integers per task
(epoch, rows taken) that a checkpoint stores and a resumed run skips to.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from odyssey.data import corpus as corpus_mod
from odyssey.data import packing
from odyssey.data.corpus import CorpusConfig
from odyssey.errors import ConfigError
from odyssey.tasks import TASKS
from odyssey.tokenizer import Tokenizer
from train.config import TrainConfig

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


# --- driver ----------------------------------------------------------------------------------------


def prepare(cfg: TrainConfig) -> None:
    """Build whatever of corpus, tokenizer and blocks is missing (data.prepare recipes)."""
    corpus_dir, blocks_dir = Path(cfg.data.corpus), Path(cfg.data.blocks_dir)
    if (blocks_dir / MANIFEST).is_file():
        return
    if not (corpus_dir / MANIFEST).is_file():
        log.info("preparing data: building the %s corpus in %s", cfg.data.prepare_preset, corpus_dir)
        corpus_mod.build_corpus(corpus_dir, CorpusConfig.from_preset(cfg.data.prepare_preset, seed=cfg.seed))
    tok_path = corpus_dir / "tokenizer.json"
    if not tok_path.is_file():
        Tokenizer.train(corpus_mod.texts(corpus_dir, "train"), cfg.data.vocab_size).save(tok_path)
    packing.pack_corpus(corpus_dir, Tokenizer.load(tok_path), cfg.data.seq_len, blocks_dir, seed=cfg.seed)


def read_manifest(cfg: TrainConfig) -> dict:
    """The blocks manifest, checked against the config: a clear error for a missing or mismatched dataset."""
    blocks_dir = Path(cfg.data.blocks_dir)
    path = blocks_dir / MANIFEST
    if not path.is_file():
        raise ConfigError(
            f"data: no packed blocks at {blocks_dir}. Build them with `odyssey data build --out {cfg.data.corpus}`, "
            f"`odyssey tokenizer train --corpus {cfg.data.corpus}` and `odyssey data pack --corpus {cfg.data.corpus} "
            f"--seq-len {cfg.data.seq_len}`, or set data.prepare=true"
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest["seq_len"] != cfg.data.seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} but {blocks_dir} holds blocks of {manifest['seq_len']} tokens"
        )
    return manifest


def mixture_tasks(cfg: TrainConfig, manifest: dict) -> dict[str, float]:
    """Tasks that train (weight > 0 and train blocks to give) with their normalised weights."""
    weights = {}
    for task in TASKS:
        weight = cfg.data.mixture.get(task, 0.0)
        blocks = manifest["counts"][task]["train"]["blocks"]
        if weight > 0 and blocks < cfg.scaling.workers:
            raise ConfigError(
                f"data.mixture.{task}: {blocks} train blocks cannot feed {cfg.scaling.workers} workers; "
                f"give it weight 0 or build a larger corpus"
            )
        if weight > 0:
            weights[task] = weight
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}


def dataset_name(split: str, task: str) -> str:
    return f"{split}_{task}"


def build_datasets(cfg: TrainConfig, tasks: list[str]) -> dict:
    """One Ray Dataset per training task of the mixture, named train_{task}.

    data.load = "stream": Ray Data reads the Parquet shards lazily with read tasks spread over the
    cluster (corpora of any size). "memory": the driver reads the shards and hands Ray Data in-memory
    Arrow tables: no read tasks to start, which on a small machine saves seconds per task and epoch.
    """
    import pyarrow.parquet as pq
    import ray.data

    context = ray.data.DataContext.get_current()  # travels with the datasets to the workers
    context.enable_progress_bars = False  # the training progress line says what matters
    context.print_on_execution_start = False
    blocks_dir = Path(cfg.data.blocks_dir)
    datasets = {}
    for task in tasks:
        files = _files(blocks_dir, task, "train")
        if cfg.data.load == "memory":
            datasets[dataset_name("train", task)] = ray.data.from_arrow([pq.read_table(f) for f in files])
        else:
            datasets[dataset_name("train", task)] = ray.data.read_parquet(files)
    return datasets


def data_config(cfg: TrainConfig, train_names: list[str]):
    """stream: streaming_split across workers, order preserved so that the split is deterministic.
    memory: no split; every worker reads the (small) in-memory dataset and keeps its stride."""
    import ray.train
    from ray.data import ExecutionOptions

    split = train_names if cfg.data.load == "stream" else []
    return ray.train.DataConfig(
        datasets_to_split=split, execution_options=ExecutionOptions(preserve_order=True)
    )


def _files(blocks_dir: Path, task: str, split: str) -> list[str]:
    return [str(p) for p in sorted((blocks_dir / task).glob(f"{split}-*.parquet"))]


# --- worker ----------------------------------------------------------------------------------------


class TaskStream:
    """Rows of one task, epoch after epoch, each epoch locally shuffled by a seed of its own.

    `stride` = (world, rank) when every worker reads the whole dataset (data.load = memory): the rank
    keeps rows rank, rank + world, ... of each epoch. Every rank shuffles with the same seed, so the
    ranks' rows never overlap. With streaming_split (data.load = stream) the shard is already this
    rank's: stride (1, 0).
    """

    def __init__(
        self, shard, task: str, seed: int, shuffle_buffer: int, stride=(1, 0), epoch: int = 0, offset: int = 0
    ):
        self.shard, self.task, self.seed, self.shuffle_buffer = shard, task, seed, shuffle_buffer
        self.world, self.rank = stride
        self._rows: list[tuple[np.ndarray, np.ndarray]] = []
        self._start_epoch(epoch)
        self._skip = offset  # resume: what this rank already trained on in this epoch

    def start(self) -> None:
        """Skip to the resume position and have the first rows ready. Starting a Ray Data execution
        takes a while, so the loader starts every task's stream at once."""
        for _ in range(self._skip):
            self.take()
        self._skip = 0
        self._fill()

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.offset, self._seen = epoch, 0, 0
        rng = np.random.default_rng([self.seed, TASKS.index(self.task), epoch])
        self._batches = iter(
            self.shard.iter_batches(
                batch_size=64,
                batch_format="numpy",
                local_shuffle_buffer_size=self.shuffle_buffer or None,
                local_shuffle_seed=int(rng.integers(2**31)) if self.shuffle_buffer else None,
            )
        )

    def _fill(self) -> None:
        while not self._rows:
            batch = next(self._batches, None)
            if batch is None:
                if self.offset == 0:
                    raise RuntimeError(f"task {self.task}: this worker's shard is empty")
                self._start_epoch(self.epoch + 1)
                continue
            rows = list(zip(batch["input_ids"], batch["loss_mask"]))
            mine = [row for i, row in enumerate(rows, start=self._seen) if i % self.world == self.rank]
            self._seen += len(rows)
            self._rows = mine[::-1]

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        self._fill()
        self.offset += 1
        return self._rows.pop()

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}


class MixtureLoader:
    """Micro-batches of (inputs, targets, loss mask), each row's task drawn by mixture weight."""

    def __init__(
        self,
        streams: dict[str, TaskStream],
        weights: dict[str, float],
        micro_batch: int,
        seed: int,
        micro_step: int = 0,
    ):
        self.streams, self.micro_batch, self.seed, self.micro_step = streams, micro_batch, seed, micro_step
        self.tasks = list(weights)
        self.p = np.array([weights[t] for t in self.tasks])
        with ThreadPoolExecutor(max_workers=len(streams)) as pool:
            list(pool.map(TaskStream.start, streams.values()))

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The same draw on every rank: seeded by the step, not the rank (see the module docstring).
        rng = np.random.default_rng([self.seed, 1, self.micro_step])
        picks = rng.choice(len(self.tasks), size=self.micro_batch, p=self.p)
        rows = [self.streams[self.tasks[i]].take() for i in picks]
        self.micro_step += 1
        ids = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))
        mask = torch.from_numpy(np.stack([r[1] for r in rows]).astype(np.bool_))
        return ids[:, :-1], ids[:, 1:], mask[:, 1:]  # inputs, next-token targets, which targets train

    def state(self) -> dict:
        return {"micro_step": self.micro_step, "streams": {t: s.state() for t, s in self.streams.items()}}


def make_loader(
    cfg: TrainConfig, weights: dict[str, float], rank: int, world: int, state: dict | None
) -> MixtureLoader:
    import ray.train

    stride = (world, rank) if cfg.data.load == "memory" else (1, 0)
    streams = {}
    for task in weights:
        pos = (state or {}).get("streams", {}).get(task, {"epoch": 0, "offset": 0})
        shard = ray.train.get_dataset_shard(dataset_name("train", task))
        streams[task] = TaskStream(shard, task, cfg.seed, cfg.data.shuffle_buffer_blocks, stride, **pos)
    return MixtureLoader(streams, weights, cfg.micro_batch_size, cfg.seed, (state or {}).get("micro_step", 0))


def read_validation(cfg: TrainConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The first eval_blocks validation blocks of every task (read once, on the driver: they are few,
    and every rank evaluates the same ones)."""
    out = {}
    for task in TASKS:
        ids, mask = packing.read_blocks(cfg.data.blocks_dir, task, "val")
        if len(ids):
            out[task] = (ids[: cfg.eval_blocks], mask[: cfg.eval_blocks])
    return out


def keep_data_stats_on_driver_node() -> None:
    """Ray Data keeps one detached stats actor per cluster, on the node of whichever process runs a
    dataset first. Left to a training worker, it lands on a GPU node and keeps that node from ever
    scaling down; created here, it lives on the driver's node (the head, under `ray job submit`)."""
    try:
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:  # a Ray without it: nothing to pin
        return
    get_or_create_stats_actor()
