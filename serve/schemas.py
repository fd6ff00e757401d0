"""Request and response bodies of the HTTP API (they also make the OpenAPI page at /docs).

Task endpoints reject unknown fields, so a misspelt `max_token` is a 422 naming it rather than a
silently ignored setting. /v1/completions follows OpenAI's shape and ignores the OpenAI fields it does
not implement (`user`, penalties), as OpenAI-compatible servers do; `n` > 1, `echo` and `logprobs`
are refused rather than ignored, since ignoring them would return something else than was asked.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- requests ----------------------------------------------------------------------------------------


class SummarizeRequest(_Strict):
    text: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="capped by the server's max_tokens limit")


class ModerateRequest(_Strict):
    text: str = Field(min_length=1)


class FindRequest(_Strict):
    query: str = Field(min_length=1)
    k: int = Field(5, ge=1, le=100)


class CodeRequest(_Strict):
    prompt: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str] = Field(description="one prompt, or several answered in one response")
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per prompt")
    echo: Literal[False] = False
    logprobs: None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if not 1 <= len(prompts) <= 16 or any(not p for p in prompts):
            raise ValueError("give 1 to 16 non-empty prompts")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty stop strings")
        return v

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


# --- responses ---------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SummarizeResponse(BaseModel):
    summary: str
    finish_reason: str
    model: str
    usage: Usage


class LabelScore(BaseModel):
    label: str
    score: float  # probability that the label applies


class ModerateResponse(BaseModel):
    flagged: bool
    verdict: Literal["safe", "unsafe"]
    labels: list[LabelScore]  # every label, most likely first
    model: str


class PassageHit(BaseModel):
    doc_id: str
    title: str
    start: int  # character offsets of the passage in its document
    end: int
    text: str
    score: float  # fused rank score: higher is better
    bm25: float
    dense: float | None  # cosine similarity of the model's embeddings; null when not used


class FindResponse(BaseModel):
    passages: list[PassageHit]
    mode: Literal["hybrid", "bm25"]  # bm25 alone while the index is re-embedded for a new model
    model: str


class CodeResponse(BaseModel):
    code: str
    language: Literal["python"] = "python"
    parses: bool
    error: str | None  # why the best attempt does not parse, when none did
    attempts: int
    model: str
    usage: Usage


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "odyssey"
    root: str  # name@weights digest: which weights answer


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    type: str
    message: str
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
