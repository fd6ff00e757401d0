"""Nothing listens beyond loopback, and no one gets in without a credential: the Ray control plane
(jobs API, dashboard, GCS) wants the cluster's token, the HTTP API wants an API key."""

from __future__ import annotations

import os

import httpx
import psutil

from odyssey import cluster
from workflows import cluster_files


def exposed(sockets: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    return [s for s in sockets if s[0] not in cluster.LOOPBACK]


def port(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


def test_every_listener_of_the_served_app_is_on_loopback(app):
    """`odyssey serve`: head (GCS, raylet, dashboard and its agents), Serve's proxy, every replica."""
    sockets = cluster.listeners(cluster.session_processes(app.head.pid))
    ports = {p for _, p, _ in sockets}
    assert {port(app.url), port(app.dashboard), port(app.head.gcs_address)} <= ports
    assert len(sockets) >= 10, sockets  # the whole cluster was read, not one process
    assert not exposed(sockets), f"listening beyond loopback: {exposed(sockets)}"


def test_every_listener_of_the_embedded_cluster_is_on_loopback(ray_cluster):
    """The cluster that `python -m train|tune` start on a laptop (odyssey.cluster.connect): this test
    process started it, so its processes are this process's descendants."""
    pids = [p.pid for p in psutil.Process().children(recursive=True)]
    sockets = cluster.listeners(pids)
    assert port(os.environ["RAY_API_SERVER_ADDRESS"]) in {p for _, p, _ in sockets}  # its dashboard
    assert not exposed(sockets), f"listening beyond loopback: {exposed(sockets)}"


def test_the_control_plane_refuses_clients_without_the_token(app, submit_without_the_token):
    jobs = f"{app.dashboard}/api/jobs/"
    token = {"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"}
    assert httpx.get(jobs, timeout=10).status_code == 401
    assert httpx.get(jobs, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code in (401, 403)
    assert httpx.post(jobs, json={"entrypoint": "touch /tmp/pwned"}, timeout=10).status_code == 401
    assert submit_without_the_token(app.dashboard, app.env).returncode != 0
    assert submit_without_the_token(app.dashboard, app.env, token="wrong").returncode != 0
    assert httpx.get(jobs, headers=token, timeout=10).json() == []  # nothing got in


def test_every_cluster_file_turns_token_auth_on():
    """cluster/*.yaml (what `ray up` launches) and the KubeRay manifests pass `odyssey cluster check`,
    which refuses a node started without token auth (tests/test_cluster_files.py shows it refusing)."""
    files = sorted(cluster_files.CLUSTER_DIR.glob("*.yaml")) + sorted(
        (cluster_files.CLUSTER_DIR / "kuberay").glob("ray*.yaml")
    )
    assert len(files) >= 8
    for path in files:
        cluster_files.check(path)  # raises ConfigError naming the field otherwise
        text = path.read_text()
        assert "RAY_AUTH_MODE=token" in text or "mode: token" in text, path


def test_the_api_wants_a_key_and_keeps_serving(app):
    pids = app.all_replica_pids()
    body = {"text": "Is this fine?"}
    with app.client(key=None) as anonymous:
        r = anonymous.post("/v1/moderate", json=body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
        assert anonymous.get("/v1/models").status_code == 401
        assert anonymous.post("/v1/completions", json={"prompt": "x"}).status_code == 401
        assert anonymous.get("/healthz").status_code == 200  # health stays open for load balancers
    for wrong in ("wrong", app.keys[0][:-1], app.keys[0] + "x", "", f"{app.keys[0]},{app.keys[1]}"):
        with app.client(key=wrong) as client:
            assert client.post("/v1/moderate", json=body).status_code in (401, 403), wrong
    with httpx.Client(base_url=app.url, timeout=30) as raw:  # a key, but not as a bearer token
        assert raw.post("/v1/moderate", json=body, headers={"Authorization": app.keys[0]}).status_code == 401
        basic = {"Authorization": f"Basic {app.keys[0]}"}
        assert raw.post("/v1/moderate", json=body, headers=basic).status_code == 401
    for key in app.keys:  # every configured key works
        with app.client(key=key) as client:
            assert client.post("/v1/moderate", json=body).status_code == 200
    assert app.all_replica_pids() == pids
