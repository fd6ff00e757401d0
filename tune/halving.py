"""Synchronous successive halving on tokens trained: the sweep's default scheduler (a Ray Tune
TrialScheduler; imported after Ray is reached).

Every trial of the sweep trains to the first rung and waits there (paused: its worker group is released,
its training run keeps the checkpoint written at the rung and trains no step past it: `pause_at`). When
the whole cohort has reported at that rung, the best 1/factor resume from their rung's checkpoints to the
next rung and the others stop; at the last rung below the trial's full length the survivors train to
the end. This is one bracket of HyperBand (Li et al. 2018), the successive halving of Jamieson &
Talwalkar (2016).

Why not asynchronous ASHA for small sweeps: ASHA promotes a trial as soon as it is in the top 1/factor
of what has reported at a rung so far; the first trials of a sweep have nothing to compare against and
run to the end, so with a handful of trials and two at a time most of the tokens go to whichever points
were drawn first (bench/tune_efficiency.py measures both). Waiting costs little here: a paused trial
holds no resources, and its run resumes from the rung's checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator


def rung_steps(steps: int, grace_fraction: float, factor: float) -> list[int]:
    """Where the cohort is cut, in steps of a full trial: grace, grace x factor, ... below `steps`."""
    rungs, at = [], grace_fraction * steps
    while round(at) < steps:
        if not rungs or round(at) > rungs[-1]:
            rungs.append(max(1, round(at)))
        at *= factor
    return rungs


class SuccessiveHalving(FIFOScheduler):
    _supports_buffered_results = False  # a result past a rung must not arrive before the rung's decision

    def __init__(self, rungs: list[int], factor: float, cohort: int, slots: int):
        """rungs: token counts where the cohort is cut (ascending, below a trial's full length); cohort:
        how many trials the search will propose (the cut at a rung waits for all of them); slots: how
        many trials train at once (paused ones hold none). The metric and mode come from the Tuner."""
        super().__init__()
        self.rungs, self.factor, self.cohort, self.slots = rungs, factor, cohort, slots
        self.trials: list[Trial] = []  # every trial added, in order
        self.alive: set[Trial] = set()  # not stopped, finished or failed
        self.reached: dict[Trial, dict[int, float]] = {}  # trial -> rung index -> signed metric there
        self.cut_at = -1  # the last rung the cohort was cut at
        self.to_resume: set[Trial] = set()  # paused survivors of the last cut, waiting for a slot

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        self._mode = mode or "min"
        return super().set_search_properties(metric, mode, **spec)

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self.trials.append(trial)
        self.reached[trial] = {}
        if trial.status not in (Trial.TERMINATED, Trial.ERROR):  # a resumed sweep re-adds finished trials
            self.alive.add(trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        self.to_resume.discard(trial)
        rung = len(self.reached[trial])
        if rung >= len(self.rungs) or result.get("tokens", 0) < self.rungs[rung] or self.metric not in result:
            return TrialScheduler.CONTINUE
        sign = 1.0 if self._mode == "min" else -1.0
        self.reached[trial][rung] = sign * float(result[self.metric])
        return self._cut(tune_controller, rung, current=trial)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self.on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self.on_trial_remove(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        """A trial gone (failed, finished, stopped by a budget): the cut it held up may be due now."""
        self.alive.discard(trial)
        self.to_resume.discard(trial)
        for rung in range(self.cut_at + 1, len(self.rungs)):
            self._cut(tune_controller, rung, current=None)

    def _cut(self, tune_controller, rung: int, current: Trial | None) -> str:
        """Cut the cohort at `rung` once every live trial has reported there; until then the trial that
        just reached it waits. Returns what the reporting trial (`current`) does next."""
        if rung <= self.cut_at:  # already cut: a survivor resumed and reported the rung again
            return TrialScheduler.CONTINUE
        if (
            rung != self.cut_at + 1
            or len(self.trials) < self.cohort
            or any(rung not in self.reached[t] for t in self.alive)
        ):
            return self._wait(tune_controller, current)
        ranked = sorted(self.alive, key=lambda t: self.reached[t][rung])
        survivors = set(ranked[: max(1, math.ceil(len(ranked) / self.factor))])
        self.cut_at = rung
        action = TrialScheduler.CONTINUE
        for t in ranked:
            if t in survivors:  # the reporting one too: its run holds at the rung (tune/trial.py)
                self.to_resume.add(t)
                if t is current:
                    action = self._wait(tune_controller, t)
            else:
                self.alive.discard(t)
                if t is current:
                    action = TrialScheduler.STOP
                else:
                    tune_controller.stop_trial(t)
        return action

    @staticmethod
    def _wait(tune_controller, trial: Trial | None) -> str:
        """Pause the reporting trial without a Tune checkpoint: its training run wrote one at the rung,
        and resumes from it when the trial runs again (tune/trial.py)."""
        if trial is not None:
            tune_controller.pause_trial(trial, should_checkpoint=False)
        return TrialScheduler.NOOP

    def full(self) -> bool:
        """Every slot taken by a trial that is training or about to."""
        busy = sum(t.status in (Trial.RUNNING, Trial.PENDING) for t in self.trials)
        return busy >= self.slots

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """New trials first (the cohort fills the first rung), then the paused survivors of a cut."""
        for trial in self.trials:
            if trial.status == Trial.PENDING:
                return trial
        if sum(t.status == Trial.RUNNING for t in self.trials) >= self.slots:
            return None
        for trial in self.trials:
            if trial.status == Trial.PAUSED and trial in self.to_resume:
                return trial
        return None

    def debug_string(self) -> str:
        return f"successive halving: rungs at {self.rungs} tokens, {len(self.alive)} of {len(self.trials)} trials alive"


class GatedVariants(BasicVariantGenerator):
    """Tune's variant generator, proposing a trial only while `full()` is false. Its own cap
    (max_concurrent) counts paused trials as live, so a cohort larger than the cap would never fill."""

    def __init__(self, full: Callable[[], bool], **kwargs):
        super().__init__(**kwargs)
        self._full = full

    def next_trial(self):
        return None if self._full() else super().next_trial()
