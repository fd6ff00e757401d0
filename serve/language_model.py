"""`LanguageModel`: the one deployment that holds the model. Every task reaches it through a handle, and
every request becomes work for one inference engine (odyssey/engine.py) running on the replica:

    generate / generate_stream   text out; sequences join the running batch between decode steps and
                                 stream their tokens as they are made
    embed                        unit vectors, for passage search
    score                        log-probabilities of given continuations, for label scoring

The engine loop runs on the replica's event loop (AsyncEngine): between steps the loop takes in new
requests, answers health checks and sends each step's tokens. A caller that goes away (client
disconnected, timeout) cancels its sequence; its cache row is free before the next step. What does not
fit the engine's queue is refused at once (503 + Retry-After at the gateway), never queued unbounded.

The model path lives in `user_config` too: a new `user_config` (the `deployments:` options of the
Serve config) loads the new model beside the old one on the running replica and swaps engines in one
assignment; sequences already running finish on the old engine, which then stops. (A new `model_path`
under the app's `args` is a new version of the app instead: Serve replaces the replicas, draining each.)

Metrics for operators (serve/metrics.py) are recorded here, by task and API key id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from odyssey import artifact, failpoints, retrieval
from odyssey.engine import AsyncEngine, Chunk, Engine, EngineConfig, Event, GenerationParams, QueueFull
from odyssey.model import Transformer
from odyssey.tasks import TASKS
from odyssey.tokenizer import Tokenizer
from serve.errors import InputTooLong, InvalidRequest, Overloaded
from serve.metrics import EngineMetrics
from serve.replica_network import bind_internal_server

log = logging.getLogger("ray.serve")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A replica runs Ray's I/O threads beside the thread of this code; a request crosses between them twice,
# and each time waits for the GIL up to the switch interval (5 ms by default). Shorter: ~0.5 ms.
SWITCH_INTERVAL_S = 0.0005


class EngineSettings(BaseModel):
    """The engine's limits (odyssey/engine.py EngineConfig): `engine:` in serve/config.yaml."""

    model_config = ConfigDict(extra="forbid")

    max_num_seqs: int = Field(32, ge=1, le=1024)  # sequences decoding at once (KV cache rows)
    max_num_batched_tokens: int = Field(2048, ge=2)  # tokens per step: decodes + prefill chunks + scoring
    max_waiting: int = Field(1024, ge=1)  # queued requests per replica beyond which it answers 503
    scheduler: Literal["continuous", "static"] = "continuous"  # static: one batch at a time (for benches)
    prefix_sharing: bool = True  # one prefill for identical prompts and for a scoring request's options

    def config(self) -> EngineConfig:
        return EngineConfig(**self.model_dump())


class LanguageModelSettings(BaseModel):
    """`user_config` of LanguageModel: applied to running replicas without restarting them."""

    model_config = ConfigDict(extra="forbid")

    model_path: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    backend: Literal["torch", "onnxruntime"] = "torch"  # onnxruntime: float32 on CPU, needs model.onnx
    engine: EngineSettings = Field(default_factory=EngineSettings)


