"""The inference engine: one KV cache and one decode loop for everything the model answers, serving and
evaluation alike (in the spirit of vLLM's scheduler and nanochat's `Engine`). No Ray, no HTTP.

    engine = Engine(model, tokenizer, EngineConfig())
    seq = engine.add(prompt_ids, GenerationParams(max_tokens=64))   # generation: joins between steps
    req = engine.add_score(prompt_ids, [option_ids, ...])           # log-probability of each option
    req = engine.add_embed([ids, ...])                              # unit vectors (odyssey/retrieval.py)
    while engine.has_work:
        for event in engine.step():   # one iteration: newcomers prefilled (in chunks), then one decode
            ...                       # event.request, event.chunk | event.result

    generate(model, tokenizer, prompts, params)   # offline: submit all, drain (evaluation, tests, benches)
    AsyncEngine(engine)                            # the loop as an asyncio task (serve/language_model.py)

Scheduling is per iteration. Each step (1) admits waiting sequences to free cache rows, (2) spends a
token budget (`max_num_batched_tokens`) oldest-first on scoring, embedding and prompt prefill (a long
prompt is prefilled in chunks over several steps), then (3) decodes one token for every sequence whose
prompt is in the cache. A sequence leaves the moment it ends (end-of-text, a stop string, max_tokens,
cancel) and its row goes to the next in the queue. `scheduler="static"` admits only into an empty
batch: the old batch-at-a-time behaviour, kept so benchmarks compare both on one engine.

Memory is bounded up front: the cache holds `max_num_seqs` rows of `max_seq_len` positions, allocated
once. What does not fit waits in the queue; a full queue (`max_waiting`) refuses with `QueueFull`.
Identical prompts share one prefill (copied into each row: `n` samples, code attempts), and a scoring
request is one row: its prompt once, then its options as a token tree (beginnings they share, once).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from odyssey.errors import ConfigError, OdysseyError
from odyssey.model import Transformer, sample
from odyssey.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------------
# Settings and what comes out


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 32  # sequences decoding at once = KV cache rows (each max_seq_len positions)
    max_num_batched_tokens: int = 2048  # tokens one step runs: decodes + prefill chunks + scoring/embedding
    max_waiting: int = 1024  # requests queued beyond the running ones; more are refused (QueueFull)
    scheduler: Literal["continuous", "static"] = "continuous"  # static: admit only into an empty batch
    prefix_sharing: bool = True  # identical prompts and a scoring request's options share one prefill

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise ConfigError(f"engine.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens <= self.max_num_seqs:
            raise ConfigError(
                f"engine.max_num_batched_tokens={self.max_num_batched_tokens} must exceed max_num_seqs="
                f"{self.max_num_seqs}: a full batch's decode step alone takes one token per sequence"
            )
        if self.scheduler not in ("continuous", "static"):
            raise ConfigError(f"engine.scheduler must be continuous or static, got {self.scheduler!r}")


class QueueFull(OdysseyError):
    """The engine's queue is full: the caller should retry later (serving answers 503 + Retry-After)."""


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()  # text that ends the completion; it is not returned
    seed: int | None = None  # same seed, same prompt, same settings -> same text, whatever runs beside it
    logprobs: int | None = None  # report each token's log-probability and this many most likely tokens

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")


MAX_TOP_LOGPROBS = 20


@dataclass
class TokenLogprob:
    """A token, its log-probability under the model (the raw distribution, before temperature, top-k and
    top-p) and the most likely tokens at its place, most likely first: (token id, log-probability)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Chunk:
    """What one generation receives after a step."""

    text: str  # new text since the previous chunk (may be "" while a stop string might be forming)
    finish_reason: (
        str | None
    )  # None while generating; "stop" (end of text or a stop string), "length", "cancelled"
    prompt_tokens: int
    completion_tokens: int  # generated so far, the end-of-text token included
    logprobs: list[TokenLogprob] = field(default_factory=list)  # this step's token, when asked for


@dataclass
class Timing:
    """Seconds, for operators' metrics: queued before admission, to the first token, per later token."""

    queue_s: float
    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float


@dataclass
class Event:
    request: Request
    chunk: Chunk | None = None  # generation
    result: object = None  # scoring: list[float]; embedding: np.ndarray (N, D)
    timing: Timing | None = None  # on a request's last event

    @property
    def finished(self) -> bool:
        return self.chunk is None or self.chunk.finish_reason is not None


