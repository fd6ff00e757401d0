"""The sweep config: which training recipe, which fields to search and how, what to optimise, how much
to spend, and what one trial may use. One YAML file per sweep in tune/configs/.

The training side is the #3 recipe as it is (`recipe:`) with settings on top (`train:`, dotted keys as
with `--set`); the search space is checked against it in tune/space.py before any trial starts.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from odyssey.config import named_file
from odyssey.errors import ConfigError
from odyssey.tasks import TASKS
from tune import space

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
METRICS = ("val_loss", "loss", *(f"val_loss_{t}" for t in TASKS))


@dataclass
class SearchConfig:
    # random: seeded random proposals; when every searched field is a list, distinct combinations (no
    # point twice). optuna: TPE (multivariate, few start-up trials), which learns from finished trials:
    # use it with asha or fifo, as halving's cohort is proposed before any trial finishes.
    # grid: every combination of the listed values (exhaustive, the reference).
    algorithm: Literal["random", "optuna", "grid"] = "random"
    seed: int = 0


@dataclass
class SchedulerConfig:
    # halving: synchronous successive halving (tune/halving.py). The whole cohort trains to the first rung
    # (grace x a trial's tokens) and waits; the best 1/factor go on to the next rung (x factor), the
    # others stop. asha: the asynchronous variant (a trial goes on if it is in the best 1/factor of what
    # has reported at the rung so far); for large sweeps on many GPUs. fifo: no stopping.
    kind: Literal["halving", "asha", "fifo"] = "halving"
    grace_fraction: float = 0.125  # first rung, as a share of a trial's tokens
    reduction_factor: float = 3.0

    def __post_init__(self) -> None:
        if not 0 < self.grace_fraction <= 1:
            raise ConfigError(f"grace_fraction must be in (0, 1], got {self.grace_fraction}")
        if self.reduction_factor <= 1:
            raise ConfigError(f"reduction_factor must be > 1, got {self.reduction_factor}")


@dataclass
class BudgetConfig:
    trials: int = 8  # samples for random/optuna; grid runs every combination once
    tokens: int | None = None  # stop the sweep once its trials have trained this many tokens together
    time_s: float | None = None  # stop the sweep after this many seconds

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ConfigError(f"trials must be >= 1, got {self.trials}")
        for name in ("tokens", "time_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive or null, got {value}")


@dataclass
class TrialConfig:
    """What one trial uses: its training run's worker group (replaces the recipe's scaling)."""

    workers: int = 1  # 1 for proxies; more runs a ZeRO-sharded TorchTrainer inside the trial
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    max_concurrent: int | None = None  # None: as many trials as the cluster holds at the start

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker must be positive, got {self.cpus_per_worker}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"max_concurrent must be >= 1 or null, got {self.max_concurrent}")


@dataclass
class TransferConfig:
    """µP transfer (`--transfer`): trials train a narrow proxy of the recipe's model; the best
    hyperparameters go to the recipe's own (wide) model, both under µP with the same base width."""

    proxy_width: int | None = None  # d_model of the proxy; None: a quarter of the target's
    # Kept fixed across widths: the head width (n_head scales with d_model), as in the µP paper's GPT runs.

    def __post_init__(self) -> None:
        if self.proxy_width is not None and self.proxy_width < 8:
            raise ConfigError(f"proxy_width must be >= 8, got {self.proxy_width}")


@dataclass
class SweepConfig:
    name: str = "sweep"  # the sweep directory is {storage}/{name}; launching again resumes it
    storage: str = "runs/tune"
    recipe: str = "tiny-cpu"  # a training recipe (train/configs/) or a YAML path
    train: dict[str, Any] = field(
        default_factory=dict
    )  # settings on top of the recipe: {optim.warmup_steps: 5}
    space: dict[str, Any] = field(default_factory=dict)  # field -> distribution (tune/space.py)
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    trial: TrialConfig = field(default_factory=TrialConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)

    @staticmethod
    def unknown_field_hint(key: str, value: Any) -> str | None:
        """A training setting given at the sweep's top level (`--set optim.lr=...`): it goes under
        `train.`; the hint names the closest field of the training config."""
        from odyssey.config import flatten_keys, to_dict
        from train.config import TrainConfig

        known = list(flatten_keys(to_dict(TrainConfig())))
        given = [f"{key}.{k}" for k in flatten_keys(value)] if isinstance(value, dict) else [key]
        close = difflib.get_close_matches(given[0], known, n=1, cutoff=0.6)
        if not close and not any(k == key or k.startswith(f"{key}.") for k in known):
            return None
        example = close[0] if close else given[0]
        return f"; training settings go under train.: did you mean 'train.{example}'? (--set train.{example}=...)"

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"name {self.name!r} must be a non-empty directory name")
        if self.metric not in METRICS:
            raise ConfigError(
                f"metric {self.metric!r} is not reported by training; use one of {', '.join(METRICS)}"
            )


def sweep_path(name_or_path: str) -> Path:
    """`tiny-lr` -> tune/configs/tiny-lr.yaml; a path is taken as it is."""
    return named_file(name_or_path, CONFIG_DIR, "sweep")


@dataclass
class Plan:
    """A sweep resolved on the driver."""

    cfg: SweepConfig
    transfer: bool
    sweep_dir: Path
    base: dict[str, Any]  # the trials' training config as plain data, before the searched values
    params: list[space.Param]
    trial_tokens: int  # the most tokens one trial may train (ASHA's max_t)
    rungs: list[int] = field(default_factory=list)  # halving: tokens where the cohort is cut
    target: dict[str, Any] | None = None  # --transfer: the wide model's training config (plain data)

    @property
    def trials_dir(self) -> Path:
        return self.sweep_dir / "trials"
