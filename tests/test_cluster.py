"""A real autoscaling cluster on this machine (`odyssey cluster local-up`, cluster/fake-gpu.yaml with a
head that holds one fake GPU and no room for GPU worker nodes yet): an elastic training job (`workers:
[1, 2]`) submitted with `ray job submit` starts on the one GPU there is; then the cap on GPU nodes is
raised (what `ray up` with a new `max_workers`, or a cloud with capacity again, does), the autoscaler
adds a GPU node for the second worker, the run grows onto it from its latest checkpoint, and the node
leaves once idle. The head our tooling starts listens on loopback only and refuses clients without
the token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from odyssey import atomic, cluster
from train import checkpoint
from workflows import cluster_files

REPO = Path(__file__).resolve().parent.parent


def odyssey_cluster(action: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "workflows", "cluster", action, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):
    """`odyssey cluster local-up` through its CLI, `local-down` at teardown (every node it added too).
    The config is cluster/fake-gpu.yaml with one fake GPU (and a CPU for data) on the head, as on a
    workstation with one GPU, and no GPU worker nodes allowed until a test raises the cap."""
    home = tmp_path_factory.mktemp("odyssey-home")
    config = yaml.safe_load((cluster_files.CLUSTER_DIR / "fake-gpu.yaml").read_text())
    config["available_node_types"]["ray.head.default"]["resources"] = {"CPU": 2, "GPU": 1}
    config["available_node_types"]["ray.worker.gpu"]["max_workers"] = 0
    config_path = home / "one-gpu-head.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "ODYSSEY_HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # the session cluster's: not this head's
        env.pop(name, None)
    up = odyssey_cluster("local-up", env, "--config", str(config_path))
    assert up.returncode == 0, up.stderr[-3000:]
    info = json.loads(up.stdout.strip().splitlines()[-1])
    head = cluster.LocalHead.load(cluster.state_file("local", home))
    try:
        yield info, head, env
    finally:
        down = odyssey_cluster("local-down", env)
        assert down.returncode == 0, down.stderr[-2000:]
        assert not cluster.session_processes(head.pid), "processes of the cluster outlived local-down"


def events_of(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.endswith("}")]  # a line being written is skipped


def auth() -> dict:
    return {"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"}


def alive_nodes(dashboard: str) -> list[dict]:
    r = httpx.get(f"{dashboard}/api/v0/nodes?limit=100&detail=true", headers=auth(), timeout=10)
    r.raise_for_status()
    return [n for n in r.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]


def gpu_workers(nodes: list[dict]) -> list[str]:
    return sorted(
        n["node_id"] for n in nodes if not n["is_head_node"] and n["resources_total"].get("GPU", 0) > 0
    )


def test_head_listens_on_loopback_only_and_refuses_clients_without_the_token(
    fake_cluster, tmp_path, submit_without_the_token
):
    _, head, env = fake_cluster
    sockets = cluster.listeners(cluster.session_processes(head.pid))
    ports = {port for _, port, _ in sockets}
    assert (
        int(head.gcs_address.rsplit(":", 1)[1]) in ports
        and int(head.dashboard_url.rsplit(":", 1)[1]) in ports
    )
    exposed = [s for s in sockets if s[0] not in cluster.LOOPBACK]
    assert not exposed, f"listening beyond loopback: {exposed}"
    again = odyssey_cluster("local-up", env)  # one local cluster at a time, and it says where it is
    assert again.returncode == 2 and f"already up (dashboard {head.dashboard_url})" in again.stderr

    # HTTP (jobs API, dashboard): no token or a wrong one is refused; the right one is let in.
    jobs = f"{head.dashboard_url}/api/jobs/"
    assert httpx.get(jobs, timeout=10).status_code == 401
    assert httpx.get(jobs, headers={"Authorization": "Bearer not-the-token"}, timeout=10).status_code in (
        401,
        403,
    )
    assert httpx.get(jobs, headers=auth(), timeout=10).status_code == 200

    # The CLI and a driver over gRPC, from a home without the token: refused; with it: in.
    assert submit_without_the_token(head.dashboard_url, env).returncode != 0
    assert submit_without_the_token(head.dashboard_url, env, token="not-the-token").returncode != 0
    assert httpx.get(jobs, headers=auth(), timeout=10).json() == []  # no job got in
    tokenless = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    tokenless.update(HOME=str(tmp_path), RAY_AUTH_MODE="token", **{cluster.SINGLE_MACHINE: "0"})
    driver = [sys.executable, "-c", f"import ray; ray.init(address='{head.gcs_address}'); print('joined')"]
    no_token = subprocess.run(driver, env=tokenless, capture_output=True, text=True, timeout=120)
    assert no_token.returncode != 0 and "joined" not in no_token.stdout
    with_token = subprocess.run(
        driver,
        env={**tokenless, "RAY_AUTH_TOKEN": os.environ["RAY_AUTH_TOKEN"]},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "joined" in with_token.stdout, with_token.stderr[-2000:]


@pytest.mark.slow
def test_an_elastic_gpu_job_starts_on_one_worker_and_grows_onto_the_node_the_autoscaler_adds(
    fake_cluster, corpus_dir, blocks_dir, tmp_path, submit_job
):
    info, head, env = fake_cluster
    dashboard = info["dashboard"]
    idle_s = (
        60 * yaml.safe_load((cluster_files.CLUSTER_DIR / "fake-gpu.yaml").read_text())["idle_timeout_minutes"]
    )
    deadline = time.monotonic() + 60
    while not alive_nodes(dashboard):  # the head registers a moment after its dashboard answers
        assert time.monotonic() < deadline, "the head never showed up in the node list"
        time.sleep(1)
    assert gpu_workers(alive_nodes(dashboard)) == []  # GPU worker nodes start at 0
    assert httpx.get(f"{dashboard}/api/jobs/", timeout=10).status_code == 401  # no token, no job

    steps = 200  # ~1 minute on one worker: the added node arrives well before the end
    sets = [
        "name=elastic", f"storage={tmp_path}", f"data.corpus={corpus_dir}", "data.prepare=false",
        "scaling.workers=[1, 2]", "scaling.resize_check_s=2", f"steps={steps}", "log_every=1",
        "eval_every=100", "checkpoint_every=10", "keep_checkpoints=1",
    ]  # fmt: skip
    train = ["python", "-m", "train", "--config", "tiny-fake-gpu", *[a for s in sets for a in ("--set", s)]]
    sub = submit_job(
        dashboard, {**env, "RAY_AUTH_MODE": "token"}, ["--submission-id", "elastic", "--no-wait"], train
    )
    assert sub.returncode == 0, sub.stdout[-2000:] + sub.stderr[-2000:]

    # Node counts over time, while the job runs and after it ends. Once the run has trained on its one
    # worker up to its first checkpoint, the head's autoscaler may add a GPU node: its config file is read
    # again at every update. (Raised sooner, the run could grow before it has a checkpoint to reshard.)
    timeline, seen, exposed, start, ended, opened = [], set(), [], time.monotonic(), None, None
    while True:
        now = time.monotonic() - start
        if opened is None and checkpoint.published(tmp_path / "elastic"):
            autoscaling = Path(head.temp_dir) / "autoscaling.yaml"
            config = yaml.safe_load(autoscaling.read_text())
            config["available_node_types"]["ray.worker.gpu"]["max_workers"] = 2
            atomic.write_text(autoscaling, yaml.safe_dump(config, sort_keys=False))
            opened = now
        workers = gpu_workers(alive_nodes(dashboard))
        seen.update(workers)
        status = httpx.get(f"{dashboard}/api/jobs/elastic", headers=auth(), timeout=10).json()["status"]
        timeline.append((round(now, 1), len(workers), status))
        if workers and not exposed:  # the added node's Ray processes listen on loopback only, like the head's
            # (The job's own training workers are left out: rank 0's torch.distributed rendezvous store
            # (TCPStore) listens on every interface, and torch offers no bind address.)
            ray_processes = [
                s
                for s in cluster.listeners(cluster.session_processes(head.pid))
                if s[2] != "ray::RayTrainWorker"
            ]
            exposed = [s for s in ray_processes if s[0] not in cluster.LOOPBACK] or [None]
        if status in ("SUCCEEDED", "FAILED", "STOPPED") and ended is None:
            ended, at_end = now, len(workers)
        if ended is not None and not workers:
            break
        assert now < 480, f"timeline (s, GPU workers, job): {timeline}"
        time.sleep(1)
    print(f"timeline (s since submit, GPU worker nodes, job; cap raised at {opened} s):", timeline)
    logs = httpx.get(f"{dashboard}/api/jobs/elastic/logs", headers=auth(), timeout=10).json()["logs"]
    assert status == "SUCCEEDED", logs[-3000:]
    summary = json.loads([line for line in logs.splitlines() if line.startswith('{"run_dir"')][-1])
    assert summary["steps"] == steps and summary["tokens"] == steps * 2048
    assert summary["checkpoint"].endswith(f"checkpoint_step{steps:07d}")
    run_dir = Path(summary["run_dir"])
    events = events_of(run_dir)
    starts = [e for e in events if e["event"] != "worker_failure"]
    controller = [line for line in logs.splitlines() if "TrainController" in line or "autoscaler" in line]
    print("\n".join(controller[-60:]))  # Ray Train's scaling decisions (pytest -s, or a failure's output)
    assert [e["event"] for e in starts] == ["start", "resize"], events
    first, grown = starts
    head_node = first["nodes"][0]
    assert first["world_size"] == 1 and head_node not in seen  # one worker, on the head's GPU
    assert grown["world_size"] == 2 and grown["old_world_size"] == 1 and grown["resharded"] is True
    assert grown["reason"] == "elastic: the cluster has room for 2 workers"
    added = [n for n in grown["nodes"] if n != head_node]
    assert len(added) == 1 and added[0] in seen, (grown, seen)  # ... and on a node the autoscaler added
    assert 10 <= grown["step"] < steps and 0 <= grown["steps_lost"] <= 10  # at most a checkpoint interval
    # No progress lost beyond that: a step trained before and after the resize has the same loss.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step: dict[int, list] = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(r)
    assert sorted(by_step) == list(range(1, steps + 1))
    for step, twice in by_step.items():
        if len(twice) == 2:
            assert twice[0]["world_size"] == 1 and twice[1]["world_size"] == 2
            assert twice[1]["loss"] == pytest.approx(twice[0]["loss"], rel=1e-3), step
    assert all(twice[-1]["world_size"] == 2 for step, twice in by_step.items() if step > grown["step"])

    # The cluster: GPU nodes came for the run (while the resized group waits for the old one's GPU
    # to be released, the autoscaler may add one more), were still there when it ended, and all left
    # after the idle timeout; every node listened on loopback only.
    assert opened is not None and all(n == 0 for t, n, _ in timeline if t < opened), timeline  # capped: none
    assert max(n for _, n, _ in timeline) >= 1 and at_end >= 1, timeline
    gone = next(t for t, n, _ in timeline if t > ended and n == 0)
    assert gone - ended < idle_s + 60, timeline
    assert exposed == [None], exposed
