"""How each task's answer is decided from what the model gives: the one place both the serving
deployments (serve/tasks.py, serve/finder.py) and evaluation (odyssey/evaluation/) call, with one
settings object (`AnswerSettings`: the `answers:` block of serve/config.yaml, and `odyssey eval`'s).

    summarize  greedy decoding of up to summary_max_tokens                     summary_params
    moderate   the model's probability of each label, with the rules' findings  moderation
               forced on; a label applies at moderation_threshold
    code       `code_attempts` decodings at once (greedy, then seeded samples);  code_params,
               the first that parses wins, else the greedy one                  pick_code
    find       BM25 and the model's embedding (odyssey/retrieval.py), fused      retrieval.fuse
               by reciprocal rank over find_depth of each ranking, the model's  find_depth
               weighted by find_dense_weight

No Ray, no HTTP: serving awaits the model through handles, evaluation calls it in-process, and both
hand the model's output to these functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from odyssey import moderation_rules
from odyssey.code_checks import completion_error
from odyssey.engine import GenerationParams
from odyssey.errors import ConfigError
from odyssey.tasks import ANSWERS, UNSAFE_LABELS, format_labels, label_probabilities


@dataclass(frozen=True)
class AnswerSettings:
    summary_max_tokens: int = 64
    code_max_tokens: int = 128
    code_attempts: int = 3  # greedy + (attempts - 1) samples
    code_temperature: float = 0.8
    code_top_p: float = 0.95
    moderation_threshold: float = 0.5  # a label applies when its probability reaches it
    find_depth: int = 50  # how deep each ranking goes into the fusion (at least 4 x the hits asked)
    # The model's ranking's weight in the fusion beside BM25's 1: pick it on the validation split
    # (`odyssey eval --split val` reports MRR at several weights; bench/tasks.py picks it so).
    find_dense_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("summary_max_tokens", "code_max_tokens", "code_attempts", "find_depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"answers.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.moderation_threshold < 1:
            raise ConfigError(
                f"answers.moderation_threshold must be in (0, 1), got {self.moderation_threshold}"
            )
        if self.find_dense_weight < 0:
            raise ConfigError(
                f"answers.find_dense_weight must be >= 0 (0: BM25 alone), got {self.find_dense_weight}"
            )
        if self.code_temperature <= 0 or not 0 < self.code_top_p <= 1:
            raise ConfigError("answers.code_temperature must be > 0 and code_top_p in (0, 1]")


# --- summarize ---------------------------------------------------------------------------------------


def summary_params(settings: AnswerSettings, max_tokens: int | None = None) -> GenerationParams:
    return GenerationParams(max_tokens=_capped(max_tokens, settings.summary_max_tokens), temperature=0.0)


# --- moderate ----------------------------------------------------------------------------------------

MODERATION_OPTIONS = tuple(format_labels(a) for a in ANSWERS)  # what the model scores, whole
Judge = Literal["served", "model", "rules"]


@dataclass(frozen=True)
class Verdict:
    labels: frozenset[str]  # the unsafe labels that apply, or {"safe"}
    probabilities: dict[str, float]  # of every label, after the rules (the rules' labels are 1.0)
    rules: tuple[moderation_rules.Hit, ...] = field(default=())

    @property
    def flagged(self) -> bool:
        return self.labels != {"safe"}


def moderation(
    text: str, logprobs: list[float] | None, settings: AnswerSettings, judge: Judge = "served"
) -> Verdict:
    """The verdict on `text`. logprobs: the model's log-probability of each MODERATION_OPTIONS answer
    (None for judge="rules"). judge "served" is what /v1/moderate answers: the model's label
    probabilities with every label a rule found forced to 1.0 (text cannot talk a rule out of matching);
    "model" and "rules" are each half alone, what evaluation reports beside it.

    A label applies when its probability reaches the threshold; when none does but "safe" is below it
    too, the likeliest unsafe label applies (the model is sure something is wrong, not which)."""
    probs = {label: 0.0 for label in ("safe", *UNSAFE_LABELS)}
    probs["safe"] = 1.0
    if judge != "rules":
        probs = label_probabilities(logprobs)
        if not all(math.isfinite(p) for p in probs.values()):
            raise ValueError("the model's label scores are not numbers")
    hits = tuple(moderation_rules.scan(text)) if judge != "model" else ()
    for hit in hits:
        probs[hit.label] = 1.0
    if hits:
        probs["safe"] = 0.0
    t = settings.moderation_threshold
    labels = {label for label in UNSAFE_LABELS if probs[label] >= t}
    if not labels and probs["safe"] < t:
        labels = {max(UNSAFE_LABELS, key=lambda label: probs[label])}
    return Verdict(frozenset(labels or {"safe"}), probs, hits)


# --- code --------------------------------------------------------------------------------------------


def code_params(settings: AnswerSettings, max_tokens: int | None = None) -> list[GenerationParams]:
    """The attempts decoded together for one request: greedy first, then samples with seeds 1, 2, ..."""
    n = _capped(max_tokens, settings.code_max_tokens)
    samples = [
        GenerationParams(
            max_tokens=n, temperature=settings.code_temperature, top_p=settings.code_top_p, seed=i
        )
        for i in range(1, settings.code_attempts)
    ]
    return [GenerationParams(max_tokens=n, temperature=0.0), *samples]


def pick_code(prompt: str, attempts: list[str]) -> tuple[int, str | None]:
    """(index of the answer, its syntax error or None): the first attempt that parses, else the greedy one."""
    errors = [completion_error(prompt, a) for a in attempts]
    best = next((i for i, e in enumerate(errors) if e is None), 0)
    return best, errors[best]


# --- find --------------------------------------------------------------------------------------------


def find_depth(settings: AnswerSettings, k: int, passages: int) -> int:
    return min(passages, max(settings.find_depth, 4 * k))


def _capped(asked: int | None, limit: int) -> int:
    return min(asked or limit, limit)
