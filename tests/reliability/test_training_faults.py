"""Training faults beyond tests/test_train.py's kills: workers that keep dying exhaust max_failures
and the run ends with an error that says so (and where to resume), not a hang; a checkpoint tampered
with after it was written (a shard deleted, one byte changed) is refused on load, naming the file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from odyssey import failpoints
from odyssey.config import load_config
from odyssey.errors import OdysseyError
from train import checkpoint, events, launch
from train.config import TrainConfig, recipe_path
from train.export import export


@pytest.fixture(scope="module")
def dying_run(ray_cluster, blocks_dir, corpus_dir, tmp_path_factory):
    """A run whose rank 1 is SIGKILLed whenever it saves the step-4 checkpoint: the first attempt dies
    there, Ray Train restarts the group from step 2 (max_failures=1), and it dies there again."""
    storage = tmp_path_factory.mktemp("runs")
    settings = [
        "name=dying", f"storage={storage}", f"data.corpus={corpus_dir}", "data.prepare=false", "steps=8",
        "log_every=1", "eval_every=2", "checkpoint_every=2", "max_failures=1",
    ]  # fmt: skip
    cfg = load_config(TrainConfig, recipe_path("tiny-cpu"), settings)
    os.environ[failpoints.ENV] = json.dumps({"checkpoint.staged": {"action": "kill", "step": 4, "rank": 1}})
    start = time.monotonic()
    try:
        with pytest.raises(OdysseyError) as failure:
            launch.run(cfg)
    finally:
        del os.environ[failpoints.ENV]
    return storage / "dying", str(failure.value), time.monotonic() - start


def test_workers_that_keep_dying_end_the_run_with_a_clear_error_not_a_hang(dying_run):
    run_dir, message, seconds = dying_run
    failures = [e for e in events.read_events(run_dir) if e["event"] == "worker_failure"]
    assert len(failures) == 2 and all(f["died"] == [1] for f in failures), failures
    assert "the workers failed 2 times, more than max_failures=1 allows" in message, message
    assert "rank 1 died" in message
    assert f"the latest intact checkpoint is {run_dir / checkpoint.name(2)} (step 2)" in message, message
    assert "run the same command to resume" in message
    assert [p.name for p in checkpoint.published(run_dir)] == [checkpoint.name(2)]  # no torn step 4
    assert seconds < 300  # bounded: ended by the error, not by this suite's timeout


def tampered(run_dir: Path, into: Path, damage) -> tuple[Path, str]:
    """A copy of the run's step-2 checkpoint in a run directory of its own, damaged in one shard."""
    source = run_dir / checkpoint.name(2)
    copy = into / source.name
    shutil.copytree(source, copy)
    manifest = json.loads((copy / checkpoint.MANIFEST).read_text())["files"]
    shard = next(rel for rel in sorted(manifest) if "zero_pp_rank_1_" in rel and "optim_states" in rel)
    damage(copy / shard)
    return into, shard


def delete(path: Path) -> None:
    path.unlink()


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, size unchanged
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "says"), [(delete, "is missing"), (flip_a_byte, "does not match its SHA-256")]
)
def test_a_tampered_checkpoint_is_refused_on_load_naming_the_file(dying_run, tmp_path, damage, says):
    run_dir, *_ = dying_run
    checkpoint.verify(run_dir / checkpoint.name(2))  # the original is intact
    damaged_run, shard = tampered(run_dir, tmp_path / "run", damage)
    with pytest.raises(checkpoint.DamagedCheckpoint, match=says) as refused:
        export(damaged_run, tmp_path / "model")
    assert shard in str(refused.value)
    assert not (tmp_path / "model").exists()  # nothing half-written
    cli = subprocess.run(
        [sys.executable, "-m", "workflows", "export", str(damaged_run), "--out", str(tmp_path / "cli-model")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 2 and "no intact checkpoint" in cli.stderr and shard in cli.stderr, cli.stderr[
        -2000:
    ]
    assert not (tmp_path / "cli-model").exists()
