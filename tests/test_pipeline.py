"""The whole pipeline as a newcomer runs it: `odyssey demo` (what `make demo` runs, with fewer steps
and a shorter evaluation) on a local cluster of its own, kept serving; then the operator's workflow on
that cluster: `serve deploy` of the checked-in config with another model (an in-place swap), promotion
(a worse checkpoint refused, a better one rolled out under steady load without a failed request), the
passage index following the model, and `odyssey serve stop` taking it all down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from odyssey import cluster
from serve import launch

BIN = Path(sys.executable).parent
ENDPOINTS = [
    "/healthz",
    "/v1/models",
    "/v1/summarize",
    "/v1/moderate",
    "/v1/find",
    "/v1/code",
    "/v1/completions",
]


class SteadyLoad:
    """Clients in threads calling two endpoints back to back; every outcome recorded."""

    def __init__(self, base: str, clients: int = 2):
        self.base, self.stop, self.outcomes = base, threading.Event(), []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        calls = [
            ("/v1/completions", {"prompt": f"client {i}", "max_tokens": 8}),
            ("/v1/moderate", {"text": "hello"}),
        ]
        with httpx.Client(base_url=self.base, timeout=60) as http:
            n = 0
            while not self.stop.is_set():
                path, body = calls[n % 2]
                try:
                    self.outcomes.append(http.post(path, json=body).status_code)
                except httpx.HTTPError as e:
                    self.outcomes.append(repr(e))
                n += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(120)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    home, out = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("demo") / "demo"
    port = cluster.free_port()
    env = {**os.environ, "ODYSSEY_HOME": str(home)}
    for name in ("RAY_ADDRESS", "RAY_DASHBOARD_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # the session cluster's
        env.pop(name, None)

    def odyssey(*args: str, timeout: float = 600) -> dict:
        done = subprocess.run(
            [BIN / "odyssey", *args], env=env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    settings = [f"out={out}", "steps=40", "eval_limit=8", f"port={port}"]
    run = subprocess.run(
        [BIN / "odyssey", "demo", "--keep-serving", *[a for s in settings for a in ("--set", s)]],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    try:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
        summary = json.loads(run.stdout.strip().splitlines()[-1])
        url = f"http://127.0.0.1:{port}"
        yield SimpleNamespace(run=run, summary=summary, out=out, url=url, port=port, env=env, odyssey=odyssey)
    finally:  # whatever the tests left up (the last one stops it itself)
        subprocess.run([BIN / "odyssey", "serve", "stop"], env=env, capture_output=True, timeout=120)
        assert not (home / launch.state_file().name).exists()


def serving_id(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["root"]


@pytest.mark.slow
def test_the_demo_trains_evaluates_serves_and_answers_every_endpoint(demo):
    s, stdout = demo.summary, demo.run.stdout
    assert s["calls"] == {
        f"{'GET' if p in ('/healthz', '/v1/models') else 'POST'} {p}": 200 for p in ENDPOINTS
    }
    for path in ENDPOINTS:  # request and answer printed for each
        assert f" {path}  ->  200" in stdout
    assert (
        stdout.count("  answer:  {") == len(ENDPOINTS)
        and "curl -s" in stdout
        and "odyssey serve stop" in stdout
    )
    answers = {
        c["request"]: c["answer"] for c in json.loads((demo.out / "summary.json").read_text())["answers"]
    }
    assert answers["POST /v1/find"]["passages"] and "verdict" in answers["POST /v1/moderate"]
    assert answers["POST /v1/completions"]["usage"]["completion_tokens"] > 0
    # Trained on 2 workers with ZeRO-2, the loss went down; the loss curve, model and eval report are there.
    t = s["training"]
    assert t["steps"] == 40 and t["final_loss"] < t["first_loss"] - 1.0
    run_dir = Path(s["run_dir"])
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[0]["world_size"] == 2
    assert (run_dir / "config.yaml").read_text().count("zero_stage: 2") == 1
    assert Path(s["loss_plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in Path(s["model"]).iterdir()} >= {
        "model.safetensors",
        "model.onnx",
        "tokenizer.json",
    }
    report = json.loads(Path(s["eval"]).read_text())
    assert report["tasks"]["find"]["bm25"]["mrr"] > 0 and report["limit"] == 8
    assert "| find | mrr |" in stdout  # the eval table, printed
    assert 1 < s["metrics"]["lm.perplexity"] < 2000  # trained: far below an untrained model's ~vocab size
    assert "eta" in demo.run.stderr  # progress lines
    assert httpx.get(f"{demo.url}/healthz", timeout=30).status_code == 200  # --keep-serving: still up


@pytest.mark.slow
def test_promotion_refuses_a_worse_checkpoint_and_rolls_out_a_better_one_under_load(demo, tmp_path):
    run_dir = Path(demo.summary["run_dir"])
    config = tmp_path / "serve.yaml"
    config.write_text(launch.CONFIG.read_text().replace("port: 8000", f"port: {demo.port}"))
    served = serving_id(demo.url)  # the demo's model: the run's best checkpoint (step 40)
    gate = ["--serve-config", str(config), "--metrics", "lm.perplexity", "--limit", "8"]

    # Step 30 is worse than what serves: refused, with the numbers; nothing deployed, config untouched.
    before = config.read_text()
    refused = demo.odyssey("promote", str(run_dir / "checkpoint_step0000030"), *gate)
    assert refused["promoted"] is False and refused["why"].startswith("worse on lm.perplexity")
    m = refused["metrics"]["lm.perplexity"]
    assert m["candidate"] > m["serving"]
    assert serving_id(demo.url) == served and config.read_text() == before
    assert json.loads((Path(refused["record"]) / "decision.json").read_text())["promoted"] is False

    # The operator swaps in step 30 (the export the refusal made) with `serve deploy` of the config...
    worse = run_dir / "exported" / "checkpoint_step0000030"
    swap = tmp_path / "swap.yaml"
    swap.write_text(config.read_text().replace("/srv/odyssey/model", str(worse)))
    env = {k: v for k, v in demo.env.items() if k != "RAY_API_SERVER_ADDRESS"}
    deploy = subprocess.run(
        [BIN / "serve", "deploy", str(swap), "--address", demo.summary["dashboard"]],
        env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    deadline = time.monotonic() + 120
    while serving_id(demo.url) == served:
        assert time.monotonic() < deadline, "serve deploy never swapped the model"
        time.sleep(0.5)
    # ...then promotes the run under steady load: its best checkpoint beats step 30.
    with SteadyLoad(demo.url) as load:
        time.sleep(1)
        promoted = demo.odyssey("promote", str(run_dir), *gate)
        time.sleep(1)
    assert promoted["promoted"] is True and promoted["checkpoint"].endswith("checkpoint_step0000040")
    assert serving_id(demo.url) == promoted["candidate_id"]
    assert len(load.outcomes) > 10
    assert set(load.outcomes) == {200}, {o: load.outcomes.count(o) for o in set(load.outcomes)}
    best = run_dir / "exported" / "checkpoint_step0000040"
    assert f"model_path: {best}" in config.read_text() and "# an exported model" in config.read_text()

    # The passage index follows the model: BM25 alone until re-embedded, then hybrid again.
    deadline = time.monotonic() + 120
    while (found := httpx.post(f"{demo.url}/v1/find", json={"query": "license"}, timeout=30).json())[
        "mode"
    ] != "hybrid":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert found["model"] == promoted["candidate_id"]

    # `odyssey serve stop` takes the app and the demo's cluster down.
    down = demo.odyssey("serve", "stop")
    assert down["cluster_stopped"]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{demo.url}/healthz", timeout=5)
