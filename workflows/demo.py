"""`odyssey demo` (`make demo`): the whole system on this machine, top to bottom.

    local Ray cluster (loopback, token auth)
      -> corpus + tokenizer + token blocks        (train/mixture.py, on the driver)
      -> pretrain `tiny` on 2 workers, ZeRO-2     (Ray Train + DeepSpeed: train/launch.py)
      -> export the best checkpoint               (safetensors + ONNX: train/export.py)
      -> evaluate it, one Ray task per shard      (odyssey/evaluation)
      -> deploy the Serve app                     (serve/launch.py, serve/config.yaml)
      -> one request to every endpoint, printed

Everything lands under `out` (runs/demo): corpus/, runs/demo/ (the training run, its loss curve
loss.png), model/, eval/. The demo starts a cluster of its own and never joins or stops another (an
`odyssey serve` app keeps answering beside it). The cluster and the app stay up with --keep-serving
(stop them with `odyssey demo stop`); otherwise they are stopped at the end.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from odyssey import cluster
from odyssey.config import load_config
from odyssey.errors import ConfigError, OdysseyError

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    recipe: str = "tiny-cpu"  # the training recipe (train/configs/)
    steps: int = 400  # ~4 minutes on 2 cores
    seq_len: int = 256  # room for a code prompt and its answer
    train: list[str] = field(default_factory=list)  # more `key=value` overrides of the recipe
    eval_limit: int | None = None  # examples per task (None: the whole test split)
    port: int | None = None  # Serve's HTTP port; None: 8000, or a free one when 8000 is taken
    keep_serving: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps={self.steps}: train at least one step")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError(f"eval_limit={self.eval_limit}: use null (all) or >= 1")
        if self.port is not None and not 0 < self.port < 65536:
            raise ConfigError(f"port={self.port}: use a TCP port (1-65535), or null for 8000 or a free one")


DEFAULT_PORT = 8000


def serving_port(port: int | None, default: int = DEFAULT_PORT) -> int:
    """The port the demo's app will listen on, checked before anything starts: `port`, which must be
    free; else `default`, or a free one when something (another app) holds it."""
    if port is not None:
        if not port_free(port):
            raise ConfigError(
                f"port={port} is in use on 127.0.0.1; pick another (--set port=N) or leave it out"
            )
        return port
    if port_free(default):
        return default
    port = cluster.free_port()
    log.info("demo: port %d is in use (another app?); the demo serves on port %d", default, port)
    return port


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def train_config(cfg: DemoConfig):
    from train.config import TrainConfig, recipe_path

    out = Path(cfg.out).resolve()
    checkpoints = max(1, cfg.steps // 4)
    overrides = [
        "name=demo",
        f"storage={out / 'runs'}",
        f"data.corpus={out / 'corpus'}",
        f"data.seq_len={cfg.seq_len}",
        f"global_batch_tokens={16 * cfg.seq_len}",  # 16 sequences a step: 8 per worker
        f"steps={cfg.steps}",
        f"optim.warmup_steps={max(1, cfg.steps // 10)}",
        f"eval_every={checkpoints}",
        f"checkpoint_every={checkpoints}",
        f"log_every={max(1, cfg.steps // 40)}",
        *cfg.train,
    ]
    return load_config(TrainConfig, recipe_path(cfg.recipe), overrides)


def plot_loss(run_dir: Path, path: Path) -> Path:
    """Training and validation loss against step, from the run's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train import events

    rows = {r["step"]: r for r in events.read_metrics(run_dir)}  # a step trained twice: its last record
    steps = sorted(rows)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [rows[s]["loss"] for s in steps], label="train loss")
    val = [s for s in steps if "val_loss" in rows[s]]
    ax.plot(val, [rows[s]["val_loss"] for s in val], "o-", label="validation loss")
    ax.set(
        xlabel="step", ylabel="cross-entropy (nats/token)", title=f"{run_dir.name}: tiny, 2 workers, ZeRO-2"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def requests_from(corpus: Path) -> list[tuple[str, str, dict | None]]:
    """One request per endpoint, built from held-out examples: (method, path, body)."""
    from odyssey.data.corpus import read_split

    def first(task: str) -> dict:
        return read_split(corpus, task, "test").slice(0, 1).to_pylist()[0]

    return [
        ("GET", "/healthz", None),
        ("GET", "/v1/models", None),
        ("POST", "/v1/summarize", {"text": first("summarize")["input"]}),
        ("POST", "/v1/moderate", {"text": first("moderate")["input"]}),
        ("POST", "/v1/find", {"query": first("find")["input"], "k": 3}),
        ("POST", "/v1/code", {"prompt": first("code")["input"]}),
        (
            "POST",
            "/v1/completions",
            {"prompt": first("lm")["target"][:120], "max_tokens": 24, "temperature": 0},
        ),
    ]


def call_every_endpoint(base: str, corpus: Path, headers: dict) -> list[dict]:
    calls = []
    with httpx.Client(base_url=base, headers=headers, timeout=120) as http:
        for method, path, body in requests_from(corpus):
            r = http.request(method, path, json=body)
            calls.append(
                {"request": f"{method} {path}", "body": body, "status": r.status_code, "answer": r.json()}
            )
    return calls


def show(calls: list[dict], base: str) -> None:
    def short(value, n: int = 300) -> str:
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= n else text[: n - 3] + "..."

    for c in calls:
        print(f"\n{c['request']}  ->  {c['status']}")
        if c["body"] is not None:
            print(f"  request: {short(c['body'])}")
        print(f"  answer:  {short(c['answer'], 600)}")
    json_and_key = '-H "Content-Type: application/json" -H "Authorization: Bearer $KEY"'
    print(
        f"\nThe endpoints (OpenAPI docs: {base}/docs), with the API key `odyssey serve key` prints:\n"
        "  KEY=$(odyssey serve key)\n"
        f'  curl -s {base}/v1/summarize {json_and_key} -d \'{{"text": "..."}}\'\n'
        f'  curl -s {base}/v1/moderate  {json_and_key} -d \'{{"text": "..."}}\'\n'
        f'  curl -s {base}/v1/find      {json_and_key} -d \'{{"query": "...", "k": 5}}\'\n'
        f'  curl -s {base}/v1/code      {json_and_key} -d \'{{"prompt": "..."}}\'\n'
        f'  curl -s {base}/v1/completions {json_and_key} -d \'{{"prompt": "...", "max_tokens": 32}}\''
    )


def run(cfg: DemoConfig) -> dict:
    from odyssey.evaluation.runner import evaluate
    from serve import api_keys, launch
    from train import checkpoint
    from train.export import export
    from train.launch import run as train

    t0 = time.perf_counter()
    out = Path(cfg.out).resolve()
    train_cfg = train_config(cfg)  # a bad override fails here, before a cluster starts
    port = serving_port(cfg.port)
    if (previous := cluster.recorded("demo")) is not None:
        raise OdysseyError(
            f"the last demo of this checkout is still serving (dashboard {previous.dashboard_url}); "
            "stop it with `odyssey demo stop`"
        )
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}

    def stage(name: str, since: float) -> float:
        now = time.perf_counter()
        stages[name] = round(now - since, 1)
        log.info("demo: %s done in %.1f s", name, now - since)
        return now

    # 1. A cluster of its own, on loopback with token auth; it outlives this process when kept serving.
    # Its logical CPUs: 2 training workers + 1 for Ray Data's readers at least (each worker sets its own
    # thread count, so the cores are not oversubscribed).
    print("starting the demo's own Ray cluster (loopback, token auth)...", file=sys.stderr)
    head = cluster.start_head(num_cpus=max(os.cpu_count() or 1, 4))
    head.save(cluster.state_file("demo"))
    try:
        cluster.connect(head.gcs_address)
        t = stage("cluster", t0)
        # 2-3. Data on the driver (missing pieces only), then pretraining on 2 workers with ZeRO-2.
        summary = train(train_cfg, head.gcs_address)
        run_dir = Path(summary["run_dir"])
        plot = plot_loss(run_dir, run_dir / "loss.png")
        t = stage("train", t)
        # 4. The best checkpoint by validation loss, in the serving format (+ ONNX for ONNX Runtime).
        model = export(checkpoint.find(run_dir, best=True), out / "model", overwrite=True, onnx=True)
        t = stage("export", t)
        # 5. Held-out evaluation, in Ray tasks.
        report = evaluate(model, train_cfg.data.corpus, limit=cfg.eval_limit, out=out / "eval")
        t = stage("eval", t)
        print("\n" + (out / "eval" / "eval.md").read_text(encoding="utf-8"), end="")
        # 6. The Serve app, then one real request to every endpoint.
        served = launch.deploy(model, port, address=head.dashboard_url)
        t = stage("serve", t)
        key = api_keys.headers(launch.key())  # deploy wrote one on a machine with none, and said so
        calls = call_every_endpoint(served["url"], Path(train_cfg.data.corpus), key)
        stage("requests", t)
        show(calls, served["url"])
    except BaseException:
        cluster.disconnect()
        stop(head)
        raise
    cluster.disconnect()  # no Ray log line may follow the summary on stdout
    if not cfg.keep_serving:
        stop(head)
    print(next_steps(cfg.keep_serving, served["url"], head.dashboard_url, model))
    found = {"run_dir": run_dir, "loss_plot": plot, "model": model, "report": report, "training": summary}
    result = outcome(cfg, out, found, served["url"], head.dashboard_url, calls)
    result.update(stages_s=stages, seconds=round(time.perf_counter() - t0, 1))
    (out / "summary.json").write_text(json.dumps({**result, "answers": calls}, indent=2) + "\n")
    return result


