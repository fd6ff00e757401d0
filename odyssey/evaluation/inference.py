"""A model's raw answers to a shard of held-out examples, task by task, exactly as serving gives them:
the same engine (odyssey/engine.py: generation and label scoring), the same answer rules and settings
(odyssey/answers.py), the same embedding (odyssey/retrieval.py). No Ray here: runner.py sends each
shard to a Ray task.

Every function takes rows of the corpus schema (task, input, target, doc_id, family) and returns one
dict per row. A row whose prompt leaves the model no room to answer is marked `skipped` rather than
cut: the report counts it, so a context too short for the test set shows instead of hiding.
"""

from __future__ import annotations

import numpy as np
import torch

from odyssey import answers, retrieval
from odyssey.answers import AnswerSettings
from odyssey.code_checks import checks_for, run_check
from odyssey.engine import Engine, EngineConfig, GenerationParams, generate
from odyssey.model import Transformer
from odyssey.tasks import parse_labels
from odyssey.tokenizer import Tokenizer

TOO_LONG = "the prompt leaves no room for an answer in the model's context"
JUDGES = ("rules", "model", "served")  # moderation's three rows: each half alone, and what serving answers


def complete(
    model: Transformer, tok: Tokenizer, task: str, texts: list[str], params: list[GenerationParams]
) -> list:
    """The text each (input, params) pair decodes to, as serving decodes it: all submitted to one engine
    and drained, max_tokens capped to the room its own prompt leaves (None for a prompt that leaves
    none), whatever runs beside it."""
    prompts = [tok.prompt(task, t) for t in texts]
    fitting = [i for i in range(len(texts)) if len(prompts[i]) < model.cfg.max_seq_len]
    done = generate(model, tok, [prompts[i] for i in fitting], [params[i] for i in fitting])
    out: list[str | None] = [None] * len(texts)
    for i, completion in zip(fitting, done):
        out[i] = completion.text
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
    # Scoring only: one cache row is enough, since nothing generates.
    engine = Engine(model, tok, EngineConfig(max_num_seqs=1, max_waiting=len(rows) + 1))
    requests = {}  # row index -> its scoring request
    for n, r in enumerate(rows):
        prompt = tok.prompt("moderate", r["input"])
        if len(prompt) + longest_option <= model.cfg.max_seq_len:
            requests[n] = engine.add_score(prompt, options)
    logprobs = {}  # request id -> the options' log-probabilities
    while engine.has_work:
        logprobs.update((e.request.id, e.result) for e in engine.step())
    out = []
    for n, r in enumerate(rows):
        row = {"actual": sorted(parse_labels(r["target"])), "family": r.get("family") or ""}
        if n not in requests:
            out.append({"skipped": TOO_LONG, **row})
            continue
        for judge in JUDGES:
            verdict = answers.moderation(r["input"], logprobs[requests[n].id], settings, judge)
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
