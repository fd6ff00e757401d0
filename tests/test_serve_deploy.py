"""The laptop and cluster workflow end to end: `odyssey serve` starts a local cluster and deploys
serve/config.yaml; `serve deploy` of the same file with another model path swaps the model under
steady load without a failed request; `odyssey serve stop` takes it all down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from odyssey import cluster
from serve import launch

BIN = Path(sys.executable).parent


@pytest.fixture
def odyssey_home(tmp_path, monkeypatch):
    """A state directory of the test's own; whatever cluster `odyssey serve` starts is stopped after."""
    monkeypatch.setenv("ODYSSEY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_DASHBOARD_ADDRESS", raising=False)
    try:
        yield tmp_path / "home"
    finally:
        head = cluster.LocalHead.load(launch.state_file())
        if head is not None:
            cluster.stop_head(head)


def odyssey(*args: str, timeout: float = 600) -> dict:
    run = subprocess.run([str(BIN / "odyssey"), *args], capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


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


@pytest.mark.slow
def test_odyssey_serve_then_redeploy_new_model_under_load(
    odyssey_home, exported_models, corpus_dir, tmp_path
):
    port = cluster.free_port()
    documents = str(corpus_dir / "documents")
    up = odyssey(
        "serve", "--model", str(exported_models[0]), "--port", str(port), "--set", f"documents={documents}"
    )
    assert up["cluster"] == "started" and up["url"] == f"http://127.0.0.1:{port}"
    assert set(up["endpoints"]) >= {
        "/v1/summarize",
        "/v1/moderate",
        "/v1/find",
        "/v1/code",
        "/v1/completions",
    }
    http = httpx.Client(base_url=up["url"], timeout=60)
    first = http.get("/v1/models").json()["data"][0]["root"]
    assert first.startswith("tiny-0@")

    # The operator's path: the checked-in config with a new model path, through `serve deploy`.
    config = yaml.safe_load(launch.CONFIG.read_text())
    args = config["applications"][0]["args"]
    args.update(model_path=str(exported_models[1]), documents=documents)
    config["http_options"]["port"] = port
    new_config = tmp_path / "serve.yaml"
    new_config.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_API_SERVER_ADDRESS", None)  # the session cluster's (tests/conftest.py), not this one's
    with SteadyLoad(up["url"]) as load:
        time.sleep(2)
        deploy = subprocess.run(
            [str(BIN / "serve"), "deploy", str(new_config), "--address", up["dashboard"]],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert deploy.returncode == 0, deploy.stderr[-3000:]
        deadline = time.monotonic() + 180
        while http.get("/v1/models").json()["data"][0]["root"] == first:
            assert time.monotonic() < deadline, "the new model never took over"
            time.sleep(0.5)
        time.sleep(2)  # and keep the load on a little while after the swap
    assert len(load.outcomes) > 20
    assert set(load.outcomes) == {200}, {o: load.outcomes.count(o) for o in set(load.outcomes)}
    assert http.get("/v1/models").json()["data"][0]["root"].startswith("tiny-1@")

    # The passage index follows the model: BM25 alone until re-embedded, then hybrid again.
    deadline = time.monotonic() + 120
    while (found := http.post("/v1/find", json={"query": "license"}).json())["mode"] != "hybrid":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert found["model"].startswith("tiny-1@")

    down = odyssey("serve", "stop")
    assert down["cluster_stopped"]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{up['url']}/healthz", timeout=5)
    assert not launch.state_file().exists()


def test_odyssey_serve_names_the_bad_field(odyssey_home, exported_models):
    run = subprocess.run(
        [str(BIN / "odyssey"), "serve", "--model", str(exported_models[0]), "--set", "gateway.max_tokens=0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "gateway.max_tokens" in run.stderr
    run = subprocess.run(
        [str(BIN / "odyssey"), "serve", "--model", str(odyssey_home / "nothing-here")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "not an exported model" in run.stderr
    assert not launch.state_file().exists()  # refused before any cluster started
