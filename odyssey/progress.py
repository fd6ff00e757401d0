"""Progress lines for long work: step, rate, ETA and whatever metrics the caller passes."""

from __future__ import annotations

import time
from collections.abc import Callable


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def fmt_rate(per_s: float) -> str:
    """12.3k above a thousand, 8.3 below (a few rows a second must not read as 0.0k)."""
    return f"{per_s / 1000:.1f}k" if per_s >= 1000 else f"{per_s:.1f}"


class Progress:
    """Prints `step 120/300 | loss 3.2100 | 12.3k tok/s | eta 0:00:42` at most every `every_s` seconds
    (and always at the last step). Rates count from the first update, so start-up is not averaged in."""

    def __init__(
        self, total: int, unit: str = "tok", every_s: float = 5.0, emit: Callable[[str], None] = print
    ):
        self.total, self.unit, self.every_s, self.emit = total, unit, every_s, emit
        self.t0 = self.last = None
        self.count0 = self.step0 = 0

    def update(self, step: int, count: int, **metrics: float) -> None:
        now = time.perf_counter()
        if self.t0 is None:
            self.t0, self.last, self.count0, self.step0 = now, now, count, step
            return
        if now - self.last < self.every_s and step < self.total:
            return
        self.last = now
        rate = (count - self.count0) / max(now - self.t0, 1e-9)
        steps_per_s = (step - self.step0) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / steps_per_s if steps_per_s else 0.0
        parts = [f"step {step}/{self.total}"]
        parts += [f"{k} {v:.4f}" for k, v in metrics.items()]
        parts += [f"{fmt_rate(rate)} {self.unit}/s", f"eta {fmt_duration(eta)}"]
        self.emit(" | ".join(parts))
