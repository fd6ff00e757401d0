"""What changed a run, in its events.jsonl: every start, relaunch, restart and resize with the old and
new world size, the step, the tokens and the reason, and every worker failure Ray Train saw.

Two writers append to the file: rank 0 of the worker group (RunLog.event, at every start of the group)
and `train.callbacks.FailureRecord`, which runs beside Ray Train's controller and records a failed
worker before the controller restarts the group. The restarted group's rank 0 reads both to say why
it starts again.
"""

from __future__ import annotations

import json
from pathlib import Path

from train import checkpoint
from train.metrics import console


def resume_point(run_dir: Path, launch_id: str, world: int) -> tuple[Path | None, dict | None, dict]:
    """Rank 0: (checkpoint to resume or None, its meta, the event that says why this start happens).

    The event tells a fresh start from a relaunch (`resume`: a new `python -m train` of the same run),
    a restart inside the same launch (`restart`: Ray Train restarted the worker group after a worker
    failed, recorded by callbacks.FailureRecord) and a resize (`resize`: the same, at another world size:
    a worker lost for good, or an elastic run that found room for more)."""
    gone = checkpoint.remove_leftovers(run_dir)
    ckpt_dir, meta, skipped = checkpoint.newest_intact(run_dir)
    events = read_events(run_dir)
    for reason in skipped:
        console(f"skipping a damaged checkpoint: {reason}")
    starts = [e for e in events if e["event"] in ("start", "resume", "restart", "resize")]
    last_start = starts[-1] if starts else None
    same_launch = last_start is not None and last_start.get("launch") == launch_id
    failures = (
        [e for e in events[events.index(last_start) + 1 :] if e["event"] == "worker_failure"]
        if last_start
        else []
    )
    old_world = last_start["world_size"] if last_start else meta["world_size"] if meta else None
    if not same_launch:
        kind = "resume" if meta is not None else "start"
        reason = "relaunched" if last_start else "a checkpoint in the run directory" if meta else "new run"
    else:
        kind = "resize" if world != old_world else "restart"
        if failures:
            failure = failures[-1]
            who = (
                f"rank {', '.join(map(str, failure['died']))} died"
                if failure.get("died")
                else "worker failed"
            )
            reason = f"{who}: {failure['error']}"
        elif world > old_world:
            reason = f"elastic: the cluster has room for {world} workers"
        else:
            reason = "worker group restarted by Ray Train"
    last_logged = last_logged_step(run_dir)
    event = {
        "event": kind,
        "launch": launch_id,
        "reason": reason,
        "old_world_size": old_world,
        "checkpoint": ckpt_dir.name if ckpt_dir else None,
        "steps_lost": max(0, last_logged - (meta["step"] if meta else 0)) if starts else 0,
        "damaged_skipped": skipped,
        "staging_removed": gone,
    }
    return ckpt_dir, meta, event


def failures_of_launch(run_dir: Path, launch_id: str) -> list[dict]:
    """The worker failures recorded since this launch's first start (none if it never started)."""
    events = read_events(run_dir)
    first = next((i for i, e in enumerate(events) if e.get("launch") == launch_id), None)
    return [] if first is None else [e for e in events[first:] if e["event"] == "worker_failure"]


def read_events(run_dir: Path) -> list[dict]:
    return _read_jsonl(Path(run_dir) / "events.jsonl")


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows in order (a restarted run logs the steps it trains again a second time)."""
    return _read_jsonl(Path(run_dir) / "metrics.jsonl")


def last_logged_step(run_dir: Path) -> int:
    """The last step metrics.jsonl records (0 if none): how far a run got before it stopped."""
    rows = read_metrics(run_dir)
    return rows[-1]["step"] if rows else 0


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
