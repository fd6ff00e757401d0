"""Ray Train callbacks of a training run (they run beside Ray Train's controller, on the driver's node)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ray.train import UserCallback


class FailureRecord(UserCallback):
    """A worker's failure, as Ray Train's controller sees it, in the run's events.jsonl (train/events.py
    reads it when the group restarts)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        # When one worker dies, its peers fail too (their collectives lose a member): the ranks whose
        # process died are the cause, the rest are consequences.
        died = sorted(r for r, e in worker_exceptions.items() if _process_died(e))
        cause = worker_exceptions[died[0] if died else min(worker_exceptions)]
        if died:
            cause = getattr(cause, "health_check_failure", cause)
        lines = str(cause).strip().splitlines()
        record = {
            "event": "worker_failure",
            "time": round(time.time(), 3),
            "ranks": sorted(worker_exceptions),
            "died": died,
            "error": f"{type(cause).__name__}: {lines[0][:300] if lines else ''}",
        }
        with open(self.run_dir / "events.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _process_died(error: BaseException) -> bool:
    """Whether the worker's process is gone (killed, out of memory, its node lost), as opposed to its
    training function raising."""
    from ray.exceptions import ActorDiedError

    seen = error
    while seen is not None:
        if isinstance(seen, ActorDiedError) or type(seen).__name__ == "WorkerHealthCheckFailedError":
            return True
        seen = seen.__cause__
    return False
