"""The task mixture a run trains on: which rows of the packed blocks (odyssey/data/packing.py) each
worker trains, and where it reads them.

The run has one global order of rows, independent of the world size (`MixtureLoader`): a step's batch
draws its tasks with a seed of the step, each task's rows come in the task's own seeded order, and rank
r of `world` trains the r-th slice. The data position is the step and the rows taken per task, the same
on every rank, so a run resumed at another world size trains exactly the rows that come next, none
twice, none skipped. Where a rank gets its rows is data.load's business, and nothing else is:

- index (the default): each rank reads the rows it trains and no others, by random access to the token
  arrays beside the Parquet shards, memory-mapped from a file system every node sees, like storage
  (`TaskArray`): 1/world of the corpus per rank and epoch. Each epoch is a seeded shuffle of the whole
  task. Ray Data takes no part in training.
- stream: Ray Data reads the Parquet shards and every rank streams each task's dataset whole, in the
  same order, keeping its own rows (`TaskStream`): world x the corpus per epoch, each epoch shuffled
  locally. The behaviour before index, kept for blocks that Ray Data reads but workers cannot map.

Building and packing the data run on Ray Data (odyssey/data/parallel.py) whichever is chosen. The few
validation blocks are read on the driver and handed to every worker with the config.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from odyssey.data import packing
from odyssey.data.corpus import CorpusConfig, build_corpus, texts
from odyssey.errors import ConfigError
from odyssey.tasks import TASKS
from odyssey.tokenizer import Tokenizer
from train import contrastive
from train.config import DataConfig, TrainConfig

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


# --- driver ----------------------------------------------------------------------------------------


@dataclass
class DataPlan:
    """What the driver needs of a run's data, from one call (`plan`): checked before Ray starts."""

    data: DataConfig  # where the blocks are and how they are read (the run's config holds the rest)
    manifest: dict  # the packed blocks' manifest (vocab_size, seq_len, counts per task and split)
    weights: dict[str, float]  # the tasks that train, with their normalised mixture weights
    rows_per_epoch: dict[str, int]  # train blocks per training task
    validation: dict[str, tuple[np.ndarray, np.ndarray]]  # every task's first eval_blocks val blocks
    pairs: dict  # find's (query, passage) ids for the contrastive objective (train/contrastive.py)

    def trainer_datasets(self) -> dict:
        """The TorchTrainer's `datasets` and `dataset_config` under data.load=stream (Ray must be up);
        nothing under index, where each worker reads its rows itself."""
        if self.data.load != "stream":
            return {}
        return {"datasets": build_datasets(self.data, list(self.weights)), "dataset_config": data_config()}


def plan(cfg: TrainConfig) -> DataPlan:
    """Build what is missing when data.prepare is on, then read and check the manifest, the mixture
    and the validation blocks."""
    if cfg.data.prepare:
        prepare(cfg)
    manifest = read_manifest(cfg)
    if cfg.data.load == "index":
        ensure_arrays(cfg)
    weights = mixture_tasks(cfg, manifest)
    rows = {t: manifest["counts"][t]["train"]["blocks"] for t in weights}
    return DataPlan(cfg.data, manifest, weights, rows, read_validation(cfg), contrastive.plan(cfg))


def prepare(cfg: TrainConfig) -> None:
    """Build whatever of corpus, tokenizer and blocks is missing (data.prepare recipes)."""
    corpus_dir, blocks_dir = Path(cfg.data.corpus), Path(cfg.data.blocks_dir)
    if (blocks_dir / MANIFEST).is_file():
        return
    if not (corpus_dir / MANIFEST).is_file():
        log.info("preparing data: building the %s corpus in %s", cfg.data.prepare_preset, corpus_dir)
        build_corpus(corpus_dir, CorpusConfig.from_preset(cfg.data.prepare_preset, seed=cfg.seed))
    tok_path = Path(cfg.data.tokenizer_path)
    if not tok_path.is_file():
        Tokenizer.train(texts(corpus_dir, "train"), cfg.data.vocab_size).save(tok_path)
    packing.pack_corpus(corpus_dir, Tokenizer.load(tok_path), cfg.data.seq_len, blocks_dir, seed=cfg.seed)


