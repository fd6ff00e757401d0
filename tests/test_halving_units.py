"""Successive halving's decisions with stand-in trials and controller (tune/halving.py): the cohort
waits at a rung until every trial has reported there, the best 1/factor go on, the others stop; a failed
trial does not hold the cut up; paused trials free their slot."""

from __future__ import annotations

import pytest

from tune.halving import SuccessiveHalving, rung_steps

ray_tune = pytest.importorskip("ray.tune")
from ray.tune.experiment import Trial  # noqa: E402
from ray.tune.schedulers import TrialScheduler  # noqa: E402


class FakeTrial:
    def __init__(self, name):
        self.trial_id, self.status = name, Trial.RUNNING

    def __repr__(self):
        return self.trial_id


class FakeController:
    def __init__(self):
        self.stopped, self.paused = [], []

    def stop_trial(self, trial):
        self.stopped.append(trial)
        trial.status = Trial.TERMINATED

    def pause_trial(self, trial, should_checkpoint=True):
        assert should_checkpoint is False  # the run's own checkpoint at the rung is what resumes
        self.paused.append(trial)
        trial.status = Trial.PAUSED


def test_rungs_grow_by_the_factor_below_the_full_length():
    assert rung_steps(48, 1 / 12, 3) == [4, 12, 36]
    assert rung_steps(16, 0.25, 2) == [4, 8]
    assert rung_steps(2000, 0.125, 3) == [250, 750]
    assert rung_steps(10, 1.0, 2) == []  # no rung below the end: nothing to cut
    assert rung_steps(3, 0.1, 2) == [1, 2]  # rounded, never 0, never twice


def cohort(n, slots=2):
    sched = SuccessiveHalving([100, 300], 3, n, slots)
    sched.set_search_properties("val_loss", "min")  # as the Tuner does
    ctl = FakeController()
    trials = [FakeTrial(f"t{i}") for i in range(n)]
    for t in trials:
        sched.on_trial_add(ctl, t)
    return sched, ctl, trials


def test_cohort_waits_at_the_rung_then_keeps_the_best_third():
    sched, ctl, trials = cohort(6)
    losses = [5.0, 3.0, 4.0, 1.0, 6.0, 2.0]
    for t, loss in list(zip(trials, losses))[:-1]:
        assert sched.on_trial_result(ctl, t, {"tokens": 50, "val_loss": 9.0}) == TrialScheduler.CONTINUE
        assert sched.on_trial_result(ctl, t, {"tokens": 100, "val_loss": loss}) == TrialScheduler.NOOP
        assert t.status == Trial.PAUSED  # waits, holding no slot
    # The last one reports: the cut. Best two of six (1.0 and 2.0): t3 and t5 (the reporter) resume
    # from their rung's checkpoints; the reporter pauses too, as its run holds at the rung (`pause_at`).
    assert (
        sched.on_trial_result(ctl, trials[5], {"tokens": 100, "val_loss": losses[5]}) == TrialScheduler.NOOP
    )
    assert trials[5].status == Trial.PAUSED and trials[5] not in ctl.stopped
    assert sorted(map(str, ctl.stopped)) == ["t0", "t1", "t2", "t4"]
    assert sched.choose_trial_to_run(ctl) is trials[3]
    trials[3].status = Trial.RUNNING
    assert sched.choose_trial_to_run(ctl) is trials[5]
    trials[5].status = Trial.RUNNING
    assert sched.choose_trial_to_run(ctl) is None  # both slots taken
    # A survivor reporting the same rung again after it resumed is not cut twice.
    assert sched.on_trial_result(ctl, trials[3], {"tokens": 100, "val_loss": 1.0}) == TrialScheduler.CONTINUE


def test_a_failed_trial_does_not_hold_up_the_cut_and_max_mode_keeps_the_highest():
    sched = SuccessiveHalving([100], 2, 3, 2)
    sched.set_search_properties("acc", "max")
    ctl = FakeController()
    trials = [FakeTrial(f"t{i}") for i in range(3)]
    for t in trials:
        sched.on_trial_add(ctl, t)
    sched.on_trial_result(ctl, trials[0], {"tokens": 100, "acc": 0.9})
    sched.on_trial_result(ctl, trials[1], {"tokens": 100, "acc": 0.5})
    assert not ctl.stopped  # t2 has not reported
    trials[2].status = Trial.ERROR
    sched.on_trial_error(ctl, trials[2])
    assert ctl.stopped == [trials[1]] and sched.choose_trial_to_run(ctl) is trials[0]
    assert trials[0].status == Trial.PAUSED  # paused at the first report, resumed from its checkpoint


def test_the_cut_waits_for_trials_not_yet_proposed_and_slots_count_only_training_trials():
    sched, ctl, trials = cohort(3, slots=1)
    sched.trials.pop()  # the third is not proposed yet
    sched.alive.discard(trials[2])
    assert sched.full()  # t0, t1 both RUNNING in this stand-in
    for t in trials[:2]:
        assert sched.on_trial_result(ctl, t, {"tokens": 100, "val_loss": 1.0}) == TrialScheduler.NOOP
    assert not sched.full() and not ctl.stopped  # both paused: room for the third, no cut yet
