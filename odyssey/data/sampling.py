"""Deterministic choices by hashing: which documents a preset reads, and which split a document is in.

Every choice depends on (seed, key) alone, never on the order in which things were read, so adding a
document to the machine never moves another document to a different split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def unit_hash(seed: int, *parts: str) -> float:
    """A uniform number in [0, 1) fixed by seed and parts."""
    digest = hashlib.blake2b("\x1f".join((str(seed), *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_of(doc_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    u = unit_hash(seed, "split", doc_id)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def sample(items: Iterable[T], limit: int | None, seed: int, key: Callable[[T], str]) -> list[T]:
    """Up to `limit` items chosen by hash (all of them when limit is None), in their original order."""
    items = list(items)
    if limit is None or limit >= len(items):
        return items
    chosen = set(sorted(range(len(items)), key=lambda i: unit_hash(seed, "sample", key(items[i])))[:limit])
    return [item for i, item in enumerate(items) if i in chosen]
