"""One trial: one real training run of train/ with the trial's hyperparameters.

Runs inside the Tune trial's process (Ray Train V2 style): it builds the trial's training config and
launches a TorchTrainer, whose worker group (1 worker for proxies, more for ZeRO-sharded runs) is
placed by Ray beside the other trials'. Every `ray.train.report` of the training loop (at evaluations
and checkpoints) reaches Tune through TuneReportCallback, so the scheduler (halving, ASHA) sees the validation loss as it falls
and can stop the trial; stopping the trial ends its worker group with it.

The training run is named after the trial and kept under the sweep directory: a sweep resumed after an
interruption restarts an unfinished trial, and its training run resumes from its own latest checkpoint;
a trial whose run had already written its last checkpoint reports that checkpoint's metrics and ends.
Under successive halving (tune/halving.py) the run also checkpoints at each rung and holds there (the
config's `pause_at`): the trial is paused for the cut and, if it survives, resumes from that checkpoint.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tune import space


def run_trial(params: dict, *, base: dict, trials_dir: str, rungs: list[int]) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from train import checkpoint, launch

    run = {"name": tune.get_context().get_trial_id(), "storage": trials_dir}
    cfg = space.train_config(base, {**params, **run})
    # Successive halving pauses the trial at each rung: its run checkpoints there and trains no further
    # until the trial is paused (to resume from that checkpoint) or stopped.
    at = {-(-tokens // cfg.global_batch_tokens) for tokens in rungs}
    cfg = replace(cfg, pause_at=sorted(s for s in at if s < cfg.steps))
    final = checkpoint.final_metrics(Path(trials_dir) / cfg.name, cfg.steps)
    if final is not None:  # restarted after its run's last checkpoint: Tune still needs the run's result
        tune.report(final)
        return
    launch.run(cfg, callbacks=[TuneReportCallback()])