class TextStream:
    """Token ids in, text out, for one generation.

    Byte-level BPE can split one character over several tokens, so the text of the ids so far may end
    in an incomplete character (decoded as U+FFFD): that tail is held back until it completes. So is a
    tail that could be the beginning of a stop string; once a stop string appears, the stream ends
    just before it.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already returned
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now certain."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids)
        if self.stop:
            longest = max(len(s) for s in self.stop)
            start = max(0, self.sent - longest)  # a stop string may straddle what was already sent
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                end = max(min(hits), self.sent)
                out, self.sent = self.text[self.sent : end], end
                return out
        end = len(self.text.rstrip("\ufffd"))
        for s in self.stop:  # hold back a tail that may grow into a stop string
            for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                if self.text[:end].endswith(s[:k]):
                    end -= k
                    break
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def flush(self) -> str:
        """The completion ended without a stop string: everything held back is final."""
        if self.stopped:
            return ""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


# ---------------------------------------------------------------------------------------------------
# Requests


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    arrival: float = field(default_factory=time.perf_counter, init=False)
    id: int = field(default_factory=lambda: next(_ids), init=False)
    admitted: float | None = field(default=None, init=False)

    def timing(self, first: float | None, tokens: int) -> Timing:
        now = time.perf_counter()
        admitted = self.admitted if self.admitted is not None else now
        tpot = (now - first) / (tokens - 1) if first is not None and tokens > 1 else None
        return Timing(
            admitted - self.arrival, None if first is None else first - self.arrival, tpot, now - self.arrival
        )


@dataclass(eq=False)
class Sequence(Request):
    prompt: list[int]
    params: GenerationParams
    stream: TextStream
    generator: torch.Generator | None
    row: int | None = None  # its KV cache row while running
    length: int = 0  # positions of the row filled
    pending: int | None = None  # the token sampled last, not yet in the cache
    generated: int = 0
    leader: Sequence | None = None  # shares this sequence's prefill (same prompt, same step)
    prompt_logits: torch.Tensor | None = None  # after the whole prompt: followers sample from it too
    first_token: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.length < len(self.prompt) and self.pending is None


@dataclass(eq=False)
class ScoreRequest(Request):
    prompt: list[int]
    continuations: list[list[int]]
    top: int | None = None  # each token's TokenLogprob with this many alternatives, instead of sums

    @property
    def tokens(self) -> int:
        return len(self.prompt) + sum(len(c) for c in self.continuations)


@dataclass(eq=False)
class EmbedRequest(Request):
    rows: list[list[int]]

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.rows)


# ---------------------------------------------------------------------------------------------------
# The KV cache


class KVPool:
    """Keys and values, (L, rows, K, length, E), allocated once. Row r holds one sequence's positions
    0 .. length-1 in order; what lies past a row's length is stale and never attended."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    @classmethod
    def allocate(cls, model: Transformer, rows: int, length: int) -> KVPool:
        cfg, w = model.cfg, model.tok_emb.weight
        shape = (cfg.n_layer, rows, cfg.kv_heads, length, cfg.head_dim)
        k = torch.zeros(shape, device=w.device, dtype=w.dtype)
        return cls(k, torch.zeros_like(k))

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def copy(self, src: int, dst: int, positions: int) -> None:
        self.k[:, dst, :, :positions] = self.k[:, src, :, :positions]
        self.v[:, dst, :, :positions] = self.v[:, src, :, :positions]


