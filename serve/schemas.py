"""Request and response bodies of the HTTP API (they also make the OpenAPI page at /docs).

Every endpoint rejects unknown fields, so a misspelt `max_token` is a 422 naming it rather than a
silently ignored setting. The OpenAI endpoints (/v1/completions, /v1/chat/completions, /v1/embeddings)
take OpenAI's fields: what changes no answer (`user`, `metadata`, `store`, `service_tier`) is accepted
and ignored; what Odyssey does not implement (`best_of` > 1, penalties, `logit_bias`, `suffix`, tools,
`dimensions`...) is refused with a 422 naming the field when set to anything but its no-op value, since
ignoring it would return something else than was asked.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError


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


def refuse(model: BaseModel, field: str, message: str):
    """A check across fields (in a model validator) as the error of one field, so the 422 names it."""
    error = PydanticCustomError("value_error", message)
    details = InitErrorDetails(type=error, loc=(field,), input=getattr(model, field, None))
    raise ValidationError.from_exception_data(type(model).__name__, [details])


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


def each(value: str | list) -> list[str | list[int]]:
    """A field of OpenAI's that takes one text or token list, or a list of them: always a list."""
    return [value] if isinstance(value, str) or isinstance(value[0], int) else list(value)


TokenIds = Annotated[list[integer(ge=0, lt=2**31)], Field(min_length=1)]
MAX_PROMPTS = 16  # prompts (or choices: prompts x n) in one completions request


class StreamOptions(_Strict):
    include_usage: bool = False


class _OpenAI(_Strict):
    """Fields every OpenAI generation request may carry. Those Odyssey does not implement are taken
    only at their no-op value; a real setting is refused (`_refuse_unsupported`), naming the field."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: NonEmpty | Annotated[list[NonEmpty], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: integer(ge=0, lt=2**63) | None = None
    n: integer(ge=1, le=MAX_PROMPTS) = Field(1, description="choices per prompt; they share one prefill")
    max_tokens: integer(ge=0) | None = None
    max_completion_tokens: integer(ge=0) | None = Field(None, description="an alias of max_tokens")
    # Accepted and ignored: they change no answer.
    user: str | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None
    # Not implemented: refused unless at their no-op value (which the schema states).
    presence_penalty: float | None = Field(None, ge=0, le=0, description="not supported: only 0")
    frequency_penalty: float | None = Field(None, ge=0, le=0, description="not supported: only 0")
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = Field(None, description="only {}")

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias", mode="before")
    @classmethod
    def _refuse_unsupported(cls, value):
        if value not in (None, 0, {}):
            raise ValueError("not supported by this server; leave it out")
        return value

    @model_validator(mode="after")
    def _one_limit(self):
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            refuse(self, "max_completion_tokens", "differs from max_tokens; send one of them")
        if self.stream_options is not None and not self.stream:
            refuse(self, "stream_options", "needs stream: true")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def limit(self, default: int) -> int:
        """max_tokens, or its alias, or the default."""
        given = self.max_tokens if self.max_tokens is not None else self.max_completion_tokens
        return default if given is None else given


class CompletionRequest(_OpenAI):
    prompt: (
        NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(description="text, up to 16 texts, token ids, or up to 16 lists of token ids")  # fmt: skip
    echo: bool = Field(False, description="begin each choice with the prompt (with max_tokens 0: only that)")
    logprobs: integer(ge=0, le=5) | None = Field(
        None, description="each token's log-probability and this many alternatives"
    )
    best_of: integer(ge=1, le=1) | None = Field(None, description="only 1: choices are not ranked here")
    suffix: None = None

    @model_validator(mode="after")
    def _tokens(self):
        if self.limit(16) == 0 and not self.echo:
            refuse(
                self,
                "max_tokens",
                "0 generates nothing; it is for echo: true (the prompt's log-probabilities)",
            )
        if len(self.prompts) * self.n > MAX_PROMPTS:
            refuse(
                self,
                "n",
                f"n x prompts is {len(self.prompts) * self.n}; at most {MAX_PROMPTS} choices a request",
            )
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text, or token ids."""
        return each(self.prompt)


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_OpenAI):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: integer(ge=0, le=20) | None = None
    response_format: ResponseFormat | None = Field(None, description="only text")
    tools: None = Field(None, description="not supported")
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            refuse(self, "top_logprobs", "needs logprobs: true")
        if self.limit(16) == 0:
            refuse(self, "max_tokens", "must be >= 1")
        return self

    @property
    def conversation(self) -> list[dict]:
        """The messages as the chat template takes them (odyssey/chat.py); developer speaks as system."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in self.messages
        ]


class EmbeddingRequest(_Strict):
    model: str | None = None
    input: (
        NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=256)] | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=256)]
    ) = Field(description="text, up to 256 texts, or their token ids")  # fmt: skip
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: None = Field(None, description="not supported: vectors have the model's width")
    user: str | None = None

    @property
    def inputs(self) -> list[str | list[int]]:
        return each(self.input)


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


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # the prompt's first token has none: nothing predicts it
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None
    tool_calls: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[ChatChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32 (encoding_format "base64")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


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
