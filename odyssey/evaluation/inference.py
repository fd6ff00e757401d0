"""A model's raw answers to a shard of held-out examples, task by task, as serving would give them:
greedy decoding, the moderation answers scored whole, passages and queries embedded as raw text.
No Ray here: runner.py sends each shard to a Ray task that calls `answer`.

Every function takes rows of the corpus schema (task, input, target, doc_id) and returns one dict per
row. A row whose prompt leaves the model no room to answer is marked `skipped` rather than cut: the
report counts it, so a context too short for the test set shows instead of hiding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from odyssey.code_checks import completion_error, doctest_check, run_check
from odyssey.model import Transformer
from odyssey.tasks import ANSWERS, MODERATION_LABELS, format_labels, label_probabilities, parse_labels
from odyssey.tokenizer import Tokenizer

ROWS_PER_FORWARD = 32  # rows per forward pass; bounds the memory of one call
TOO_LONG = "the prompt leaves no room for an answer in the model's context"


@dataclass(frozen=True)
class AnswerSettings:
    """How answers are produced: the serving app's defaults (serve/config.yaml)."""

    summary_max_tokens: int = 64
    code_max_tokens: int = 128
    moderation_threshold: float = 0.5  # a label applies when its probability reaches it
    # Run the doctests of `code` prompts against the generated bodies (and the references) in a limited
    # child process (odyssey/code_checks.py). False: parse rate and exact match only, nothing executed.
    run_code_checks: bool = True


def _chunks(items: list, n: int = ROWS_PER_FORWARD):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _greedy(model: Transformer, tok: Tokenizer, task: str, rows: list[dict], max_tokens: int) -> list:
    """Greedy answers (text, or None for a prompt that does not fit), batched by prompt length so each
    batch pads little and gets the room its longest prompt leaves."""
    room = model.cfg.max_seq_len
    prompts = [tok.prompt(task, r["input"]) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    out: list[str | None] = [None] * len(rows)
    fitting = [i for i in order if len(prompts[i]) < room]
    for part in _chunks(fitting):
        longest = max(len(prompts[i]) for i in part)
        ids = model.generate(
            [prompts[i] for i in part],
            min(max_tokens, room - longest),
            temperature=0.0,
            stop_ids=[tok.eos_id],
            pad_id=tok.pad_id,
        )
        for i, generated in zip(part, ids):
            out[i] = tok.decode(generated)
    return out


def summarize(model, tok, rows, settings: AnswerSettings) -> list[dict]:
    texts = _greedy(model, tok, "summarize", rows, settings.summary_max_tokens)
    return [
        {"skipped": TOO_LONG} if t is None else {"prediction": t.strip(), "reference": r["target"]}
        for t, r in zip(texts, rows)
    ]


def moderate(model, tok, rows, settings: AnswerSettings) -> list[dict]:
    answers = [[*tok.encode(format_labels(a)), tok.eos_id] for a in ANSWERS]
    longest_answer = max(map(len, answers))
    out = []
    for r in rows:
        prompt = tok.prompt("moderate", r["input"])
        actual = sorted(parse_labels(r["target"]))
        if len(prompt) + longest_answer > model.cfg.max_seq_len:
            out.append({"skipped": TOO_LONG, "actual": actual})
            continue
        logprobs = model.score([prompt] * len(answers), answers, tok.pad_id).tolist()
        probs = label_probabilities(logprobs)
        unsafe = {label for label in MODERATION_LABELS[1:] if probs[label] >= settings.moderation_threshold}
        out.append({"predicted": sorted(unsafe or {"safe"}), "actual": actual})
    return out


def code(model, tok, rows, settings: AnswerSettings) -> list[dict]:
    bodies = _greedy(model, tok, "code", rows, settings.code_max_tokens)
    out = []
    for r, body in zip(rows, bodies):
        if body is None:
            out.append({"skipped": TOO_LONG})
            continue
        body = body.rstrip()
        row = {
            "parses": completion_error(r["input"], body) is None,
            "exact": body.strip() == r["target"].strip(),
        }
        check = doctest_check(r["input"], r.get("doc_id", "")) if settings.run_code_checks else None
        if check is not None:
            reference = run_check(check, r["target"])  # a check the reference fails proves nothing
            if reference.passed:
                result = run_check(check, body)
                row["check"] = {"passed": result.passed, "error": result.error}
        out.append(row)
    return out


@torch.no_grad()
def lm(model, tok, rows, settings: AnswerSettings) -> list[dict]:
    """Summed negative log-likelihood and token count of each text, over context-sized windows."""
    window = model.cfg.max_seq_len
    out = []
    for r in rows:
        ids = torch.tensor([tok.bos_id, *tok.encode(r["target"]), tok.eos_id])
        nll, n = 0.0, 0
        for start in range(0, len(ids) - 1, window):
            piece = ids[start : start + window + 1]
            loss = model(piece[None, :-1], piece[None, 1:])
            nll += float(loss) * (len(piece) - 1)
            n += len(piece) - 1
        out.append({"nll": nll, "tokens": n})
    return out


def embed(model: Transformer, tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """Unit vectors (N, D) of raw texts, each cut to the model's context: what /v1/find embeds."""
    limit = model.cfg.max_seq_len
    rows = [tok.encode(t)[:limit] or [tok.pad_id] for t in texts]
    parts = [model.embed(part, tok.pad_id).float().numpy() for part in _chunks(rows)]
    return np.concatenate(parts) if parts else np.zeros((0, model.cfg.d_model), dtype=np.float32)


ANSWER = {"summarize": summarize, "moderate": moderate, "code": code, "lm": lm}
