"""`LanguageModel`: the one deployment that holds the model. Every task reaches it through a handle, so
requests of all tasks share its batches.

Three batched entry points, each behind `@serve.batch` (size and wait set from `user_config`):
    generate / generate_stream   text out, one KV cache per batch (serve/generation.py)
    embed                        unit vectors, for passage search
    score                        log-probabilities of given continuations, for label scoring

The model path lives in `user_config` too: a new `user_config` (the `deployments:` options of the
Serve config) loads the new model beside the old one on the running replica and swaps them in one
assignment; a batch already running finishes on the model it began with. (A new `model_path` under the
app's `args` is a new version of the app instead: Serve replaces the replicas, draining each.) The model runs on the replica's event loop itself, one step at a time: handing each step to a
worker thread cost more than a whole step of a small model (threads take turns on the GIL), and
between steps the loop takes in new requests, which queue for the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import uuid
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from odyssey import artifact, failpoints, retrieval
from odyssey.decoding import BatchDecoder, Chunk, GenerationParams
from odyssey.model import Transformer
from odyssey.tasks import TASKS
from odyssey.tokenizer import Tokenizer
from serve.errors import InputTooLong, InvalidRequest
from serve.replica_network import bind_internal_server

log = logging.getLogger("ray.serve")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A replica runs Ray's I/O threads beside the thread of this code; a request crosses between them twice,
# and each time waits for the GIL up to the switch interval (5 ms by default). Shorter: ~0.5 ms.
SWITCH_INTERVAL_S = 0.0005
ROWS_PER_FORWARD = 64  # embed/score: rows per forward pass, so one huge request cannot take all memory


class LanguageModelSettings(BaseModel):
    """`user_config` of LanguageModel: applied to running replicas without restarting them."""

    model_config = ConfigDict(extra="forbid")

    model_path: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    backend: Literal["torch", "onnxruntime"] = "torch"  # onnxruntime: float32 on CPU, needs model.onnx
    max_batch_size: int = Field(16, ge=1, le=512)
    batch_wait_timeout_s: float = Field(0.002, ge=0.0, le=1.0)


@dataclass
class Loaded:
    """A model with everything that must change together with it."""

    model: Transformer
    tokenizer: Tokenizer
    name: str
    id: str  # name@sha256 prefix of the weights: passage vectors are tied to it

    def prompt(self, task: str, text: str) -> list[int]:
        if task not in TASKS:
            raise InvalidRequest(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
        return self.tokenizer.prompt(task, text)

    def answers(self, task: str, text: str, options: tuple[str, ...]) -> list[tuple[list[int], list[int]]]:
        """(prompt, option + end-of-text) token pairs: what `score` rates."""
        prompt = self.prompt(task, text)
        return [(prompt, [*self.tokenizer.encode(o), self.tokenizer.eos_id]) for o in options]


def load(settings: LanguageModelSettings, device: str, name: str | None = None, threads: int = 1) -> Loaded:
    path = Path(settings.model_path)
    model, tokenizer, config = artifact.load(
        path, settings.backend, device=device, dtype=DTYPES[settings.dtype], threads=threads
    )
    if tokenizer is None:
        raise ValueError(f"{path} has no {artifact.TOKENIZER}: export the model with `odyssey export`")
    name = name or config.get("name") or path.resolve().name
    return Loaded(model, tokenizer, name, f"{name}@{artifact.weights_digest(path)}")


@dataclass
class GenerateCall:
    task: str
    text: str
    params: GenerationParams
    call_id: str
    prompt: list[int]  # encoded once, when the call is checked...
    model_id: str  # ...by this model's tokenizer; a batch on another model (after a swap) encodes again


@dataclass
class ScoreCall:
    task: str
    text: str
    options: tuple[str, ...]
    pairs: list[tuple[list[int], list[int]]]
    model_id: str


@serve.deployment(name="LanguageModel")
class LanguageModel:
    def __init__(self, device: str = "cpu", model_name: str | None = None, threads: int = 1):
        bind_internal_server()
        torch.set_num_threads(threads)  # the CPUs this replica reserved, no more: replicas share machines
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.device = device
        self.threads = threads
        self.model_name = model_name
        self.loaded: Loaded | None = None
        self.settings: LanguageModelSettings | None = None
        self.batch_sizes = {kind: Counter() for kind in ("generate", "stream", "embed", "score")}
        self.cancelled: set[str] = set()  # generate calls whose caller went away

    async def reconfigure(self, config: dict) -> None:
        settings = LanguageModelSettings(**config)
        old = self.settings
        which = ("model_path", "dtype", "backend")
        if old is None or any(getattr(settings, k) != getattr(old, k) for k in which):
            loaded = await asyncio.to_thread(load, settings, self.device, self.model_name, self.threads)
            log.info("serving %s from %s", loaded.id, settings.model_path)
            self.loaded = loaded  # one assignment: requests see the old model or the new one, never a mix
        for method in (self._generate_batch, self._stream_batch, self._embed_batch, self._score_batch):
            method.set_max_batch_size(settings.max_batch_size)
            method.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.settings = settings

    def check_health(self) -> None:
        if self.loaded is None:
            raise RuntimeError("no model loaded")

    async def info(self) -> dict:
        m = self.loaded
        return {
            "name": m.name,
            "id": m.id,
            "max_seq_len": m.model.cfg.max_seq_len,
            "params": m.model.num_params(),
            "device": self.device,
            "dtype": self.settings.dtype,
            "backend": self.settings.backend,
            "model_path": self.settings.model_path,
            "replica_pid": os.getpid(),
        }

    async def stats(self) -> dict:
        """How many batches of each size each entry point ran: batching, observed."""
        return {kind: dict(sizes) for kind, sizes in self.batch_sizes.items()}

    # --- generation --------------------------------------------------------------------------------

    def _call(self, task: str, text: str, params: GenerationParams) -> GenerateCall:
        """Fail early (413) when the prompt leaves no room; cap max_tokens to the room there is."""
        m = self.loaded
        prompt, limit = m.prompt(task, text), m.model.cfg.max_seq_len
        if len(prompt) >= limit:
            raise InputTooLong(
                f"the prompt is {len(prompt)} tokens; this model reads at most {limit - 1} before answering"
            )
        params = replace(params, max_tokens=min(params.max_tokens, limit - len(prompt)))
        return GenerateCall(task, text, params, uuid.uuid4().hex, prompt, m.id)

    async def generate_stream(self, task: str, text: str, params: GenerationParams) -> AsyncGenerator[Chunk]:
        call = self._call(task, text, params)
        finished = False
        try:
            async for chunk in self._stream_batch(call):
                finished = chunk.finish_reason is not None
                yield chunk
        finally:
            if not finished:  # the caller stopped reading (client gone, timeout): stop decoding its row
                self.cancelled.add(call.call_id)

    async def generate(self, task: str, text: str, params: GenerationParams) -> dict:
        return await self._generate_batch(self._call(task, text, params))

    # Two batch queues over one decode loop: whole answers (every task) and streams (completions with
    # "stream": true). A generator batch costs a future per row per step, a whole answer does not, and
    # for short answers that bookkeeping would weigh as much as the model.

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _generate_batch(self, calls: list[GenerateCall]) -> list[dict]:
        texts: list[list[str]] = [[] for _ in calls]
        last: list[Chunk | None] = [None] * len(calls)
        model_id = None
        async for chunks, batch_model_id in self._decode(calls, "generate", turns=False):
            model_id = batch_model_id
            for i, chunk in enumerate(chunks):
                if chunk is not None:
                    texts[i].append(chunk.text)
                    last[i] = chunk
        return [
            {
                "text": "".join(t),
                "finish_reason": c.finish_reason,
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens,
                "model": model_id,
            }
            for t, c in zip(texts, last)
        ]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _stream_batch(self, calls: list[GenerateCall]) -> AsyncGenerator[list]:
        ended = [False] * len(calls)
        async for chunks, _ in self._decode(calls, "stream", turns=True):
            out = []
            for i, chunk in enumerate(chunks):
                out.append(StopIteration if ended[i] or chunk is None else chunk)
                ended[i] = ended[i] or chunk is None or chunk.finish_reason is not None
            yield out

    async def _decode(
        self, calls: list[GenerateCall], kind: str, turns: bool
    ) -> AsyncGenerator[tuple[list, str]]:
        """One batch, step by step: each step's chunks (None for rows that ended before it).

        With `turns`, the event loop gets a turn after every step, to send the step's chunks to streaming
        callers. Whole answers go without: a turn lets Serve's batch queue form the next batch from the
        first one or two arrivals while this one runs, where without turns every arrival meanwhile joins
        it (measured: 2.9x vs 4.9x the unbatched req/s at 32 clients)."""
        m = self.loaded  # this batch's model, whatever a reconfigure does meanwhile
        self.batch_sizes[kind][len(calls)] += 1
        room = m.model.cfg.max_seq_len
        prompts = [c.prompt if c.model_id == m.id else m.prompt(c.task, c.text) for c in calls]
        # After a swap between a call's check and its batch, a new tokenizer may need more room.
        params = [
            replace(c.params, max_tokens=max(1, min(c.params.max_tokens, room - len(p))))
            for c, p in zip(calls, prompts)
        ]
        decoder = BatchDecoder(m.model, m.tokenizer, prompts, params)
        try:
            while not decoder.done:
                for i, c in enumerate(calls):
                    if c.call_id in self.cancelled and decoder.finish[i] is None:
                        decoder.finish[i] = "cancelled"
                if not decoder.done:
                    failpoints.hit("serve.decode_step", text=calls[0].text)  # drills: a slow step
                    yield decoder.step(), m.id
                    if turns:
                        await asyncio.sleep(0)
        finally:
            self.cancelled.difference_update(c.call_id for c in calls)

    # --- embeddings and scores ---------------------------------------------------------------------

    async def embed(self, texts: list[str]) -> dict:
        """Unit vectors (N, D) float32 of texts (odyssey/retrieval.py: each cut to the model's context),
        and the model id."""
        return await self._embed_batch(list(texts))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _embed_batch(self, requests: list[list[str]]) -> list[dict]:
        m = self.loaded
        self.batch_sizes["embed"][len(requests)] += 1
        limit = m.model.cfg.max_seq_len
        rows = [retrieval.embed_ids(m.tokenizer, t, limit) for texts in requests for t in texts]
        vectors = _in_chunks(lambda part: m.model.embed(part, m.tokenizer.pad_id), rows, len)
        out, start = [], 0
        for texts in requests:
            out.append({"vectors": vectors[start : start + len(texts)], "model_id": m.id})
            start += len(texts)
        return out

    async def score(self, task: str, text: str, options: list[str]) -> dict:
        """Log-probability of each option (followed by end-of-text) as the answer to `text` in `task`."""
        failpoints.hit("serve.score", task=task, text=text)  # drills: an error or a stall mid-request
        m, options = self.loaded, tuple(options)
        pairs = m.answers(task, text, options)
        n = max(len(p) + len(c) for p, c in pairs)
        if n > m.model.cfg.max_seq_len:
            raise InputTooLong(
                f"the input is {n} tokens with its longest label; this model reads {m.model.cfg.max_seq_len}"
            )
        return await self._score_batch(ScoreCall(task, text, options, pairs, m.id))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _score_batch(self, calls: list[ScoreCall]) -> list[dict]:
        m = self.loaded
        self.batch_sizes["score"][len(calls)] += 1
        pairs = [
            pair
            for c in calls
            for pair in (c.pairs if c.model_id == m.id else m.answers(c.task, c.text, c.options))
        ]

        def run(part):
            return m.model.score([p for p, _ in part], [c for _, c in part], m.tokenizer.pad_id)

        logprobs = _in_chunks(run, pairs, lambda pair: len(pair[0]) + len(pair[1]))
        out, start = [], 0
        for c in calls:
            out.append({"logprobs": logprobs[start : start + len(c.options)].tolist(), "model_id": m.id})
            start += len(c.options)
        return out


def _in_chunks(fn, rows: list, length) -> np.ndarray:
    """fn over rows, ROWS_PER_FORWARD at a time, longest first so that each chunk pads little."""
    order = sorted(range(len(rows)), key=lambda i: -length(rows[i]))
    results: list = [None] * len(rows)
    for start in range(0, len(order), ROWS_PER_FORWARD):
        idx = order[start : start + ROWS_PER_FORWARD]
        values = fn([rows[i] for i in idx]).float().cpu().numpy()
        for j, i in enumerate(idx):
            results[i] = values[j]
    return np.stack(results)
