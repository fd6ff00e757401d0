"""`odyssey serve` refuses a bad config naming the field, and starts nothing. (The whole workflow
(`odyssey serve` starting a local cluster, `serve deploy` and promotion swapping the model under steady
load, `odyssey serve stop`) runs in test_pipeline.py, on the cluster the demo leaves up.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from odyssey import cluster
from serve import launch

BIN = Path(sys.executable).parent


@pytest.fixture
def odyssey_home(tmp_path, monkeypatch):
    """A state directory of the test's own; whatever cluster `odyssey serve` starts is stopped after."""
    monkeypatch.setenv("ODYSSEY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_DASHBOARD_ADDRESS", raising=False)
    try:
        yield tmp_path / "home"
    finally:
        head = cluster.LocalHead.load(launch.state_file())
        if head is not None:
            cluster.stop_head(head)


def test_odyssey_serve_names_the_bad_field(odyssey_home, exported_models):
    run = subprocess.run(
        [str(BIN / "odyssey"), "serve", "--model", str(exported_models[0]), "--set", "gateway.max_tokens=0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "gateway.max_tokens" in run.stderr
    run = subprocess.run(
        [str(BIN / "odyssey"), "serve", "--model", str(odyssey_home / "nothing-here")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "not an exported model" in run.stderr
    assert not launch.state_file().exists()  # refused before any cluster started
    assert not (odyssey_home / "api_keys").exists()  # and before any API key was written
