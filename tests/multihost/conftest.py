"""Three hosts with addresses of their own on this machine (workflows/hosts.py: network namespaces on a
bridge of their own), one Ray cluster across them, shared by the package's tests and removed after
them, whatever happened in between. Needs root on Linux, as CI runs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from workflows import hosts as hosts_harness

REPO = Path(__file__).resolve().parents[2]
WORKER_PORTS = range(10002, 20000)  # Ray's default --min-worker-port .. --max-worker-port
PREFIX = f"odt{os.getpid()}"  # this session's: another session's hosts are not touched


@pytest.fixture(scope="package")
def hosts():
    """Host 0: the Ray head (0 CPUs); hosts 1 and 2: 2 CPUs each, for a training worker or two model
    replicas."""
    for stale in hosts_harness.record(PREFIX).parent.glob("odt*.json"):  # of sessions killed outright
        pid = int(stale.stem[3:]) if stale.stem[3:].isdigit() else None
        if pid is not None and not Path(f"/proc/{pid}").exists():
            hosts_harness.down(stale.stem)
    with hosts_harness.running(PREFIX, n=3, cpus=2) as cluster:
        yield cluster


@pytest.fixture
def wait_for():
    return _wait_for


def _wait_for(what: str, check, timeout_s: float, every_s: float = 1.0):
    """check()'s first truthy value within timeout_s, or a failure that says what never happened."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s")


@pytest.fixture
def assert_documented():
    return _assert_documented


def _assert_documented(exposure: dict, where: str) -> None:
    """Nothing listens beyond a host's own address and loopback but on a wildcard (`Hosts.exposure`), and
    every process that listens on one is in SECURITY.md's list of what must stay on the private network."""
    assert not exposure["other"], (where, exposure["other"])
    security = (REPO / "SECURITY.md").read_text()
    for address, port, process in exposure["wildcard"]:
        if port in WORKER_PORTS:
            continue  # a Ray worker process's core worker server, whatever its name: SECURITY.md says so
        assert f"`{process}`" in security, f"{where}: {process} on {address}:{port} is not in SECURITY.md"
