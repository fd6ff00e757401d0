"""The hosts harness (workflows/hosts.py) leaves nothing behind: not after a test that fails inside it,
not after a failure while the hosts come up. Nothing left means no namespace, no /etc/netns entry, no
process of the hosts, no temp dir and no record."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from odyssey.errors import OdysseyError
from workflows import hosts as harness

REPO = Path(__file__).resolve().parents[2]

FAILS_INSIDE = """
import pytest
from workflows import hosts

@pytest.fixture
def two_hosts():
    with hosts.running("{prefix}", n=2, start_ray=False) as h:
        yield h

def test_fails_on_purpose(two_hosts):
    assert two_hosts.run(1, ["true"]).returncode == 0
    raise AssertionError("on purpose, inside the fixture")

def test_errors_on_purpose(two_hosts):
    two_hosts.run(0, ["sleep", "600"], timeout=0.5)  # a process on a host, and a timeout
"""


def leftovers(prefix: str, temp_dir: str | None = None) -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left = [line.split()[0] for line in names.splitlines() if line.startswith(f"{prefix}-")]
    left += [str(p) for p in Path("/etc/netns").glob(f"{prefix}-*")]
    left += [str(p) for p in Path("/tmp").glob(f"{prefix}-*")]
    if harness.record(prefix).exists():
        left.append(str(harness.record(prefix)))
    if temp_dir:
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and temp_dir.encode() in (proc / "cmdline").read_bytes():
                    left.append(f"process {proc.name}")
            except OSError:
                continue
    return left


def test_a_test_that_fails_inside_the_fixture_leaves_nothing_behind(tmp_path):
    prefix = f"odf{os.getpid()}"
    (tmp_path / "test_on_purpose.py").write_text(FAILS_INSIDE.format(prefix=prefix))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "2 failed" in done.stdout, done.stdout[-3000:]
    assert "on purpose, inside the fixture" in done.stdout and "TimeoutExpired" in done.stdout
    assert not leftovers(prefix)


def test_a_failure_while_hosts_come_up_removes_what_was_started(monkeypatch):
    prefix = f"odu{os.getpid()}"
    started = []
    real_start = harness.Hosts.start_ray

    def start_ray(self, i, wait_s=90):
        if i == 1:
            raise OdysseyError("host 1 failed to start, on purpose")
        real_start(self, i, wait_s)  # the head starts for real
        started.append(self.hosts[i].temp_dir)

    monkeypatch.setattr(harness.Hosts, "start_ray", start_ray)
    with pytest.raises(OdysseyError, match="on purpose"):
        harness.up(prefix, n=2)
    assert started, "the head did not start"
    assert not leftovers(prefix, temp_dir=str(Path(started[0]).parent))
