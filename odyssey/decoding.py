"""Batched generation for serving: requests with their own sampling settings, decoded together over
one KV cache and streamed back as text.

    decoder = BatchDecoder(model, tokenizer, prompts, params)   # prefill: one forward over all prompts
    while not decoder.done:
        chunks = decoder.step()   # one token per live row -> one Chunk per row (None once a row ended)

No Ray here: serve/language_model.py runs this inside a deployment, one batch at a time, and
evaluation (odyssey/evaluation/inference.py) drives it to the end for its answers: one decode path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from odyssey.model import Transformer, sample
from odyssey.tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()  # text that ends the completion; it is not returned
    seed: int | None = None  # same seed, same prompt, same settings -> same text

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


@dataclass
class Chunk:
    """What one request receives after a step."""

    text: str  # new text since the previous chunk (may be "" while a stop string might be forming)
    finish_reason: str | None  # None while generating; "stop" (end of text or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


class TextStream:
    """Token ids in, text out, for one request.

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


class BatchDecoder:
    """One batch of requests decoded together. Rows end on their own: at the end-of-text token, at a
    stop string, or at their max_tokens; the batch is done when every row has ended."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        prompts: list[list[int]],
        params: list[GenerationParams],
    ):
        if len(prompts) != len(params) or not prompts:
            raise ValueError("one GenerationParams per prompt, and at least one prompt")
        over = [
            len(p) + q.max_tokens
            for p, q in zip(prompts, params)
            if len(p) + q.max_tokens > model.cfg.max_seq_len
        ]
        if over:
            raise ValueError(
                f"a prompt + its max_tokens = {over[0]} tokens exceeds max_seq_len={model.cfg.max_seq_len}"
            )
        # Left-padded: every row's prompt ends at the longest's end; each row then has its own room.
        room = max(len(p) for p in prompts) + max(p.max_tokens for p in params)
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.prompt_tokens = [len(p) for p in prompts]
        self.generated = [0] * len(prompts)
        self.finish: list[str | None] = [None] * len(prompts)
        self.streams = [TextStream(tokenizer, p.stop) for p in params]
        self.generators = [
            torch.Generator(device=model.tok_emb.weight.device).manual_seed(p.seed)
            if p.seed is not None
            else None
            for p in params
        ]
        self.logits, self.cache = model.prefill(prompts, room, tokenizer.pad_id)  # (B, V)
        self.pending: torch.Tensor | None = None  # tokens sampled last step, not yet run through the model

    @property
    def size(self) -> int:
        return len(self.params)

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    @torch.no_grad()
    def step(self) -> list[Chunk | None]:
        if self.done:
            raise RuntimeError("the batch is done")
        if self.pending is not None:  # deferred, so a batch that just ended never pays for a decode
            self.logits = self.model.decode(self.pending, self.cache)
        next_ids = self._sample(self.logits)  # (B,)
        self.pending = next_ids
        chunks: list[Chunk | None] = []
        for i, token in enumerate(next_ids.tolist()):
            if self.finish[i] is not None:
                chunks.append(None)
                continue
            stream, text = self.streams[i], ""
            if token == self.tokenizer.eos_id:
                self.finish[i] = "stop"
                text = stream.flush()
            else:
                self.generated[i] += 1
                text = stream.push(token)
                if stream.stopped:
                    self.finish[i] = "stop"
                elif self.generated[i] >= self.params[i].max_tokens:
                    self.finish[i] = "length"
                    text += stream.flush()
            chunks.append(Chunk(text, self.finish[i], self.prompt_tokens[i], self.generated[i]))
        return chunks

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row, each row with its own settings: rows that share settings (and have no
        seed of their own) are sampled in one call."""
        # Finished rows get the pad token: they still feed the next decode step, never the answer.
        out = torch.full((logits.shape[0],), self.tokenizer.pad_id, dtype=torch.long, device=logits.device)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(self.params):
            if self.finish[i] is None:
                key = (p.temperature, p.top_k, p.top_p, i if self.generators[i] is not None else -1)
                groups.setdefault(key, []).append(i)
        for (temperature, top_k, top_p, own), rows in groups.items():
            index = torch.tensor(rows, device=logits.device)
            generator = self.generators[own] if own >= 0 else None
            out[index] = sample(logits[index], temperature, top_k, top_p, generator)
        return out
