"""`Gateway`: the HTTP front door (FastAPI, the app's ingress).

    POST /v1/summarize  /v1/moderate  /v1/find  /v1/code     one task each
    POST /v1/completions  /v1/chat/completions  /v1/embeddings     OpenAI's shapes (serve/openai_shapes.py);
                                                             "stream": true -> server-sent events
    GET  /v1/models  /healthz  /docs

Its job is the HTTP contract, not the model: validate (422 naming the field, or the line and column
of broken JSON, or the missing `Content-Type: application/json`), refuse oversized input (413, by
Content-Length or by counting a chunked body as it arrives), answer a wrong method with 405 and its
`Allow`, check the API key when auth is on (401), bound every call downstream by a timeout (504), turn
back-pressure from the model's bounded queue into 503 + Retry-After instead of an unbounded wait, and
send a call again when the replica that had it died (SIGKILL, a lost node): the calls have no side
effects, and another replica answers.
Every error body is `{"error": {"type", "message", "param"?, "request_id"}}`; every response carries
`x-request-id` (Serve's proxy sets it, or echoes the client's).

No `from __future__ import annotations` here: Serve pickles the ingress class by value, with only the
globals its methods name, so FastAPI could not resolve the routes' annotations written as strings (it
would take every request body for a missing query parameter: 422).
"""

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import re
import time

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from odyssey import chat
from odyssey.engine import GenerationParams
from serve import api_keys, schemas
from serve import openai_shapes as shapes
from serve.errors import (
    InputTooLong,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    ServeError,
    TimedOut,
    Unauthorized,
    root_cause,
)
from serve.replica_network import bind_internal_server

log = logging.getLogger("ray.serve")
FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+")
JSON_KINDS = {  # a JSON value's kind by the Python type json gives it, for "not an object" errors
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}
RETRIES = 3  # sends of a call again after its replica died, within the call's one timeout


class GatewaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_input_chars: int = Field(20_000, ge=1)  # longer text -> 413
    max_body_bytes: int = Field(1_000_000, ge=1)  # larger request body -> 413, before it is parsed
    max_tokens: int = Field(256, ge=1)  # the cap on any request's max_tokens
    request_timeout_s: float = Field(60.0, gt=0)  # per call downstream (per chunk when streaming) -> 504
    retry_after_s: int = Field(1, ge=0)  # Retry-After of a 503
    auth: bool = True  # require `Authorization: Bearer <key>` on /v1/* (serve/api_keys.py)
    api_keys_env: str = "ODYSSEY_API_KEYS"  # comma-separated keys, read by each replica at start
    api_keys_file: str | None = None  # one key per line; None: $ODYSSEY_HOME/api_keys (~/.odyssey)


def request_id() -> str:
    return serve.context._get_serve_request_context().request_id


def error_response(exc: ServeError, retry_after_s: int, param: str | None = None) -> JSONResponse:
    body = {"type": exc.type, "message": exc.message, "request_id": request_id()}
    if param or exc.param:
        body["param"] = param or exc.param
    headers = {"Retry-After": str(retry_after_s)} if exc.status == 503 else None
    return JSONResponse({"error": body}, status_code=exc.status, headers=headers)


def is_json(content_type: str | None) -> bool:
    """Whether FastAPI parses a body of this type as JSON (application/json, application/*+json). It
    hands any other body, or one sent without a type, to validation as raw bytes, which then fail as
    "not a dictionary": true, but silent about the header that would have fixed it."""
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def json_position(document: object, pos: object) -> str:
    """Where a JSON decode error is, in words: the line and column an editor shows, and the character
    offset that json reports (all a client sees otherwise is a bare number)."""
    if not isinstance(pos, int):
        return "an unknown position"
    if not isinstance(document, str):
        return f"character {pos}"
    line = document.count("\n", 0, pos) + 1
    column = pos - document.rfind("\n", 0, pos)  # rfind is -1 on the first line: column pos + 1
    return f"line {line}, column {column} (character {pos})"


def body_problem(error: dict, document: object, content_type: str | None) -> str | None:
    """What is wrong with the body as a whole (broken JSON, not sent as JSON, missing), with the fix;
    None when the problem is in one field."""
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "not JSON")
        return f"body: invalid JSON at {json_position(document, loc[-1] if loc else None)}: {reason}"
    if loc != ("body",):
        return None
    if error.get("type") == "missing":
        return "body: missing; send a JSON object with the header `Content-Type: application/json`"
    if not is_json(content_type):
        sent = (
            f"this one came as {content_type!r}" if content_type else "this one came without a Content-Type"
        )
        return f"body: must be JSON sent with the header `Content-Type: application/json`; {sent}"
    kind = JSON_KINDS.get(type(error.get("input")), "that")
    return f"body: must be a JSON object of the request's fields, not {kind}"


