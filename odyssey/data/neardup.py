"""Near-duplicate detection: MinHash signatures of word shingles, LSH candidates, groups of documents.

Splits are drawn per document, so two documents that say almost the same thing (the Debian "dbus" and
"dbus-python" descriptions, one MIT license under two copyright lines, a planted text with one word
changed) would otherwise land in different splits and the test split would measure memory. This module
finds such documents so the corpus can draw one split per *group*.

Method
    1. Normalise: lowercase, keep runs of word characters (``\\w+``), which drops punctuation and
       collapses whitespace. "Copyright (c) 2019, Jane" and "copyright c 2019 jane" are the same text.
    2. Shingle: every run of SHINGLE_WORDS consecutive words is one set element. A text with fewer
       words than that is one shingle of all its words, so short texts match only when identical. A
       text with no words has no shingles and matches nothing.
    3. MinHash: NUM_PERM minimums of a permuted 32-bit shingle hash. The permutations are exactly
       datasketch's default "affine32" scheme (MurmurHash3 finalizer, then ``a*h + b mod 2**32`` with
       datasketch's own ``a, b`` for the seed), vectorised over all shingles of a batch at once: the
       signature of a text equals ``datasketch.MinHash(num_perm, seed)`` fed the same shingle hashes,
       and depends on that text alone, so signatures of a chunk equal signatures computed one by one.
    4. Candidates by LSH banding with ``datasketch.MinHashLSH``'s bands for the threshold (the same
       candidate set its query returns, bucketed with numpy for speed), confirmed by the
       estimated Jaccard similarity (the fraction of equal signature entries) >= threshold; documents
       joined by a confirmed pair are merged with union-find, and a group is named by its smallest
       doc_id, so the result does not depend on input order.

Threshold and shingle size
    5-word shingles are the usual choice for near-duplicate text (Broder's resemblance; Lee et al.
    2022 "Deduplicating Training Data Makes Language Models Better"): long enough that shared stock
    phrases ("this package contains the") rarely make unrelated texts similar, short enough that one
    changed word disturbs only 5 shingles. One word changed in a 60-word text leaves 51 of 61
    shingles shared (Jaccard 0.84); a different copyright line on the MIT license leaves about 0.95.
    With 128 permutations the estimate has a standard deviation of about sqrt(J(1-J)/128) ~ 0.03:
    over 200 planted one-word edits of 60-word texts the estimates averaged 0.84 with a minimum of
    0.73, so a threshold of 0.8 would miss about a tenth of them. We use 0.7 (BigCode's choice for
    The Stack): such edits stay clear of the line, and for split control a false merge is cheap (two
    documents share a split) while a miss is a leak.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from datasketch import MinHash, MinHashLSH

DEFAULT_THRESHOLD = 0.7
SHINGLE_WORDS = 5
NUM_PERM = 128

# A text with no words gets this in every position: no shingle hash can produce it (they are < 2**32).
EMPTY = np.uint64(2**64 - 1)

_WORD = re.compile(r"\w+")
# Shingle hashes are computed for at most this many shingles at once ((block, num_perm) uint32 values).
_BLOCK_SHINGLES = 1 << 15
# Odd multipliers that make a shingle hash depend on word order (multiples of the golden ratio, 2**64).
_POSITION_MULTIPLIERS = (
    np.arange(1, SHINGLE_WORDS + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
) | np.uint64(1)


def normalise(text: str) -> list[str]:
    """The words of a text: lowercase runs of word characters."""
    return _WORD.findall(text.lower())


def signatures(texts: Sequence[str], num_perm: int = NUM_PERM, seed: int = 1) -> np.ndarray:
    """MinHash signatures of texts, shape (len(texts), num_perm), uint64 (values < 2**32, or EMPTY)."""
    hashes, counts = _shingle_hashes(texts)
    a, b = _permutations(num_perm, seed)
    out = np.full((len(texts), num_perm), EMPTY, dtype=np.uint64)
    ends = np.cumsum(counts)
    for lo, hi in _blocks(counts):
        start = ends[lo] - counts[lo]
        # (shingles, num_perm) uint32: the arithmetic wraps, which is the modulo 2**32 of the scheme.
        block = _fmix32(hashes[start : ends[hi - 1]])[:, None] * a + b
        offsets = ends[lo:hi] - counts[lo:hi] - start
        nonempty = counts[lo:hi] > 0
        if nonempty.any():
            out[lo:hi][nonempty] = np.minimum.reduceat(block, offsets[nonempty], axis=0)
    return out


def group(
    keys: Sequence[str], sigs: np.ndarray, threshold: float = DEFAULT_THRESHOLD
) -> tuple[dict[str, str], dict]:
    """Group documents whose texts are near-duplicates. keys[i] is the doc_id owning the text of sigs[i].

    Returns doc_id -> group id (the smallest doc_id in its group) for every doc_id in keys, and stats.
    """
    if len(keys) != len(sigs):
        raise ValueError(f"{len(keys)} keys but {len(sigs)} signatures")
    parent = {doc: doc for doc in keys}
    unique, members = _unique_signatures(sigs)
    for texts in members:
        for i in texts[1:]:
            _union(parent, keys[texts[0]], keys[i])
    pairs = 0
    for u, v, _ in _similar_pairs(unique, threshold):
        pairs += 1
        _union(parent, keys[members[u][0]], keys[members[v][0]])
    groups = {doc: _find(parent, doc) for doc in sorted(parent)}
    sizes = Counter(groups.values())
    stats = {
        "threshold": threshold,
        "num_perm": sigs.shape[1],
        "shingle_words": SHINGLE_WORDS,
        "texts": len(keys),
        "documents": len(groups),
        "groups": len(sizes),
        "merged_documents": sum(doc != gid for doc, gid in groups.items()),
        "largest_group": max(sizes.values(), default=0),
        "identical_texts": sum(len(m) - 1 for m in members),
        "pairs": pairs,
    }
    return groups, stats


def cross_split_pairs(
    rows: Iterable[tuple[str, str, str]], threshold: float = DEFAULT_THRESHOLD
) -> list[tuple[str, str, float]]:
    """Every pair of texts in different splits with estimated Jaccard >= threshold: the leak check.

    rows are (doc_id, split, text). Returns sorted (doc_id_a, doc_id_b, jaccard) with doc_id_a <= doc_id_b.
    """
    rows = list(rows)
    unique, members = _unique_signatures(signatures([text for _, _, text in rows]))
    found = []
    for texts in members:
        found += _pairs_across(rows, texts, texts, 1.0)
    for u, v, jaccard in _similar_pairs(unique, threshold):
        found += _pairs_across(rows, members[u], members[v], jaccard)
    return sorted(found)


def _pairs_across(
    rows: list[tuple[str, str, str]], left: list[int], right: list[int], jaccard: float
) -> Iterator[tuple[str, str, float]]:
    for i in left:
        for j in right:
            if (left is not right or i < j) and rows[i][1] != rows[j][1]:
                a, b = sorted((rows[i][0], rows[j][0]))
                yield a, b, jaccard


def _shingle_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every text's shingles, concatenated, and the number of shingles per text."""
    vocab: dict[str, int] = {"": 0}  # id 0 pads short texts; its hash is 0
    ids: list[int] = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    for t, text in enumerate(texts):
        words = normalise(text)
        if words:
            ids += [vocab.setdefault(w, len(vocab)) for w in words]
            ids += [0] * (SHINGLE_WORDS - len(words))  # a short text is one shingle of all its words
        lengths[t] = max(len(words), SHINGLE_WORDS) if words else 0
    word_hash = np.array([_word_hash(w) for w in vocab], dtype=np.uint64)[np.array(ids, dtype=np.int64)]
    counts = np.where(lengths > 0, lengths - SHINGLE_WORDS + 1, 0)
    # Shingle k of text t starts at word (start of t) + k.
    starts = np.repeat(np.cumsum(lengths) - lengths, counts) + _ranges(counts)
    mixed = np.zeros(len(starts), dtype=np.uint64)
    for j in range(SHINGLE_WORDS):
        mixed += word_hash[starts + j] * _POSITION_MULTIPLIERS[j]
    return (_fmix64(mixed) >> np.uint64(32)).astype(np.uint32), counts


