"""Request and response bodies of the HTTP API (they also make the OpenAPI page at /docs).

Task endpoints reject unknown fields, so a misspelt `max_token` is a 422 naming it rather than a
silently ignored setting. /v1/completions follows OpenAI's shape and ignores the OpenAI fields it does
not implement (`user`, penalties), as OpenAI-compatible servers do; `n` > 1, `echo` and `logprobs`
are refused rather than ignored, since ignoring them would return something else than was asked.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field


def _unicode(text: str) -> str:
    """JSON can carry a lone surrogate ("\\ud800"): a str Python holds but no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text at character {e.start} (a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


def _integral(value):
    """JSON Schema's integer includes 2.0 (a number without a fraction): take it as 2; anything else
    goes on to the strict check (2.5, "2", true are refused)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(**limits) -> type:
    """An int field with these limits (ge=, le=...), which also takes 2.0 for 2. The limits come
    before the converter so that the OpenAPI schema states them (as minimum/maximum)."""
    return Annotated[int, Field(**limits), BeforeValidator(_integral)]


class _Strict(BaseModel):
    # strict: a JSON value of the wrong type is refused ("5" for an int, "true" for a bool), not coerced
    model_config = ConfigDict(extra="forbid", strict=True)


# --- requests ----------------------------------------------------------------------------------------


class SummarizeRequest(_Strict):
    text: Text = Field(min_length=1)
    max_tokens: integer(ge=1) | None = Field(None, description="capped by the server's max_tokens limit")


class ModerateRequest(_Strict):
    text: Text = Field(min_length=1)


class FindRequest(_Strict):
    query: Text = Field(min_length=1)
    k: integer(ge=1, le=100) = 5


class CodeRequest(_Strict):
    prompt: Text = Field(min_length=1)
    max_tokens: integer(ge=1) | None = None


NonEmpty = Annotated[Text, Field(min_length=1)]


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    # The limits are in the types, so the OpenAPI schema states them and clients can check up front.
    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=16)] = Field(
        description="one prompt, or up to 16 answered in one response"
    )
    max_tokens: integer(ge=1) = 16
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: NonEmpty | Annotated[list[NonEmpty], Field(max_length=4)] | None = None
    stream: bool = False
    seed: integer(ge=0, lt=2**63) | None = None
    n: integer(ge=1, le=1) = Field(1, description="one choice per prompt")
    echo: Literal[False] = False
    logprobs: None = None

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


class RuleHit(BaseModel):
    label: str
    kind: str  # what a rule found ("card number"), never the text it matched


class ModerateResponse(BaseModel):
    flagged: bool
    verdict: Literal["safe", "unsafe"]
    categories: list[str]  # the labels that apply (odyssey/answers.py), or ["safe"]
    labels: list[LabelScore]  # every label, most likely first
    rules: list[RuleHit]  # labels found by rule: on whatever the model scored
    model: str


class PassagePlace(BaseModel):
    doc_id: str
    title: str
    start: int  # character offsets in that document
    end: int


class PassageHit(BaseModel):
    doc_id: str  # where the passage first occurs
    title: str
    start: int  # character offsets of the passage in its document
    end: int
    text: str
    score: float  # fused rank score: higher is better
    bm25: float
    dense: float | None  # cosine similarity of the model's embeddings; null when not used
    # The other places with the same text (whitespace aside), e.g. a license paragraph that several
    # packages' copyright files quote: a passage is answered once, wherever it occurs. At most 10.
    also_in: list[PassagePlace] = []


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
    root: str  # name@<the first 12 hex digits of the weights' sha256>: which weights answer


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    type: str
    message: str  # what is wrong and what to do about it
    param: str | None = None  # the field at fault ("body" for the body as a whole), when there is one
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