def invalid_request(errors: list[dict], document: object, content_type: str | None) -> tuple[str, str | None]:
    """A RequestValidationError as one message naming each problem once, and the first field named
    (`param`; "body" when the body as a whole is the problem)."""
    problems, param = [], None
    for error in errors:
        where, problem = "body", body_problem(error, document, content_type)
        if problem is None:
            # Field names and list indexes; not the labels pydantic gives the members of a union
            # ("prompt" may be a string or a list: "function-after[...]", "list[...]").
            loc = [str(p) for p in error.get("loc", ()) if p != "body" and FIELD.fullmatch(str(p))]
            where = ".".join(loc) or None
            problem = f"{where or 'body'}: {error.get('msg')}"
        param = param or where
        if problem not in problems:
            problems.append(problem)
    return "; ".join(problems), param


def http_error(request: Request, exc: HTTPException) -> ServeError:
    """One of Starlette's or FastAPI's own refusals (an unknown route, a wrong method, a body it cannot
    decode, a body over the limit) as the error it means, saying what to do instead."""
    if exc.status_code == 405:
        allowed = [m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip()]
        fix = f"use {' or '.join(allowed)}" if allowed else "GET /docs lists each endpoint's method"
        return MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}; {fix}")
    if exc.status_code == 404:
        return NotFound(f"nothing at {request.url.path}; GET /docs lists the endpoints")
    return {413: InputTooLong}.get(exc.status_code, InvalidRequest)(str(exc.detail))


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway:
    def __init__(
        self,
        lm: DeploymentHandle,
        summarizer: DeploymentHandle,
        moderator: DeploymentHandle,
        finder: DeploymentHandle,
        coder: DeploymentHandle,
        settings: dict | None = None,
    ):
        bind_internal_server()
        self.lm, self.summarizer, self.moderator, self.finder, self.coder = (
            lm,
            summarizer,
            moderator,
            finder,
            coder,
        )
        self.settings = GatewaySettings(**(settings or {}))
        self.key_digests = api_keys.digests(self.settings)
        self.model_id: str | None = None  # learnt from the model's answers; /v1/models asks afresh

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    # --- calls downstream --------------------------------------------------------------------------

    async def call(self, send):
        """`send()` makes a handle call; await it within the timeout, send it again if the replica that
        had it died, and map what comes back to HTTP errors."""
        timeout = self.settings.request_timeout_s
        deadline = time.monotonic() + timeout
        for attempt in range(RETRIES + 1):
            response = send()
            try:
                return await asyncio.wait_for(response, max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                response.cancel()
                raise TimedOut(f"no answer within {timeout} s; retry later") from None
            except Exception as e:
                died = isinstance(root_cause(e), RayActorError)
                if not died or attempt == RETRIES or time.monotonic() + 0.1 * 2**attempt > deadline:
                    raise translate(e) from None
                log.warning(
                    "request %s: its replica died (%s); sending it again", request_id(), root_cause(e)
                )
                await asyncio.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")

    def check_text(self, field: str, text: str) -> None:
        if len(text) > self.settings.max_input_chars:
            raise InputTooLong(
                f"{field} is {len(text)} characters; the limit is {self.settings.max_input_chars}"
            )

    def cap(self, max_tokens: int | None) -> int | None:
        return None if max_tokens is None else min(max_tokens, self.settings.max_tokens)

    def authorize(self, request: Request) -> str:
        """The caller's API key id (serve/api_keys.py `key_id`; "" with auth off), or 401."""
        if not self.settings.auth:
            return ""
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(key.strip().encode()).digest()
        ok = scheme.lower() == "bearer" and any(hmac.compare_digest(digest, d) for d in self.key_digests)
        if not ok:
            raise Unauthorized("missing or invalid API key: send `Authorization: Bearer <key>`")
        return api_keys.key_id(key.strip())

    def model_name(self) -> str:
        return (self.model_id or "odyssey").split("@")[0]

    # --- the routes (ROUTES wires them) -----------------------------------------------------------

    async def summarize(self, body: schemas.SummarizeRequest):
        self.check_text("text", body.text)
        return await self.call(
            lambda: self.summarizer.remote(body.text, self.cap(body.max_tokens), api_keys.CALLER.get())
        )

    async def moderate(self, body: schemas.ModerateRequest):
        self.check_text("text", body.text)
        return await self.call(lambda: self.moderator.remote(body.text, api_keys.CALLER.get()))

    async def find(self, body: schemas.FindRequest):
        self.check_text("query", body.query)
        return await self.call(lambda: self.finder.remote(body.query, body.k, api_keys.CALLER.get()))

    async def code(self, body: schemas.CodeRequest):
        self.check_text("prompt", body.prompt)
        return await self.call(
            lambda: self.coder.remote(body.prompt, self.cap(body.max_tokens), api_keys.CALLER.get())
        )

    async def completions(self, body: schemas.CompletionRequest):
        task = await self.task_for(body.model)
        for i, prompt in enumerate(body.prompts):
            if isinstance(prompt, str):
                self.check_text(f"prompt[{i}]" if isinstance(body.prompt, list) else "prompt", prompt)
        params = self.generation_params(body, body.logprobs)
        answer_id, created, model = f"cmpl-{request_id()}", int(time.time()), self.model_label(task)
        if body.stream:
            if len(body.prompts) > 1:
                raise InvalidRequest("stream one prompt at a time", "prompt")

            def layout(item: dict) -> list[dict]:
                choice = shapes.completion_choice(
                    item["text"], item["index"], item["finish_reason"], item["tokens"]
                )
                return [shapes.completion_body(answer_id, created, model, [choice])]

            stream = await Stream.open(self, task, body.prompts[0], params, body.n, body.echo)
            return stream.response(layout, [], self.usage_chunk(body, answer_id, created, model, chat=False))
        outs = await asyncio.gather(
            *(
                self.call(
                    functools.partial(
                        self.lm.generate.remote, task, p, params, api_keys.CALLER.get(), body.n, body.echo
                    )
                )
                for p in body.prompts
            )
        )
        self.model_id = outs[0]["model"]
        choices = [
            shapes.completion_choice(c["text"], i * body.n + j, c["finish_reason"], c["tokens"])
            for i, out in enumerate(outs)
            for j, c in enumerate(out["choices"])
        ]
        return shapes.completion_body(answer_id, created, model, choices, answer_usage(outs))

    async def chat_completions(self, body: schemas.ChatCompletionRequest):
        task = await self.task_for(body.model)
        messages = body.conversation
        for i, m in enumerate(messages):
            self.check_text(f"messages[{i}].content", m["content"])
        params = self.generation_params(body, (body.top_logprobs or 0) if body.logprobs else None, task)
        answer_id, created, model = f"chatcmpl-{request_id()}", int(time.time()), self.model_label(task)
        if body.stream:

            def layout(item: dict) -> list[dict]:
                out = []
                if item["text"] or item["tokens"]:
                    delta = shapes.chat_delta(item["index"], {"content": item["text"]}, None, item["tokens"])
                    out.append(delta)
                if item["finish_reason"] is not None:
                    out.append(shapes.chat_delta(item["index"], {}, item["finish_reason"]))
                return [shapes.chat_body(answer_id, created, model, [c], None, chunk=True) for c in out]

            opening = [
                shapes.chat_body(
                    answer_id,
                    created,
                    model,
                    [shapes.chat_delta(i, {"role": "assistant", "content": ""})],
                    None,
                    True,
                )
                for i in range(body.n)
            ]
            stream = await Stream.open(self, task, messages, params, body.n, False)
            return stream.response(
                layout, opening, self.usage_chunk(body, answer_id, created, model, chat=True)
            )
        out = await self.call(
            functools.partial(self.lm.generate.remote, task, messages, params, api_keys.CALLER.get(), body.n)
        )
        self.model_id = out["model"]
        choices = [
            shapes.chat_choice(c["text"], i, c["finish_reason"], c["tokens"])
            for i, c in enumerate(out["choices"])
        ]
        return shapes.chat_body(answer_id, created, model, choices, answer_usage([out]))

    async def embeddings(self, body: schemas.EmbeddingRequest):
        await self.task_for(body.model)
        for i, text in enumerate(body.inputs):
            if isinstance(text, str):
                self.check_text(f"input[{i}]" if isinstance(body.input, list) else "input", text)
        out = await self.call(lambda: self.lm.embed.remote(body.inputs, api_keys.CALLER.get()))
        self.model_id = out["model_id"]
        return shapes.embeddings_body(self.model_name(), out["vectors"], body.encoding_format, out["tokens"])

    async def models(self):
        info = await self.call(self.lm.info.remote)
        self.model_id = info["id"]
        ids = [info["name"], *(f"{info['name']}:{task}" for task in chat.CHAT_TASKS)]
        return {"object": "list", "data": [{"id": i, "created": 0, "root": info["id"]} for i in ids]}

    async def healthz(self):
        info = await self.call(self.lm.info.remote)
        return {"status": "ok", "model": info["id"]}

    async def task_for(self, model: str | None) -> str:
        """The task a request's `model` asks for: the served model's name (or name@weights) is the plain
        language model, NAME:TASK a task (GET /v1/models lists them); any other model is a 404."""
        if model is None:
            return "lm"
        name, _, task = model.rpartition(":") if ":" in model else (model, "", "lm")
        if model in (self.model_name(), self.model_id):
            name, task = model, "lm"
        if name not in (self.model_name(), self.model_id):  # the model may have changed: ask afresh
            info = await self.call(self.lm.info.remote)
            self.model_id = info["id"]
        if (name in (self.model_name(), self.model_id) or model == self.model_id) and task in (
            "lm",
            *chat.CHAT_TASKS,
        ):
            return task
        raise NotFound(
            f"model {model!r} is not served here; GET /v1/models lists {self.model_name()!r} and its tasks",
            "model",
        )

    def model_label(self, task: str) -> str:
        return self.model_name() if task == "lm" else f"{self.model_name()}:{task}"

    def generation_params(
        self,
        body: schemas.CompletionRequest | schemas.ChatCompletionRequest,
        logprobs: int | None,
        task: str = "",
    ) -> GenerationParams:
        stops = body.stops + (chat.TURN_STOPS if task == "lm" else ())  # chat: the reply ends with its turn
        try:
            return GenerationParams(
                max_tokens=self.cap(body.limit(16)),
                temperature=body.temperature,
                top_p=body.top_p if body.top_p < 1.0 else None,
                stop=stops,
                seed=body.seed,
                logprobs=logprobs,
            )
        except ValueError as e:
            raise InvalidRequest(str(e)) from None

    def usage_chunk(self, body, answer_id: str, created: int, model: str, chat: bool):
        """With stream_options.include_usage: the last chunk, with no choices and the whole usage."""
        if not body.include_usage:
            return None
        if chat:
            return lambda usage: shapes.chat_body(answer_id, created, model, [], usage, chunk=True)
        return lambda usage: shapes.completion_body(answer_id, created, model, [], usage)


def answer_usage(outs: list[dict]) -> dict:
    """Each prompt counted once (its n choices share it), every choice's tokens."""
    prompt = sum(o["prompt_tokens"] for o in outs)
    return shapes.usage(prompt, sum(c["completion_tokens"] for o in outs for c in o["choices"]))


def translate(exc: BaseException) -> BaseException:
    """A downstream failure as the ServeError it means, or as it is (a 500)."""
    root = root_cause(exc)
    if isinstance(root, ServeError):
        return root
    if isinstance(root, BackPressureError):
        return Overloaded("the model is at capacity: its request queue is full; retry after the given delay")
    if isinstance(root, DeploymentUnavailableError):
        return Overloaded("the model is not available right now (starting or redeploying); retry shortly")
    return exc


class BodyTooLarge(HTTPException):
    """A body without Content-Length that grew past the limit while it was read (FastAPI lets an
    HTTPException out of its body parsing; anything else it would turn into a 400)."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"the request body is over the limit of {max_bytes} bytes")


class BodyLimit:
    """Refuse a body larger than max_bytes before it is parsed: by its Content-Length before anything
    reads it, and a body sent without one (chunked) by counting its bytes as they arrive. A plain ASGI
    middleware: FastAPI's @app.middleware("http") costs a task and a stream per request."""

    def __init__(self, app, max_bytes: int, retry_after_s: int):
        self.app, self.max_bytes, self.retry_after_s = app, max_bytes, retry_after_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            too_long = InputTooLong(f"the request body is {int(length)} bytes; the limit is {self.max_bytes}")
            return await error_response(too_long, self.retry_after_s)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)


