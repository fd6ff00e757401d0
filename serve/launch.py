"""`odyssey serve`: deploy the app of serve/config.yaml with a model path filled in, and return once
every endpoint answers.

    odyssey serve --model runs/demo/model [--port 8000] [--set model.max_replicas=4 ...]
    odyssey serve key          # the API key clients send (API keys are on as shipped: serve/api_keys.py)
    odyssey serve stop

Where it deploys: the cluster whose dashboard --address (or RAY_DASHBOARD_ADDRESS) names; else the
local cluster an earlier `odyssey serve` started; else it starts one (loopback, token auth) that
outlives the command, until `odyssey serve stop`. It deploys the way `serve deploy` does (the
dashboard's REST API, the whole config), so a later `serve deploy` of the same file with another
model path rolls the new model out (new replicas; the old ones drain).
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
from pathlib import Path

import httpx
import yaml

from odyssey import artifact, cluster
from odyssey.config import apply_overrides
from odyssey.errors import ConfigError, OdysseyError
from serve import api_keys

CONFIG = Path(__file__).with_name("config.yaml")
APP = "odyssey"


def state_file() -> Path:
    """Where `odyssey serve` of this checkout remembers the local cluster it started."""
    return cluster.state_file("serve")


def read_config(config_path: Path, overrides: list[str]) -> tuple[dict, dict]:
    """(the whole Serve config file, its app with --set overrides applied to the app's args)."""
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise OdysseyError(f"cannot read {config_path}: {e}") from None
    config = copy.deepcopy(config)
    app = next((a for a in config.get("applications", []) if a.get("name") == APP), None)
    if app is None:
        raise OdysseyError(f"{config_path} has no application named {APP!r}")
    app["args"] = apply_overrides(app.get("args") or {}, overrides)
    return config, app


def serve_config(config_path: Path, model: Path, port: int | None, overrides: list[str]) -> dict:
    """The whole Serve config: the file, with the model path (absolute: replicas run elsewhere) and
    --set overrides of the app's args; validated by check_config."""
    config, app = read_config(config_path, overrides)
    artifact.read_config(model)  # a clear error when it is not an exported model
    app["args"]["model_path"] = str(model.resolve())
    if port is not None:
        config.setdefault("http_options", {})["port"] = port
    try:
        return check_config(config)
    except ConfigError as e:
        raise ConfigError(f"serve config: {e}") from None


def check_config(config: dict) -> dict:
    """A whole Serve config checked as `serve deploy` and the app would: Serve's schema, then each
    application's args by the app's (serve.app.AppArgs). The validated config, or ConfigError naming
    the first bad field. (`odyssey serve` and `odyssey cluster check` of a RayService both use it.)"""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from serve.app import AppArgs

    try:
        checked = ServeDeploySchema.model_validate(config)
        for app in checked.applications:
            AppArgs(**(app.args or {}))
    except ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    return checked.model_dump(exclude_unset=True)


def find_or_start_cluster(address: str | None, num_cpus: int | None = None) -> tuple[str, bool]:
    """(dashboard URL, whether this call started the cluster). num_cpus: the logical CPUs of a cluster it
    starts (default: the machine's cores)."""
    address = address or os.environ.get("RAY_DASHBOARD_ADDRESS")
    if address:
        return address, False
    head = cluster.recorded("serve")
    if head is not None:
        return head.dashboard_url, False
    print("starting a local Ray cluster (loopback, token auth)...", file=sys.stderr)
    head = cluster.start_head(num_cpus=num_cpus)
    head.save(state_file())
    return head.dashboard_url, True


def patiently(call, deadline: float, what: str):
    """`call()` to the dashboard, again while its connection drops or times out (a busy head drops
    some), until `deadline`; then one line that says what to check."""
    import requests

    while True:
        try:
            return call()
        except (requests.ConnectionError, requests.Timeout, ConnectionError) as e:
            if time.monotonic() > deadline:
                raise OdysseyError(
                    f"the Ray dashboard did not answer while {what} ({type(e).__name__}); is the cluster up? "
                    "`odyssey cluster env serve` then `ray status` tells"
                ) from None
            time.sleep(1)


def wait_running(client, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        details = patiently(client.get_serve_details, deadline, "waiting for the app")
        app = (details.get("applications") or {}).get(APP)
        status = app and app.get("status")
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED" or time.monotonic() > deadline:
            message = (app or {}).get("message") or "it did not become ready in time"
            for name, d in ((app or {}).get("deployments") or {}).items():
                if d.get("message"):
                    message += f"\n  {name}: {d['message']}"
            raise OdysseyError(f"the app did not deploy: {message}")
        time.sleep(1)


def probe(base: str, headers: dict) -> dict[str, int]:
    """Call every endpoint once; their status codes."""
    calls = [
        ("GET", "/healthz", None),
        ("GET", "/v1/models", None),
        ("POST", "/v1/summarize", {"text": "ready?", "max_tokens": 1}),
        ("POST", "/v1/moderate", {"text": "ready?"}),
        ("POST", "/v1/find", {"query": "ready?", "k": 1}),
        ("POST", "/v1/code", {"prompt": "ready?", "max_tokens": 1}),
        ("POST", "/v1/completions", {"prompt": "ready?", "max_tokens": 1}),
        (
            "POST",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "ready?"}], "max_tokens": 1},
        ),
        ("POST", "/v1/embeddings", {"input": "ready?"}),
    ]
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
        return {path: http.request(method, path, json=body).status_code for method, path, body in calls}