def read_manifest(cfg: TrainConfig) -> dict:
    """The blocks manifest, checked against the config: a clear error for a missing or mismatched dataset."""
    blocks_dir = Path(cfg.data.blocks_dir)
    path = blocks_dir / MANIFEST
    if not path.is_file():
        raise ConfigError(
            f"data: no packed blocks at {blocks_dir}. Build them with `odyssey data build --out {cfg.data.corpus}`, "
            + ("" if cfg.data.tokenizer else f"`odyssey tokenizer train --corpus {cfg.data.corpus}`, ")
            + f"{pack_command(cfg)}, or set data.prepare=true"
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest["seq_len"] != cfg.data.seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} but {blocks_dir} holds blocks of {manifest['seq_len']} tokens"
        )
    tok_path = Path(cfg.data.tokenizer_path)
    if tok_path.is_file() and manifest.get("tokenizer_sha256") != Tokenizer.load(tok_path).fingerprint:
        raise ConfigError(
            f"data: {blocks_dir} was packed with another tokenizer than {tok_path}, the one this run uses: "
            f"pack them again with {pack_command(cfg, '--overwrite')}, or set data.blocks to blocks of this tokenizer"
        )
    return manifest


def ensure_arrays(cfg: TrainConfig) -> None:
    """data.load=index reads the token arrays beside the blocks: blocks packed before they existed get
    them here, once, on the driver."""
    try:
        packing.ensure_arrays(cfg.data.blocks_dir)
    except OSError as e:
        raise ConfigError(
            f"data.load=index: {cfg.data.blocks_dir} lacks its token arrays and they cannot be written there "
            f"({e}); make it writable once, pack again with {pack_command(cfg, '--overwrite')}, or set "
            "data.load=stream"
        ) from None


def pack_command(cfg: TrainConfig, *flags: str) -> str:
    """The `odyssey data pack` that makes the blocks this run reads."""
    tokenizer = f" --tokenizer {cfg.data.tokenizer}" if cfg.data.tokenizer else ""
    rest = "".join(f" {f}" for f in flags)
    return (
        f"`odyssey data pack --corpus {cfg.data.corpus}{tokenizer} --seq-len {cfg.data.seq_len} "
        f"--out {cfg.data.blocks_dir}{rest}`"
    )


def mixture_tasks(cfg: TrainConfig, manifest: dict) -> dict[str, float]:
    """Tasks that train (weight > 0 and train blocks to give) with their normalised weights."""
    weights = {}
    for task in TASKS:
        weight = cfg.data.mixture.get(task, 0.0)
        blocks = manifest["counts"][task]["train"]["blocks"]
        if weight > 0 and blocks == 0:
            raise ConfigError(
                f"data.mixture.{task}: no train blocks; give it weight 0 or build a larger corpus"
            )
        if weight > 0:
            weights[task] = weight
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}


def dataset_name(split: str, task: str) -> str:
    return f"{split}_{task}"


def build_datasets(data: DataConfig, tasks: list[str]) -> dict:
    """data.load=stream: one Ray Dataset per training task of the mixture, named train_{task}, read
    lazily from the Parquet shards by read tasks spread over the cluster."""
    import ray.data

    context = ray.data.DataContext.get_current()  # travels with the datasets to the workers
    context.enable_progress_bars = False  # the training progress line says what matters
    context.print_on_execution_start = False
    blocks_dir = Path(data.blocks_dir)
    datasets = {}
    for task in tasks:
        datasets[dataset_name("train", task)] = ray.data.read_parquet(_files(blocks_dir, task, "train"))
    return datasets


def data_config():
    """No split: every worker reads every dataset in the same order and keeps its own rows of the
    global order (see the module docstring), so the order survives a change of world size."""
    import ray.train
    from ray.data import ExecutionOptions

    return ray.train.DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True))


def _files(blocks_dir: Path, task: str, split: str) -> list[str]:
    return [str(p) for p in sorted((blocks_dir / task).glob(f"{split}-*.parquet"))]


# --- worker ---------------------------------------------------------------------------------------


class RowSource(Protocol):
    """Where MixtureLoader gets one task's rows: `TaskArray` (data.load=index) or `TaskStream` (stream)."""

    bytes_read: int  # bytes of rows this rank has read since it started (ids + loss mask)

    def start(self) -> None:
        """Be ready to give rows from the resume position on."""

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """ids and loss mask of the task's row at global `index` (epoch after epoch)."""


