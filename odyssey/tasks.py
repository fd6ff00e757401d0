"""The tasks one model learns, their control tokens and moderation labels: the vocabulary that the
corpus, the tokenizer, training and serving all agree on."""

from __future__ import annotations

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
