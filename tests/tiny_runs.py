"""The tiny training run the tests share: its settings, and its loss curve read back. The session's
uninterrupted ZeRO 0/2/3 runs (conftest.zero_runs) are the references that resumed, resized and
multi-host runs are held to."""

from __future__ import annotations

from pathlib import Path

from odyssey.config import load_config
from train import events
from train.config import TrainConfig, recipe_path

STEPS = 32  # room after the step-8 checkpoint: the kill test must land before the run ends


def settings(corpus_dir, storage, name, *extra) -> list[str]:
    return [
        f"name={name}",
        f"storage={storage}",
        f"data.corpus={corpus_dir}",
        "data.prepare=false",
        f"steps={STEPS}",
        "log_every=1",
        "eval_every=8",
        "checkpoint_every=8",
        "keep_checkpoints=4",  # every checkpoint of the run stays: resumes at other sizes start from them
        *extra,
    ]


def config(corpus_dir, storage, name, *extra) -> TrainConfig:
    return load_config(TrainConfig, recipe_path("tiny-cpu"), settings(corpus_dir, storage, name, *extra))


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss, the last record of each step (a resumed run logs some steps twice)."""
    return {r["step"]: r["loss"] for r in events.read_metrics(run_dir)}
