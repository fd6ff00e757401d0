"""The thin task deployments: each formats its task for the model, calls `LanguageModel` through a
handle, and turns what comes back into an answer. (Passage search, which also holds an index, is
serve/finder.py.)"""

from __future__ import annotations

import asyncio

from ray import serve
from ray.serve.handle import DeploymentHandle

from odyssey.code_checks import completion_error
from odyssey.tasks import ANSWERS, format_labels, label_probabilities
from serve.generation import GenerationParams


def usage(result: dict) -> dict:
    p, c = result["prompt_tokens"], result["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


@serve.deployment(name="Summarizer")
class Summarizer:
    def __init__(self, lm: DeploymentHandle, max_tokens: int = 64):
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
    def __init__(self, lm: DeploymentHandle, threshold: float = 0.5):
        self.lm, self.threshold = lm, threshold

    async def __call__(self, text: str) -> dict:
        out = await self.lm.score.remote("moderate", text, [format_labels(a) for a in ANSWERS])
        probs = label_probabilities(out["logprobs"])
        flagged = probs["safe"] < self.threshold
        ranked = sorted(probs.items(), key=lambda kv: -kv[1])
        return {
            "flagged": flagged,
            "verdict": "unsafe" if flagged else "safe",
            "labels": [{"label": label, "score": round(p, 6)} for label, p in ranked],
            "model": out["model_id"],
        }


@serve.deployment(name="Coder")
class Coder:
    """Code from a plain-language prompt. Several attempts go out at once (greedy, then samples) and
    share the model's batches; the first that parses wins, else the greedy one with its error."""

    def __init__(self, lm: DeploymentHandle, max_tokens: int = 128, attempts: int = 3):
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
