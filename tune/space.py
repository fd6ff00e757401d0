"""Search spaces: which training-config fields a sweep varies, and over what.

A sweep file names each field by its dotted path in the training config and gives one distribution:

    space:
      optim.lr: {loguniform: [1.0e-4, 3.0e-2]}   # continuous, sampled on a log scale
      optim.weight_decay: {uniform: [0.0, 0.2]}
      optim.warmup_steps: {int: [0, 20]}          # integers, both ends included
      global_batch_tokens: {choice: [1024, 2048]} # one of these, sampled
      model.n_layer: {grid: [2, 4]}               # every one of these, each in its own trials

Everything that can be wrong with a space is found here, before any trial starts: an unknown field
(with the closest real one), an empty or reversed range, a log range through zero, and a value that
the training config itself refuses (`optim.lr: 0`, a global batch that does not split into
micro-batches): each extreme value is built into a full training config and checked.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from odyssey.config import flatten_keys, from_dict, set_values
from odyssey.errors import ConfigError
from train.config import TrainConfig

KINDS = ("uniform", "loguniform", "int", "choice", "grid")


@dataclass(frozen=True)
class Param:
    """One searched field: `kind` is one of KINDS; `values` the two ends of a range or the list."""

    field: str
    kind: str
    values: tuple

    @property
    def discrete(self) -> bool:
        return self.kind in ("choice", "grid")

    @property
    def log_scale(self) -> bool:
        return self.kind == "loguniform" or (
            self.discrete
            and all(isinstance(v, (int, float)) and v > 0 for v in self.values)
            and max(self.values) / min(self.values) >= 10
        )

    def extremes(self) -> list:
        """The values a config check must accept: both ends of a range, every item of a list."""
        return list(self.values)

    def to_tune(self, search: str):
        """The Ray Tune domain for this parameter under the given search algorithm."""
        from ray import tune

        lo, hi = self.values[0], self.values[-1]
        if self.kind == "uniform":
            return tune.uniform(lo, hi)
        if self.kind == "loguniform":
            return tune.loguniform(lo, hi)
        if self.kind == "int":
            return tune.randint(lo, hi + 1)  # Tune's upper end is exclusive
        if self.kind == "grid" or search == "grid":
            return tune.grid_search(list(self.values))
        return tune.choice(list(self.values))


def parse_space(raw: Any, search: str, base: Mapping[str, Any]) -> list[Param]:
    """Check a sweep's `space:` mapping against the training config `base` (plain data); return its params."""
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(
            "space: give at least one field to search, e.g. `optim.lr: {loguniform: [1e-4, 1e-2]}`"
        )
    params = [_parse_param(name, spec) for name, spec in flatten(raw).items()]
    for p in params:
        where = f"space.{p.field}"
        if search == "grid" and not p.discrete:
            raise ConfigError(
                f"{where}: search grid needs a list ({{grid: [...]}} or {{choice: [...]}}), got {p.kind}"
            )
        if search == "optuna" and p.kind == "grid":
            raise ConfigError(
                f"{where}: optuna samples its own points; use {{choice: [...]}} instead of grid"
            )
        for value in p.extremes():
            _check_value(base, {p.field: value}, where)
    # Discrete values interact (global batch vs. micro-batch): check every combination when there are few.
    discrete = [p for p in params if p.discrete]
    combos = math.prod(len(p.values) for p in discrete)
    if len(discrete) > 1 and combos <= 256:
        for values in itertools.product(*(p.values for p in discrete)):
            chosen = {p.field: v for p, v in zip(discrete, values)}
            _check_value(base, chosen, "space (" + ", ".join(f"{k}={v}" for k, v in chosen.items()) + ")")
    return params


def flatten(raw: Any) -> dict[str, Any]:
    """`{optim: {lr: {loguniform: ...}}}` (nested, or from `--set space.optim.lr=...`) -> `{optim.lr: ...}`.
    A distribution is a one-key mapping to a list; anything else that is a mapping is a section."""
    return flatten_keys(raw, is_leaf=_is_distribution_or_value)


def _is_distribution_or_value(value: Any) -> bool:
    if not isinstance(value, Mapping):
        return True
    return len(value) == 1 and (next(iter(value)) in KINDS or isinstance(next(iter(value.values())), list))


def _parse_param(name: str, spec: Any) -> Param:
    where = f"space.{name}"
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(
            f"{where}: give one distribution as a mapping, e.g. {{loguniform: [1e-4, 1e-2]}}; kinds: {', '.join(KINDS)}"
        )
    ((kind, values),) = spec.items()
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown distribution {kind!r}; kinds: {', '.join(KINDS)}")
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"{where}: {kind} needs a non-empty list, got {values!r}")
    values = tuple(_number(v) for v in values)
    if kind in ("choice", "grid"):
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{where}: {kind} lists a value twice: {list(values)}")
        return Param(name, kind, values)
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}: {kind} needs [low, high] numbers, got {list(values)}")
    lo, hi = values
    if not lo < hi:
        raise ConfigError(f"{where}: the range [{lo}, {hi}] is empty; low must be below high")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0 (a log scale), got {lo}")
    if kind == "int" and not all(float(v).is_integer() for v in values):
        raise ConfigError(f"{where}: int needs integer ends, got {list(values)}")
    return Param(name, kind, (int(lo), int(hi)) if kind == "int" else (float(lo), float(hi)))


def _number(value: Any) -> Any:
    """YAML 1.1 reads `3e-4` as a string: take it as the number it means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_value(base: Mapping[str, Any], values: Mapping[str, Any], where: str) -> None:
    try:
        from_dict(TrainConfig, set_values(base, values))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def train_config(base: Mapping[str, Any], params: Mapping[str, Any]) -> TrainConfig:
    """The training config of one trial: the sweep's base with the trial's sampled values."""
    return from_dict(TrainConfig, set_values(base, params))