@dataclass
class Loaded:
    """A model with everything that must change together with it: its tokenizer, its engine."""

    model: Transformer
    tokenizer: Tokenizer
    name: str
    id: str  # name@sha256 prefix of the weights: passage vectors are tied to it
    engine: AsyncEngine | None = None

    def prompt(self, task: str, text: str) -> list[int]:
        if task not in TASKS:
            raise InvalidRequest(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
        return self.tokenizer.prompt(task, text)

    def answers(self, task: str, text: str, options: tuple[str, ...]) -> tuple[list[int], list[list[int]]]:
        """The prompt and each option + end-of-text: what `score` rates."""
        return self.prompt(task, text), [[*self.tokenizer.encode(o), self.tokenizer.eos_id] for o in options]


def load(settings: LanguageModelSettings, device: str, name: str | None = None, threads: int = 1) -> Loaded:
    path = Path(settings.model_path)
    model, tokenizer, config = artifact.load(
        path, settings.backend, device=device, dtype=DTYPES[settings.dtype], threads=threads
    )
    if tokenizer is None:
        raise ValueError(f"{path} has no {artifact.TOKENIZER}: export the model with `odyssey export`")
    name = name or config.get("name") or path.resolve().name
    return Loaded(model, tokenizer, name, f"{name}@{artifact.weights_digest(path)}")


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
        self.metrics = EngineMetrics()
        self.tags: dict[int, tuple[str, str]] = {}  # request id -> (task, API key id), for the metrics
        self.texts: dict[int, str] = {}  # request id -> its text, for the fault drills' step failpoint

    async def reconfigure(self, config: dict) -> None:
        settings = LanguageModelSettings(**config)
        old, loaded = self.settings, self.loaded
        which = ("model_path", "dtype", "backend")
        if old is None or any(getattr(settings, k) != getattr(old, k) for k in which):
            loaded = await asyncio.to_thread(load, settings, self.device, self.model_name, self.threads)
            log.info("serving %s from %s", loaded.id, settings.model_path)
        elif settings.engine == old.engine:
            self.settings = settings
            return
        engine = Engine(loaded.model, loaded.tokenizer, settings.engine.config())
        log.info("engine: %s, KV cache %.1f MiB", settings.engine, engine.pool.bytes / 2**20)
        running = AsyncEngine(
            engine, self._on_event, lambda: self._before_step(engine), lambda: self._after_step(engine)
        )
        fresh = Loaded(loaded.model, loaded.tokenizer, loaded.name, loaded.id, running)
        previous = self.loaded
        self.loaded, self.settings = fresh, settings  # one assignment: a request sees one model, never a mix
        if previous is not None:
            previous.engine.retire()  # it finishes what it runs, then stops

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
        """The engine now (running, waiting, KV cache use) and the sizes of the batches it ran, by kind."""
        engine = self.loaded.engine.engine
        return {**engine.stats(), **{kind: dict(sizes) for kind, sizes in engine.batches.items()}}

    # --- generation --------------------------------------------------------------------------------

    def _prompt(self, m: Loaded, task: str, text: str) -> list[int]:
        """Fail early (413) when the prompt leaves no room to answer; the engine caps max_tokens to it."""
        prompt, limit = m.prompt(task, text), m.model.cfg.max_seq_len
        if len(prompt) >= limit:
            raise InputTooLong(
                f"the prompt is {len(prompt)} tokens; this model reads at most {limit - 1} before answering"
            )
        return prompt

    def _submit(self, m: Loaded, task: str, key_id: str, add, *args):
        """A request into the engine, tagged for the metrics; a full queue is a 503, counted as refused."""
        try:
            request = add(*args)
        except QueueFull as e:
            self.metrics.refused(task)
            raise Overloaded(f"the model's queue is full ({e}); retry after the given delay") from None
        self.tags[request.id] = (task, key_id)
        return request

    async def generate_stream(
        self, task: str, text: str, params: GenerationParams, key_id: str = ""
    ) -> AsyncGenerator[Chunk]:
        m = self.loaded
        seq = self._submit(m, task, key_id, m.engine.engine.add, self._prompt(m, task, text), params)
        self.texts[seq.id] = text
        try:
            async for event in m.engine.stream(seq):
                yield event.chunk
        finally:  # the caller stopped reading (client gone, timeout): the stream's own cleanup cancels it
            self.texts.pop(seq.id, None)

    async def generate(self, task: str, text: str, params: GenerationParams, key_id: str = "") -> dict:
        m = self.loaded
        seq = self._submit(m, task, key_id, m.engine.engine.add, self._prompt(m, task, text), params)
        self.texts[seq.id] = text
        try:
            answer, last = await m.engine.complete(seq)
        finally:
            self.texts.pop(seq.id, None)
        return {
            "text": answer,
            "finish_reason": last.finish_reason,
            "prompt_tokens": last.prompt_tokens,
            "completion_tokens": last.completion_tokens,
            "model": m.id,
        }

    def _on_event(self, event: Event) -> None:
        task, key_id = self.tags.pop(event.request.id, ("", ""))
        self.metrics.finished(task, key_id, event)

    def _before_step(self, engine: Engine) -> None:
        for text in {self.texts.get(seq.id) for seq in engine.running} - {None}:
            failpoints.hit("serve.decode_step", text=text)  # drills: a slow step

    def _after_step(self, engine: Engine) -> None:
        self.metrics.engine(engine.stats())

    # --- embeddings and scores ---------------------------------------------------------------------

    async def embed(self, texts: list[str], key_id: str = "") -> dict:
        """Unit vectors (N, D) float32 of texts (odyssey/retrieval.py: each cut to the model's context),
        and the model id."""
        m = self.loaded
        rows = [retrieval.embed_ids(m.tokenizer, t, m.model.cfg.max_seq_len) for t in texts]
        vectors = await self._aux(m, "embed", key_id, m.engine.engine.add_embed, rows)
        return {"vectors": vectors, "model_id": m.id}

    async def score(self, task: str, text: str, options: list[str], key_id: str = "") -> dict:
        """Log-probability of each option (followed by end-of-text) as the answer to `text` in `task`."""
        failpoints.hit("serve.score", task=task, text=text)  # drills: an error or a stall mid-request
        m = self.loaded
        prompt, continuations = m.answers(task, text, tuple(options))
        n = len(prompt) + max(map(len, continuations))
        if n > m.model.cfg.max_seq_len:
            raise InputTooLong(
                f"the input is {n} tokens with its longest label; this model reads {m.model.cfg.max_seq_len}"
            )
        logprobs = await self._aux(m, task, key_id, m.engine.engine.add_score, prompt, continuations)
        return {"logprobs": logprobs, "model_id": m.id}

    async def _aux(self, m: Loaded, task: str, key_id: str, add, *args):
        return await m.engine.result(self._submit(m, task, key_id, add, *args))