def gateway_settings(config: dict):
    """The app's GatewaySettings (auth, where its API keys come from)."""
    from serve.app import AppArgs

    app = next(a for a in config["applications"] if a["name"] == APP)
    return AppArgs(**app["args"]).gateway


def client_headers(config: dict) -> dict:
    """The Authorization header of the app's first API key (this machine's), with auth on."""
    settings = gateway_settings(config)
    found = api_keys.keys(settings) if settings.auth else []
    return api_keys.headers(found[0] if found else None)


def key(config_path: Path = CONFIG, overrides: list[str] | None = None) -> str:
    """`odyssey serve key`: the API key clients send to the app of `config_path` on this machine,
    written first when there is none."""
    config, _ = read_config(config_path, overrides or [])
    settings = gateway_settings(config)
    if not settings.auth:
        raise OdysseyError(f"gateway.auth is off in {config_path} (or --set): the API takes no key")
    return _first_key(settings)


def _first_key(settings) -> str | None:
    """The key `odyssey serve` probes with; with auth on and no key anywhere, a new one, and the
    operator is told which (the first run on a machine)."""
    found, created = api_keys.ensure(settings)
    if created:
        print(
            f"API keys are on (gateway.auth): wrote a new key to {api_keys.key_file(settings)} (owner-only).\n"
            f"Clients send `Authorization: Bearer <key>`; `odyssey serve key` prints it again:\n  {found}",
            file=sys.stderr,
        )
    return found


def deploy(
    model: Path,
    port: int | None = None,
    overrides: list[str] | None = None,
    config_path: Path = CONFIG,
    address: str | None = None,
    timeout_s: float = 600,
) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # read when Ray is first imported, just below
    config = serve_config(config_path, model, port, overrides or [])
    key = _first_key(gateway_settings(config))  # before any replica starts: they read the key file
    dashboard, started = find_or_start_cluster(address)
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    connect = time.monotonic() + 30  # a dashboard that never answers is no cluster: say so soon
    client = patiently(lambda: ServeSubmissionClient(dashboard), connect, f"connecting to {dashboard}")
    deadline = time.monotonic() + timeout_s
    details = patiently(client.get_serve_details, deadline, "reading the cluster's Serve state")
    running = (details.get("http_options") or {}).get("port")
    wanted = config.get("http_options", {}).get("port", 8000)
    if running and running != wanted and details.get("applications"):
        raise OdysseyError(
            f"Serve already listens on port {running} on this cluster; use --port {running} or `odyssey serve stop`"
        )
    patiently(lambda: client.deploy_applications(config), deadline, "submitting the app")
    wait_running(client, deadline - time.monotonic())
    host = config.get("http_options", {}).get("host", "127.0.0.1")
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{wanted}"
    headers = api_keys.headers(key)
    deadline = time.monotonic() + 120
    while True:  # the proxy may need a moment after the app turns RUNNING
        try:
            statuses = probe(base, headers)
            if all(code == 200 for code in statuses.values()) or time.monotonic() > deadline:
                break
        except httpx.TransportError:
            statuses = {}
            if time.monotonic() > deadline:
                break
        time.sleep(1)
    not_ready = {p: c for p, c in statuses.items() if c != 200}
    if not statuses or not_ready:
        raise OdysseyError(f"deployed, but endpoints do not answer 200: {not_ready or 'no answer'} at {base}")
    return {
        "url": base,
        "endpoints": sorted(statuses),
        "docs": f"{base}/docs",
        "dashboard": dashboard,
        "cluster": "started" if started else "joined",
        "model": config["applications"][0]["args"]["model_path"],
        "auth": "Authorization: Bearer $(odyssey serve key)" if key else "off (gateway.auth=false)",
        "stop": "odyssey serve stop",
    }


def stop(address: str | None = None) -> dict:
    """Delete the app; stop the local cluster if `odyssey serve` of this checkout started it (and only
    then: a cluster that another checkout or command started is never stopped from here)."""
    head = cluster.recorded("serve")
    dashboard = address or os.environ.get("RAY_DASHBOARD_ADDRESS") or (head.dashboard_url if head else None)
    if dashboard is None:
        raise OdysseyError(
            "no cluster to stop: `odyssey serve` started none in this checkout; pass --address"
            + cluster.elsewhere_hint("serve")
        )
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    stopped_cluster = False
    if head is not None and head.dashboard_url == dashboard:
        ServeSubmissionClient(dashboard).delete_applications()
        cluster.stop_head(head)
        state_file().unlink(missing_ok=True)
        stopped_cluster = True
    else:
        ServeSubmissionClient(dashboard).delete_applications()
    return {"stopped": APP, "dashboard": dashboard, "cluster_stopped": stopped_cluster}