class CacheView:
    """One forward's window on a KVPool: row b of the batch is pool row rows[b]; its lengths[b] new
    tokens (right-padded to T) go to positions starts[b] ...; each query sees its row's keys up to its
    own position. Attention calls `store` once per layer; `mask`, `positions` are the forward's."""

    def __init__(self, pool: KVPool, rows: list[int], starts: list[int], lengths: list[int], T: int):
        device = pool.k.device
        self.pool = pool
        self.rows = torch.tensor(rows, device=device)
        self.starts = torch.tensor(starts, device=device)
        self.lengths = torch.tensor(lengths, device=device)
        self.span = max(s + n for s, n in zip(starts, lengths))  # key positions read
        r0 = rows[0]
        self.slice = slice(r0, r0 + len(rows)) if rows == list(range(r0, r0 + len(rows))) else None
        t = torch.arange(T, device=device)
        self.positions = self.starts[:, None] + t[None, :]  # (B, T)
        keys = torch.arange(self.span, device=device)
        self.mask = (keys[None, None, :] <= self.positions[:, :, None]).unsqueeze(1)  # (B, 1, T, S)
        if all(n == T for n in lengths):  # no padding (every decode step): every (b, t) is real
            self._src = (slice(None), slice(None))
            self._dst = (self.rows[:, None], self.positions)
        else:
            self._src = (t[None, :] < self.lengths[:, None]).nonzero(as_tuple=True)  # (b, t) of real tokens
            self._dst = (self.rows[self._src[0]], self.positions[self._src])

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """This call's k, v (B, K, T, E) into the pool, real tokens only."""
        self.pool.k[layer][self._dst[0], :, self._dst[1]] = k.transpose(1, 2)[self._src]
        self.pool.v[layer][self._dst[0], :, self._dst[1]] = v.transpose(1, 2)[self._src]

    def read(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of a pool tensor with a rows axis first, positions < span: a view when rows are contiguous."""
        rows = t[self.slice] if self.slice is not None else t[self.rows]
        return rows[..., : self.span, :]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.write(layer, k, v)
        return self.read(self.pool.k[layer]), self.read(self.pool.v[layer])


def tree_mask(parent: torch.Tensor) -> torch.Tensor:
    """parent (B, T): the index each token follows (itself: a root; padding is its own root) -> the
    attention mask (B, 1, T, T) in which a token sees itself and its ancestors. Parents come first."""
    B, T = parent.shape
    batch = torch.arange(B, device=parent.device)
    mask = torch.zeros(B, T, T, dtype=torch.bool, device=parent.device)
    for i in range(T):
        mask[:, i] = mask[batch, parent[:, i]]
        mask[:, i, i] = True
    return mask.unsqueeze(1)


# ---------------------------------------------------------------------------------------------------
# The engine


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = config or EngineConfig()
        self.max_len = model.cfg.max_seq_len
        self.pool = KVPool.allocate(model, self.config.max_num_seqs, self.max_len)
        self.rows: list[Sequence | None] = [None] * self.config.max_num_seqs
        self.waiting: deque[Sequence] = deque()  # generations without a row yet
        self.aux: deque[ScoreRequest | EmbedRequest] = deque()  # scoring and embedding
        self.steps = 0
        # Steps by batch size, for decoding and for scoring/embedding requests: batching, observed.
        self.batches: dict[str, Counter[int]] = {kind: Counter() for kind in ("decode", "score", "embed")}

    # --- submitting --------------------------------------------------------------------------------

    def add(self, prompt: list[int], params: GenerationParams) -> Sequence:
        """Queue a generation. max_tokens is capped to the room the prompt leaves in the context."""
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1 to generate (add_score rates a prompt's own tokens)")
        self._check_prompt(prompt, 1)
        params = _capped(params, self.max_len - len(prompt))
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.pool.k.device).manual_seed(params.seed)
        seq = Sequence(list(prompt), params, TextStream(self.tokenizer, params.stop), generator)
        self._queue(self.waiting, seq)
        return seq

    def add_score(
        self, prompt: list[int], continuations: list[list[int]], top: int | None = None
    ) -> ScoreRequest:
        """Queue the summed log-probability of each continuation after the prompt; with `top`, each
        continuation's tokens one by one instead (TokenLogprob, with `top` alternatives)."""
        if not continuations or any(len(c) == 0 for c in continuations):
            raise ValueError("at least one continuation, each of at least one token")
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
        self._check_prompt(prompt, max(map(len, continuations)))
        request = ScoreRequest(list(prompt), [list(c) for c in continuations], top)
        return self._queue(self.aux, request)

    def add_embed(self, rows: list[list[int]]) -> EmbedRequest:
        """Queue unit vectors of token rows (odyssey/retrieval.py builds them)."""
        if not rows:
            raise ValueError("nothing to embed: give at least one row")
        for r in rows:
            self._check_prompt(r, 0)
        return self._queue(self.aux, EmbedRequest([list(r) for r in rows]))

    def cancel(self, request: Request) -> None:
        """Stop a request: a waiting one leaves the queue, a running one frees its row now."""
        if request in self.waiting:
            self.waiting.remove(request)
        elif request in self.aux:
            self.aux.remove(request)
        elif isinstance(request, Sequence) and request.row is not None:
            for s in self.running:  # followers still waiting for this prefill now prefill themselves
                if s.leader is request:
                    s.leader = None
            self._free(request)

    def _check_prompt(self, ids: list[int], room: int) -> None:
        if not ids:
            raise ValueError("a prompt needs at least one token")
        if len(ids) + room > self.max_len:
            raise ValueError(
                f"{len(ids)} tokens + {room} to come exceed the model's context of {self.max_len}"
            )

    def _queue(self, queue: deque, request: Request) -> Request:
        if len(self.waiting) + len(self.aux) >= self.config.max_waiting:
            raise QueueFull(f"{self.config.max_waiting} requests are waiting already; retry later")
        queue.append(request)
        return request

    # --- state -------------------------------------------------------------------------------------

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.rows if s is not None]

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.aux or self.running)

    def stats(self) -> dict:
        used = sum(s.length for s in self.running)
        return {
            "running": len(self.running),
            "waiting": len(self.waiting) + len(self.aux),
            "kv_cache_used": used / (len(self.rows) * self.max_len),
            "kv_cache_bytes": self.pool.bytes,
            "steps": self.steps,
        }

    # --- one iteration -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Event]:
        self.steps += 1
        events: list[Event] = []
        joined = self._admit()  # their prompt is in the cache already (a running twin's): sample now
        decoding = [s for s in self.running if s.pending is not None]
        budget = self.config.max_num_batched_tokens - len(decoding)
        prefill = self._spend(budget, events)
        ready, logits = self._prefill(prefill) if prefill else ([], [])
        ready, logits = joined + ready, [s.prompt_logits[None] for s in joined] + logits
        if decoding:
            rows = [s.row for s in decoding]
            tokens = [[s.pending] for s in decoding]
            logits.append(self._forward(self.pool, rows, tokens, [s.length for s in decoding]))
            self.batches["decode"][len(decoding)] += 1
            for s in decoding:
                s.length += 1
        if ready or decoding:
            self._sample(ready + decoding, torch.cat(logits), events)
        return events

    def _admit(self) -> list[Sequence]:
        """Waiting generations into free rows, in arrival order (static: only into an empty batch).
        Returns those whose prompt a running sequence had in the cache already: copied, to sample."""
        joined: list[Sequence] = []
        if self.config.scheduler == "static" and self.running:
            return joined
        free = [r for r, s in enumerate(self.rows) if s is None]
        sharing = self.config.prefix_sharing
        by_prompt = {tuple(s.prompt): s.leader or s for s in self.running} if sharing else {}
        now = time.perf_counter()
        while self.waiting and free:
            seq = self.waiting.popleft()
            seq.row, seq.admitted = free.pop(0), now
            self.rows[seq.row] = seq
            twin = by_prompt.get(tuple(seq.prompt))
            if twin is None:
                if sharing:
                    by_prompt[tuple(seq.prompt)] = seq
            elif twin.prompt_logits is not None:  # its prompt is in the cache already: copy it
                self._follow(seq, twin)
                joined.append(seq)
            else:
                seq.leader = twin
        return joined

    def _spend(self, budget: int, events: list[Event]) -> list[tuple[Sequence, int]]:
        """The step's token budget, oldest first, on scoring/embedding requests (run here, whole) and
        prompt chunks (returned, for _prefill). The oldest item always runs, whatever its size."""
        todo = sorted(
            [s for s in self.running if s.prefilling and s.leader is None] + list(self.aux),
            key=lambda r: r.arrival,
        )
        chunks, batch, first = [], [], True
        for item in todo:
            if budget <= 0 and not first:
                break
            if isinstance(item, Sequence):
                n = min(len(item.prompt) - item.length, max(budget, 1))
                chunks.append((item, n))
            else:
                n = item.tokens
                if n > budget and not first:
                    continue
                batch.append(item)
            budget, first = budget - n, False
        for request in batch:
            self.aux.remove(request)
        scores = [r for r in batch if isinstance(r, ScoreRequest)]
        embeds = [r for r in batch if isinstance(r, EmbedRequest)]
        if scores:
            self.batches["score"][len(scores)] += 1
            for r, result in zip(scores, self._score(scores)):
                events.append(Event(r, result=result, timing=r.timing(None, 0)))
        if embeds:
            self.batches["embed"][len(embeds)] += 1
            for r, result in zip(embeds, self._embed(embeds)):
                events.append(Event(r, result=result, timing=r.timing(None, 0)))
        return chunks

    def _prefill(self, chunks: list[tuple[Sequence, int]]) -> tuple[list[Sequence], list[torch.Tensor]]:
        """Run prompt chunks into their rows; sequences whose prompt is now whole are ready to sample
        their first token (so are their followers, whose rows get a copy)."""
        rows = [s.row for s, _ in chunks]
        tokens = [s.prompt[s.length : s.length + n] for s, n in chunks]
        logits = self._forward(self.pool, rows, tokens, [s.length for s, _ in chunks])
        ready, out = [], []
        for (s, n), row_logits in zip(chunks, logits):
            s.length += n
            if s.length == len(s.prompt):
                s.prompt_logits = row_logits
                ready.append(s)
                out.append(row_logits[None])
                for f in self.running:
                    if f.leader is s:
                        self._follow(f, s)
                        ready.append(f)
                        out.append(row_logits[None])
        return ready, out

    def _follow(self, seq: Sequence, twin: Sequence) -> None:
        self.pool.copy(twin.row, seq.row, len(seq.prompt))
        seq.length, seq.leader, seq.prompt_logits = len(seq.prompt), None, twin.prompt_logits

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, events: list[Event]) -> None:
        """One token for each sequence, each with its own settings: sequences without a seed of their own
        that share settings are sampled in one call."""
        tokens = [0] * len(seqs)
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(seqs):
            p = s.params
            groups.setdefault((p.temperature, p.top_k, p.top_p, i if s.generator else -1), []).append(i)
        for (temperature, top_k, top_p, own), idx in groups.items():
            generator = seqs[own].generator if own >= 0 else None
            picked = sample(logits[idx], temperature, top_k, top_p, generator).tolist()
            for i, t in zip(idx, picked):
                tokens[i] = t
        asked = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        reports = dict(zip(asked, token_logprobs(logits[asked], tokens, asked, seqs))) if asked else {}
        now = time.perf_counter()
        for i, (s, token) in enumerate(zip(seqs, tokens)):
            s.first_token = s.first_token or now
            events.append(self._emit(s, token, reports.get(i)))

    def _emit(self, s: Sequence, token: int, logprob: TokenLogprob | None = None) -> Event:
        finish, text = None, ""
        if token == self.tokenizer.eos_id:
            finish, text = "stop", s.stream.flush()
        else:
            s.generated += 1
            text = s.stream.push(token)
            if s.stream.stopped:
                finish = "stop"
            elif s.generated >= s.params.max_tokens:
                finish, text = "length", text + s.stream.flush()
        s.pending = token if finish is None else None
        ended = token == self.tokenizer.eos_id  # counted as generated, as OpenAI counts it
        chunk = Chunk(text, finish, len(s.prompt), s.generated + ended, [logprob] if logprob else [])
        if finish is None:
            return Event(s, chunk)
        self._free(s)
        return Event(s, chunk, timing=s.timing(s.first_token, s.generated))

    def _free(self, s: Sequence) -> None:
        """Give the row back, moving the last running row into it so running rows stay contiguous (a
        contiguous batch reads the cache as a view; scattered rows are gathered: a copy per layer)."""
        row, last = s.row, max(r for r, x in enumerate(self.rows) if x is not None)
        self.rows[row], s.row, s.pending = None, None, None
        if last != row:
            moved = self.rows[last]
            self.pool.copy(last, row, moved.length)
            self.rows[row], self.rows[last], moved.row = moved, None, row

    # --- forwards ----------------------------------------------------------------------------------

    def _forward(
        self, pool: KVPool, rows: list[int], tokens: list[list[int]], starts: list[int], every: bool = False
    ) -> torch.Tensor:
        """tokens[b] (right-padded) at positions starts[b]... of pool row rows[b]. Returns the logits
        after each row's last token (B, V), or with `every` after each of its tokens (B, T, V)."""
        lengths = [len(t) for t in tokens]
        T = max(max(lengths), 1)
        device = pool.k.device
        pad = self.tokenizer.pad_id
        ids = torch.tensor([t + [pad] * (T - len(t)) for t in tokens], dtype=torch.long, device=device)
        view = CacheView(pool, rows, starts, lengths, T)
        cos, sin = self.model.rope_at(view.positions.clamp(max=self.max_len - 1))
        h = self.model.hidden_states(ids, cos, sin, view.mask, view)  # (B, T, D)
        if every:
            return self.model.logits(h)
        last = torch.tensor([max(n - 1, 0) for n in lengths], device=device)
        return self.model.logits(h[torch.arange(len(tokens), device=device), last])

    def _score(self, requests: list[ScoreRequest]) -> list[list]:
        """Every request's options' log-probabilities in one forward. With prefix sharing a request is one
        row: its prompt, then its options as a token tree (options that begin alike share those tokens),
        each token seeing the prompt and its own ancestors only, at its depth's position: the prompt and
        every shared option prefix run once, and no cache is copied. Without, each option is a row of its
        own: prompt + option."""
        if self.config.prefix_sharing:
            rows = [(r.prompt, r.continuations) for r in requests]
        else:
            rows = [(r.prompt, [c]) for r in requests for c in r.continuations]
        top = max((r.top for r in requests if r.top is not None), default=None)
        flat = iter(self._score_rows(rows, top))
        return [
            [sum(t.logprob for t in option) if r.top is None else _trim(option, r.top) for option in options]
            for r, options in zip(requests, ([next(flat) for _ in r.continuations] for r in requests))
        ]

    def _score_rows(
        self, rows: list[tuple[list[int], list[list[int]]]], top: int | None
    ) -> list[list[TokenLogprob]]:
        """(prompt, options) rows -> each option's tokens with their log-probabilities (and `top`
        alternatives), in order."""
        ids, parents, positions = [], [], []  # per row; a token's parent: the index it follows
        # Per option: the (row, index) whose state predicts each of its tokens.
        predictors: list[list[tuple[int, int]]] = []
        for b, (prompt, options) in enumerate(rows):
            P = len(prompt)
            ids.append(list(prompt))
            parents.append([max(i - 1, 0) for i in range(P)])
            positions.append(list(range(P)))
            node: dict[tuple[int, int], int] = {}  # (parent index, token) -> index: the options' tree
            for c in options:
                at, chain = P - 1, [(b, P - 1)]  # c[0] follows the prompt; c[t] the node of c[t - 1]
                for t, token in enumerate(c[:-1]):
                    if (at, token) not in node:
                        node[at, token] = len(ids[b])
                        ids[b].append(token)
                        parents[b].append(at)
                        positions[b].append(P + t)
                    at = node[at, token]
                    chain.append((b, at))
                predictors.append(chain)
        T = max(map(len, ids))
        device = self.pool.k.device

        def padded(rows: list[list[int]], fill) -> torch.Tensor:
            return torch.tensor([r + [fill] * (T - len(r)) for r in rows], dtype=torch.long, device=device)

        parent = torch.tensor([p + list(range(len(p), T)) for p in parents], dtype=torch.long, device=device)
        cos, sin = self.model.rope_at(padded(positions, 0))
        h = self.model.hidden_states(padded(ids, self.tokenizer.pad_id), cos, sin, tree_mask(parent))
        where = list(dict.fromkeys(p for chain in predictors for p in chain))  # each state once
        b, t = torch.tensor(where, device=device).unbind(-1)
        logprobs = F.log_softmax(self.model.logits(h[b, t]).float(), -1)  # (N, V)
        k = {p: n for n, p in enumerate(where)}
        options = [c for _, opts in rows for c in opts]
        at = torch.tensor([k[p] for chain in predictors for p in chain], device=device)
        flat = [tok for c in options for tok in c]
        per_token = logprobs[at, torch.tensor(flat, device=device)].tolist()
        alternatives = [[]] * len(flat)
        if top:
            top_lp, top_id = logprobs.topk(top, -1)
            alternatives = [list(zip(i, lp)) for i, lp in zip(top_id[at].tolist(), top_lp[at].tolist())]
        scored = [TokenLogprob(*x) for x in zip(flat, per_token, alternatives)]
        out, start = [], 0
        for c in options:
            out.append(scored[start : start + len(c)])
            start += len(c)
        return out

    def _embed(self, requests: list[EmbedRequest]) -> list[np.ndarray]:
        rows = [row for r in requests for row in r.rows]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths pad little
        vectors: list = [None] * len(rows)
        per = max(1, self.config.max_num_batched_tokens // max(len(rows[order[0]]), 1))
        for start in range(0, len(order), per):
            idx = order[start : start + per]
            out = self.model.embed([rows[i] for i in idx], self.tokenizer.pad_id).float().cpu().numpy()
            for j, i in enumerate(idx):
                vectors[i] = out[j]
        result, start = [], 0
        for r in requests:
            result.append(np.stack(vectors[start : start + len(r.rows)]))
            start += len(r.rows)
        return result


def token_logprobs(logits: torch.Tensor, tokens: list[int], rows: list[int], seqs) -> list[TokenLogprob]:
    """logits (N, V) of the sequences at `rows` -> each one's picked token with its log-probability
    and its params.logprobs most likely alternatives."""
    logprobs = F.log_softmax(logits.float(), -1)
    picked = torch.tensor([tokens[i] for i in rows], device=logits.device)
    chosen = logprobs.gather(-1, picked[:, None]).squeeze(-1).tolist()
    k = max(seqs[i].params.logprobs for i in rows)
    top_lp, top_id = logprobs.topk(k, -1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    return [
        TokenLogprob(
            tokens[i], chosen[n], list(zip(top_id[n].tolist(), top_lp[n].tolist()))[: seqs[i].params.logprobs]
        )
        for n, i in enumerate(rows)
    ]


def _trim(tokens: list[TokenLogprob], top: int) -> list[TokenLogprob]:
    return [TokenLogprob(t.token, t.logprob, t.top[:top]) for t in tokens]


def _capped(params: GenerationParams, room: int) -> GenerationParams:
    if params.max_tokens <= room:
        return params
    return GenerationParams(**{**params.__dict__, "max_tokens": room})


# ---------------------------------------------------------------------------------------------------
# Offline: submit all, drain


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    params: list[GenerationParams] | GenerationParams,
    config: EngineConfig | None = None,
) -> list[Completion]:
    """Every prompt's completion, as serving would give it (the same engine, run to the end)."""
    engine = Engine(model, tokenizer, config or EngineConfig(max_waiting=max(len(prompts), 1) + 1))
    params = params if isinstance(params, list) else [params] * len(prompts)
    seqs = [engine.add(p, q) for p, q in zip(prompts, params)]
    texts: dict[int, list[str]] = {s.id: [] for s in seqs}
    last: dict[int, Chunk] = {}
    while engine.has_work:
        for e in engine.step():
            texts[e.request.id].append(e.chunk.text)
            last[e.request.id] = e.chunk
    return [
        Completion(
            "".join(texts[s.id]),
            s.stream.ids,
            last[s.id].finish_reason,
            last[s.id].prompt_tokens,
            last[s.id].completion_tokens,
        )
        for s in seqs
    ]


def score(
    model: Transformer, tokenizer: Tokenizer, prompt: list[int], continuations: list[list[int]]
) -> list[float]:
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=1, max_num_batched_tokens=1 << 20))
    request = engine.add_score(prompt, continuations)
    return next(e.result for e in engine.step() if e.request is request)


