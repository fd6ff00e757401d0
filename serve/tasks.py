"""The thin task deployments: each calls `LanguageModel` through a handle and turns what comes back into
an answer with odyssey/answers.py, as evaluation does. (Passage search, which also holds an index, is
serve/finder.py.)"""

from __future__ import annotations

import asyncio
import logging

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from odyssey import answers
from odyssey.answers import AnswerSettings
from serve.errors import ModerationUnavailable, ServeError
from serve.replica_network import bind_internal_server

log = logging.getLogger("ray.serve")


def usage(result: dict) -> dict:
    p, c = result["prompt_tokens"], result["choices"][0]["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


@serve.deployment(name="Summarizer")
class Summarizer:
    def __init__(self, lm: DeploymentHandle, settings: AnswerSettings):
        bind_internal_server()
        self.lm, self.settings = lm, settings

    async def __call__(self, text: str, max_tokens: int | None = None, key_id: str = "") -> dict:
        params = answers.summary_params(self.settings, max_tokens)
        out = await self.lm.generate.remote("summarize", text, params, key_id)
        answer = out["choices"][0]
        return {
            "summary": answer["text"].strip(),
            "finish_reason": answer["finish_reason"],
            "model": out["model"],
            "usage": usage(out),
        }


@serve.deployment(name="Moderator")
class Moderator:
    """The verdict of odyssey/answers.py `moderation`: the model's label scores, with every label a rule
    found (odyssey/moderation_rules.py) on whatever the model says, so text that argues for "safe"
    cannot unflag a card number. It fails closed: when the scores cannot be had or are not numbers, the
    answer is an error (503 moderation_unavailable), never a verdict. Text over the model's context is
    refused (413) by the model, never cut to what fits."""

    def __init__(self, lm: DeploymentHandle, settings: AnswerSettings):
        bind_internal_server()
        self.lm, self.settings = lm, settings

    async def __call__(self, text: str, key_id: str = "") -> dict:
        try:
            out = await self.lm.score.remote("moderate", text, list(answers.MODERATION_OPTIONS), key_id)
            verdict = answers.moderation(text, out["logprobs"], self.settings)
        except (ServeError, RayActorError):
            raise  # the client's error (413), or a replica that died: the gateway retries that one
        except Exception as e:
            log.exception("moderation failed")
            raise ModerationUnavailable(
                "moderation failed, so this text was NOT checked; do not treat it as safe; retry later"
            ) from e
        ranked = sorted(verdict.probabilities.items(), key=lambda kv: -kv[1])
        return {
            "flagged": verdict.flagged,
            "verdict": "unsafe" if verdict.flagged else "safe",
            "categories": sorted(verdict.labels),
            "labels": [{"label": label, "score": round(p, 6)} for label, p in ranked],
            "rules": [{"label": h.label, "kind": h.kind} for h in verdict.rules],
            "model": out["model_id"],
        }


@serve.deployment(name="Coder")
class Coder:
    """Code from a plain-language prompt: odyssey/answers.py's attempts (greedy, then seeded samples) go
    out at once, so the model's engine prefills their shared prompt once; the first that parses wins,
    else the greedy one."""

    def __init__(self, lm: DeploymentHandle, settings: AnswerSettings):
        bind_internal_server()
        self.lm, self.settings = lm, settings

    async def __call__(self, prompt: str, max_tokens: int | None = None, key_id: str = "") -> dict:
        tries = answers.code_params(self.settings, max_tokens)
        outs = await asyncio.gather(*(self.lm.generate.remote("code", prompt, p, key_id) for p in tries))
        best, error = answers.pick_code(prompt, [o["choices"][0]["text"] for o in outs])
        return {
            "code": outs[best]["choices"][0]["text"],
            "parses": error is None,
            "error": error,
            "attempts": len(outs),
            "model": outs[best]["model"],
            "usage": usage(outs[best]),
        }
