"""The files users run first on a cluster, checked before they cost an hour of cloud time: `ray up`
configurations (cluster/*.yaml) and KubeRay manifests (cluster/kuberay/*.yaml).

A `ray up` file goes through what `ray up` itself does before it contacts a cloud (Ray's defaults for
the provider, then Ray's JSON schema, `ray/autoscaler/ray-schema.json`), then through Odyssey's rules:
token authentication on every node, GPU workers that start at zero and leave when idle, resources
declared so the autoscaler can plan, exact versions installed, no port opened to the internet.

    odyssey cluster check [FILE ...]      (default: every file under cluster/)
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

from odyssey.errors import ConfigError

CLUSTER_DIR = Path(__file__).resolve().parent.parent / "cluster"
CONSTRAINTS = "cluster/constraints.txt"
CLOUDS_WITH_SPOT = ("aws", "azure", "gcp")
PINNED = ("torch", "ray", "deepspeed")
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")


def default_files() -> list[Path]:
    return sorted(CLUSTER_DIR.glob("*.yaml")) + sorted((CLUSTER_DIR / "kuberay").glob("*.yaml"))


def check(path: Path) -> dict:
    """Check one file (a `ray up` config or KubeRay manifests); a summary, or ConfigError naming every
    problem with its field."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read it: {e}") from None
    if docs and all(isinstance(d, dict) and "apiVersion" in d for d in docs):
        return check_kuberay(path, docs)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise ConfigError(f"{path}: not a `ray up` config (one YAML mapping) nor KubeRay manifests")
    return check_ray_up(path, docs[0])


def _raise(path: Path, problems: list[str]) -> None:
    if problems:
        raise ConfigError(f"{path}:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------------
# `ray up` configurations


def prepare(config: dict) -> dict:
    """What `ray up` makes of the file before it contacts the cloud: defaults filled in, validated by
    Ray's schema (jsonschema.ValidationError or ValueError when it is wrong)."""
    from ray.autoscaler._private import util

    config = copy.deepcopy(config)
    if config.get("provider", {}).get("type") == "fake_multinode":
        # The wheel ships no defaults file for this provider: the file itself must be complete.
        util.merge_setup_commands(config)
        util.fill_node_type_min_max_workers(config)
    else:
        config = util.prepare_config(config)
    util.validate_config(config)
    return config


def check_ray_up(path: Path, raw: dict) -> dict:
    import click
    import jsonschema

    try:
        config = prepare(raw)
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ConfigError(f"{path}: Ray's schema: {where}: {e.message}") from None
    except (ValueError, KeyError, RuntimeError) as e:
        raise ConfigError(f"{path}: Ray refuses it: {e}") from None
    except click.ClickException as e:  # Ray's cli_logger.abort, e.g. a local provider without head_ip
        raise ConfigError(f"{path}: Ray refuses it: {e.format_message()}") from None
    provider = raw["provider"]["type"]
    problems = [] if provider == "fake_multinode" else _remote_rules(raw, config)
    problems += _autoscaling_rules(raw, config)
    _raise(path, problems)
    return {
        "file": str(path),
        "kind": f"ray up ({provider})",
        "node_types": {
            name: {k: t.get(k) for k in ("min_workers", "max_workers", "resources")}
            for name, t in config["available_node_types"].items()
        },
    }


def _start_commands(config: dict) -> list[tuple[str, str]]:
    return [
        (f"{field}[{i}]", command)
        for field in ("head_start_ray_commands", "worker_start_ray_commands")
        for i, command in enumerate(config.get(field) or [])
        if "ray start" in command
    ]


def _remote_rules(raw: dict, config: dict) -> list[str]:
    """Machines reached over SSH: token auth, the dashboard, versions, the network."""
    problems = []
    starts = _start_commands(config)
    if len(starts) < 2:
        problems.append("head_start_ray_commands / worker_start_ray_commands: each needs its `ray start`")
    for where, command in starts:
        if "RAY_AUTH_MODE=token" not in command:
            problems.append(f"{where}: start Ray with RAY_AUTH_MODE=token (token authentication)")
    head_start = " ".join(c for _, c in starts if "--head" in c)
    if "--dashboard-host=" not in head_start:
        problems.append(
            "head_start_ray_commands: set --dashboard-host explicitly (Ray's default differs by version)"
        )
    mounts = {str(k): str(v) for k, v in (raw.get("file_mounts") or {}).items()}
    if "~/.ray/auth_token" not in mounts:
        problems.append("file_mounts: ship the token: `~/.ray/auth_token: ~/.ray/auth_token`")
    if "~/.odyssey/api_keys" not in mounts:  # the gateway replicas' keys (serve/api_keys.py)
        problems.append(
            "file_mounts: ship the HTTP API's keys: `~/.odyssey/api_keys: ~/.odyssey/api_keys` "
            "(`odyssey serve key` writes the file)"
        )
    pins = constraints()
    for name in PINNED:
        if name not in pins:
            problems.append(f"{CONSTRAINTS}: pin {name} to an exact version")
    setup = " ".join(config.get("setup_commands") or [])
    if f"PIP_CONSTRAINT=$HOME/odyssey/{CONSTRAINTS}" not in setup:
        problems.append(f"setup_commands: install with the exact versions in {CONSTRAINTS} (PIP_CONSTRAINT)")
    for rule in raw["provider"].get("security_group", {}).get("IpPermissions", []):
        open_to_all = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))
        if open_to_all and rule.get("FromPort") != 22:
            problems.append(
                f"provider.security_group: port {rule.get('FromPort')} open to 0.0.0.0/0; keep Ray's ports inside the cluster"
            )
    return problems


