"""How Odyssey reaches Ray: join the cluster it is given, or start an embedded one that is safe by
default (token authentication on, loopback only).

Ray reads RAY_AUTH_MODE when it is imported, so `connect` must run before the first `import ray`
of the process (the entry points call it first).
"""

from __future__ import annotations

import os
import secrets


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join `address` (or RAY_ADDRESS, as inside `ray job submit`); else start an embedded cluster."""
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if not address:
        if not _token_configured():
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # this embedded cluster's own token
        # Ray runs workers at nice 15 by default; in an embedded cluster the workers are the job, and on a
        # small machine every preemption of one compute thread stalls its peers at the next barrier.
        os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")


def _token_configured() -> bool:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or os.path.isfile(path)
