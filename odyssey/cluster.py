"""How Odyssey reaches Ray: join the cluster it is given, or start an embedded one that is safe by
default (token authentication on, loopback only).

Ray reads RAY_AUTH_MODE when it is imported, so `connect` must run before the first `import ray`
of the process (the entry points call it first).
"""

from __future__ import annotations

import os
import secrets
import socket
import sys


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join `address` (or RAY_ADDRESS, as inside `ray job submit`); else start an embedded cluster."""
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


def _token_file() -> str | None:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return path if os.path.isfile(path) else None


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
