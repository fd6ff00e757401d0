"""Near-duplicate grouping: signatures, LSH grouping and the cross-split leak check (no Ray)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH

from odyssey.data import neardup

MIT = """Copyright (c) {holder}

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES
OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN
CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def prose(seed: int, words: int = 60) -> str:
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(5000)}" for _ in range(words))


def one_word_changed(text: str) -> str:
    words = text.split()
    words[len(words) // 2] = "planted"
    return " ".join(words)


def jaccard(a: str, b: str) -> float:
    sa, sb = neardup.signatures([a, b])
    return float((sa == sb).mean())


def test_one_word_changed_groups_and_unrelated_do_not():
    text = prose(1)
    keys = ["doc-b", "doc-a", "doc-c"]
    groups, _ = neardup.group(keys, neardup.signatures([text, one_word_changed(text), prose(2)]))
    assert groups == {"doc-a": "doc-a", "doc-b": "doc-a", "doc-c": "doc-c"}


def test_license_with_another_copyright_line_groups():
    a, b = MIT.format(holder="2019 Jane Doe"), MIT.format(holder="2021-2024 The Example Project Developers")
    assert jaccard(a, b) >= neardup.DEFAULT_THRESHOLD
    assert jaccard(prose(3, 170), prose(4, 170)) < 0.1


def test_groups_do_not_depend_on_input_order():
    base = [prose(seed) for seed in range(20)]
    texts = base + [one_word_changed(t) for t in base[::3]] + base[:4]
    keys = [f"doc-{i:02d}" for i in range(len(texts))]
    sigs = neardup.signatures(texts)
    expected, stats = neardup.group(keys, sigs)
    order = list(range(len(keys)))
    for seed in range(3):
        random.Random(seed).shuffle(order)
        groups, shuffled_stats = neardup.group([keys[i] for i in order], sigs[order])
        assert groups == expected and shuffled_stats == stats


def test_chunked_signatures_equal_whole_and_match_datasketch():
    texts = [prose(seed, words=seed % 40) for seed in range(60)] + ["", "!!!", "one two"]
    whole = neardup.signatures(texts)
    assert whole.shape == (len(texts), neardup.NUM_PERM) and whole.dtype == np.uint64
    chunked = np.concatenate([neardup.signatures(texts[i : i + 7]) for i in range(0, len(texts), 7)])
    assert np.array_equal(whole, chunked)
    assert np.array_equal(whole, np.concatenate([neardup.signatures([t]) for t in texts]))
    # Each signature is datasketch's own MinHash of the same shingle hashes.
    hashes, counts = neardup._shingle_hashes(texts)
    offsets = np.cumsum(counts) - counts
    for i in range(len(texts)):
        sketch = MinHash(num_perm=neardup.NUM_PERM, seed=1, hashfunc=int)
        sketch.update_batch(hashes[offsets[i] : offsets[i] + counts[i]].tolist())
        expected = (
            sketch.hashvalues.astype(np.uint64) if counts[i] else np.full(neardup.NUM_PERM, neardup.EMPTY)
        )
        assert np.array_equal(whole[i], expected)


def test_candidates_are_the_pairs_minhashlsh_returns():
    base = [prose(seed, 30) for seed in range(30)]
    texts = base + [one_word_changed(t) for t in base] + [" ".join(t.split()[:20]) for t in base]
    unique, _ = neardup._unique_signatures(neardup.signatures(texts))
    lsh = MinHashLSH(threshold=neardup.DEFAULT_THRESHOLD, num_perm=neardup.NUM_PERM)
    sketches = [MinHash(hashvalues=row.astype(np.uint32), scheme="affine32") for row in unique]
    for u, sketch in enumerate(sketches):
        lsh.insert(u, sketch)
    expected = sorted((u, v) for u, s in enumerate(sketches) for v in lsh.query(s) if v > u)
    assert expected and neardup._candidate_pairs(unique, neardup.DEFAULT_THRESHOLD).tolist() == [
        list(p) for p in expected
    ]


def test_cross_split_pairs_finds_planted_pair_only_across_splits():
    text = prose(5)
    planted = one_word_changed(text)
    across = neardup.cross_split_pairs([("b", "train", text), ("a", "test", planted), ("c", "val", prose(6))])
    assert [(a, b) for a, b, _ in across] == [("a", "b")]
    assert across[0][2] == pytest.approx(jaccard(text, planted)) and across[0][2] >= neardup.DEFAULT_THRESHOLD
    assert (
        neardup.cross_split_pairs([("b", "train", text), ("a", "train", planted), ("c", "val", prose(6))])
        == []
    )
    exact = neardup.cross_split_pairs([("a", "train", text), ("b", "val", text.upper())])
    assert exact == [("a", "b", 1.0)]


def test_short_and_empty_texts():
    texts = ["hello big world", "Hello,  big world!", "hello big", "", "   ", "big world hello"]
    groups, stats = neardup.group(["a", "b", "c", "d", "e", "f"], neardup.signatures(texts))
    assert groups == {"a": "a", "b": "a", "c": "c", "d": "d", "e": "e", "f": "f"}
    assert stats["identical_texts"] == 1 and stats["pairs"] == 0


def test_stats_count_texts_documents_and_merges():
    text = prose(7)
    texts = [text, one_word_changed(text), prose(8), prose(9), text]
    groups, stats = neardup.group(["b", "a", "c", "c", "d"], neardup.signatures(texts))
    assert groups == {"a": "a", "b": "a", "c": "c", "d": "a"}
    assert stats == {
        "threshold": neardup.DEFAULT_THRESHOLD,
        "num_perm": neardup.NUM_PERM,
        "shingle_words": neardup.SHINGLE_WORDS,
        "texts": 5,
        "documents": 4,
        "groups": 2,
        "merged_documents": 2,
        "largest_group": 3,
        "identical_texts": 1,
        "pairs": 1,
    }


def test_group_of_nothing():
    groups, stats = neardup.group([], neardup.signatures([]))
    assert groups == {} and stats["groups"] == 0 and stats["documents"] == 0
