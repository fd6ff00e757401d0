"""The whole pipeline as a newcomer runs it: `odyssey demo` (what `make demo` runs, with fewer steps
and a shorter evaluation) while another `odyssey serve` app of the same checkout is up: the demo trains
and serves on a cluster of its own, kept serving, and leaves the other app answering. Then the
operator's workflow on the demo's cluster: `serve deploy` of the checked-in config with another model
(an in-place swap), promotion (a worse checkpoint refused, a better one rolled out under steady load
without a failed request), the passage index following the model, and `odyssey demo stop` taking the
demo down and nothing else. Another checkout sees neither cluster."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from odyssey import cluster, logs
from odyssey.data.corpus import read_manifest
from serve import launch

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
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

    def __init__(self, base: str, auth: dict, clients: int = 2):
        self.base, self.auth, self.stop, self.outcomes = base, auth, threading.Event(), []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        calls = [
            ("/v1/completions", {"prompt": f"client {i}", "max_tokens": 8}),
            ("/v1/moderate", {"text": "hello"}),
        ]
        with httpx.Client(base_url=self.base, headers=self.auth, timeout=60) as http:
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
def home(tmp_path_factory):
    """The user's ODYSSEY_HOME and environment (the session cluster's addresses left out)."""
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "ODYSSEY_HOME": str(home)}
    for name in ("RAY_ADDRESS", "RAY_DASHBOARD_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # the session cluster's
        env.pop(name, None)
    return SimpleNamespace(path=home, env=env, auth=lambda: {"Authorization": f"Bearer {key_in(home)}"})


def key_in(home: Path) -> str:
    """The API key the first `odyssey serve` of this ODYSSEY_HOME wrote (API keys are on as shipped)."""
    return (home / "api_keys").read_text().strip()


def odyssey(env: dict, *args: str, timeout: float = 600, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([BIN / "odyssey", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def last_json(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def other_app(home, exported_models):
    """An `odyssey serve` app of this checkout, up before the demo starts (its own local cluster)."""
    port = cluster.free_port()
    started = odyssey(home.env, "serve", "--model", str(exported_models[0]), "--port", str(port), ok=False)
    state = cluster.state_file("serve", home.path)
    head = cluster.LocalHead.load(state)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        yield SimpleNamespace(
            url=last_json(started)["url"], head=head, state=state, record=state.read_text(), run=started
        )
    finally:
        stopped = odyssey(home.env, "serve", "stop", ok=False)
        if head is not None:
            cluster.stop_head(head)  # whatever `serve stop` left (nothing, when it worked)
        assert stopped.returncode == 0, stopped.stderr[-2000:]
        assert head is None or not cluster.session_processes(head.pid), "the app's processes outlived stop"


@pytest.fixture(scope="module")
def demo(home, other_app, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    port = cluster.free_port()
    settings = [f"out={out}", "steps=40", "eval_limit=8", f"port={port}"]
    # As on macOS, Fedora or Alpine: no Debian package index or copyright files. The demo's corpus, its
    # model and the Finder's default index come from what every Python installation has.
    no_debian = tmp_path_factory.mktemp("no-debian")
    run = odyssey(
        {**home.env, "ODYSSEY_DEBIAN_ROOT": str(no_debian)},
        "demo",
        "--keep-serving",
        *[a for s in settings for a in ("--set", s)],
        timeout=900,
        ok=False,
    )
    state = cluster.state_file("demo", home.path)
    head = cluster.LocalHead.load(state)
    try:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
        summary = last_json(run)
        url = f"http://127.0.0.1:{port}"
        yield SimpleNamespace(
            run=run, summary=summary, out=out, url=url, port=port, env=home.env, head=head,
            odyssey=lambda *args: last_json(odyssey(home.env, *args)),
        )  # fmt: skip
    finally:  # whatever the tests left up (the last one stops it itself)
        odyssey(home.env, "demo", "stop", ok=False)
        if head is not None:
            cluster.stop_head(head)
        assert not state.exists()


def serving_id(url: str, auth: dict) -> str:
    # A rollout starts every replica anew on 2 shared cores: the proxy may take a while to answer.
    return httpx.get(f"{url}/v1/models", headers=auth, timeout=120).json()["data"][0]["root"]


def test_the_first_serve_on_a_machine_writes_an_api_key_and_says_which(other_app, home):
    """API keys are on as shipped: the first `odyssey serve` of a machine (an ODYSSEY_HOME) with no key
    writes one, owner-only, and tells the operator; `odyssey serve key` prints it; /v1/* wants it."""
    key = key_in(home.path)
    assert f"wrote a new key to {home.path / 'api_keys'} (owner-only)" in other_app.run.stderr
    assert key in other_app.run.stderr and key not in other_app.run.stdout  # the summary holds no secret
    assert (home.path / "api_keys").stat().st_mode & 0o777 == 0o600
    assert last_json(other_app.run)["auth"] == "Authorization: Bearer $(odyssey serve key)"
    assert odyssey(home.env, "serve", "key").stdout.strip() == key
    assert httpx.get(f"{other_app.url}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{other_app.url}/v1/models", headers=home.auth(), timeout=30).status_code == 200


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
        and "odyssey demo stop" in stdout
    )
    answers = {
        c["request"]: c["answer"] for c in json.loads((demo.out / "summary.json").read_text())["answers"]
    }
    assert answers["POST /v1/find"]["passages"] and "verdict" in answers["POST /v1/moderate"]
    # Built with the Debian sources hidden: every task from the portable ones, the index too.
    sources = {s["name"]: s for s in read_manifest(demo.out / "corpus")["sources"]}
    assert sources["debian"]["examples"] == 0 and sources["python_packages"]["examples"] > 0
    assert not any("common-licenses" in p["doc_id"] for p in answers["POST /v1/find"]["passages"])
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
    assert "| find | mrr (all) |" in stdout  # the eval table, printed
    assert 1 < s["metrics"]["lm.perplexity"] < 2000  # trained: far below an untrained model's ~vocab size
    assert "eta" in demo.run.stderr  # progress lines
    assert httpx.get(f"{demo.url}/healthz", timeout=30).status_code == 200  # --keep-serving: still up
    assert s["serving"] and s["stop"] == "odyssey demo stop"
    assert s["serve_again"].startswith("odyssey serve --model")
    assert_quiet(demo.run.stdout + demo.run.stderr)


def assert_quiet(log: str) -> None:
    """A successful run's log: no Python dict dumps, no error-level line, no line twice."""
    lines = [line for line in log.splitlines() if line.strip()]
    assert not [line for line in lines if "TrainingReport(" in line or "metrics={" in line]
    errors = [i for i, line in enumerate(lines) if logs.ERROR_LINE.search(line)]
    assert not errors, "\n".join(lines[errors[0] : errors[0] + 40]) if errors else ""
    twice = [line for line, n in collections.Counter(lines).items() if n > 1]
    assert not twice, twice


@pytest.mark.slow
def test_the_demo_runs_on_a_cluster_of_its_own_and_leaves_another_app_answering(demo, other_app):
    # The other app's cluster is untouched: its record, its head, its app, its answers.
    assert other_app.state.read_text() == other_app.record and other_app.head.alive()
    assert httpx.get(f"{other_app.url}/healthz", timeout=30).status_code == 200
    assert "Connecting to existing Ray cluster" not in demo.run.stderr
    # The demo trained and served on a head it started: another dashboard, another session.
    assert demo.head is not None and demo.head.pid != other_app.head.pid
    assert demo.summary["dashboard"] == demo.head.dashboard_url != other_app.head.dashboard_url
    start = json.loads((Path(demo.summary["run_dir"]) / "events.jsonl").read_text().splitlines()[0])
    token = {"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"}
    nodes = httpx.get(f"{other_app.head.dashboard_url}/api/v0/nodes", headers=token, timeout=30).json()
    other_nodes = {n["node_id"] for n in nodes["data"]["result"]["result"]}
    assert len(start["nodes"]) == 2 and other_nodes and not other_nodes & set(start["nodes"])


def test_another_checkout_neither_sees_nor_stops_these_clusters(demo, other_app, home, tmp_path):
    """A second clone of the project (its sources, run with its own `python -m workflows`) on the same
    machine, same user: `odyssey serve stop` there finds nothing of its own to stop and says where the
    other checkout's cluster is; both apps here keep answering."""
    clone = tmp_path / "clone"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)

    def there(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "workflows", *args]
        return subprocess.run(command, cwd=clone, env=home.env, capture_output=True, text=True, timeout=120)

    probe = subprocess.run(
        [sys.executable, "-c", "import odyssey; print(odyssey.__file__)"],
        cwd=clone,
        capture_output=True,
        text=True,
    )
    assert probe.stdout.startswith(str(clone)), probe.stdout  # the clone's own code runs there
    stop = there("serve", "stop")
    assert stop.returncode == 2 and "started none in this checkout" in stop.stderr
    assert f"{REPO} (dashboard {other_app.head.dashboard_url})" in stop.stderr  # where the other one is
    assert there("demo", "stop").returncode == 2
    env = there("cluster", "env", "serve")
    assert env.returncode == 2 and "no serve cluster of this checkout is up" in env.stderr
    for url in (other_app.url, demo.url):
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200


@pytest.mark.slow
def test_promotion_refuses_a_worse_checkpoint_and_rolls_out_a_better_one_under_load(
    demo, other_app, home, tmp_path
):
    auth = home.auth()
    run_dir = Path(demo.summary["run_dir"])
    config = tmp_path / "serve.yaml"
    config.write_text(launch.CONFIG.read_text().replace("port: 8000", f"port: {demo.port}"))
    served = serving_id(demo.url, auth)  # the demo's model: the run's best checkpoint (step 40)
    gate = ["--serve-config", str(config), "--metrics", "lm.perplexity", "--limit", "8"]
    gate += [
        "--address",
        demo.summary["dashboard"],
    ]  # the demo's cluster, not this checkout's `odyssey serve`

    # Step 30 is worse than what serves: refused, with the numbers; nothing deployed, config untouched.
    before = config.read_text()
    refused = demo.odyssey("promote", str(run_dir / "checkpoint_step0000030"), *gate)
    assert refused["promoted"] is False and refused["why"].startswith("worse on lm.perplexity")
    m = refused["metrics"]["lm.perplexity"]
    assert m["candidate"] > m["serving"]
    assert serving_id(demo.url, auth) == served and config.read_text() == before
    assert json.loads((Path(refused["record"]) / "decision.json").read_text())["promoted"] is False
    # Decided on the validation split: the test split only reports.
    assert refused["split"] == "val"
    assert json.loads((Path(refused["record"]) / "candidate" / "eval.json").read_text())["split"] == "val"

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
    while serving_id(demo.url, auth) == served:
        assert time.monotonic() < deadline, "serve deploy never swapped the model"
        time.sleep(0.5)
    # ...then promotes the run under steady load: its best checkpoint beats step 30.
    with SteadyLoad(demo.url, auth) as load:
        time.sleep(1)
        promoted = demo.odyssey("promote", str(run_dir), *gate)
        time.sleep(1)
    assert promoted["promoted"] is True and promoted["checkpoint"].endswith("checkpoint_step0000040")
    assert serving_id(demo.url, auth) == promoted["candidate_id"]
    assert len(load.outcomes) > 10
    assert set(load.outcomes) == {200}, {o: load.outcomes.count(o) for o in set(load.outcomes)}
    best = run_dir / "exported" / "checkpoint_step0000040"
    assert f"model_path: {best}" in config.read_text() and "# an exported model" in config.read_text()

    # The passage index follows the model: BM25 alone until re-embedded, then hybrid again.
    deadline = time.monotonic() + 120
    while (
        found := httpx.post(f"{demo.url}/v1/find", json={"query": "license"}, headers=auth, timeout=30).json()
    )["mode"] != "hybrid":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert found["model"] == promoted["candidate_id"]

    # `odyssey demo stop` takes the demo's app and cluster down, and nothing else.
    other = serving_id(other_app.url, auth)
    down = demo.odyssey("demo", "stop")
    assert down["dashboard"] == demo.summary["dashboard"]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{demo.url}/healthz", timeout=5)
    assert not cluster.session_processes(demo.head.pid), "the demo's processes outlived `odyssey demo stop`"
    assert serving_id(other_app.url, auth) == other and other_app.head.alive()
