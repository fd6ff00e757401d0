"""The HTTP API's keys. `gateway.auth` is on as shipped: /v1/* answers 401 without a key.

A replica's keys are the comma-separated keys of its environment variable `gateway.api_keys_env`
(ODYSSEY_API_KEYS) and the lines of `gateway.api_keys_file` (null: $ODYSSEY_HOME/api_keys, that is
~/.odyssey/api_keys); the gateway keeps only their SHA-256 digests. A replica with auth on and no key
refuses to start, and says where it looked.

`odyssey serve` on a machine with no key writes one to the key file (owner-only, as Ray's own
~/.ray/auth_token) and tells the operator; `odyssey serve key` prints it. On a cluster every node that
runs a gateway replica needs the file (the cluster files ship it beside the Ray token) or the
environment variable (KubeRay: a Secret).
"""

from __future__ import annotations

import contextvars
import hashlib
import os
import secrets
from pathlib import Path

from odyssey import cluster

FILE_NAME = "api_keys"


def key_file(settings) -> Path:
    """Where `settings` (a GatewaySettings) reads keys from: its api_keys_file, or the default."""
    return Path(settings.api_keys_file).expanduser() if settings.api_keys_file else cluster.home() / FILE_NAME


def keys(settings) -> list[str]:
    """Every key of the environment variable, then of the key file (a missing file holds none)."""
    found = os.environ.get(settings.api_keys_env, "").split(",")
    path = key_file(settings)
    if path.is_file():
        found += path.read_text(encoding="utf-8").splitlines()
    return [k.strip() for k in found if k.strip()]


def digests(settings) -> set[bytes]:
    """What a gateway replica checks requests against; with auth on and no key, an error naming both
    places a key can come from (the replica does not start: the deployment fails with this message)."""
    found = {hashlib.sha256(k.encode()).digest() for k in keys(settings)}
    if settings.auth and not found:
        raise ValueError(
            f"gateway.auth is on but there are no API keys: none in ${settings.api_keys_env} (comma-separated) "
            f"of the replica's environment, nor in {key_file(settings)}. Run `odyssey serve key` on this "
            "machine (it writes one there), or set gateway.auth=false on a network you trust"
        )
    return found


def ensure(settings) -> tuple[str | None, bool]:
    """(the key clients send: the first one, None with auth off; whether it was just written). With
    auth on and no key anywhere, writes a new key to the key file, owner-only."""
    if not settings.auth:
        return None, False
    found = keys(settings)
    if found:
        return found[0], False
    path = key_file(settings)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = "sk-odyssey-" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(key + "\n")
    path.chmod(0o600)  # an empty file that was there before keeps its mode through os.open
    return key, True


# The caller's key id in the gateway, set by its /v1 routes' auth dependency and handed to the model with
# each call, for the metrics by API key. (Here, not in serve/gateway.py: Serve pickles the ingress class
# by value, and a ContextVar cannot be pickled.)
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller_key_id", default="")


def key_id(key: str) -> str:
    """A short, stable name for a key in metrics and logs: a hash prefix, never the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def headers(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}
