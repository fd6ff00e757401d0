"""The thin task deployments: each formats its task for the model, calls `LanguageModel` through a
handle, and turns what comes back into an answer. (Passage search, which also holds an index, is
serve/finder.py.)"""

from __future__ import annotations

import asyncio
import logging
import math

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from odyssey import moderation_rules
from odyssey.code_checks import completion_error
from odyssey.tasks import ANSWERS, format_labels, label_probabilities
from serve.errors import ModerationUnavailable, ServeError
from serve.generation import GenerationParams
from serve.replica_network import bind_internal_server

log = logging.getLogger("ray.serve")


def usage(result: dict) -> dict:
    p, c = result["prompt_tokens"], result["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


@serve.deployment(name="Summarizer")
class Summarizer:
    def __init__(self, lm: DeploymentHandle, max_tokens: int = 64):
        bind_internal_server()
        self.lm, self.max_tokens = lm, max_tokens

    async def __call__(self, text: str, max_tokens: int | None = None) -> dict:
        params = GenerationParams(
            max_tokens=min(max_tokens or self.max_tokens, self.max_tokens), temperature=0.0
        )
        out = await self.lm.generate.remote("summarize", text, params)
        return {
            "summary": out["text"].strip(),
            "finish_reason": out["finish_reason"],
            "model": out["model"],
            "usage": usage(out),
        }


@serve.deployment(name="Moderator")
class Moderator:
    """Labels from the model's scores, overruled by the rules (odyssey/moderation_rules.py): a label a
    rule found is on whatever the model says, so text that argues for "safe" cannot unflag a card
    number. It fails closed: when the scores cannot be had or are not numbers, the answer is an error
    (503 moderation_unavailable), never a verdict. Text over the model's context is refused (413) by
    the model, never cut to what fits."""

    def __init__(self, lm: DeploymentHandle, threshold: float = 0.5):
        bind_internal_server()
        self.lm, self.threshold = lm, threshold

    async def __call__(self, text: str) -> dict:
        hits = moderation_rules.scan(text)
        try:
            out = await self.lm.score.remote("moderate", text, [format_labels(a) for a in ANSWERS])
            probs = label_probabilities(out["logprobs"])
        except (ServeError, RayActorError):
            raise  # the client's error (413), or a replica that died: the gateway retries that one
        except Exception as e:
            log.exception("moderation failed")
            raise ModerationUnavailable(
                "moderation failed, so this text was NOT checked; do not treat it as safe; retry later"
            ) from e
        if not all(math.isfinite(p) for p in probs.values()):
            raise ModerationUnavailable("the model's label scores are not numbers; this text was NOT checked")
        for hit in hits:
            probs[hit.label] = 1.0
        if hits:
            probs["safe"] = 0.0
        flagged = probs["safe"] < self.threshold
        ranked = sorted(probs.items(), key=lambda kv: -kv[1])
        return {
            "flagged": flagged,
            "verdict": "unsafe" if flagged else "safe",
            "labels": [{"label": label, "score": round(p, 6)} for label, p in ranked],
            "rules": [{"label": h.label, "kind": h.kind} for h in hits],
            "model": out["model_id"],
        }


@serve.deployment(name="Coder")
class Coder:
    """Code from a plain-language prompt. Several attempts go out at once (greedy, then samples) and
    share the model's batches; the first that parses wins, else the greedy one with its error."""

    def __init__(self, lm: DeploymentHandle, max_tokens: int = 128, attempts: int = 3):
        bind_internal_server()
        self.lm, self.max_tokens, self.attempts = lm, max_tokens, attempts

    async def __call__(self, prompt: str, max_tokens: int | None = None) -> dict:
        n = min(max_tokens or self.max_tokens, self.max_tokens)
        tries = [GenerationParams(max_tokens=n, temperature=0.0)] + [
            GenerationParams(max_tokens=n, temperature=0.8, top_p=0.95, seed=i)
            for i in range(1, self.attempts)
        ]
        outs = await asyncio.gather(*(self.lm.generate.remote("code", prompt, p) for p in tries))
        errors = [completion_error(prompt, o["text"]) for o in outs]
        best = next((i for i, e in enumerate(errors) if e is None), 0)
        return {
            "code": outs[best]["text"],
            "parses": errors[best] is None,
            "error": errors[best],
            "attempts": len(outs),
            "model": outs[best]["model"],
            "usage": usage(outs[best]),
        }
