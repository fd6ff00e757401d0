"""The training config: one typed dataclass per concern, a named recipe per YAML file in configs/.

Batch arithmetic is checked here, before any worker starts: the global batch is given in tokens and
must split evenly into micro_batch_size x seq_len x workers x gradient-accumulation steps, at every
world size an elastic run (`workers: [min, max]`) may take: the accumulation steps are recomputed at
each (re)start so that the global batch, and with it the training curve, does not change with the size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from odyssey import hf
from odyssey.config import named_file
from odyssey.errors import ConfigError, OdysseyError
from odyssey.model import ModelConfig, tiny
from odyssey.tasks import TASKS

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class DataConfig:
    corpus: str = "runs/data/tiny"  # `odyssey data build --out` output
    # The tokenizer.json the blocks are packed with and checkpoints carry; None: {corpus}/tokenizer.json.
    # With init.from, the checkpoint's (set by train/launch.py).
    tokenizer: str | None = None
    blocks: str | None = None  # packed blocks; None: {corpus}/blocks-{seq_len}[-{tokenizer's name}]
    seq_len: int = 128
    mixture: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TASKS, 1.0))  # task -> weight
    # Build corpus, tokenizer and blocks on the driver when they are missing (CPU recipes); else a
    # missing dataset is an error before any worker starts.
    prepare: bool = False
    prepare_preset: Literal["tiny", "full"] = "tiny"
    vocab_size: int = 4096  # of the tokenizer `prepare` trains
    # How the workers read the blocks (train/mixture.py). index: each worker reads only the rows it
    # trains, by random access to the token arrays beside the Parquet shards (data.blocks on a file
    # system every node sees, like storage); each epoch a seeded shuffle of the whole task. stream: Ray
    # Data reads the Parquet shards and every worker streams them whole (world x the reads), shuffled
    # locally. A run keeps its order only under one of them: resume it with the same.
    load: Literal["index", "stream"] = "index"
    shuffle_buffer_blocks: int = 64  # load: stream only: the local shuffle on each worker, per epoch
    # Values a recipe may still hold, refused with the fix (odyssey/config.py: from_dict).
    retired_values: ClassVar[dict] = {
        "load": {"memory": "removed; use index (each worker reads its own rows: starts as fast, reads less)"}
    }

    def __post_init__(self) -> None:
        if self.seq_len < 8:
            raise ConfigError(f"seq_len={self.seq_len} is too short; use 8 or more")
        unknown = set(self.mixture) - set(TASKS)
        if unknown:
            raise ConfigError(f"mixture: unknown task {sorted(unknown)[0]!r}; tasks: {', '.join(TASKS)}")
        if any(w < 0 for w in self.mixture.values()) or not any(w > 0 for w in self.mixture.values()):
            raise ConfigError("mixture: weights must be >= 0 and at least one > 0")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or str(Path(self.corpus) / "tokenizer.json")

    @property
    def blocks_dir(self) -> str:
        if self.blocks:
            return self.blocks
        own = f"-{Path(self.tokenizer).stem}" if self.tokenizer else ""  # not the corpus's tokenizer
        return str(Path(self.corpus) / f"blocks-{self.seq_len}{own}")


@dataclass
class InitConfig:
    """Where training starts: freshly initialised weights (the default), or `init: {from: PATH}`, a
    Hugging Face Llama checkpoint (odyssey/hf.py) whose config.json sets the model's shape (the `model:`
    section then sets none), whose weights are the starting point, and whose tokenizer packs the data."""

    from_: str | None = None  # a directory every node sees, like storage

    def __post_init__(self) -> None:
        if self.from_ is None:
            return
        try:
            hf.check_pretrained(self.from_)
        except OdysseyError as e:
            raise ConfigError(f"from={self.from_!r}: {e}") from None


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    offload_optimizer: bool = False  # optimizer state in host memory (ZeRO 1-3)
    offload_params: bool = False  # parameters in host memory (ZeRO 3 only)
    activation_checkpointing: bool = False  # recompute each block's activations in backward

    def __post_init__(self) -> None:
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(f"offload_params needs zero_stage 3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("offload_optimizer needs zero_stage 1, 2 or 3")


@dataclass
class ScalingConfig:
    # N, or [min, max]: an elastic run starts with as many workers as the cluster holds (at least min),
    # and Ray Train restarts it at another size when workers are lost or capacity is added.
    workers: int | tuple[int, int] = 2
    use_gpu: bool = False  # reserve one GPU per worker (training uses CUDA where the worker has it)
    cpus_per_worker: float = 1.0
    # torch.distributed backend. auto: NCCL for GPU workers, gloo for CPU ones. gloo with use_gpu: GPUs
    # reserved but no CUDA behind them, as on the fake-GPU cluster (cluster/fake-gpu.yaml).
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # Cluster check before start: with an autoscaler the cluster may grow to fit, so only
    # `autoscaling: false` clusters are held to what they have now.
    autoscaling: bool = False
    # Elastic runs: how often Ray Train asks whether the worker group could grow (a resize restarts the
    # group from the latest checkpoint, so growing costs up to a checkpoint interval of work).
    resize_check_s: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.workers, (list, tuple)):
            low, high = self.workers
            if low < 1 or high < low:
                raise ConfigError(f"workers: [min, max] needs 1 <= min <= max, got [{low}, {high}]")
            self.workers = (low, high) if low < high else low
        elif self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.resize_check_s <= 0:
            raise ConfigError(f"resize_check_s must be positive, got {self.resize_check_s}")
        if self.cpus_per_worker <= 0:
            raise ConfigError("cpus_per_worker must be positive")
        if self.backend == "nccl" and not self.use_gpu:
            raise ConfigError("backend nccl needs GPU workers: set use_gpu=true, or backend auto or gloo")

    @property
    def elastic(self) -> bool:
        return isinstance(self.workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.workers[0] if self.elastic else self.workers

    @property
    def max_workers(self) -> int:
        return self.workers[1] if self.elastic else self.workers


@dataclass
class ContrastiveConfig:
    """InfoNCE on the `find` task's (query, passage) pairs, beside the language-model loss in every step
    (train/contrastive.py): what trains the embedding /v1/find searches with. weight 0 turns it off."""

    weight: float = 0.5  # of the contrastive loss, added to the language-model loss
    pairs_per_step: int = 32  # across all workers: each query's in-batch negatives are the others
    temperature: float = 0.05
    query_tokens: int = 32  # a query's ids, prompt included, cut to this (and to data.seq_len)
    passage_tokens: int = 128  # a passage's likewise

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"contrastive.weight must be >= 0 (0 = off), got {self.weight}")
        if self.pairs_per_step < 2:
            raise ConfigError(
                f"contrastive.pairs_per_step must be >= 2 (negatives), got {self.pairs_per_step}"
            )
        if self.temperature <= 0:
            raise ConfigError(f"contrastive.temperature must be positive, got {self.temperature}")
        if min(self.query_tokens, self.passage_tokens) < 4:
            raise ConfigError("contrastive.query_tokens and passage_tokens must be >= 4 (the prompt takes 3)")


@dataclass
class TrainConfig:
    name: str = "tiny-cpu"  # the run directory is {storage}/{name}; launching again resumes it
    storage: str = "runs"
    model: ModelConfig = field(default_factory=tiny)  # vocab and context follow the data
    init: InitConfig = field(default_factory=InitConfig)  # from a Hugging Face checkpoint, or fresh
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    global_batch_tokens: int = 2048
    micro_batch_size: int = 8  # sequences per worker per forward/backward
    steps: int = 60
    log_every: int = 5
    eval_every: int = 30
    eval_blocks: int = 16  # validation blocks per task
    checkpoint_every: int = 30
    checkpoint_at: list[int] = field(default_factory=list)  # more steps that checkpoint
    # Steps that checkpoint and then wait for the run to be stopped: a sweep's rungs under successive
    # halving (tune/halving.py pauses the trial there; it resumes from that checkpoint, or is stopped).
    pause_at: list[int] = field(default_factory=list)
    keep_checkpoints: int = 2  # best by validation loss; the latest is always kept too
    max_failures: int = (
        0  # worker-group restarts from the latest checkpoint after a worker dies; -1: no limit
    )
    peak_tflops: float | None = None  # per device, for MFU; None: table (GPU) or measured (CPU)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "log_every",
            "eval_every",
            "checkpoint_every",
            "micro_batch_size",
            "keep_checkpoints",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        outside = [s for s in self.checkpoint_at if not 0 < s <= self.steps]
        if outside:
            raise ConfigError(f"checkpoint_at: step {outside[0]} is not in 1..steps={self.steps}")
        outside = [s for s in self.pause_at if not 0 < s < self.steps]
        if outside:
            raise ConfigError(f"pause_at: step {outside[0]} is not in 1..steps-1={self.steps - 1}")
        if self.max_failures < -1:
            raise ConfigError(f"max_failures must be >= 0, or -1 for no limit; got {self.max_failures}")
        sizes = range(self.scaling.min_workers, self.scaling.max_workers + 1)
        bad = [w for w in sizes if self.global_batch_tokens % self.tokens_per_micro_step(w)]
        if bad and not self.scaling.elastic:
            self.grad_accum_steps(bad[0])  # the message with the nearest sizes that work
        if bad:
            good = [w for w in sizes if w not in bad]
            raise ConfigError(
                f"scaling.workers={list(self.scaling.workers)}: global_batch_tokens={self.global_batch_tokens} cannot be "
                f"kept at {', '.join(map(str, bad))} workers (not a multiple of micro_batch_size x seq_len x workers); "
                + (f"sizes that keep it: {good}. " if good else "")
                + "Choose sizes that divide global_batch_tokens / (micro_batch_size x seq_len) = "
                f"{self.global_batch_tokens / (self.micro_batch_size * self.data.seq_len):g}"
            )
        if self.contrastive.weight and self.contrastive.pairs_per_step < self.scaling.max_workers:
            raise ConfigError(
                f"contrastive.pairs_per_step={self.contrastive.pairs_per_step} leaves some of "
                f"{self.scaling.max_workers} workers without a pair; use at least {self.scaling.max_workers}"
            )
        if not self.name or "/" in self.name:
            raise ConfigError(f"name {self.name!r} must be a non-empty directory name")
        if "://" in self.storage:
            raise ConfigError(
                f"storage={self.storage!r}: use a file-system path that every node sees (a local disk on one machine; "
                "NFS, EFS, Filestore or a ReadWriteMany volume on a cluster): checkpoints are published by an "
                "atomic rename, which object stores do not offer"
            )

    @property
    def sequences_per_step(self) -> int:
        """Sequences in one optimizer step, across all workers: the same at every world size."""
        return self.global_batch_tokens // self.data.seq_len

    def tokens_per_micro_step(self, workers: int) -> int:
        """Tokens one forward/backward consumes across `workers` workers."""
        return self.micro_batch_size * self.data.seq_len * workers

    def grad_accum_steps(self, workers: int) -> int:
        """Micro-batches per worker per optimizer step at this world size (the global batch stays fixed)."""
        per = self.tokens_per_micro_step(workers)
        if self.global_batch_tokens % per:
            lower = max(per, self.global_batch_tokens // per * per)
            raise ConfigError(
                f"global_batch_tokens={self.global_batch_tokens} is not a multiple of micro_batch_size x seq_len x "
                f"workers = {self.micro_batch_size} x {self.data.seq_len} x {workers} = {per}; "
                f"use {lower} or {lower + per}"
            )
        return self.global_batch_tokens // per


def recipe_path(name_or_path: str) -> Path:
    """`tiny-cpu` -> train/configs/tiny-cpu.yaml; a path is taken as it is."""
    return named_file(name_or_path, CONFIG_DIR, "recipe")
