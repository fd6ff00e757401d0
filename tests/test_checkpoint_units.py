"""Checkpoint integrity and restart bookkeeping without a cluster: manifests, damage detection, what a
reader lists, fault injection, and the reason a restarted run gives. (The real thing, DeepSpeed shards
written by a Ray Train worker group and killed mid-save, is in test_elastic.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from odyssey import failpoints
from odyssey.errors import OdysseyError
from train import checkpoint, events
from train.checkpoint import DamagedCheckpoint


def fake_checkpoint(
    run_dir: Path, step: int, world: int = 2, stage: int = 2, metrics: dict | None = None
) -> Path:
    """A checkpoint directory laid out as save() publishes it, with small files for shards."""
    path = run_dir / checkpoint.name(step)
    (path / checkpoint.TAG).mkdir(parents=True)
    (path / checkpoint.TAG / "mp_rank_00_model_states.pt").write_bytes(os.urandom(300))
    for r in range(world):
        (path / checkpoint.TAG / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(500))
    meta = {"step": step, "tokens": step * 2048, "world_size": world, "zero_stage": stage, "data": {}}
    meta |= {"metrics": metrics} if metrics is not None else {}
    (path / checkpoint.META).write_text(json.dumps(meta))
    files = {}
    for rank in range(world):
        files.update(checkpoint._hash_files(path, rank, world))
    assert not checkpoint.missing_shards(files, stage, world)
    (path / checkpoint.MANIFEST).write_text(json.dumps({"step": step, "files": files}))
    return path


def test_missing_shards_names_what_a_world_size_needs():
    two = [
        "ds/mp_rank_00_model_states.pt",
        "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",  # ZeRO-1 in bf16 names it so
    ]
    assert checkpoint.missing_shards(two, 2, 2) == []
    assert checkpoint.missing_shards(two, 2, 3) == ["zero_pp_rank_2_mp_rank_00_optim_states.pt"]
    assert checkpoint.missing_shards(two[:1], 0, 4) == []  # ZeRO-0: one file holds everything
    assert checkpoint.missing_shards(two, 3, 2) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
    ]


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_a_damaged_checkpoint_is_named_and_the_previous_one_is_used(tmp_path, damage):
    good = fake_checkpoint(tmp_path, 8)
    bad = fake_checkpoint(tmp_path, 16)
    shard = bad / checkpoint.TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "delete":
        shard.unlink()
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-1])
    else:
        data = bytearray(shard.read_bytes())
        data[100] ^= 0x01  # one bit
        shard.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpoint, match=f"{bad}: ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        checkpoint.verify(bad)
    path, meta, skipped = checkpoint.newest_intact(tmp_path)
    assert path == good and meta["step"] == 8
    assert len(skipped) == 1 and str(bad) in skipped[0]
    assert checkpoint.find(tmp_path) == good  # export takes the newest intact one too


def test_only_published_checkpoints_are_listed_and_leftovers_go(tmp_path):
    fake_checkpoint(tmp_path, 8)
    half = tmp_path / f".{checkpoint.name(16)}.staging"  # a save killed before its rename
    (half / checkpoint.TAG).mkdir(parents=True)
    (tmp_path / checkpoint.name(24)).mkdir()  # no manifest: not a checkpoint
    assert [p.name for p in checkpoint.published(tmp_path)] == [checkpoint.name(8)]
    assert checkpoint.remove_leftovers(tmp_path) == [half.name] and not half.exists()
    with pytest.raises(DamagedCheckpoint, match=r"no manifest\.json"):
        checkpoint.verify(tmp_path / checkpoint.name(24))


def test_final_metrics_only_once_the_newest_intact_checkpoint_is_the_last_step(tmp_path):
    """What a Tune trial restarted after its run ended reports (tune/trial.py), instead of training."""
    assert checkpoint.final_metrics(tmp_path, 16) is None  # no checkpoint yet
    fake_checkpoint(tmp_path, 8, metrics={"step": 8, "val_loss": 3.0})
    assert checkpoint.final_metrics(tmp_path, 16) is None  # steps left to train
    last = fake_checkpoint(tmp_path, 16, metrics={"step": 16, "val_loss": 2.5})
    assert checkpoint.final_metrics(tmp_path, 16) == {"step": 16, "val_loss": 2.5}
    (last / checkpoint.META).write_text("{}")  # damaged: its manifest no longer matches
    assert checkpoint.final_metrics(tmp_path, 16) is None  # the run resumes from step 8


def test_resharding_is_needed_across_world_sizes_and_stages_but_zero0_is_refused():
    meta = {"world_size": 2, "zero_stage": 2}
    assert not checkpoint.needs_resharding(meta, 2, 2)
    assert checkpoint.needs_resharding(meta, 1, 2) and checkpoint.needs_resharding(meta, 2, 3)
    assert not checkpoint.needs_resharding({"world_size": 2, "zero_stage": 0}, 1, 0)
    with pytest.raises(OdysseyError, match=r"resume with deepspeed\.zero_stage=2"):
        checkpoint.needs_resharding(meta, 2, 0)


def write_events(run_dir: Path, *records: dict) -> None:
    with open(run_dir / "events.jsonl", "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_a_restart_says_why_and_what_changed(tmp_path):
    ckpt, meta, event = events.resume_point(tmp_path, "launch-a", 2)
    assert (ckpt, meta, event["event"], event["reason"]) == (None, None, "start", "new run")
    write_events(tmp_path, {"event": "start", "launch": "launch-a", "world_size": 2})
    fake_checkpoint(tmp_path, 8)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 12)))
    failure = {"event": "worker_failure", "ranks": [0, 1], "died": [1], "error": "ActorDiedError: killed"}
    write_events(tmp_path, failure)

    ckpt, meta, event = events.resume_point(tmp_path, "launch-a", 1)  # Ray restarted the group smaller
    assert ckpt.name == checkpoint.name(8) and meta["step"] == 8
    assert event["event"] == "resize" and event["old_world_size"] == 2
    assert event["reason"] == "rank 1 died: ActorDiedError: killed" and event["steps_lost"] == 3
    write_events(tmp_path, {**event, "world_size": 1})
    _, _, grown = events.resume_point(tmp_path, "launch-a", 2)  # no failure since: capacity came
    assert grown["event"] == "resize" and grown["reason"] == "elastic: the cluster has room for 2 workers"
    _, _, again = events.resume_point(tmp_path, "launch-b", 2)  # a new `python -m train` of the run
    assert again["event"] == "resume" and again["reason"] == "relaunched"


def test_failpoints_fire_only_where_armed_and_once(tmp_path, monkeypatch):
    marker = tmp_path / "fired"
    spec = {"checkpoint.staged": {"action": "sleep", "seconds": 0.3, "step": 16, "once": str(marker)}}
    monkeypatch.setenv(failpoints.ENV, json.dumps(spec))
    t = time.monotonic()
    failpoints.hit("checkpoint.staged", step=8, rank=0)  # another step: nothing
    failpoints.hit("elsewhere", step=16)
    assert time.monotonic() - t < 0.2 and not marker.exists()
    failpoints.hit("checkpoint.staged", step=16, rank=1)
    assert time.monotonic() - t >= 0.3 and marker.exists()
    t = time.monotonic()
    failpoints.hit("checkpoint.staged", step=16, rank=1)  # once: a restarted process gets past
    assert time.monotonic() - t < 0.2
    kill = {"p": {"action": "kill"}}
    code = "from odyssey import failpoints; failpoints.hit('p'); print('survived')"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, failpoints.ENV: json.dumps(kill)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == -9 and "survived" not in done.stdout


def test_the_failure_record_names_the_rank_whose_process_died(tmp_path):
    """Ray Train reports every rank of a failed group: the dead one (a failed health check whose cause is
    the actor's death) and its peers, whose collectives broke. The record keeps them apart."""
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from train import callbacks

    dead = WorkerHealthCheckFailedError("A worker health check failed.", ActorDiedError())
    peer = RuntimeError("[gloo] Read error: Connection reset by peer")
    callbacks.FailureRecord(tmp_path).after_exception(None, {0: peer, 1: dead})
    callbacks.FailureRecord(tmp_path).after_exception(None, {0: ValueError("bad batch")})
    died, raised = events.read_events(tmp_path)
    assert died["ranks"] == [0, 1] and died["died"] == [1] and died["error"].startswith("ActorDiedError: ")
    assert raised["died"] == [] and raised["error"] == "ValueError: bad batch"
