"""Which local cluster a command finds, stops or points Ray's CLI at: one record per checkout and per
command, a record of a process that is no longer the head is no cluster, a dashboard that drops a
poll is asked again, and the demo serves beside an app that holds its port. Unit level: heads here are
stand-in processes, the dashboard a stand-in client (the real ones: test_pipeline.py, test_readme.py)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from odyssey import cluster
from odyssey.errors import ConfigError, OdysseyError
from serve import launch
from workflows import demo


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ODYSSEY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def start_stand_in(temp_dir) -> tuple[subprocess.Popen, cluster.LocalHead]:
    """A live process, in a session of its own, whose command line names its temp dir, as the head's
    `ray start --temp-dir=...` does."""
    command = [sys.executable, "-c", "import time; time.sleep(120)", f"--temp-dir={temp_dir}"]
    proc = subprocess.Popen(command, start_new_session=True)
    return proc, cluster.LocalHead(
        proc.pid, "127.0.0.1:6390", "http://127.0.0.1:8299", str(temp_dir), "/src/a"
    )


@pytest.fixture
def stand_in_head(tmp_path):
    proc, head = start_stand_in(tmp_path / "ray-head")
    try:
        yield head
    finally:
        proc.kill()
        proc.wait()


def test_demo_stop_stops_the_demos_cluster_and_nothing_else(home, stand_in_head, tmp_path):
    stand_in_head.save(cluster.state_file("serve"))
    proc, demo_head = start_stand_in(tmp_path / "ray-demo")
    demo_head.save(cluster.state_file("demo"))
    assert demo.stop()["dashboard"] == demo_head.dashboard_url
    assert proc.wait(timeout=30) is not None and not cluster.state_file("demo").exists()
    assert cluster.recorded("serve") == stand_in_head  # the other command's cluster runs on, recorded
    with pytest.raises(OdysseyError, match="no demo of this checkout is serving"):
        demo.stop()


def test_each_checkout_and_each_command_has_its_own_record(home, monkeypatch, tmp_path):
    monkeypatch.setattr(cluster, "checkout", lambda: tmp_path / "one" / "odyssey")
    one = {role: cluster.state_file(role) for role in ("serve", "demo", "local")}
    monkeypatch.setattr(cluster, "checkout", lambda: tmp_path / "two" / "odyssey")  # same name, elsewhere
    two = {role: cluster.state_file(role) for role in ("serve", "demo", "local")}
    assert len(set(one.values()) | set(two.values())) == 6
    assert all(path.is_relative_to(home) for path in [*one.values(), *two.values()])


def test_a_record_is_a_cluster_only_while_its_head_runs(home, stand_in_head):
    stand_in_head.save(cluster.state_file("serve"))
    assert cluster.recorded("serve") == stand_in_head and cluster.recorded("demo") is None
    # A pid now used by another process (this one) is not the head: the record is dropped.
    cluster.LocalHead(os_pid := __import__("os").getpid(), "a", "b", "/tmp/ray-gone").save(
        cluster.state_file("demo")
    )
    assert os_pid and cluster.recorded("demo") is None and not cluster.state_file("demo").exists()


def test_commands_here_name_the_cluster_another_checkout_started(home, stand_in_head, monkeypatch, tmp_path):
    stand_in_head.save(cluster.state_file("serve"))
    monkeypatch.setattr(cluster, "checkout", lambda: tmp_path / "elsewhere")
    assert cluster.recorded("serve") is None  # not this checkout's to join or stop
    with pytest.raises(
        OdysseyError, match=r"started none in this checkout.*/src/a \(dashboard http://127.0.0.1:8299\)"
    ):
        launch.stop()
    with pytest.raises(OdysseyError, match="no serve cluster of this checkout is up"):
        cluster.env_lines("serve")


def test_cluster_env_points_rays_cli_at_the_recorded_cluster(home, stand_in_head):
    with pytest.raises(OdysseyError, match="start one with `odyssey cluster local-up`"):
        cluster.env_lines()
    stand_in_head.save(cluster.state_file("local"))
    lines = cluster.env_lines().splitlines()
    assert "export RAY_AUTH_MODE=token" in lines
    assert "export RAY_ADDRESS=127.0.0.1:6390" in lines
    assert "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:8299" in lines
    assert f"export {cluster.SINGLE_MACHINE}=0" in lines  # else Ray dials the machine's address
    assert "ray get-auth-token" in lines[1]  # how a browser gets in


class FlakyDashboard:
    """Serve's submission client whose dashboard drops the first `drops` polls."""

    def __init__(self, drops: int, status: str = "RUNNING"):
        self.drops, self.status, self.polls = drops, status, 0

    def get_serve_details(self) -> dict:
        self.polls += 1
        if self.polls <= self.drops:
            raise requests.exceptions.ConnectionError("('Connection aborted.', RemoteDisconnected(...))")
        return {"applications": {launch.APP: {"status": self.status}}}


def test_a_dropped_readiness_poll_is_retried():
    client = FlakyDashboard(drops=2)
    launch.wait_running(client, timeout_s=30)
    assert client.polls == 3


def test_a_dashboard_that_stays_away_is_one_clear_error():
    t0 = time.monotonic()
    with pytest.raises(OdysseyError, match="did not answer while waiting for the app") as e:
        launch.wait_running(FlakyDashboard(drops=10**6), timeout_s=1.5)
    assert "\n" not in str(e.value) and "ray status" in str(e.value)
    assert time.monotonic() - t0 < 10


def test_the_demo_serves_beside_an_app_that_holds_its_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        chosen = demo.serving_port(None, default=port)
        assert chosen != port and demo.port_free(chosen)
        with pytest.raises(ConfigError, match=rf"port={port} is in use on 127.0.0.1; pick another"):
            demo.serving_port(port)


def test_a_head_that_exits_while_starting_is_started_again_then_its_log_is_quoted(monkeypatch, tmp_path):
    """`ray start` that dies at once (a port taken between choosing and binding): one more try on
    other ports, then an error quoting the log, kept after the head's temp dir is gone."""
    launches = []

    def dies_at_once(num_cpus, num_gpus, autoscaling):
        temp_dir = tmp_path / f"ray-{len(launches)}"
        temp_dir.mkdir()
        (temp_dir / "head.log").write_text(f"try {len(launches)}\nFailed to bind: port 6390 in use\n")
        proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
        proc.wait()
        launches.append(temp_dir)
        return cluster.LocalHead(proc.pid, "127.0.0.1:6390", "http://127.0.0.1:1", str(temp_dir)), proc

    monkeypatch.setattr(cluster, "_launch_head", dies_at_once)
    monkeypatch.setattr(cluster, "ensure_token", lambda: None)
    with pytest.raises(OdysseyError, match=r"the Ray head node exited; its log \(\S+\) ends:") as e:
        cluster.start_head(num_cpus=1, wait_s=30)
    assert len(launches) == 2 and not any(d.exists() for d in launches)
    assert "try 1\nFailed to bind: port 6390 in use" in str(e.value)
    kept = Path(str(e.value).split("its log (")[1].split(")")[0])
    assert "port 6390 in use" in kept.read_text()
    shutil.rmtree(kept.parent)


def test_free_ports_are_distinct():
    ports = cluster.free_ports(50)
    assert len(set(ports)) == 50