class TaskArray:
    """One task's rows by random access (data.load=index): its token arrays memory-mapped, its order in
    each epoch a seeded permutation of all its rows. A rank reads the rows it is asked for and no
    others, so a step's rows are read only by the ranks that train them."""

    def __init__(self, blocks_dir: str, task: str, seed: int, rows_per_epoch: int):
        self.blocks_dir, self.task, self.seed, self.rows_per_epoch = blocks_dir, task, seed, rows_per_epoch
        self.bytes_read = 0
        self._epoch, self._order = -1, np.zeros(0, np.int64)

    def start(self) -> None:
        """Map the arrays, checked against the manifest's count (the driver wrote them if missing: plan)."""
        try:
            self.ids, self.mask = packing.open_arrays(self.blocks_dir, self.task, "train")
        except FileNotFoundError as e:
            raise ConfigError(
                f"data.load=index: {e.filename} is not on this worker's node: put data.blocks on a file "
                "system every node sees (like storage), or set data.load=stream"
            ) from None
        if len(self.ids) != self.rows_per_epoch:
            raise ConfigError(
                f"task {self.task}: {len(self.ids)} rows in {self.blocks_dir}'s arrays but its manifest "
                f"counts {self.rows_per_epoch}; rebuild the blocks with `odyssey data pack --overwrite`"
            )
        self.row_bytes = self.ids.shape[1] * (self.ids.itemsize + self.mask.itemsize)

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, i = divmod(index, self.rows_per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, TASKS.index(self.task), epoch])
            self._epoch, self._order = epoch, rng.permutation(self.rows_per_epoch)
        g = self._order[i]  # the row's global sample index: its place in the task's shards
        self.bytes_read += self.row_bytes
        return np.asarray(self.ids[g]), np.asarray(self.mask[g])


class TaskStream:
    """One task's rows in the run's global order (data.load=stream): epoch after epoch, each epoch
    locally shuffled with a seed of its own. Every rank reads the same stream in the same order (the
    same seeds) and keeps only the rows it is given by global index, so which rank trains which row can
    change with the world size while the order of rows cannot; every rank reads every row."""

    def __init__(
        self, shard, task: str, seed: int, shuffle_buffer: int, rows_per_epoch: int, position: int = 0
    ):
        self.shard, self.task, self.seed, self.shuffle_buffer = shard, task, seed, shuffle_buffer
        self.rows_per_epoch = rows_per_epoch
        self.bytes_read = 0
        self._position = position  # the global index of the first row this run may ask for
        self.epoch, self._cursor = -1, 0  # epoch open, index in it of the first row of _batch
        self._batch: dict | None = None

    def start(self) -> None:
        """Open the epoch of the resume position and read up to it. Starting a Ray Data execution takes
        a while, so the loader starts every task's stream at once."""
        self._seek(*divmod(self._position, self.rows_per_epoch))

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The row at global `index`; indices must not go backwards (rows before are skipped)."""
        epoch, i = divmod(index, self.rows_per_epoch)
        self._seek(epoch, i)
        j = i - self._cursor
        return self._batch["input_ids"][j], self._batch["loss_mask"][j]

    def _seek(self, epoch: int, i: int) -> None:
        if epoch != self.epoch:
            if epoch < self.epoch:
                raise RuntimeError(f"task {self.task}: row order went backwards to epoch {epoch}")
            self._open(epoch)
        while self._batch is None or i >= self._cursor + len(self._batch["input_ids"]):
            if self._batch is not None:
                self._cursor += len(self._batch["input_ids"])
            self._batch = next(self._batches, None)
            if self._batch is None:
                raise RuntimeError(
                    f"task {self.task}: epoch {epoch} ended after {self._cursor} rows but the blocks manifest "
                    f"counts {self.rows_per_epoch}; rebuild the blocks with `odyssey data pack`"
                )
            ids, mask = self._batch["input_ids"], self._batch["loss_mask"]
            self.bytes_read += len(ids) * (np.asarray(ids[0]).nbytes + np.asarray(mask[0]).nbytes)

    def _open(self, epoch: int) -> None:
        self.epoch, self._cursor, self._batch = epoch, 0, None
        rng = np.random.default_rng([self.seed, TASKS.index(self.task), epoch])
        self._batches = iter(
            self.shard.iter_batches(
                batch_size=64,
                batch_format="numpy",
                local_shuffle_buffer_size=self.shuffle_buffer or None,
                local_shuffle_seed=int(rng.integers(2**31)) if self.shuffle_buffer else None,
            )
        )


class MixtureLoader:
    """This rank's micro-batches of (inputs, targets, loss mask), one optimizer step at a time.

    A step's global batch is `sequences` rows whose tasks are drawn by mixture weight with an RNG seeded
    by the step alone; each task's rows follow the task's global order. Rank r of `world` trains the r-th
    contiguous slice of the batch, cut into micro-batches. So the rows of a step, and the micro-batches
    they form, are the same at every world size: a run resized from 2 workers to 1 trains the same
    tokens in the same groups, and its position is (step, rows taken per task), not a per-rank offset.
    """

    def __init__(
        self,
        sources: dict[str, RowSource],
        weights: dict[str, float],
        sequences: int,
        micro_batch: int,
        rank: int,
        world: int,
        seed: int,
        state: dict | None = None,
    ):
        if sequences % (micro_batch * world):
            raise ValueError(
                f"{sequences} sequences per step do not split into {world} x micro-batches of {micro_batch}"
            )
        self.sources, self.sequences, self.micro_batch, self.seed = sources, sequences, micro_batch, seed
        self.rank, self.world = rank, world
        self.tasks = list(weights)
        self.p = np.array([weights[t] for t in self.tasks])
        state = state or {}
        self.step = state.get("step", 0)
        self.taken = {t: state.get("taken", {}).get(t, 0) for t in self.tasks}
        with ThreadPoolExecutor(max_workers=len(sources)) as pool:  # a stream takes a while to start
            list(pool.map(lambda source: source.start(), sources.values()))

    def step_batches(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The next step's micro-batches for this rank: sequences / (world x micro_batch) of them."""
        rng = np.random.default_rng([self.seed, 1, self.step])  # the same draw on every rank
        picks = [self.tasks[i] for i in rng.choice(len(self.tasks), size=self.sequences, p=self.p)]
        per_rank = self.sequences // self.world
        mine = range(self.rank * per_rank, (self.rank + 1) * per_rank)
        rows, seen = [], dict.fromkeys(self.tasks, 0)
        for j, task in enumerate(picks):
            if j in mine:
                rows.append(self.sources[task].row(self.taken[task] + seen[task]))
            seen[task] += 1
        for task, n in seen.items():
            self.taken[task] += n
        self.step += 1
        return [_micro_batch(rows[i : i + self.micro_batch]) for i in range(0, per_rank, self.micro_batch)]

    def state(self) -> dict:
        """The data position after the last step: the same on every rank, whatever the world size."""
        return {"step": self.step, "taken": dict(self.taken)}

    @property
    def bytes_read(self) -> int:
        """Bytes of rows this rank has read since it started: its own rows under index, all under stream."""
        return sum(source.bytes_read for source in self.sources.values())


