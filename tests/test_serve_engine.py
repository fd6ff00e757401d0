"""The engine behind real Serve HTTP (torch backend, a tiny model that reads 1024 tokens): a short
request overtakes a long stream, a client that disconnects stops its generation, health answers during
long generations, and the operators' metrics are scraped from the node's Prometheus endpoint."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import replace

import httpx
import pytest

from odyssey import cluster
from serve import api_keys
from serve.app import AppArgs, build_app
from serve.gateway import GatewaySettings

APP = "engine"


@pytest.fixture(scope="module")
def long_model(tmp_path_factory, tokenizer):
    import torch

    from odyssey import artifact
    from odyssey.model import Transformer, pad_vocab, tiny

    torch.manual_seed(0)
    model = Transformer(replace(tiny(), vocab_size=pad_vocab(tokenizer.vocab_size), max_seq_len=1024))
    return artifact.save_model(tmp_path_factory.mktemp("models") / "tiny-1k", model, tokenizer)


@pytest.fixture(scope="module")
def http(ray_cluster, long_model, corpus_dir, tmp_path_factory):
    from ray import serve

    port = cluster.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    gateway = GatewaySettings(
        api_keys_file=str(tmp_path_factory.mktemp("keys") / "api_keys"), max_tokens=1024
    )
    key, _ = api_keys.ensure(gateway)
    args = AppArgs(
        model_path=str(long_model), documents=str(corpus_dir / "documents"), max_documents=3, gateway=gateway
    )
    try:
        serve.run(build_app(args), name=APP, route_prefix="/")
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers=api_keys.headers(key), timeout=60
        ) as c:
            c.key_id = api_keys.key_id(key)
            yield c
    finally:
        serve.shutdown()


def lm_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("LanguageModel", app_name=APP).stats.remote().result()


def prometheus() -> dict[str, float]:
    """The head node's metrics export: {'name{tags}': value} of this project's series."""
    import ray

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    series = {}
    for line in text.splitlines():
        if line.startswith("ray_odyssey_"):
            name, _, value = line.rpartition(" ")
            series[name] = float(value)
    return series


def settled() -> dict[str, float]:
    """The export once it stops moving: what earlier requests reported has arrived (processes report
    every 0.5 s here: tests/conftest.py)."""
    last = prometheus()
    for _ in range(40):
        time.sleep(0.75)
        now = prometheus()
        if now == last:
            return now
        last = now
    return last


def total(series: dict[str, float], name: str, **tags: str) -> float:
    """Sum of a metric's series whose tags include `tags`."""
    out = 0.0
    for key, value in series.items():
        if re.match(rf"ray_{name}(_total)?{{", key) and all(f'{k}="{v}"' in key for k, v in tags.items()):
            out += value
    return out


class Stream(threading.Thread):
    """A streamed completion read in the background: chunks counted as they arrive."""

    def __init__(self, http: httpx.Client, max_tokens: int, stop_after: int | None = None):
        super().__init__(daemon=True)
        self.http, self.max_tokens, self.stop_after = http, max_tokens, stop_after
        self.chunks, self.finish, self.started = 0, None, threading.Event()

    def run(self) -> None:
        body = {"prompt": "The license", "max_tokens": self.max_tokens, "temperature": 0, "stream": True}
        with self.http.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                self.chunks += 1
                self.started.set()
                self.finish = json.loads(line[6:])["choices"][0]["finish_reason"] or self.finish
                if self.stop_after is not None and self.chunks >= self.stop_after:
                    return  # leaving the block closes the connection: the client is gone


def test_a_short_request_overtakes_a_long_stream(http):
    long = Stream(http, 256)
    long.start()
    assert long.started.wait(30)
    r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    produced = long.chunks
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert produced < 128, f"the 4-token request finished after {produced} of the stream's 256 tokens"
    long.join(60)
    assert long.finish == "length"


def test_a_client_that_disconnects_stops_its_generation(http):
    before = settled()
    stream = Stream(http, 512, stop_after=5)
    stream.start()
    assert stream.started.wait(30)
    stream.join(30)
    gone = time.monotonic()
    while lm_stats()["running"] and time.monotonic() - gone < 1:
        time.sleep(0.02)
    assert lm_stats()["running"] == 0, "the sequence still runs after its client left"
    deadline, after = gone + 5, before
    while time.monotonic() < deadline:
        after = prometheus()
        if total(after, "odyssey_cancelled_requests", task="lm") > total(
            before, "odyssey_cancelled_requests", task="lm"
        ):
            break
        time.sleep(0.1)
    generated = total(after, "odyssey_generated_tokens", task="lm", key_id=http.key_id) - total(
        before, "odyssey_generated_tokens", task="lm", key_id=http.key_id
    )
    assert total(after, "odyssey_running_sequences") == 0
    assert 5 <= generated < 512, generated  # what it did generate, no more
    assert (
        total(after, "odyssey_cancelled_requests", task="lm")
        - total(before, "odyssey_cancelled_requests", task="lm")
        == 1
    )


def test_health_answers_during_long_generations(http):
    streams = [Stream(http, 600) for _ in range(4)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(30)
    worst = 0.0
    for _ in range(10):
        t0 = time.perf_counter()
        assert http.get("/healthz").status_code == 200
        worst = max(worst, time.perf_counter() - t0)
        time.sleep(0.05)
    assert any(s.is_alive() for s in streams), "the generations ended before health was asked"
    assert worst < 1.0, f"/healthz took {worst:.2f} s during long generations"
    for s in streams:
        s.join(120)


def test_metrics_move_as_requests_are_served(http):
    before = settled()
    for i in range(3):
        r = http.post("/v1/completions", json={"prompt": f"Text {i}", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200
    assert http.post("/v1/moderate", json={"text": "a plain sentence"}).status_code == 200
    names = (
        "odyssey_time_to_first_token_seconds_count",
        "odyssey_time_per_output_token_seconds_count",
        "odyssey_request_latency_seconds_count",
        "odyssey_queue_wait_seconds_count",
    )
    deadline, after = time.monotonic() + 30, before
    while time.monotonic() < deadline:
        after = prometheus()
        moderated = total(after, names[2], task="moderate") > total(before, names[2], task="moderate")
        if moderated and all(total(after, n, task="lm") >= total(before, n, task="lm") + 3 for n in names):
            break
        time.sleep(0.2)
    for n in names:
        assert total(after, n, task="lm") - total(before, n, task="lm") >= 3, n
    assert total(after, "odyssey_request_latency_seconds_count", task="moderate") > total(
        before, "odyssey_request_latency_seconds_count", task="moderate"
    )
    prompt = total(after, "odyssey_prompt_tokens", task="lm", key_id=http.key_id)
    assert prompt - total(before, "odyssey_prompt_tokens", task="lm", key_id=http.key_id) >= 3
    assert (
        total(after, "odyssey_generated_tokens", task="lm", key_id=http.key_id)
        - total(before, "odyssey_generated_tokens", task="lm", key_id=http.key_id)
        == 24
    )
    assert "odyssey_kv_cache_usage" in " ".join(after) and "odyssey_waiting_requests" in " ".join(after)
    assert api_keys.key_id("sk") != "sk" and all("sk-" not in k for k in after)  # ids, never keys