def outcome(cfg: DemoConfig, out: Path, found: dict, url: str, dashboard: str, calls: list[dict]) -> dict:
    """The demo's JSON summary: where everything landed, what training and evaluation measured, what
    each endpoint answered and how to go on."""
    model, summary = found["model"], found["training"]
    return {
        "out": str(out),
        "run_dir": str(found["run_dir"]),
        "loss_plot": str(found["loss_plot"]),
        "model": str(model),
        "eval": str(out / "eval" / "eval.json"),
        "metrics": found["report"]["metrics"],
        "training": {
            k: summary[k] for k in ("steps", "tokens", "first_loss", "final_loss", "val_loss", "tokens_per_s")
        },
        "serving": cfg.keep_serving,
        "url": url,
        "dashboard": dashboard,
        "stop": "odyssey demo stop" if cfg.keep_serving else None,
        "serve_again": f"odyssey serve --model {relative(model)}",
        "calls": {c["request"]: c["status"] for c in calls},
    }


def next_steps(keep_serving: bool, url: str, dashboard: str, model: Path) -> str:
    if keep_serving:
        return (
            f"\nStill serving at {url} (dashboard {dashboard}; `odyssey cluster env demo` points Ray's CLI "
            "at it).\nStop the app and its cluster with: odyssey demo stop"
        )
    return (
        "\nStopped the app and the demo's cluster. Serve the model again with:\n"
        f"  odyssey serve --model {relative(model)}      # then the curl lines above; `odyssey serve stop` ends it\n"
        "or run `odyssey demo --keep-serving` to leave the demo's app up."
    )


def relative(path: Path) -> str:
    """A path as a user typing in this directory would write it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def stop(head: cluster.LocalHead | None = None) -> dict:
    """Stop the demo's cluster (its app with it): `head`, or the one this checkout's last demo kept up.
    Nothing else: a cluster that another command or checkout started is never touched."""
    head = cluster.stop_recorded(
        "demo", "no demo of this checkout is serving: `odyssey demo --keep-serving` leaves one up", head
    )
    return {"stopped": "demo", "dashboard": head.dashboard_url}