def _word_hash(word: str) -> int:
    if not word:
        return 0
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") | 1


def _ranges(counts: np.ndarray) -> np.ndarray:
    """0..c-1 for every c in counts, concatenated."""
    total = int(counts.sum())
    return np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)


def _blocks(counts: np.ndarray) -> Iterator[tuple[int, int]]:
    """Consecutive text ranges [lo, hi) of about _BLOCK_SHINGLES shingles each (a long text alone)."""
    lo, total = 0, 0
    for hi, c in enumerate(counts.tolist(), start=1):
        total += c
        if total >= _BLOCK_SHINGLES:
            yield lo, hi
            lo, total = hi, 0
    if lo < len(counts):
        yield lo, len(counts)


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 permutation parameters for (num_perm, seed), as uint32 arrays."""
    a, b = MinHash(num_perm=num_perm, seed=seed).permutations
    return a.astype(np.uint32), b.astype(np.uint32)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, as datasketch applies it before permuting."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _unique_signatures(sigs: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    """Distinct non-empty signatures (sorted) and, for each, the indices of the texts that have it."""
    keep = np.flatnonzero(~(sigs == EMPTY).all(axis=1)) if len(sigs) else np.zeros(0, dtype=np.int64)
    if len(keep) == 0:
        return np.zeros((0, sigs.shape[1] if sigs.ndim == 2 else NUM_PERM), dtype=np.uint64), []
    unique, inverse = np.unique(sigs[keep], axis=0, return_inverse=True)
    members: list[list[int]] = [[] for _ in range(len(unique))]
    for i, u in zip(keep.tolist(), inverse.ravel().tolist()):
        members[u].append(i)
    return unique, members


def _similar_pairs(unique: np.ndarray, threshold: float) -> Iterator[tuple[int, int, float]]:
    """(u, v, jaccard) for u < v whose estimated Jaccard >= threshold, in (u, v) order."""
    candidates = _candidate_pairs(unique, threshold)
    for lo in range(0, len(candidates), _BLOCK_SHINGLES):
        u, v = candidates[lo : lo + _BLOCK_SHINGLES].T
        jaccard = (unique[u] == unique[v]).mean(axis=1)
        for i in np.flatnonzero(jaccard >= threshold).tolist():
            yield int(u[i]), int(v[i]), float(jaccard[i])


def _candidate_pairs(unique: np.ndarray, threshold: float) -> np.ndarray:
    """Sorted (u, v), u < v, that agree on at least one LSH band: exactly the pairs MinHashLSH would return.

    The bands are datasketch.MinHashLSH's own (b bands of r rows, tuned to the threshold); the
    bucketing is done here with numpy because MinHashLSH's per-key Python inserts and queries take
    ~15 s for 75k texts; this way the whole of group() takes ~3 s.
    """
    if len(unique) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    lsh = MinHashLSH(threshold=threshold, num_perm=unique.shape[1])
    pairs = [np.zeros((0, 2), dtype=np.int64)]
    for band in range(lsh.b):
        rows = np.ascontiguousarray(unique[:, band * lsh.r : (band + 1) * lsh.r])
        bucket = np.unique(
            rows.view(np.dtype((np.void, rows.itemsize * lsh.r))).ravel(), return_inverse=True
        )[1]
        pairs += [_all_pairs(same) for same in _shared_buckets(bucket.ravel())]
    return np.unique(np.concatenate(pairs), axis=0)


def _shared_buckets(bucket: np.ndarray) -> Iterator[np.ndarray]:
    """The indices in each bucket that holds more than one, ascending."""
    order = np.argsort(bucket, kind="stable")
    starts = np.flatnonzero(np.diff(bucket[order], prepend=-1))
    sizes = np.diff(starts, append=len(order))
    for start, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist()):
        yield order[start : start + size]


def _all_pairs(indices: np.ndarray) -> np.ndarray:
    """Every (indices[i], indices[j]) with i < j, for ascending indices."""
    i, j = np.triu_indices(len(indices), k=1)
    return np.stack([indices[i], indices[j]], axis=1)


def _find(parent: dict[str, str], doc: str) -> str:
    while parent[doc] != doc:
        parent[doc] = parent[parent[doc]]
        doc = parent[doc]
    return doc


def _union(parent: dict[str, str], x: str, y: str) -> None:
    """Join the groups of x and y under the smaller root, so every root is its group's smallest doc_id."""
    rx, ry = _find(parent, x), _find(parent, y)
    if rx != ry:
        parent[max(rx, ry)] = min(rx, ry)
