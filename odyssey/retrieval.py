"""Passage search, the parts training, evaluation and serving share: what the model embeds, the
contrastive objective that trains it, and the fusion of the dense ranking with BM25's.

    ids = embed_ids(tok, "terms of the MIT license", max_tokens=64)   # <bos><find> text <sep>
    vectors = embed_texts(model, tok, texts)                          # (N, D) unit vectors
    loss = info_nce(queries, passages, temperature=0.05)              # in-batch negatives
    fused = fuse(bm25_scores, dense_scores, depth=50)                 # reciprocal rank fusion

Queries and passages are embedded alike: the `find` prompt around the text, and the model's final
state at its end-of-input token (`Transformer.embedding`). Training (train/contrastive.py) feeds the
same ids to the same function, so the vectors served are the vectors trained.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from odyssey.model import Transformer
from odyssey.tokenizer import Tokenizer

TASK = "find"
ROWS_PER_FORWARD = 32  # rows per forward pass; bounds the memory of one call
RRF_K = 60  # the constant of reciprocal rank fusion (Cormack et al. 2009): robust across corpora


def embed_ids(tok: Tokenizer, text: str | list[int], max_tokens: int) -> list[int]:
    """The ids the model embeds for `text` (or the token ids of a text): the find prompt (<bos><find>
    text <sep>), the text cut so that the whole is at most max_tokens; the end-of-input token stays last."""
    head, tail = tok.prefix(TASK), [tok.sep_id]
    room = max_tokens - len(head) - len(tail)
    if room < 1:
        raise ValueError(f"max_tokens={max_tokens} leaves no room for text")
    body = tok.encode(text) if isinstance(text, str) else list(text)
    return [*head, *body[:room], *tail]


def embed_batch(tok: Tokenizer, texts: list[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> left-padded ids (N, T) int32 and their real-token mask (N, T): the rows `embedding`
    takes, T the longest row. What training stores for its pairs."""
    rows = [embed_ids(tok, t, max_tokens) for t in texts]
    T = max((len(r) for r in rows), default=1)
    ids = np.full((len(rows), T), tok.pad_id, dtype=np.int32)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = r
    valid = np.zeros_like(ids, dtype=bool)
    for i, r in enumerate(rows):
        valid[i, T - len(r) :] = True
    return ids, valid


@torch.no_grad()
def embed_texts(
    model: Transformer, tok: Tokenizer, texts: list[str], max_tokens: int | None = None
) -> np.ndarray:
    """Unit vectors (N, D) float32 of texts, each cut to max_tokens (default: the model's context)."""
    limit = min(max_tokens or model.cfg.max_seq_len, model.cfg.max_seq_len)
    rows = [embed_ids(tok, t, limit) for t in texts]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths pad little
    out = np.zeros((len(rows), model.cfg.d_model), dtype=np.float32)
    for start in range(0, len(order), ROWS_PER_FORWARD):
        part = order[start : start + ROWS_PER_FORWARD]
        out[part] = model.embed([rows[i] for i in part], tok.pad_id).float().cpu().numpy()
    return out


def info_nce(queries: torch.Tensor, passages: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with in-batch negatives: queries (N, D) and passages (N, D) unit vectors, row i of each a
    pair; every other passage is a negative of query i. Mean cross-entropy of picking the right one."""
    logits = queries.float() @ passages.float().T / temperature  # (N, N)
    return F.cross_entropy(logits, torch.arange(len(queries), device=logits.device))


def fuse(bm25: np.ndarray, dense: np.ndarray | None, depth: int, dense_weight: float = 1.0) -> np.ndarray:
    """Reciprocal rank fusion of two rankings over the same passages (P,): each passage scores, over
    the rankings, weight / (RRF_K + rank) for its rank in each ranking's first `depth` (BM25's weight 1,
    the model's `dense_weight`: chosen on validation data, see `odyssey eval`'s fusion curve). A passage
    without one query word is no BM25 match (score 0); without dense scores, BM25's ranking alone."""
    fused = np.zeros(len(bm25), dtype=np.float64)
    ranked = np.argsort(-bm25, kind="stable")[:depth]
    ranked = ranked[bm25[ranked] > 0]
    fused[ranked] += 1.0 / (RRF_K + 1 + np.arange(len(ranked)))
    if dense is not None and dense_weight > 0:
        top = np.argsort(-dense, kind="stable")[:depth]
        fused[top] += dense_weight / (RRF_K + 1 + np.arange(len(top)))
    return fused
