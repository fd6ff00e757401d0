"""What a Ray cluster across hosts exposes, seen from another host: the jobs API, the dashboard and the
GCS refuse a client without the cluster's token, and every listening socket of every host is on the
host's own address, on loopback, or (Ray's servers that bind every interface, and torch's store) on
a wildcard that SECURITY.md lists as what must stay on the private network."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Run on a client host, with or without the token: what each of the head's doors answers.
PROBE = """
import json, os, sys, urllib.error, urllib.request
dashboard, gcs = sys.argv[1], sys.argv[2]
token = os.environ.get("PROBE_TOKEN")
out = {}
for name, path in (("jobs", "/api/jobs/"), ("nodes", "/api/v0/nodes"), ("cluster_status", "/api/cluster_status")):
    request = urllib.request.Request(dashboard + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            out[name] = r.status
    except urllib.error.HTTPError as e:
        out[name] = e.code
import ray
try:
    ray.init(address=gcs, logging_level="ERROR")
    out["gcs"] = "joined"
except Exception as e:
    out["gcs"] = type(e).__name__
print(json.dumps(out))
"""


def probe(hosts, i: int, token: str | None, tmp_path: Path) -> dict:
    env = {k: v for k, v in hosts.env().items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    if token:
        env.update(PROBE_TOKEN=token, RAY_AUTH_TOKEN=token)
    done = hosts.run(
        i, [sys.executable, "-c", PROBE, hosts.dashboard_url, hosts.gcs_address], env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_from_another_host_a_client_without_the_token_is_refused_everywhere(hosts, tmp_path):
    token = Path(hosts.token_path).read_text().strip()
    refused = probe(hosts, 2, None, tmp_path)
    assert refused["jobs"] == refused["nodes"] == refused["cluster_status"] == 401, refused
    assert refused["gcs"] != "joined", refused
    wrong = probe(hosts, 2, "not-the-token", tmp_path)
    assert wrong["jobs"] in (401, 403) and wrong["gcs"] != "joined", wrong
    allowed = probe(hosts, 2, token, tmp_path)  # the same client with the token: the doors work
    assert allowed == {"jobs": 200, "nodes": 200, "cluster_status": 200, "gcs": "joined"}, allowed


def own_addresses(hosts, i: int) -> set[str]:
    out = subprocess.run(
        ["ip", "-n", hosts.hosts[i].netns, "-j", "addr"], capture_output=True, text=True, check=True
    ).stdout
    return {a["local"] for link in json.loads(out) for a in link["addr_info"] if a["family"] == "inet"}


def test_every_host_listens_on_its_own_address_or_loopback_and_wildcards_are_documented(
    hosts, assert_documented
):
    for i, host in enumerate(hosts.hosts):
        # A wildcard on a host is as wide as its addresses: here its own and loopback alone.
        assert own_addresses(hosts, i) == {host.address, "127.0.0.1"}
        exposure = hosts.exposure(i)
        assert exposure["own"] and exposure["loopback"], (host.netns, exposure)
        assert_documented(exposure, host.netns)
    head = {(a, p) for a, p, _ in hosts.exposure(0)["own"]}
    assert (hosts.head.address, 8265) in head  # the dashboard and jobs API on the head's address, not all
