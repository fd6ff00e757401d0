"""A model's raw answers to a shard of held-out examples, task by task, exactly as serving gives them:
the same decoder (odyssey/decoding.py), the same answer rules and settings (odyssey/answers.py), the
same embedding (odyssey/retrieval.py). No Ray here: runner.py sends each shard to a Ray task.

Every function takes rows of the corpus schema (task, input, target, doc_id, family) and returns one
dict per row. A row whose prompt leaves the model no room to answer is marked `skipped` rather than
cut: the report counts it, so a context too short for the test set shows instead of hiding.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from odyssey import answers, retrieval
from odyssey.answers import AnswerSettings
from odyssey.code_checks import checks_for, run_check
from odyssey.decoding import BatchDecoder, GenerationParams
from odyssey.model import Transformer
from odyssey.tasks import parse_labels
from odyssey.tokenizer import Tokenizer

ROWS_PER_FORWARD = 32  # rows per forward pass; bounds the memory of one call
TOO_LONG = "the prompt leaves no room for an answer in the model's context"
JUDGES = ("rules", "model", "served")  # moderation's three rows: each half alone, and what serving answers


def complete(
    model: Transformer, tok: Tokenizer, task: str, texts: list[str], params: list[GenerationParams]
) -> list:
    """The text each (input, params) pair decodes to, as serving decodes it: max_tokens capped to the
    room its own prompt leaves (None for a prompt that leaves none), whatever it is batched with;
    batched by prompt length so each batch pads little."""
    room = model.cfg.max_seq_len
    prompts = [tok.prompt(task, t) for t in texts]
    fitting = sorted((i for i in range(len(texts)) if len(prompts[i]) < room), key=lambda i: len(prompts[i]))
    out: list[str | None] = [None] * len(texts)
    for start in range(0, len(fitting), ROWS_PER_FORWARD):
        part = fitting[start : start + ROWS_PER_FORWARD]
        capped = [
            replace(params[i], max_tokens=min(params[i].max_tokens, room - len(prompts[i]))) for i in part
        ]
        decoder = BatchDecoder(model, tok, [prompts[i] for i in part], capped)
        texts_of = [[] for _ in part]
        while not decoder.done:
            for j, chunk in enumerate(decoder.step()):
                if chunk is not None:
                    texts_of[j].append(chunk.text)
        for j, i in enumerate(part):
            out[i] = "".join(texts_of[j])
    return out


def summarize(model, tok, rows, settings: AnswerSettings) -> list[dict]:
    params = answers.summary_params(settings)
    texts = complete(model, tok, "summarize", [r["input"] for r in rows], [params] * len(rows))
    return [
        {"skipped": TOO_LONG}
        if t is None
        else {"prediction": t.strip(), "reference": r["target"], "input": r["input"]}
        for t, r in zip(texts, rows)
    ]


def moderate(model, tok, rows, settings: AnswerSettings) -> list[dict]:
    """Each judge's labels: the rules alone, the model alone, and both as /v1/moderate decides."""
    options = [[*tok.encode(o), tok.eos_id] for o in answers.MODERATION_OPTIONS]
    longest_option = max(map(len, options))
    out = []
    for r in rows:
        prompt = tok.prompt("moderate", r["input"])
        row = {"actual": sorted(parse_labels(r["target"])), "family": r.get("family") or ""}
        if len(prompt) + longest_option > model.cfg.max_seq_len:
            out.append({"skipped": TOO_LONG, **row})
            continue
        logprobs = model.score([prompt] * len(options), options, tok.pad_id).tolist()
        for judge in JUDGES:
            verdict = answers.moderation(r["input"], logprobs, settings, judge)
            row[judge] = sorted(verdict.labels)
        out.append(row)
    return out


def code(model, tok, rows, settings: AnswerSettings, run_checks: bool = True) -> list[dict]:
    """The answer serving gives (the first of the attempts that parses, else the greedy one), and with
    run_checks its executable check (odyssey/code_checks.py) when the example has one that the
    reference itself passes (a check the reference fails proves nothing)."""
    tries = answers.code_params(settings)
    flat = complete(
        model, tok, "code", [r["input"] for r in rows for _ in tries], [p for _ in rows for p in tries]
    )
    out = []
    for n, r in enumerate(rows):
        attempts = flat[n * len(tries) : (n + 1) * len(tries)]
        family = r.get("family") or ""
        if attempts[0] is None:
            out.append({"skipped": TOO_LONG, "family": family})
            continue
        best, error = answers.pick_code(r["input"], attempts)
        answer = attempts[best].rstrip()
        row = {"parses": error is None, "exact": answer.strip() == r["target"].strip(), "family": family}
        check = checks_for(r["input"], r["target"], r.get("doc_id", ""), family) if run_checks else None
        if check is not None and run_check(check, r["target"]).passed:
            result = run_check(check, answer)
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
    """Unit vectors (N, D) of queries or passages: what /v1/find embeds (odyssey/retrieval.py)."""
    return retrieval.embed_texts(model, tok, texts)


ANSWER = {"summarize": summarize, "moderate": moderate, "code": code, "lm": lm}