def _is_spot(node_config: dict) -> bool:
    scheduling = node_config.get("scheduling") or {}
    if isinstance(scheduling, list):  # Ray's own GCP examples write it as a list of one-key maps
        scheduling = {k: v for item in scheduling for k, v in item.items()}
    arm = node_config.get("azure_arm_parameters") or {}
    return (
        (node_config.get("InstanceMarketOptions") or {}).get("MarketType") == "spot"
        or arm.get("priority") == "Spot"
        or scheduling.get("provisioningModel") == "SPOT"
        or scheduling.get("preemptible") is True
    )


def _autoscaling_rules(raw: dict, config: dict) -> list[str]:
    """Node types the autoscaler can plan with, and GPUs that cost nothing while unused."""
    problems = []
    provider = raw["provider"]["type"]
    if provider == "local":  # fixed machines: nothing to scale
        return problems
    types = raw.get("available_node_types") or {}
    head = raw.get("head_node_type")
    gpu_types = {n: t for n, t in types.items() if n != head and t.get("resources", {}).get("GPU", 0) > 0}
    if not gpu_types:
        problems.append("available_node_types: no worker type declares GPUs in `resources`")
    for name, node_type in types.items():
        where = f"available_node_types.{name}"
        if name != head and "max_workers" not in node_type:
            problems.append(f"{where}.max_workers: set it (the cap on what this type can cost)")
        if "CPU" not in node_type.get("resources", {}):
            problems.append(f"{where}.resources: declare CPU (and GPU) so the autoscaler can plan")
    for name, node_type in gpu_types.items():
        if node_type.get("min_workers", 0) != 0:
            problems.append(f"available_node_types.{name}.min_workers: 0 for GPU workers (no idle GPU bill)")
    if "idle_timeout_minutes" not in raw:
        problems.append("idle_timeout_minutes: set it, so idle nodes leave")
    if provider in CLOUDS_WITH_SPOT and not any(
        _is_spot(t.get("node_config", {})) for t in gpu_types.values()
    ):
        problems.append(f"available_node_types: add a spot/preemptible GPU worker type ({provider} has them)")
    return problems


def constraints(path: Path | None = None) -> dict[str, str]:
    """The exact versions a cluster installs: {package: version}."""
    path = path or CLUSTER_DIR / "constraints.txt"
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s#]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


# ---------------------------------------------------------------------------------------------------
# KubeRay manifests