# (method, path, Gateway method, response model): /v1/* ask for the API key when auth is on.
ROUTES = [
    ("POST", "/v1/summarize", "summarize", schemas.SummarizeResponse),
    ("POST", "/v1/moderate", "moderate", schemas.ModerateResponse),
    ("POST", "/v1/find", "find", schemas.FindResponse),
    ("POST", "/v1/code", "code", schemas.CodeResponse),
    ("POST", "/v1/completions", "completions", schemas.CompletionResponse),
    ("POST", "/v1/chat/completions", "chat_completions", schemas.ChatCompletionResponse),
    ("POST", "/v1/embeddings", "embeddings", schemas.EmbeddingResponse),
    ("GET", "/v1/models", "models", schemas.ModelList),
    ("GET", "/healthz", "healthz", None),
]
ERRORS = {code: {"model": schemas.ErrorResponse} for code in (400, 401, 404, 413, 422, 503, 504)}


def build_api(gw: Gateway) -> FastAPI:
    app = FastAPI(
        title="Odyssey",
        description="One multitask language model: summarize, moderate, find passages, write code.",
        version="1",
    )
    app.add_middleware(
        BodyLimit, max_bytes=gw.settings.max_body_bytes, retry_after_s=gw.settings.retry_after_s
    )
    add_error_handlers(app, gw.settings.retry_after_s)

    async def authorized(request: Request) -> None:  # async: it runs in the route's own context
        api_keys.CALLER.set(gw.authorize(request))

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])
    for method, path, name, response_model in ROUTES:
        router, route = (v1, path.removeprefix("/v1")) if path.startswith("/v1/") else (app, path)
        extra = {"response_model": response_model, "responses": ERRORS} if response_model else {}
        router.add_api_route(route, getattr(gw, name), methods=[method], name=name, **extra)
    app.include_router(v1)
    return app


