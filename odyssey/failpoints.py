"""Fault injection: named points in the code where a test or a drill can make a process die or stall.

A failure that matters most often strikes at one instant (a worker killed while its checkpoint shard is
half published); waiting for it by chance makes a flaky test, so the code names those instants and
`ODYSSEY_FAILPOINTS` arms them, a JSON object from point name to what to do there:

    ODYSSEY_FAILPOINTS='{"checkpoint.staged": {"action": "kill", "step": 16, "rank": 1, "once": "/tmp/fp-1"}}'

action: `kill` (SIGKILL this process: no cleanup, no flush, as an out-of-memory kill or a lost node),
`sleep` (`seconds`, default 5) or `error` (raise FailpointError, as a bug would). Every other key but
`once` must equal the value the code passes for the point to fire. A point may hold a list of such
specs: the first that matches fires (`serve.score` errors for one text and stalls for another). `once`: a marker file; the point fires only while it is absent and creates it
first, so a restarted process gets past. Unset (the default), a point costs one dict lookup.
`launch.run` hands the variable to Ray Train's workers.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

ENV = "ODYSSEY_FAILPOINTS"
CONTROLS = ("action", "once", "seconds")


class FailpointError(RuntimeError):
    """Raised by a point armed with `"action": "error"`."""


def hit(point: str, **where) -> None:
    raw = os.environ.get(ENV)
    if not raw:
        return
    specs = json.loads(raw).get(point) or []
    spec = next(
        (
            s
            for s in (specs if isinstance(specs, list) else [specs])
            if all(where.get(k) == v for k, v in s.items() if k not in CONTROLS)
        ),
        None,
    )
    if spec is None:
        return
    if spec.get("once"):
        marker = Path(spec["once"])
        try:
            marker.touch(exist_ok=False)
        except FileExistsError:
            return
    action = spec.get("action", "kill")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "error":
        raise FailpointError(f"failpoint {point} fired")
    time.sleep(float(spec.get("seconds", 5)))