# ---------------------------------------------------------------------------------------------------
# Online: the loop as an asyncio task


class AsyncEngine:
    """Runs `Engine.step` on the event loop whenever there is work, giving the loop a turn after each
    step: requests submitted meanwhile join at the next step, and every step's tokens reach their
    callers at once. (On the loop itself, not a thread: for a small model, handing each step to a thread
    costs more than the step, and between steps the loop answers health checks and takes new work.)

        seq = async_engine.engine.add(prompt, params)      # QueueFull at once when the queue is full
        async for event in async_engine.stream(seq): ...   # its events as they come
        text, last, logprobs = await async_engine.complete(seq)  # or only the end
        vectors = await async_engine.result(async_engine.engine.add_embed(rows))

    `on_event` sees every request's last event (timings, for metrics), a cancelled one's too; `before_step`
    and `after_step` run around each step (fault drills, gauges).
    """

    def __init__(self, engine: Engine, on_event=None, before_step=None, after_step=None):
        self.engine = engine
        self.on_event, self.before_step, self.after_step = on_event, before_step, after_step
        self.waiters: dict[int, asyncio.Queue | tuple[list[str], asyncio.Future]] = {}
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.retired = False

    def retire(self) -> None:
        """Finish the work there is, then stop (a newer engine takes the new work)."""
        self.retired = True
        self.wake.set()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def _loop(self) -> None:
        while True:
            if not self.engine.has_work:
                if self.after_step is not None:
                    self.after_step()  # the gauges at rest too (after a cancel, say)
                if self.retired:
                    return
                self.wake.clear()
                await self.wake.wait()
                continue
            if self.before_step is not None:
                self.before_step()
            try:
                events = self.engine.step()
            except Exception as e:  # a failed step fails the requests in it, never the loop
                self._fail_all(e)
                events = []
            for e in events:
                self._deliver(e)
            if self.after_step is not None:
                self.after_step()
            await asyncio.sleep(0)

    def _deliver(self, event: Event) -> None:
        if event.timing is not None and self.on_event is not None:
            self.on_event(event)
        waiter = self.waiters.get(event.request.id)
        if isinstance(waiter, asyncio.Queue):
            waiter.put_nowait(event)
        elif waiter is not None:  # a whole answer: gather the text here, wake its caller once
            chunks, future = waiter
            if event.chunk is not None:
                chunks.append(event.chunk)
            if event.finished and not future.done():
                future.set_result(event)

    def _fail_all(self, error: Exception) -> None:
        for r in [*self.engine.running, *self.engine.waiting, *self.engine.aux]:
            self.engine.cancel(r)
        for waiter in self.waiters.values():
            if isinstance(waiter, asyncio.Queue):
                waiter.put_nowait(error)
            elif not waiter[1].done():
                waiter[1].set_exception(error)

    def _watch(self, request: Request, waiter) -> None:
        self.waiters[request.id] = waiter
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._loop())
        self.wake.set()

    def _cancelled(self, request: Request) -> None:
        """The caller went away: free the request's row (or queue place) before the next step."""
        self.waiters.pop(request.id, None)
        self.wake.set()
        if isinstance(request, Sequence) and (request.row is not None or request in self.engine.waiting):
            self.engine.cancel(request)
            chunk = Chunk("", "cancelled", len(request.prompt), request.generated)
            self._deliver(
                Event(request, chunk, timing=request.timing(request.first_token, request.generated))
            )
        elif request in self.engine.aux:
            self.engine.cancel(request)

    # Each of these watches its request from the call on, before the caller's first await: a step that
    # runs before the caller reads (another task's turn) cannot take events nobody receives.

    def stream(self, seq: Sequence) -> AsyncIterator[Event]:
        """A generation's events as they come. Leaving early (the caller went away) cancels it."""
        queue: asyncio.Queue = asyncio.Queue()
        self._watch(seq, queue)
        return self._read(seq, queue)

    async def _read(self, seq: Sequence, queue: asyncio.Queue) -> AsyncIterator[Event]:
        try:
            while True:
                event = await queue.get()
                if isinstance(event, Exception):
                    raise event
                yield event
                if event.finished:
                    return
        finally:
            self._cancelled(seq)

    def complete(self, seq: Sequence) -> Awaitable[tuple[str, Chunk, list[TokenLogprob]]]:
        """A generation's whole text, its last chunk (finish reason, token counts) and its tokens'
        log-probabilities (when its params ask for them)."""
        chunks: list[Chunk] = []
        future = asyncio.get_running_loop().create_future()
        self._watch(seq, (chunks, future))

        async def ended():
            try:
                event = await future
            finally:
                self._cancelled(seq)
            return "".join(c.text for c in chunks), event.chunk, [lp for c in chunks for lp in c.logprobs]

        return ended()

    def cancel(self, request: Request) -> None:
        """Stop watching a request and cancel it if it still runs: for a caller that may never have
        read what it asked for (a no-op once it was read to its end)."""
        self._cancelled(request)

    async def result(self, request: ScoreRequest | EmbedRequest):
        future = asyncio.get_running_loop().create_future()
        self._watch(request, ([], future))
        try:
            event = await future
        finally:
            self._cancelled(request)
        return event.result