def check_kuberay(path: Path, docs: list[dict]) -> dict:
    problems, groups = [], {}
    for i, doc in enumerate(docs):
        kind, where = doc.get("kind"), f"document {i + 1} ({doc.get('kind')})"
        if doc.get("apiVersion") != "ray.io/v1":
            if doc.get("apiVersion") == "v1" and kind in ("Secret", "ConfigMap", "PersistentVolumeClaim"):
                continue
            problems.append(f"{where}: apiVersion must be ray.io/v1, got {doc.get('apiVersion')!r}")
            continue
        if kind not in KUBERAY_KINDS:
            problems.append(f"{where}: kind must be one of {', '.join(KUBERAY_KINDS)}")
            continue
        if not (doc.get("metadata") or {}).get("name"):
            problems.append(f"{where}: metadata.name is required")
        spec = doc.get("spec") or {}
        if kind == "RayCluster":
            cluster, prefix = spec, "spec"
        elif kind == "RayJob":
            cluster, prefix = spec.get("rayClusterSpec") or {}, "spec.rayClusterSpec"
            if not spec.get("entrypoint"):
                problems.append(f"{where}: spec.entrypoint is required (the training command)")
            if spec.get("shutdownAfterJobFinishes") is not True:
                problems.append(f"{where}: spec.shutdownAfterJobFinishes: true (no idle GPUs after the job)")
        else:
            cluster, prefix = spec.get("rayClusterConfig") or {}, "spec.rayClusterConfig"
            problems += _serve_config_problems(where, spec.get("serveConfigV2"))
        found, cluster_problems = _raycluster_problems(f"{where}: {prefix}", cluster)
        problems += cluster_problems
        groups[kind] = found
    if len({repr(g) for g in groups.values()}) > 1:
        problems.append(f"worker groups differ between {', '.join(groups)}: keep them the same")
    _raise(path, problems)
    return {
        "file": str(path),
        "kind": "KubeRay " + ", ".join(groups),
        "worker_groups": next(iter(groups.values()), {}),
    }


def _raycluster_problems(where: str, spec: dict) -> tuple[dict, list[str]]:
    problems = []
    if not spec:
        return {}, [f"{where}: missing"]
    if not str(spec.get("rayVersion", "")).startswith("2."):
        problems.append(f"{where}.rayVersion: required (the image's Ray version)")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{where}.enableInTreeAutoscaling: true (worker groups scale from 0)")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append(f"{where}.authOptions.mode: token (Ray token authentication; KubeRay >= 1.5.1)")
    head = spec.get("headGroupSpec") or {}
    problems += _pod_problems(f"{where}.headGroupSpec", head)
    found = {}
    workers = spec.get("workerGroupSpecs") or []
    if not workers:
        problems.append(f"{where}.workerGroupSpecs: at least one worker group")
    for j, group in enumerate(workers):
        at = f"{where}.workerGroupSpecs[{j}]"
        name = group.get("groupName")
        if not name:
            problems.append(f"{at}.groupName: required")
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
            problems.append(f"{at}: minReplicas and maxReplicas are required, 0 <= min <= max")
        problems += _pod_problems(at, group)
        containers = (group.get("template") or {}).get("spec", {}).get("containers") or [{}]
        limits = (containers[0].get("resources") or {}).get("limits") or {}
        found[name] = {"minReplicas": lo, "maxReplicas": hi, "limits": limits}
    if not any("nvidia.com/gpu" in g["limits"] for g in found.values()):
        problems.append(f"{where}.workerGroupSpecs: no group asks for nvidia.com/gpu")
    for name, g in found.items():
        if "nvidia.com/gpu" in g["limits"] and g["minReplicas"] != 0:
            problems.append(f"{where}: worker group {name}: minReplicas 0 for GPU workers (no idle GPU bill)")
    return found, problems


def _pod_problems(where: str, group: dict) -> list[str]:
    if "rayStartParams" not in group:
        return [f"{where}.rayStartParams: required (may be empty)"]
    containers = (group.get("template") or {}).get("spec", {}).get("containers") or []
    if not containers or not containers[0].get("image"):
        return [f"{where}.template.spec.containers[0].image: required"]
    return []


def _serve_config_problems(where: str, text) -> list[str]:
    """serveConfigV2 is a string holding a Serve config: checked as `odyssey serve` checks its own."""
    from serve import launch

    if not isinstance(text, str):
        return [f"{where}: spec.serveConfigV2 is required (a string: the Serve config)"]
    try:
        launch.check_config(yaml.safe_load(text))
    except yaml.YAMLError as e:
        return [f"{where}: spec.serveConfigV2: not YAML: {e}"]
    except ConfigError as e:
        return [f"{where}: spec.serveConfigV2: {e}"]
    return []
