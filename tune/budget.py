"""The token budget of a sweep: a Ray Tune stopper that ends the whole sweep once its trials have
trained `budget` tokens together (imported after Ray is reached: Ray reads its settings on import)."""

from __future__ import annotations

from ray.tune import Stopper


class TokenBudget(Stopper):
    def __init__(self, budget: int):
        self.budget = budget
        self.used: dict[str, int] = {}  # trial -> tokens it has trained so far

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.used[trial_id] = int(result.get("tokens", 0))
        return False  # no single trial is stopped for it; stop_all ends them all

    def stop_all(self) -> bool:
        return sum(self.used.values()) >= self.budget
