"""The passage index behind /v1/find: documents cut into passages, searched two ways and fused.

Each distinct passage text is indexed once, with every place it occurs (split_documents): a paragraph
that many documents quote is one search result, not many equal ones.

- BM25 (bm25s) catches exact words: clause numbers, license names, package names.
- Dense: the model's embedding of each passage (odyssey/retrieval.py: trained for it, contrastively), searched exactly (one matrix product; a few hundred
  thousand passages fit before an approximate index would pay off). It catches paraphrases.
- Reciprocal rank fusion (odyssey/retrieval.py, what evaluation fuses with too) merges the two
  rankings without calibrating their scores against each other: sum over rankings of 1 / (60 + rank).

Dense vectors belong to one model: the index records which (`model_id`) and answers with BM25 alone
when a query comes embedded by another model (after a redeploy, until the index is re-embedded).
No Ray here: serve/finder.py wraps it in a deployment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from odyssey import answers, retrieval
from odyssey.answers import AnswerSettings
from odyssey.bm25 import BM25
from odyssey.data import debian, legal
from odyssey.data.schema import Document
from odyssey.errors import OdysseyError


@dataclass(frozen=True)
class Place:
    doc_id: str
    title: str
    start: int  # character offsets into the document's text
    end: int


@dataclass(frozen=True)
class Passage:
    """A distinct passage text, at the first place it occurs (text == that document's text[start:end])
    and, in also_in, every other place with the same text but for whitespace."""

    doc_id: str
    title: str
    start: int
    end: int
    text: str
    also_in: tuple[Place, ...] = ()


def load_documents(source: str | Path | None = None, max_documents: int | None = None) -> list[Document]:
    """Documents to index: a Parquet file or directory of them (columns doc_id, text, optional title;
    a corpus's documents/ directory fits), or by default this machine's legal documents (legal.documents:
    Debian's license texts and copyright files where the machine has them, and the license files of
    the installed Python distributions everywhere)."""
    if source is None:
        listed = legal.documents()[:max_documents]
        docs = [Document(i, t, p.read_text(encoding="utf-8", errors="replace")) for i, t, p in listed]
    else:
        path = Path(source)
        if not path.exists():
            raise OdysseyError(f"documents: {path} does not exist; give a Parquet file or directory")
        table = pq.read_table(path)
        missing = {"doc_id", "text"} - set(table.column_names)
        if missing:
            raise OdysseyError(f"documents: {path} lacks column(s) {sorted(missing)}; needs doc_id and text")
        rows = table.slice(0, max_documents if max_documents is not None else table.num_rows).to_pylist()
        docs = [Document(str(r["doc_id"]), str(r.get("title") or r["doc_id"]), str(r["text"])) for r in rows]
    docs = [d for d in docs if d.text.strip()]
    if not docs and source is None:
        raise OdysseyError(
            "documents: this machine has no legal documents to index (no Debian license or copyright "
            f"files under ${debian.ROOT_ENV}={debian.debian_root()}, and no license files in the installed "
            "Python distributions); set the app's `documents` (serve/config.yaml) to a Parquet file or "
            "directory with columns doc_id and text, e.g. a built corpus's documents/ directory"
        )
    if not docs:
        raise OdysseyError(
            f"documents: nothing to index in {source}; it needs rows with non-empty text (columns doc_id, text)"
        )
    return docs


def split_documents(documents: list[Document]) -> list[Passage]:
    """Paragraph-sized passages (the corpus's own splitter), each distinct text once. Packages'
    copyright files quote the same license paragraphs word for word; indexed once per copy, a search
    would answer the same paragraph several times (same text, same score) and the finder would embed
    it as often. So a passage keeps the first place it occurs and lists the others."""
    texts: dict[str, str] = {}  # the text as it reads at its first place
    places: dict[str, list[Place]] = {}
    for place, text in _places(documents):
        key = " ".join(text.split())  # the same text, however it was wrapped or indented
        texts.setdefault(key, text)
        places.setdefault(key, []).append(place)
    return [
        Passage(first.doc_id, first.title, first.start, first.end, texts[key], tuple(others))
        for key, (first, *others) in places.items()
    ]


def _places(documents: list[Document]):
    """(place, text) of every passage of every document, in order."""
    for doc in documents:
        cursor = 0
        for text in legal.split_passages(doc.text):
            start = doc.text.find(text, cursor)  # every passage is a substring, in order
            yield Place(doc.doc_id, doc.title, start, start + len(text)), text
            cursor = start + 1


@dataclass
class Hit:
    passage: Passage
    score: float  # fused: higher is better
    bm25: float
    dense: float | None  # cosine similarity; None when the dense side did not take part


class PassageIndex:
    def __init__(self, passages: list[Passage]):
        if not passages:
            raise OdysseyError("the passage index needs at least one passage")
        self.passages = passages
        self.bm25 = BM25([p.text for p in passages])
        self.vectors: torch.Tensor | None = None  # (P, D) unit vectors
        self.model_id: str | None = None

    def __len__(self) -> int:
        return len(self.passages)

    def set_vectors(self, vectors: torch.Tensor, model_id: str) -> None:
        if vectors.shape[0] != len(self.passages):
            raise ValueError(f"{vectors.shape[0]} vectors for {len(self.passages)} passages")
        self.vectors, self.model_id = vectors.float(), model_id

    def bm25_scores(self, query: str) -> np.ndarray:
        return self.bm25.scores(query)  # (P,)

    def search(
        self,
        query: str,
        k: int,
        query_vector: torch.Tensor | None = None,
        model_id: str | None = None,
        settings: AnswerSettings | None = None,
    ) -> list[Hit]:
        """The k best passages, fused as odyssey/answers.py's settings say (find_depth, find_dense_weight).
        query_vector (D,) joins in when it comes from the index's model."""
        k = min(k, len(self.passages))
        settings = settings or AnswerSettings()
        depth = answers.find_depth(settings, k, len(self.passages))
        bm25 = self.bm25_scores(query)
        dense = None
        if query_vector is not None and self.vectors is not None and model_id == self.model_id:
            dense = (self.vectors @ query_vector.float()).numpy()  # (P,) cosine: both sides unit length
        fused = retrieval.fuse(bm25, dense, depth, settings.find_dense_weight)
        best = np.argsort(-fused, kind="stable")[:k]
        return [
            Hit(
                self.passages[i],
                float(fused[i]),
                float(bm25[i]),
                None if dense is None else float(dense[i]),
            )
            for i in best
            if fused[i] > 0
        ]
