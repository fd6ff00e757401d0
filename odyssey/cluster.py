"""How Odyssey reaches Ray: join the cluster it is given, or start an embedded one that is safe by
default (token authentication on, loopback only).

Ray reads RAY_AUTH_MODE when it is imported, so `connect` must run before the first `import ray`
of the process (the entry points call it first).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from odyssey.errors import OdysseyError


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join `address` (or RAY_ADDRESS, as inside `ray job submit`); else start an embedded cluster.
    Inside a Ray worker (a Tune trial), or once connected, there is nothing to do."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    token = "RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else _token_file()  # where it is, or None
    if not address:
        if token is None:  # this embedded cluster's own token, for this process alone
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        # Ray runs workers at nice 15 by default; in an embedded cluster the workers are the job, and on a
        # small machine every preemption of one compute thread stalls its peers at the next barrier.
        os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
        return
    # The dashboard too, on loopback: it shows the run, and Ray Train's placement-group cleaner asks its
    # state API whether the run's controller is alive. Every process of the cluster inherits this
    # environment, so RAY_API_SERVER_ADDRESS points that API here: left to itself it would guess the
    # cluster from /tmp/ray/ray_current_cluster, which any earlier `ray start` may have left behind.
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    context = ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        _node_ip_address="127.0.0.1",
    )
    if context.dashboard_url:
        how = (
            f"the token in {token}"
            if token
            else "a one-off token; set RAY_AUTH_TOKEN before launching to log in"
        )
        print(f"embedded Ray cluster: dashboard at http://{context.dashboard_url} ({how})", file=sys.stderr)


def disconnect() -> None:
    """Leave Ray (and stop the embedded cluster, if this process started one)."""
    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()


def _token_file() -> str | None:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return path if os.path.isfile(path) else None


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------------
# A head node of its own, outliving the command that started it (`odyssey serve`, tests)


@dataclass
class LocalHead:
    """A `ray start --head --block` process on loopback and where to reach it."""

    pid: int
    gcs_address: str
    dashboard_url: str
    temp_dir: str

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        return True

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self)) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> LocalHead | None:
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None


def ensure_token() -> None:
    """Token auth needs a token every client of the cluster can find: RAY_AUTH_TOKEN, the file at
    RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token. With none, write the last one (owner-only), as
    `ray get-auth-token --generate` would."""
    os.environ["RAY_AUTH_MODE"] = "token"
    if os.environ.get("RAY_AUTH_TOKEN") or _token_file():
        return
    path = Path(os.path.expanduser("~/.ray/auth_token"))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    print(f"wrote a new Ray auth token to {path}", file=sys.stderr)


def start_head(num_cpus: int | None = None, num_gpus: int | None = None, wait_s: float = 120) -> LocalHead:
    """Start a head node on loopback with token auth, the dashboard, and ports of its own (so that it
    can run beside any other cluster on the machine). It runs in a session of its own: it outlives
    this process until stop_head."""
    ensure_token()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # an embedded cluster's, when this process has one
        env.pop(name, None)
    port, dashboard, agent, agent_grpc, runtime_env, metrics, client = (free_port() for _ in range(7))
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    command = [
        str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
        f"--ray-client-server-port={client}", "--disable-usage-stats", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        command.append(f"--num-gpus={num_gpus}")
    with open(Path(temp_dir) / "head.log", "wb") as log:
        proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = LocalHead(proc.pid, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", temp_dir)
    deadline = time.monotonic() + wait_s
    while not _answers(f"{head.dashboard_url}/api/version"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_head(head)
            raise OdysseyError(f"the Ray head node did not start; its log: {temp_dir}/head.log")
        time.sleep(0.5)
    return head


def stop_head(head: LocalHead, timeout: float = 60) -> None:
    """SIGTERM to `ray start --block` stops every process it started."""
    if head.alive():
        os.kill(head.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while head.alive() and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(head.pid, os.WNOHANG)  # reap it when it is our child
            time.sleep(0.2)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def _answers(url: str) -> bool:
    """Whether an HTTP server answers at url (any status, 401 included)."""
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True
