"""The OpenAI API's bodies, built from what `LanguageModel` answers: completions (`text_completion`), chat
(`chat.completion` and its stream's `chat.completion.chunk`), embeddings, and token log-probabilities in
both of OpenAI's shapes (the completions API's parallel lists, the chat API's list of objects).

The replica describes each token once (`describe`: its text, its bytes, its log-probability, the most
likely alternatives, where it starts in the answer's text); the gateway lays that out per API here.
"""

from __future__ import annotations

import base64
from functools import cache

import numpy as np

from odyssey.engine import TokenLogprob
from odyssey.tokenizer import Tokenizer

# --- one token, described once (on the replica) ------------------------------------------------------


@cache
def _byte_of_symbol() -> dict[str, int]:
    """Byte-level BPE spells each byte as a printable character (GPT-2's table): the inverse map."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols, extra = dict(zip(printable, printable)), 0
    for b in range(256):
        if b not in symbols:
            symbols[b], extra = 256 + extra, extra + 1
    return {chr(s): b for b, s in symbols.items()}


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    """A token's bytes: a byte-level token may hold part of a character, which no text can show."""
    if token in tokenizer.special_ids:
        return b""  # control tokens are no text
    symbols, table = tokenizer.hf.id_to_token(token) or "", _byte_of_symbol()
    if type(tokenizer.hf.decoder).__name__ == "ByteLevel" and all(c in table for c in symbols):
        return bytes(table[c] for c in symbols)
    return tokenizer.hf.decode([token]).encode()


def token_text(tokenizer: Tokenizer, token: int, raw: bytes) -> str:
    """How OpenAI names a token: its text, a control token's spelling, or `bytes:\\xNN...` for bytes
    that are no whole character."""
    if token in tokenizer.special_ids:
        return tokenizer.hf.id_to_token(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class Describer:
    """Tokens of one answer -> dicts the gateway lays out: token, bytes, logprob (None for an answer's
    very first token, which nothing predicts), top [[token, logprob, bytes], ...], offset (characters
    into the answer's text where the token starts)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.raw = tokenizer, b""

    def __call__(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> dict:
        raw = token_bytes(self.tokenizer, token)
        offset = len(self.raw.decode("utf-8", "ignore"))
        self.raw += raw
        alternatives = None if top is None else [self._alternative(t, lp) for t, lp in top]
        return {
            "token": self._name(token, raw),
            "bytes": list(raw),
            "logprob": logprob,
            "top": alternatives,
            "offset": offset,
        }

    def fork(self) -> Describer:
        """A describer that goes on from here: each of n answers after one echoed prompt."""
        twin = Describer(self.tokenizer)
        twin.raw = self.raw
        return twin

    def _name(self, token: int, raw: bytes) -> str:
        return token_text(self.tokenizer, token, raw)

    def _alternative(self, token: int, logprob: float) -> list:
        raw = token_bytes(self.tokenizer, token)
        return [self._name(token, raw), logprob, list(raw)]

    def scored(self, tokens: list[TokenLogprob]) -> list[dict]:
        return [self(t.token, t.logprob, t.top) for t in tokens]


# --- the completions API -----------------------------------------------------------------------------


def completion_logprobs(tokens: list[dict] | None) -> dict | None:
    """The legacy completions shape: parallel lists."""
    if tokens is None:
        return None
    return {
        "tokens": [t["token"] for t in tokens],
        "token_logprobs": [t["logprob"] for t in tokens],
        "top_logprobs": [
            None if t["top"] is None else {name: lp for name, lp, _ in t["top"]} for t in tokens
        ],
        "text_offset": [t["offset"] for t in tokens],
    }


def completion_choice(
    text: str, index: int, finish_reason: str | None, tokens: list[dict] | None = None
) -> dict:
    return {
        "text": text,
        "index": index,
        "logprobs": completion_logprobs(tokens),
        "finish_reason": finish_reason,
    }


def completion_body(
    completion_id: str, created: int, model: str, choices: list[dict], usage: dict | None = None
) -> dict:
    """An OpenAI `text_completion` object: the whole answer (with `usage`) and each streamed chunk."""
    body = {"id": completion_id, "object": "text_completion", "created": created, "model": model}
    body["choices"] = choices
    if usage is not None:
        body["usage"] = usage
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# --- the chat API ------------------------------------------------------------------------------------


def chat_logprobs(tokens: list[dict] | None) -> dict | None:
    """The chat shape: one object per token, alternatives as objects too."""
    if tokens is None:
        return None

    content = []
    for t in tokens:
        item = {"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"]}
        item["top_logprobs"] = [
            {"token": name, "logprob": lp, "bytes": raw} for name, lp, raw in t["top"] or []
        ]
        content.append(item)
    return {"content": content, "refusal": None}


def chat_body(
    chat_id: str, created: int, model: str, choices: list[dict], usage: dict | None, chunk: bool = False
) -> dict:
    body = {"id": chat_id, "object": "chat.completion.chunk" if chunk else "chat.completion"}
    body.update(created=created, model=model, system_fingerprint=None, choices=choices)
    if usage is not None or not chunk:
        body["usage"] = usage
    return body


def chat_choice(text: str, index: int, finish_reason: str | None, tokens: list[dict] | None = None) -> dict:
    message = {"role": "assistant", "content": text, "refusal": None, "tool_calls": None}
    return {
        "index": index,
        "message": message,
        "logprobs": chat_logprobs(tokens),
        "finish_reason": finish_reason,
    }


def chat_delta(
    index: int, delta: dict, finish_reason: str | None = None, tokens: list[dict] | None = None
) -> dict:
    return {"index": index, "delta": delta, "logprobs": chat_logprobs(tokens), "finish_reason": finish_reason}


# --- the embeddings API ------------------------------------------------------------------------------


def embeddings_body(model: str, vectors: np.ndarray, encoding_format: str, tokens: int) -> dict:
    """float: lists of numbers; base64: each vector's float32 bytes (what the `openai` SDK asks for by
    default, and decodes itself)."""

    def encoded(v: np.ndarray):
        if encoding_format == "base64":
            return base64.b64encode(v.astype("<f4").tobytes()).decode()
        return v.astype(np.float32).tolist()

    data = [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)]
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
