"""The application graph, built by a typed builder:

                     ┌─> Summarizer ─┐
    HTTP -> Gateway ─┼─> Moderator  ─┼─> LanguageModel  (one model, one engine: every task's requests
                     ├─> Finder     ─┤                    decode together, joining between steps)
                     ├─> Coder      ─┘
                     └───────────────────> (completions, models, health)

    serve run serve.app:build_app model_path=runs/demo/model      # a laptop, for a quick look
    serve deploy serve/config.yaml                                 # a cluster (or `odyssey serve`)

`AppArgs` is what `args:` in serve/config.yaml (or key=value on `serve run`) may hold; Serve validates
it before anything starts, so a misspelt field fails the deploy with its name.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, BackpressureConfig

from odyssey.answers import AnswerSettings
from odyssey.errors import ConfigError
from serve.finder import Finder
from serve.gateway import Gateway, GatewaySettings
from serve.language_model import EngineSettings, LanguageModel, LanguageModelSettings
from serve.tasks import Coder, Moderator, Summarizer


class ModelArgs(BaseModel):
    """The LanguageModel deployment: its replicas, their resources and their queues."""

    model_config = ConfigDict(extra="forbid")

    device: Literal["cpu", "cuda"] = "cpu"
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16.0, gt=0)  # per replica, what autoscaling aims at
    max_ongoing_requests: int = Field(64, ge=1)  # per replica; at least engine.max_num_seqs to fill its batch
    max_queued_requests: int = Field(256, ge=1)  # per caller, beyond which requests get 503 + Retry-After

    @model_validator(mode="after")
    def _check(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas={self.max_replicas} < min_replicas={self.min_replicas}")
        if self.device == "cuda" and self.num_gpus <= 0:
            raise ValueError("device cuda needs num_gpus > 0 (a fraction shares one GPU between replicas)")
        return self


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_path: str  # an exported model (model.safetensors + config.json + tokenizer.json), or a Hugging Face Llama dir
    model_name: str | None = None  # the name /v1/models shows; default: the model directory's name
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    backend: Literal["torch", "onnxruntime"] = "torch"  # onnxruntime: `odyssey export --format onnx`
    engine: EngineSettings = Field(default_factory=EngineSettings)  # continuous batching: odyssey/engine.py
    model: ModelArgs = Field(default_factory=ModelArgs)
    documents: str | None = None  # Parquet (doc_id, text, title?) for /v1/find; default: local license texts
    max_documents: int | None = Field(100, ge=1)
    # How each task's answer is decided (odyssey/answers.py): the very object `odyssey eval` answers with.
    answers: AnswerSettings = Field(default_factory=AnswerSettings)
    # A replica being stopped (scale-down, a new version of the app) takes no new requests and is given
    # this long to finish the ones it has, long streams included, before it is killed.
    drain_timeout_s: float = Field(120.0, gt=0)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)

    @model_validator(mode="after")
    def _check(self):
        if self.backend == "onnxruntime" and (self.model.device != "cpu" or self.dtype != "float32"):
            raise ValueError(
                f"backend onnxruntime runs float32 on CPU; got device={self.model.device}, "
                f"dtype={self.dtype}: use backend torch on GPUs"
            )
        if self.model.max_ongoing_requests < self.engine.max_num_seqs:
            raise ValueError(
                f"model.max_ongoing_requests={self.model.max_ongoing_requests} < engine.max_num_seqs="
                f"{self.engine.max_num_seqs}: a replica could never fill its batch; raise the first or "
                "lower the second"
            )
        try:
            self.engine.config()
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return self

    def model_settings(self) -> dict:
        return LanguageModelSettings(
            model_path=self.model_path,
            dtype=self.dtype,
            backend=self.backend,
            engine=self.engine,
        ).model_dump()


def build_app(args: AppArgs) -> Application:
    # Serve validates `args` into AppArgs from this signature's annotation (so no postponed annotations
    # in this module); a plain dict from a direct call is validated here the same way.
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    m = args.model
    lm = LanguageModel.options(
        user_config=args.model_settings(),  # applied to running replicas when changed alone (language_model.py)
        ray_actor_options={"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
        autoscaling_config=AutoscalingConfig(
            min_replicas=m.min_replicas,
            initial_replicas=max(1, m.min_replicas),
            max_replicas=m.max_replicas,
            target_ongoing_requests=m.target_ongoing_requests,
        ),
        max_ongoing_requests=m.max_ongoing_requests,
        max_queued_requests=m.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=args.gateway.retry_after_s),
        health_check_period_s=10,
        graceful_shutdown_timeout_s=args.drain_timeout_s,
    ).bind(device=m.device, model_name=args.model_name, threads=max(1, int(m.num_cpus)))
    light = {
        "ray_actor_options": {"num_cpus": 0},
        "max_ongoing_requests": 256,
        "graceful_shutdown_timeout_s": args.drain_timeout_s,
    }
    summarizer = Summarizer.options(**light).bind(lm, args.answers)
    moderator = Moderator.options(**light).bind(lm, args.answers)
    finder = Finder.options(**light).bind(lm, args.answers, args.documents, args.max_documents)
    coder = Coder.options(**light).bind(lm, args.answers)
    return Gateway.options(
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=512,
        max_queued_requests=1024,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=args.gateway.retry_after_s),
        graceful_shutdown_timeout_s=args.drain_timeout_s,  # a stream lives here as long as in the model
    ).bind(lm, summarizer, moderator, finder, coder, args.gateway.model_dump())
