"""BM25 (Robertson et al.; the bm25s implementation): the lexical ranking that passage search fuses
with the model's embeddings (serve/passages.py) and that evaluation reports beside the model's own
ranking, as its baseline (odyssey/evaluation)."""

from __future__ import annotations

import logging

import bm25s
import numpy as np

logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index build at DEBUG


class BM25:
    def __init__(self, texts: list[str]):
        if not texts:
            raise ValueError("BM25 needs at least one text to index")
        self.size = len(texts)
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize(texts, show_progress=False), show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """(P,) float32: the query's score against every indexed text; 0 where no query word occurs."""
        words = bm25s.tokenize(query, return_ids=False, show_progress=False)[0]
        if not words:  # only stop words or punctuation: nothing to match
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self.index.get_scores(words), dtype=np.float32)
