"""`Finder`: passage search over a pile of documents (serve/passages.py), with the model's embeddings
(odyssey/retrieval.py: the vectors the contrastive objective trains).

At start it cuts the documents into passages (each distinct text once), builds BM25, and embeds every
passage through the `LanguageModel` handle (batched with everyone else's requests). A query is
embedded the same way; the answer says which model embedded it. When that is not the model the index
was embedded with (a redeploy swapped models), the query is answered by BM25 alone and the index is
re-embedded in the background.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict

import numpy as np
import torch
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from odyssey.answers import AnswerSettings
from serve.passages import PassageIndex, load_documents, split_documents
from serve.replica_network import bind_internal_server

log = logging.getLogger("ray.serve")

EMBED_CALL_ROWS = 256  # passages per embed call while indexing
EMBED_CALLS_IN_FLIGHT = 2  # indexing leaves room in the model's queue for live traffic
ALSO_IN_LISTED = 10  # other places a hit lists: a license paragraph may recur in hundreds of files


@serve.deployment(name="Finder")
class Finder:
    async def __init__(
        self,
        lm: DeploymentHandle,
        settings: AnswerSettings,
        documents: str | None = None,
        max_documents: int | None = 100,
    ):
        bind_internal_server()
        self.lm, self.settings = lm, settings
        docs = await asyncio.to_thread(load_documents, documents, max_documents)
        passages = split_documents(docs)
        self.index = await asyncio.to_thread(PassageIndex, passages)
        self.reembedding: asyncio.Task | None = None
        await self._embed_index()
        log.info(
            "passage index: %d documents, %d distinct passages (%d places), %s",
            len(docs),
            len(passages),
            sum(1 + len(p.also_in) for p in passages),
            self.index.model_id,
        )

    async def _embed_index(self) -> None:
        texts = [p.text for p in self.index.passages]
        gate = asyncio.Semaphore(EMBED_CALLS_IN_FLIGHT)

        async def embed(part: list[str]) -> dict:
            async with gate:
                for attempt in range(60):  # the model's queue is bounded: indexing waits its turn
                    try:
                        return await self.lm.embed.remote(part)
                    except BackPressureError:
                        await asyncio.sleep(min(0.05 * 2**attempt, 2.0))
                raise RuntimeError("the model stayed at capacity while indexing passages")

        parts = await asyncio.gather(
            *(embed(texts[i : i + EMBED_CALL_ROWS]) for i in range(0, len(texts), EMBED_CALL_ROWS))
        )
        if len({p["model_id"] for p in parts}) > 1:  # the model changed midway: embed again
            return await self._embed_index()
        self.index.set_vectors(
            torch.from_numpy(np.concatenate([p["vectors"] for p in parts])), parts[0]["model_id"]
        )

    def _reembed_in_background(self) -> None:
        if self.reembedding is None or self.reembedding.done():
            self.reembedding = asyncio.get_running_loop().create_task(self._embed_index())

    async def info(self) -> dict:
        return {"passages": len(self.index), "model_id": self.index.model_id}

    async def __call__(self, query: str, k: int = 5, key_id: str = "") -> dict:
        embedded = await self.lm.embed.remote([query], key_id)
        model_id = embedded["model_id"]
        vector = torch.from_numpy(embedded["vectors"][0])
        if model_id != self.index.model_id:
            self._reembed_in_background()
        hits = await asyncio.to_thread(self.index.search, query, k, vector, model_id, self.settings)
        return {
            "passages": [
                {
                    "doc_id": h.passage.doc_id,
                    "title": h.passage.title,
                    "start": h.passage.start,
                    "end": h.passage.end,
                    "text": h.passage.text,
                    "score": h.score,
                    "bm25": h.bm25,
                    "dense": h.dense,
                    "also_in": [asdict(place) for place in h.passage.also_in[:ALSO_IN_LISTED]],
                }
                for h in hits
            ],
            "mode": "hybrid" if model_id == self.index.model_id else "bm25",
            "model": model_id,
        }