def add_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Every error as `{"error": {...}}` with its status: ours, FastAPI's, validation, the unexpected."""

    @app.exception_handler(ServeError)
    async def on_serve_error(request: Request, exc: ServeError):
        return error_response(exc, retry_after_s)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException):
        # The same error body as every other error, and the refusal's own headers (a 405's Allow).
        response = error_response(http_error(request, exc), retry_after_s)
        response.status_code = exc.status_code
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        # 422 for every body that cannot be taken as the request, broken JSON and the wrong content
        # type included: FastAPI's own status for them, and what clients already handle.
        message, param = invalid_request(exc.errors(), exc.body, request.headers.get("content-type"))
        error = {"type": "invalid_request", "message": message, "param": param, "request_id": request_id()}
        return JSONResponse({"error": error}, status_code=422)

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):
        log.exception("request %s failed", request_id())
        message = f"internal error; the replica logs have it under request id {request_id()}"
        error = {"type": "internal_error", "message": message, "request_id": request_id()}
        return JSONResponse({"error": error}, status_code=500)


class Stream:
    """A generation streamed as server-sent events in OpenAI's format, then `data: [DONE]`. The replica's
    first item is awaited before answering, so that a refusal (413, 503) is still a status code."""

    def __init__(self, gw: Gateway, items):
        self.items, self.timeout = items, gw.settings.request_timeout_s

    @classmethod
    async def open(
        cls, gw: Gateway, task: str, prompt, params: GenerationParams, n: int, echo: bool
    ) -> "Stream":
        call = gw.lm.options(stream=True).generate_stream
        stream = cls(gw, call.remote(task, prompt, params, api_keys.CALLER.get(), n, echo))
        stream.first = await stream.next()
        return stream

    async def next(self) -> dict | None:
        try:
            return await asyncio.wait_for(self.items.__anext__(), self.timeout)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            self.items.cancel()
            raise TimedOut(f"no token within {self.timeout} s") from None
        except Exception as e:
            raise translate(e) from None

    def response(self, layout, opening: list[dict], usage_chunk) -> StreamingResponse:
        """layout(item) -> the chunks of one replica item; opening: chunks sent first; usage_chunk(usage)
        -> the last chunk (stream_options.include_usage), or None."""

        async def events():
            item, counted, prompt_tokens = self.first, {}, 0
            try:
                for chunk in opening:
                    yield sse(chunk if usage_chunk is None else {**chunk, "usage": None})
                while item is not None:
                    counted[item["index"]], prompt_tokens = item["completion_tokens"], item["prompt_tokens"]
                    for chunk in layout(item):
                        yield sse(chunk if usage_chunk is None else {**chunk, "usage": None})
                    item = await self.next()
                if usage_chunk is not None:
                    yield sse(usage_chunk(shapes.usage(prompt_tokens, sum(counted.values()))))
                yield sse("[DONE]")
            except ServeError as e:  # mid-stream the status is sent already: report in the stream
                yield sse({"error": {"type": e.type, "message": e.message}})
            finally:
                self.items.cancel()

        headers = {"Cache-Control": "no-cache"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
