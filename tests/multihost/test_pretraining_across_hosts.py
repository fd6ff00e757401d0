"""`ray job submit` of an elastic ZeRO-2 run across hosts with addresses of their own: one worker per
host over gloo (its interface derived from the node's Ray address: train/network.py), checkpoints on the
shared file system. A host is lost mid-run (link down, every process SIGKILLed): the run goes on on
the host left, from its last checkpoint, on the uninterrupted run's loss curve; the host comes back and
the run grows onto it again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_runs import STEPS, losses, settings

from odyssey import failpoints
from train import events

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-3  # relative, as for resizes on one machine (tests/test_train.py)
LOST_AT, BACK_AT = 12, 20  # the steps at which a host is lost, and at which it comes back


def starts(run_dir: Path) -> list[dict]:
    return [e for e in events.read_events(run_dir) if e["event"] in ("start", "resume", "restart", "resize")]


def reached(run_dir: Path, step: int, world: int) -> bool:
    """Whether the run has logged `step` since its latest start, and that start was at `world`."""
    s = starts(run_dir)
    return bool(s) and s[-1]["world_size"] == world and max(losses(run_dir), default=0) >= step


@pytest.mark.slow
def test_a_run_across_hosts_survives_a_lost_host_on_its_curve_and_grows_back(
    hosts, wait_for, assert_documented, zero_runs, corpus_dir, blocks_dir, tmp_path
):
    _, runs = zero_runs
    reference = losses(Path(runs[2]["run_dir"]))
    run_dir = tmp_path / "across"
    # Each stall holds the run at a step long enough for the test to act; the restart ends it.
    stalls = [
        {"action": "sleep", "seconds": 120, "step": LOST_AT, "world": 2, "once": str(tmp_path / "fp-lost")},
        {"action": "sleep", "seconds": 120, "step": BACK_AT, "world": 1, "once": str(tmp_path / "fp-back")},
    ]
    overrides = settings(
        corpus_dir,
        tmp_path,
        "across",
        "scaling.workers=[1,2]",
        "scaling.cpus_per_worker=2",  # a host's 2 CPUs: one worker per host
        "scaling.resize_check_s=2",
        "max_failures=3",
    )
    runtime_env = {"env_vars": {failpoints.ENV: json.dumps({"train.step": stalls})}}
    submit = [
        str(Path(sys.executable).parent / "ray"), "job", "submit",
        "--address", hosts.dashboard_url, "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps(runtime_env),
        "--", sys.executable, "-m", "train", "--config", "tiny-cpu", *[a for s in overrides for a in ("--set", s)],
    ]  # fmt: skip
    job = subprocess.Popen(
        hosts.command(0, submit),
        env=hosts.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(f"step {LOST_AT} on 2 hosts", lambda: reached(run_dir, LOST_AT, 2), 240)
        first = starts(run_dir)[0]
        lost = next(i for i, h in enumerate(hosts.hosts) if h.address == first["hosts"][1])
        training = {i: hosts.exposure(i) for i in (1, 2)}  # torch's store and gloo listen now
        hosts.crash(lost)
        wait_for(f"step {BACK_AT} on the host left", lambda: reached(run_dir, BACK_AT, 1), 180)
        hosts.restore(lost)
        output, _ = job.communicate(timeout=240)
    finally:
        job.kill()
    assert job.returncode == 0, output[-3000:]

    for i, exposure in training.items():
        assert_documented(exposure, f"{hosts.hosts[i].netns} while training")
    s = starts(run_dir)
    assert [e["world_size"] for e in s] == [2, 1, 2], s
    assert len(set(s[0]["hosts"])) == 2 and hosts.head.address not in s[0]["hosts"]
    survivor = [h for h in s[0]["hosts"] if h != hosts.hosts[lost].address]
    assert s[1]["hosts"] == survivor and s[1]["event"] == "resize", s[1]
    assert s[1]["step"] == 8 and ("died" in s[1]["reason"] or "failed" in s[1]["reason"]), s[1]
    assert sorted(s[2]["hosts"]) == sorted(s[0]["hosts"]) and s[2]["event"] == "resize", s[2]
    assert s[2]["step"] == 16, s[2]  # the checkpoint the single host wrote
    resumed = losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(9, STEPS + 1):  # every step after the last checkpoint before the loss
        assert resumed[step] == pytest.approx(reference[step], rel=TOLERANCE), (step, resumed[step])
