"""Sweeps for real: Ray Tune trials that are Ray Train + DeepSpeed runs of the tiny model on the session's
local cluster; successive halving (the default) pausing the cohort at each rung and stopping all but
the best; the best recipe trained again; a sweep process killed mid-way and
resumed without rerunning finished trials; a bad space refused by the CLI before any trial."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from odyssey.config import from_dict, load_config
from odyssey.errors import ConfigError
from train import checkpoint, launch
from train.config import TrainConfig
from tune import sweep
from tune.config import SweepConfig

REPO = Path(__file__).resolve().parent.parent
STEPS = 16


def sweep_data(corpus_dir, storage, name, **sections) -> dict:
    """A sweep of the tiny model (one-worker trials of 16 steps) as a sweep file holds it."""
    data = {
        "name": name,
        "storage": str(storage),
        "recipe": "tiny-cpu",
        "train": {
            "data.corpus": str(corpus_dir),
            "data.prepare": False,
            "steps": STEPS,
            "eval_every": 4,
            "log_every": 4,
            "checkpoint_every": STEPS,
        },
        "trial": {"workers": 1},
    }
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    return data


@pytest.fixture(scope="module")
def halving_sweep(ray_cluster, blocks_dir, corpus_dir, tmp_path_factory):
    """Four learning rates, two far too small, proposed at random (each once), two trials at a time;
    successive halving at 1/4 and 1/2 of the steps keeping the best half (the default search otherwise)."""
    storage = tmp_path_factory.mktemp("tune")
    data = sweep_data(
        corpus_dir,
        storage,
        "halving",
        space={"optim.lr": {"choice": [3e-3, 1e-2, 1e-4, 1e-5]}},
        scheduler={"grace_fraction": 0.25, "reduction_factor": 2},
        budget={"trials": 4},
        trial={"max_concurrent": 2},
    )
    summary = sweep.run(from_dict(SweepConfig, data))
    rows = json.loads((Path(summary["sweep_dir"]) / "trials.json").read_text())
    return data, summary, rows


def _events(summary, row) -> list[dict]:
    path = Path(summary["sweep_dir"]) / "trials" / row["trial_id"] / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_halving_sweep_cuts_the_cohort_at_each_rung(halving_sweep):
    _, summary, rows = halving_sweep
    assert len(rows) == 4 and summary["trials"]["error"] == 0
    by_lr = {r["params"]["optim.lr"]: r for r in rows}
    assert set(by_lr) == {3e-3, 1e-2, 1e-4, 1e-5}  # each point once
    # All four to step 4; the best two to step 8; the best one to the end (16). Each trial stops exactly
    # at its rung: the cut waits for the whole cohort there.
    assert sorted(r["tokens"] // 2048 for r in rows) == [4, 4, 8, 16]
    assert [r["state"] for r in rows].count("completed") == 1
    assert by_lr[1e-5]["tokens"] == by_lr[1e-4]["tokens"] == 4 * 2048  # barely move: the first cut
    assert summary["tokens"] == sum(r["tokens"] for r in rows) == (4 * 4 + 2 * 4 + 8) * 2048
    for r in rows:
        # Every trial was a real training run, with the per-step metrics it trained...
        metrics = Path(summary["sweep_dir"]) / "trials" / r["trial_id"] / "metrics.jsonl"
        steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
        # ...and held at its rung (train/loop.py `pause_at`): not a step trained past it before the cut.
        assert steps[-1] * 2048 == r["tokens"], (r["params"], steps)
    # Every survivor of a cut went on from the checkpoint its run wrote at the rung, never from scratch:
    # the two survivors of the first cut, and the one of the second.
    events = [e for r in rows for e in _events(summary, r)]
    assert [e["event"] for e in events].count("start") == 4
    resumed = sorted(e["checkpoint"] for e in events if e["event"] == "resume")
    assert resumed == [checkpoint.name(4), checkpoint.name(4), checkpoint.name(8)], resumed


def test_sweep_writes_table_plot_and_the_best_recipe(halving_sweep):
    _, summary, rows = halving_sweep
    out = Path(summary["sweep_dir"])
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "trials.md").read_text()
    assert table.count("\n| ") == 4 and "stopped" in table  # a row per trial
    completed = [r for r in rows if r["state"] == "completed"]
    best = min(completed, key=lambda r: r["last"])
    assert summary["best"]["params"] == best["params"]
    recipe = load_config(TrainConfig, out / "best.yaml")
    assert recipe.optim.lr == best["params"]["optim.lr"] and recipe.name == "halving-best"
    assert recipe.steps == STEPS and recipe.scaling.workers == 1


def test_best_recipe_trains_and_reproduces_its_trial(halving_sweep, tmp_path):
    _, summary, _rows = halving_sweep
    recipe = load_config(TrainConfig, Path(summary["sweep_dir"]) / "best.yaml", [f"storage={tmp_path}"])
    result = launch.run(recipe)
    assert result["steps"] == STEPS and result["final_loss"] < result["first_loss"]
    # Same config, same seed: the recipe's run lands where its trial did.
    assert result["val_loss"]["mean"] == pytest.approx(summary["best"]["val_loss"], rel=0.02)


def test_finished_sweep_resumes_as_a_no_op(halving_sweep):
    import ray

    data, summary, rows = halving_sweep
    marks = {
        r["trial_id"]: (Path(summary["sweep_dir"]) / "trials" / r["trial_id"] / "metrics.jsonl").read_bytes()
        for r in rows
    }
    again = sweep.run(from_dict(SweepConfig, data))
    assert again["trials"] == summary["trials"] and again["tokens"] == summary["tokens"]
    for trial_id, before in marks.items():
        assert (Path(summary["sweep_dir"]) / "trials" / trial_id / "metrics.jsonl").read_bytes() == before
    # Stopped trials took their worker groups with them: the cluster's CPUs are all free again.
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < 4 and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 4


def test_a_different_sweep_under_the_same_name_is_refused(halving_sweep):
    data, _summary, _rows = halving_sweep
    changed = from_dict(SweepConfig, {**data, "train": {**data["train"], "steps": 8}})
    with pytest.raises(ConfigError, match="holds a sweep with other settings"):
        sweep.run(changed)


def _tune_cli(args: list[str], **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(
        [sys.executable, "-m", "tune", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the kill takes the driver and its embedded cluster
        **kw,
    )


def test_killed_transfer_sweep_resumes_without_rerunning_finished_trials(blocks_dir, corpus_dir, tmp_path):
    """A µP transfer sweep (32-wide proxy of the 128-wide tiny model) in its own process, SIGKILLed with
    its embedded cluster once a trial has finished, then launched again."""
    sweep_file = tmp_path / "transfer.yaml"
    data = sweep_data(
        corpus_dir,
        tmp_path / "tune",
        "mup",
        train={"steps": 8, "checkpoint_every": 4},
        space={"optim.lr": {"grid": [3e-3, 3e-2]}},
        search={"algorithm": "grid"},
        scheduler={"kind": "fifo"},
        trial={"max_concurrent": 1},
        transfer={"proxy_width": 32},
    )
    sweep_file.write_text(yaml.safe_dump(data))
    trials_dir = tmp_path / "tune" / "mup" / "trials"

    def finished() -> list[Path]:
        """Training runs of the trials that Tune has recorded as finished in its experiment state."""
        done = []
        for state in (tmp_path / "tune" / "mup").glob("experiment_state-*.json"):
            with contextlib.suppress(ValueError, OSError):  # being rewritten right now
                for trial, _ in json.loads(state.read_text())["trial_data"]:
                    trial = json.loads(trial)
                    if trial["status"] == "TERMINATED":
                        done.append(trials_dir / trial["trial_id"] / "metrics.jsonl")
        return done

    proc = _tune_cli(["--config", str(sweep_file), "--transfer"])
    try:
        deadline = time.time() + 240
        while not finished() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert finished(), (
            proc.communicate()[1][-3000:] if proc.poll() is not None else "no trial finished in time"
        )
        done_before = {p.parent.name: p.read_bytes() for p in finished()}
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    again = _tune_cli(["--config", str(sweep_file), "--transfer"])
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["trials"] == {"completed": 2, "stopped": 0, "error": 0}
    for trial_id, before in done_before.items():  # finished trials were kept, not trained again
        assert (trials_dir / trial_id / "metrics.jsonl").read_bytes() == before
    assert len(list(trials_dir.iterdir())) == 2
    # The transfer recipe: the tiny model's own width under µP, with the proxy's best learning rate.
    target = load_config(TrainConfig, summary["target_recipe"])
    proxy = load_config(TrainConfig, summary["recipe"])
    assert (proxy.model.d_model, target.model.d_model) == (32, 128)
    assert target.model.mup and target.model.mup_base_width == 32 and target.model.width_mult == 4
    assert target.optim.lr == proxy.optim.lr == summary["best"]["params"]["optim.lr"]


def test_bad_space_is_refused_before_any_trial(tmp_path):
    proc = _tune_cli(
        [
            "--config",
            "tiny-lr",
            "--set",
            f"storage={tmp_path}",
            "--set",
            "space.optim.lrr={loguniform: [1e-3, 1e-2]}",
        ]
    )
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "tune: error: space.optim.lrr: unknown field 'optim.lrr'; did you mean 'optim.lr'?" in err
    assert "Traceback" not in err and "Ray" not in err  # refused before Ray started
    assert not any(tmp_path.iterdir())  # no sweep directory, no trial
