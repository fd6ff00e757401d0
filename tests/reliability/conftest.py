"""The app as an operator runs it: `odyssey serve` (its own head node on loopback, token auth, the
dashboard, Serve's proxy) with API keys on, two LanguageModel replicas and small queues, so that
overload and a lost replica are reachable in seconds. Every test in this folder calls it over HTTP;
`odyssey serve stop` takes it all down at the end and no process of it may outlive that.

Failpoints are armed in the replicas' environment (odyssey/failpoints.py): scoring the text
"drill: fail" raises inside the model replica, "drill: stall" stalls it for 7 s (the gateway's
timeout here is 5 s), and an engine step while a sequence generates from the prompt "drill: slow"
takes 20 ms more (a long generation that leaves the CPUs to the rest). No other text touches them.

The model's replica count sits in the Serve config's `deployments:` options (what an operator edits
to scale without a new version of the app), here 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from odyssey import cluster
from serve import launch

KEYS = ("rk-0123456789abcdef", "rk-fedcba9876543210")
TIMEOUT_S = 5  # the gateway's per-call timeout in this app
QUEUE = 8  # max_queued_requests of LanguageModel, per caller
ONGOING = 8  # max_ongoing_requests per LanguageModel replica (= its engine's max_num_seqs)
FAILPOINTS = {
    "serve.score": [
        {"action": "error", "text": "drill: fail"},
        {"action": "sleep", "seconds": 7, "text": "drill: stall"},
    ],
    "serve.decode_step": {"action": "sleep", "seconds": 0.02, "text": "drill: slow"},
}


@dataclass
class App:
    url: str
    dashboard: str
    head: cluster.LocalHead
    env: dict
    model: Path
    config: Path
    keys: tuple[str, ...] = KEYS

    def client(self, key: str | None = KEYS[0], timeout: float = 60) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def serve_details(self) -> dict:
        token = {"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"}
        r = httpx.get(f"{self.dashboard}/api/serve/applications/", headers=token, timeout=30)
        r.raise_for_status()
        return r.json()

    def replicas(self, deployment: str = "LanguageModel") -> list[dict]:
        app = self.serve_details()["applications"]["odyssey"]
        return app["deployments"].get(deployment, {}).get("replicas", [])  # none while a new version builds

    def replica_pids(self, deployment: str = "LanguageModel") -> list[int]:
        return sorted(r["pid"] for r in self.replicas(deployment) if r["state"] == "RUNNING")

    def all_replica_pids(self) -> dict[str, list[int]]:
        app = self.serve_details()["applications"]["odyssey"]
        return {name: self.replica_pids(name) for name in app["deployments"]}

    def proxy(self) -> psutil.Process:
        return next(
            psutil.Process(pid)
            for pid in cluster.session_processes(self.head.pid)
            if "ProxyActor" in " ".join(psutil.Process(pid).cmdline())
        )

    def redeploy(self, *overrides: str, deployments: list[dict] | None = None) -> None:
        """Deploy the app's config again with these overrides of its args (a change of args is a new
        version of the app: Serve replaces every replica, draining each), and `deployments:` options
        (replicas, autoscaling: applied to the running replicas), as `serve deploy` of an edited file
        does. Returns once Serve has it; the rollout goes on."""
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        port = int(self.url.rsplit(":", 1)[1])
        config = launch.serve_config(self.config, self.model, port, settings(*overrides))
        if deployments:
            config["applications"][0]["deployments"] = deployments
        ServeSubmissionClient(self.dashboard).deploy_applications(config)

    def scale_model(self, n: int, **model_settings) -> None:
        """What an operator does to scale, or to change the model's settings on the running replicas:
        the `deployments:` options of LanguageModel (its autoscaling and user_config), deployed again."""
        from serve.app import AppArgs

        args = launch.serve_config(self.config, self.model, None, settings())["applications"][0]["args"]
        user_config = {**AppArgs(**args).model_settings(), **model_settings}
        options = {"name": "LanguageModel", "autoscaling_config": replicas(n), "user_config": user_config}
        self.redeploy(deployments=[options])

    def wait_running(self, replicas: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            app = self.serve_details()["applications"]["odyssey"]
            if app["status"] == "RUNNING" and len(self.replica_pids()) == replicas:
                return
            time.sleep(0.5)
        raise AssertionError(f"the app is not RUNNING with {replicas} model replicas after {timeout_s} s")


def replicas(n: int) -> dict:
    """The model's `autoscaling_config` for n replicas."""
    return {"min_replicas": n, "initial_replicas": n, "max_replicas": n, "target_ongoing_requests": ONGOING}


def settings(*overrides: str) -> list[str]:
    """The app's `--set` overrides of serve/config.yaml (later ones win)."""
    return [
        f"gateway.request_timeout_s={TIMEOUT_S}",
        "gateway.max_tokens=1024",
        f"engine.max_num_seqs={ONGOING}",
        "max_documents=20",
        "model.num_cpus=0.5",
        "model.min_replicas=2",
        "model.max_replicas=2",
        f"model.max_ongoing_requests={ONGOING}",
        f"model.max_queued_requests={QUEUE}",
        *overrides,
    ]


@pytest.fixture(scope="package")
def long_model(tmp_path_factory, tokenizer) -> Path:
    """A fresh tiny model that reads 1024 tokens: long generations take seconds on a CPU."""
    import torch

    from odyssey import artifact
    from odyssey.model import Transformer, pad_vocab, tiny

    torch.manual_seed(0)
    model = Transformer(replace(tiny(), vocab_size=pad_vocab(tokenizer.vocab_size), max_seq_len=1024))
    return artifact.save_model(tmp_path_factory.mktemp("models") / "tiny-1k", model, tokenizer)


@pytest.fixture(scope="package")
def app(tmp_path_factory, long_model) -> App:
    home = tmp_path_factory.mktemp("serve-home")
    env = {
        **os.environ,
        "ODYSSEY_HOME": str(home),
        "ODYSSEY_API_KEYS": ",".join(KEYS),
        "ODYSSEY_FAILPOINTS": json.dumps(FAILPOINTS),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # the session cluster's, if it is up
        env.pop(name, None)
    config = yaml.safe_load(launch.CONFIG.read_text())
    config["applications"][0]["deployments"] = [{"name": "LanguageModel", "autoscaling_config": replicas(2)}]
    config_path = home / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config))
    port = cluster.free_port()
    serve = ["serve", "--config", str(config_path), "--model", str(long_model), "--port", str(port)]
    started = subprocess.run(
        [sys.executable, "-m", "workflows", *serve, *[a for s in settings() for a in ("--set", s)]],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    head = cluster.LocalHead.load(cluster.state_file("serve", home))
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        info = json.loads(started.stdout.strip().splitlines()[-1])
        yield App(info["url"], info["dashboard"], head, env, long_model, config_path)
    finally:
        stop = subprocess.run(
            [sys.executable, "-m", "workflows", "serve", "stop"], env=env, capture_output=True, text=True, timeout=300
        )  # fmt: skip
        if head is not None:
            cluster.stop_head(head)  # whatever `serve stop` left (nothing, when it worked)
        assert stop.returncode == 0, stop.stderr[-2000:]
        assert head is None or not cluster.session_processes(head.pid), "the app's processes outlived stop"