def _micro_batch(rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))
    mask = torch.from_numpy(np.stack([r[1] for r in rows]).astype(np.bool_))
    return ids[:, :-1], ids[:, 1:], mask[:, 1:]  # inputs, next-token targets, which targets train


def make_loader(
    cfg: TrainConfig,
    weights: dict[str, float],
    rows_per_epoch: dict[str, int],
    rank: int,
    world: int,
    state: dict | None,
) -> MixtureLoader:
    taken = (state or {}).get("taken", {})
    sources = {task: row_source(cfg, task, rows_per_epoch[task], taken.get(task, 0)) for task in weights}
    return MixtureLoader(
        sources, weights, cfg.sequences_per_step, cfg.micro_batch_size, rank, world, cfg.seed, state
    )


def row_source(cfg: TrainConfig, task: str, rows_per_epoch: int, position: int) -> RowSource:
    """One task's rows as data.load reads them; `position`: the global index of the first row to come."""
    if cfg.data.load == "index":
        return TaskArray(cfg.data.blocks_dir, task, cfg.seed, rows_per_epoch)
    import ray.train

    shard = ray.train.get_dataset_shard(dataset_name("train", task))
    return TaskStream(shard, task, cfg.seed, cfg.data.shuffle_buffer_blocks, rows_per_epoch, position)


def read_validation(cfg: TrainConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The first eval_blocks validation blocks of every task (read once, on the driver: they are few,
    and every rank evaluates the same ones)."""
    out = {}
    for task in TASKS:
        ids, mask = packing.read_blocks(cfg.data.blocks_dir, task, "val")
        if len(ids):
            out[task] = (ids[: cfg.eval_blocks], mask[: cfg.eval_blocks])
    return out
