"""Every file under cluster/ as its users run it: `ray up` configs through Ray's own preparation and JSON
schema (what `ray up` does before it contacts a cloud) and Odyssey's rules; KubeRay manifests parsed
with their required fields; and broken copies refused with the field named."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

from odyssey.errors import ConfigError
from workflows import cluster_files

CLUSTER = cluster_files.CLUSTER_DIR
RAY_UP = ["aws.yaml", "azure.yaml", "gcp.yaml", "local.yaml", "fake-gpu.yaml"]
KUBERAY = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/rayservice.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_files_pass_rays_schema_and_ours(name):
    config = cluster_files.prepare(load(name))  # raises on anything Ray's schema refuses
    assert "cluster_synced_files" in config and config["available_node_types"]
    summary = cluster_files.check(CLUSTER / name)
    assert summary["kind"].startswith("ray up")


@pytest.mark.parametrize("name", ["aws.yaml", "azure.yaml", "gcp.yaml"])
def test_cloud_files_scale_gpus_from_zero_with_spot_and_a_cpu_type(name):
    raw = load(name)
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0  # no work on the head
    gpu = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in gpu.values())
    assert any(cluster_files._is_spot(t["node_config"]) for t in gpu.values())
    assert any(n != raw["head_node_type"] and "GPU" not in t["resources"] for n, t in types.items())
    assert raw["idle_timeout_minutes"] > 0
    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert raw["file_mounts"]["~/.odyssey/api_keys"] == "~/.odyssey/api_keys"  # API keys on every node


def test_constraints_pin_what_this_client_runs():
    pins = cluster_files.constraints()
    assert pins["ray"] == ray.__version__  # a laptop's ray must match the cluster's to submit and deploy
    assert {"torch", "deepspeed"} <= set(pins)


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        ("aws.yaml", lambda c: c.update(max_wokers=3), r"Ray's schema: \(top level\): Additional properties"),
        (
            "aws.yaml",
            lambda c: c["available_node_types"]["gpu-h100"].update(min_workers=2),
            r"gpu-h100.min_workers: 0 for GPU workers",
        ),
        (
            "azure.yaml",
            lambda c: c.update(
                worker_start_ray_commands=["ray stop", "ray start --address=$RAY_HEAD_IP:6379"]
            ),
            r"worker_start_ray_commands\[1\]: start Ray with RAY_AUTH_MODE=token",
        ),
        ("gcp.yaml", lambda c: c["file_mounts"].pop("~/.ray/auth_token"), r"file_mounts: ship the token"),
        (
            "aws.yaml",
            lambda c: c["file_mounts"].pop("~/.odyssey/api_keys"),
            r"file_mounts: ship the HTTP API's keys",
        ),
        (
            "gcp.yaml",
            lambda c: c["available_node_types"]["gpu-h100"].update(resources={"CPU": 8, "GPU": "eight"}),
            r"Ray's schema: available_node_types.gpu-h100.resources.GPU: 'eight' is not of type 'integer'",
        ),
        (
            "aws.yaml",
            lambda c: c["provider"].update(
                security_group={
                    "IpPermissions": [
                        {
                            "FromPort": 8265,
                            "ToPort": 8265,
                            "IpProtocol": "tcp",
                            "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
                        }
                    ]
                }
            ),
            r"port 8265 open to 0.0.0.0/0",
        ),
        ("local.yaml", lambda c: c["provider"].pop("head_ip"), r"Ray refuses it"),
    ],
)
def test_a_broken_ray_up_file_is_refused_with_its_field(tmp_path, name, edit, message):
    config = copy.deepcopy(load(name))
    edit(config)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=message):
        cluster_files.check(path)


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifests_carry_the_required_fields(name):
    docs = list(yaml.safe_load_all((CLUSTER / name).read_text()))
    assert docs[0]["apiVersion"] == "ray.io/v1"
    summary = cluster_files.check(CLUSTER / name)
    groups = summary["worker_groups"]
    assert groups["gpu-h100"] == {
        "minReplicas": 0,
        "maxReplicas": 4,
        "limits": {"cpu": "96", "memory": "1600Gi", "nvidia.com/gpu": "8"},
    }
    assert groups["cpu"]["minReplicas"] == 0


def test_kuberay_worker_groups_match_across_manifests():
    groups = [cluster_files.check(CLUSTER / n)["worker_groups"] for n in KUBERAY]
    assert groups[0] == groups[1] == groups[2]


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        ("kuberay/rayjob.yaml", lambda d: d["spec"].pop("entrypoint"), r"spec.entrypoint is required"),
        (
            "kuberay/raycluster.yaml",
            lambda d: d["spec"].pop("authOptions"),
            r"spec.authOptions.mode: token",
        ),
        (
            "kuberay/raycluster.yaml",
            lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplicas=5),
            r"workerGroupSpecs\[0\]: minReplicas and maxReplicas are required, 0 <= min <= max",
        ),
        (
            "kuberay/rayservice.yaml",
            lambda d: d["spec"].update(
                serveConfigV2=d["spec"]["serveConfigV2"].replace("bfloat16", "float8")
            ),
            r"spec.serveConfigV2: dtype: Input should be",
        ),
        (
            "kuberay/raycluster.yaml",
            lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image"),
            r"headGroupSpec.template.spec.containers\[0\].image: required",
        ),
    ],
)
def test_a_broken_manifest_is_refused_with_its_field(tmp_path, name, edit, message):
    doc = yaml.safe_load((CLUSTER / name).read_text())
    edit(doc)
    path = tmp_path / Path(name).name
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=message):
        cluster_files.check(path)


def test_cluster_check_cli(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "workflows", "cluster", "check"], capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    checked = json.loads(ok.stdout.strip().splitlines()[-1])["checked"]
    assert {Path(c["file"]).name for c in checked} >= {Path(n).name for n in RAY_UP + KUBERAY}
    bad = tmp_path / "aws.yaml"
    bad.write_text((CLUSTER / "aws.yaml").read_text().replace("idle_timeout_minutes: 10\n", ""))
    refused = subprocess.run(
        [sys.executable, "-m", "workflows", "cluster", "check", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2
    assert "idle_timeout_minutes: set it" in refused.stderr and "Traceback" not in refused.stderr


def test_the_kuberay_image_holds_every_package_the_project_installs():
    """The image installs the checkout with `pip install -e .`: each top-level package must be copied
    in (the `odyssey` command itself lives in workflows/)."""
    import tomllib

    pyproject = tomllib.loads((CLUSTER.parent / "pyproject.toml").read_text(encoding="utf-8"))
    packages = pyproject["tool"]["importlinter"]["root_packages"]
    assert [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]] == packages
    dockerfile = (CLUSTER / "kuberay" / "Dockerfile").read_text(encoding="utf-8")
    copied = {line.split()[-1] for line in dockerfile.splitlines() if line.startswith("COPY")}
    assert set(packages) <= copied, set(packages) - copied
