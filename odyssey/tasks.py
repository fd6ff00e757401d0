"""The tasks one model learns, their control tokens and moderation labels: the vocabulary that the
corpus, the tokenizer, training and serving all agree on."""

from __future__ import annotations

import itertools
import math
from typing import Literal

TASKS = ("summarize", "moderate", "find", "code", "lm")
Task = Literal["summarize", "moderate", "find", "code", "lm"]
SPLITS = ("train", "val", "test")

# Control tokens. Text never turns into these (the tokenizer encodes their spelling as plain text);
# only the prompt format inserts them, by id. So a user cannot forge a task switch or an end of text.
PAD, BOS, EOS, SEP = "<|pad|>", "<|bos|>", "<|eos|>", "<|sep|>"
TASK_TOKENS = {task: f"<|{task}|>" for task in TASKS if task != "lm"}
SPECIAL_TOKENS = (PAD, BOS, EOS, SEP, *TASK_TOKENS.values())

# Moderation: multi-label. "safe" means no other label applies.
MODERATION_LABELS = ("safe", "profanity", "personal_data", "spam")
UNSAFE_LABELS = MODERATION_LABELS[1:]


def format_labels(labels: set[str] | list[str]) -> str:
    """The moderation target text: unsafe labels in canonical order, or "safe"."""
    unknown = set(labels) - set(MODERATION_LABELS)
    if unknown:
        raise ValueError(
            f"unknown moderation labels {sorted(unknown)}; labels: {', '.join(MODERATION_LABELS)}"
        )
    present = [label for label in UNSAFE_LABELS if label in labels]
    return ", ".join(present) if present else "safe"


def parse_labels(text: str) -> set[str]:
    """Inverse of format_labels; unknown words are ignored."""
    found = {part.strip() for part in text.split(",")} & set(MODERATION_LABELS)
    return found - {"safe"} if len(found) > 1 else found


# Every answer the moderation task was trained to give: "safe", or the unsafe labels that apply, in
# canonical order. Scoring each whole answer and summing gives every label's probability of applying.
ANSWERS = [
    tuple(combo) for n in range(len(UNSAFE_LABELS) + 1) for combo in itertools.combinations(UNSAFE_LABELS, n)
]


def label_probabilities(logprobs: list[float]) -> dict[str, float]:
    """Log-probabilities of ANSWERS -> probability of each label (softmax over answers, then marginals)."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    probs = {label: 0.0 for label in MODERATION_LABELS}
    for answer, w in zip(ANSWERS, weights):
        for label in answer or ("safe",):
            probs[label] += w / total
    return probs
