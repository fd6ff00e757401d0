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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from odyssey import artifact, chat, failpoints, retrieval
from odyssey.engine import AsyncEngine, Engine, EngineConfig, Event, GenerationParams, QueueFull
from odyssey.errors import OdysseyError
from odyssey.model import Transformer
from odyssey.tasks import TASKS
from odyssey.tokenizer import Tokenizer
from serve.errors import InputTooLong, InvalidRequest, Overloaded
from serve.metrics import EngineMetrics
from serve.openai_shapes import Describer
from serve.replica_network import bind_internal_server

log = logging.getLogger("ray.serve")

# What a generation starts from: text in the task's format, chat messages ({"role", "content"}), or
# token ids, taken as they are.
Prompt = str | list[dict] | list[int]
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


def choice(text: str, finish_reason: str, completion_tokens: int, tokens: list[dict] | None) -> dict:
    return {
        "text": text,
        "finish_reason": finish_reason,
        "completion_tokens": completion_tokens,
        "tokens": tokens,
    }


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

    def _prompt(self, m: Loaded, task: str, prompt: Prompt) -> list[int]:
        """A prompt as token ids: text in the task's format, chat messages through the chat template
        (odyssey/chat.py), or ids as given. Fails early (413) when it leaves no room to answer."""
        try:
            if isinstance(prompt, str):
                ids = m.prompt(task, prompt)
            elif prompt and isinstance(prompt[0], dict):
                ids = chat.chat_ids(m.tokenizer, prompt, task)
            else:
                ids = list(prompt)
                bad = next((t for t in ids if not 0 <= t < m.model.cfg.vocab_size), None)
                if bad is not None or not ids:
                    raise InvalidRequest(
                        f"token id {bad} is not in 0..{m.model.cfg.vocab_size - 1}", "prompt"
                    )
        except OdysseyError as e:  # what the chat template cannot render
            raise InvalidRequest(str(e), "messages") from None
        limit = m.model.cfg.max_seq_len
        if len(ids) >= limit:
            raise InputTooLong(
                f"the prompt is {len(ids)} tokens; this model reads at most {limit - 1} before answering"
            )
        return ids

    def _submit(self, m: Loaded, task: str, key_id: str, add, *args):
        """A request into the engine, tagged for the metrics; a full queue is a 503, counted as refused."""
        try:
            request = add(*args)
        except QueueFull as e:
            self.metrics.refused(task)
            raise Overloaded(f"the model's queue is full ({e}); retry after the given delay") from None
        self.tags[request.id] = (task, key_id)
        return request

    def _start(
        self,
        m: Loaded,
        task: str,
        ids: list[int],
        prompt: Prompt,
        params: GenerationParams,
        n: int,
        key_id: str,
    ) -> list:
        """n sequences of one prompt, submitted together so that the engine prefills it once. Seeded:
        the i-th choice takes seed + i, so the choices differ and each is reproducible."""
        seeds = [None if params.seed is None else (params.seed + i) % 2**63 for i in range(n)]
        seqs = [
            self._submit(m, task, key_id, m.engine.engine.add, ids, replace(params, seed=seed))
            for seed in seeds
        ]
        for seq in seqs:
            self.texts[seq.id] = prompt if isinstance(prompt, str) else ""
        return seqs

    async def _echo(self, m: Loaded, task: str, ids: list[int], top: int | None, key_id: str) -> dict:
        """The prompt as an answer's beginning: its text and, when asked, its tokens' log-probabilities
        (the first token's is None: nothing predicts it)."""
        describe = Describer(m.tokenizer)
        tokens = None
        if top is not None:
            scored = []
            if len(ids) > 1:
                request = self._submit(m, task, key_id, m.engine.engine.add_score, ids[:1], [ids[1:]], top)
                scored = (await m.engine.result(request))[0]
            tokens = [describe(ids[0], None, None), *describe.scored(scored)]
        return {"text": m.tokenizer.decode(ids), "tokens": tokens, "describe": describe}

    async def generate(
        self,
        task: str,
        prompt: Prompt,
        params: GenerationParams,
        key_id: str = "",
        n: int = 1,
        echo: bool = False,
    ) -> dict:
        """n completions of one prompt: {"choices": [{text, finish_reason, completion_tokens, tokens}],
        "prompt_tokens", "model"}. `tokens` (params.logprobs set): serve/openai_shapes.py `Describer`
        dicts. With echo, each text (and its tokens) begins with the prompt's; with max_tokens 0 it is
        only that (the prompt's log-probabilities, scored without generating)."""
        m = self.loaded
        ids = self._prompt(m, task, prompt)
        only_echo = params.max_tokens == 0
        head = await self._echo(m, task, ids, params.logprobs, key_id) if echo or only_echo else None
        if only_echo:
            return {"choices": [choice(head["text"], "length", 0, head["tokens"])] * n, "prompt_tokens": len(ids), "model": m.id}  # fmt: skip
        seqs = self._start(m, task, ids, prompt, params, n, key_id)
        try:
            ends = await asyncio.gather(*[m.engine.complete(seq) for seq in seqs])
        finally:
            for seq in seqs:
                self.texts.pop(seq.id, None)
                m.engine.cancel(seq)  # a no-op for a finished one
        choices = []
        for text, last, logprobs in ends:
            describe = head["describe"].fork() if head else Describer(m.tokenizer)
            tokens = None if params.logprobs is None else describe.scored(logprobs)
            if head is not None:
                text, tokens = head["text"] + text, None if tokens is None else head["tokens"] + tokens
            choices.append(choice(text, last.finish_reason, last.completion_tokens, tokens))
        return {"choices": choices, "prompt_tokens": len(ids), "model": m.id}

    async def generate_stream(
        self,
        task: str,
        prompt: Prompt,
        params: GenerationParams,
        key_id: str = "",
        n: int = 1,
        echo: bool = False,
    ) -> AsyncGenerator[dict]:
        """The n completions as they are made: {"index", "text", "finish_reason", "tokens",
        "completion_tokens", "prompt_tokens"} per step and choice (the echoed prompt first, when asked)."""
        m = self.loaded
        ids = self._prompt(m, task, prompt)
        head = await self._echo(m, task, ids, params.logprobs, key_id) if echo else None
        seqs = self._start(m, task, ids, prompt, params, n, key_id)
        merged: asyncio.Queue = asyncio.Queue()
        pumps: list[asyncio.Future] = []

        async def pump(index: int, events) -> None:
            describe = head["describe"].fork() if head else Describer(m.tokenizer)
            try:
                async for event in events:
                    chunk = event.chunk
                    tokens = None if params.logprobs is None else describe.scored(chunk.logprobs)
                    merged.put_nowait(
                        {"index": index, "text": chunk.text, "finish_reason": chunk.finish_reason, "tokens": tokens,
                         "completion_tokens": chunk.completion_tokens, "prompt_tokens": len(ids)}
                    )  # fmt: skip
            except Exception as e:
                merged.put_nowait(e)

        try:
            pumps += [asyncio.ensure_future(pump(i, m.engine.stream(seq))) for i, seq in enumerate(seqs)]
            for index in range(n if head else 0):
                yield {"index": index, "text": head["text"], "finish_reason": None, "tokens": head["tokens"],
                       "completion_tokens": 0, "prompt_tokens": len(ids)}  # fmt: skip
            done = 0
            while done < n:
                item = await merged.get()
                if isinstance(item, Exception):
                    raise item
                done += item["finish_reason"] is not None
                yield item
        finally:  # the caller stopped reading (client gone, timeout): each stream's cleanup cancels it
            for pump_task in pumps:
                pump_task.cancel()
            for seq in seqs:
                self.texts.pop(seq.id, None)
                m.engine.cancel(seq)

    def _on_event(self, event: Event) -> None:
        task, key_id = self.tags.pop(event.request.id, ("", ""))
        self.metrics.finished(task, key_id, event)

    def _before_step(self, engine: Engine) -> None:
        for text in {self.texts.get(seq.id) for seq in engine.running} - {None}:
            failpoints.hit("serve.decode_step", text=text)  # drills: a slow step

    def _after_step(self, engine: Engine) -> None:
        self.metrics.engine(engine.stats())

    # --- embeddings and scores ---------------------------------------------------------------------

    async def embed(self, texts: list[str] | list[list[int]], key_id: str = "") -> dict:
        """Unit vectors (N, D) float32 of texts, or of token ids of texts (odyssey/retrieval.py: each in
        the find format, cut to the model's context), the model id and the tokens read."""
        m = self.loaded
        for i, text in enumerate(texts):
            if not isinstance(text, str) and not all(0 <= t < m.tokenizer.vocab_size for t in text):
                raise InvalidRequest(f"token ids must be in 0..{m.tokenizer.vocab_size - 1}", f"input[{i}]")
        rows = [retrieval.embed_ids(m.tokenizer, t, m.model.cfg.max_seq_len) for t in texts]
        vectors = await self._aux(m, "embed", key_id, m.engine.engine.add_embed, rows)
        return {"vectors": vectors, "model_id": m.id, "tokens": sum(map(len, rows))}

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
