"""`odyssey cluster local-up | local-down`: an autoscaling cluster of fake GPU nodes on this machine
(cluster/fake-gpu.yaml), its config checked first as `odyssey cluster check` does."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from odyssey import cluster
from odyssey.errors import OdysseyError
from workflows import cluster_files


def local_up(config_path: Path) -> dict:
    """Start a head on loopback with token auth whose autoscaler adds and removes the worker nodes of
    `config_path` (cluster/fake-gpu.yaml: fake GPUs, real Ray nodes) on this machine."""
    head = cluster.recorded("local")
    if head is not None:
        raise OdysseyError(
            f"a local cluster is already up (dashboard {head.dashboard_url}); stop it with `odyssey cluster local-down`"
        )
    cluster.ensure_token()  # before Ray is imported (the check below imports it)
    summary = cluster_files.check(config_path)
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))  # a single mapping: check() said so
    if summary["kind"] != "ray up (fake_multinode)":
        raise OdysseyError(
            f"{config_path}: local-up runs fake_multinode configs (cluster/fake-gpu.yaml); use `ray up` for it"
        )
    resources = config["available_node_types"][config["head_node_type"]]["resources"]
    print("starting a local autoscaling cluster (loopback, token auth)...", file=sys.stderr)
    head = cluster.start_head(
        num_cpus=resources.get("CPU", 0), num_gpus=resources.get("GPU", 0), autoscaling=config
    )
    head.save(cluster.state_file("local"))
    return {
        "dashboard": head.dashboard_url,
        "address": head.gcs_address,
        "token": cluster.token_source(),
        "node_types": summary["node_types"],
        "env": 'eval "$(odyssey cluster env)"',
        "submit": "ray job submit --working-dir . -- python -m train --config tiny-fake-gpu --set storage=$PWD/runs",
        "stop": "odyssey cluster local-down",
    }


def local_down() -> dict:
    head = cluster.stop_recorded(
        "local",
        "no local cluster of this checkout to stop: none was started by `odyssey cluster local-up` here",
    )
    return {"stopped": head.dashboard_url}
