"""Distributed pretraining for real: Ray Train, 2 CPU workers over gloo, DeepSpeed ZeRO 0/2/3, real
checkpoints, a real kill and resume, export to the serving format, and `ray job submit` against a
`ray start --head` cluster with token authentication on loopback."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from odyssey import artifact, cluster
from odyssey.config import load_config
from odyssey.errors import ConfigError, OdysseyError
from train import launch
from train.config import TrainConfig, recipe_path
from train.export import export

REPO = Path(__file__).resolve().parent.parent
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
        *extra,
    ]


def config(corpus_dir, storage, name, *extra) -> TrainConfig:
    return load_config(TrainConfig, recipe_path("tiny-cpu"), settings(corpus_dir, storage, name, *extra))


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss, the last record of each step (a resumed run logs some steps twice)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def zero_runs(ray_cluster, blocks_dir, corpus_dir, tmp_path_factory):
    """The same tiny run under ZeRO 0, 2 and 3, on the session's local cluster."""
    storage = tmp_path_factory.mktemp("runs")
    out = {}
    for stage in (0, 2, 3):
        summary = launch.run(config(corpus_dir, storage, f"zero{stage}", f"deepspeed.zero_stage={stage}"))
        out[stage] = summary
    return storage, out


def test_zero_stages_agree_at_first_and_lower_the_loss(zero_runs):
    _, runs = zero_runs
    curves = {stage: losses(Path(s["run_dir"])) for stage, s in runs.items()}
    for step in (1, 2, 3):  # the same model, data and arithmetic: sharding must not change the numbers
        assert curves[2][step] == pytest.approx(curves[0][step], rel=1e-4)
        assert curves[3][step] == pytest.approx(curves[0][step], rel=1e-4)
    flops_per_token = {}  # MFU / (tokens/s) = FLOPs per token / peak: the same model, so within noise
    for stage, s in runs.items():
        rows = [json.loads(line) for line in (Path(s["run_dir"]) / "metrics.jsonl").open()]
        norms = [r["grad_norm"] for r in rows]  # every stage reports the clipped gradients' norm
        assert len(norms) == STEPS and all(0 < n < 100 for n in norms), (stage, norms[:3])
        flops_per_token[stage] = statistics.median(r["mfu"] / r["tokens_per_s"] for r in rows)
    for stage in (2, 3):  # ZeRO-3's empty local parameters must not shrink the model it counts
        assert 0.5 < flops_per_token[stage] / flops_per_token[0] < 2.0, flops_per_token
    for stage in (2, 3):
        s = runs[stage]
        assert s["steps"] == STEPS and s["tokens"] == STEPS * 2048
        early = sum(curves[stage][i] for i in (1, 2, 3)) / 3
        late = sum(curves[stage][i] for i in (STEPS - 2, STEPS - 1, STEPS)) / 3
        assert late < early - 0.5, (stage, early, late)
        assert s["val_loss"]["mean"] < s["first_loss"] and set(s["val_loss"]) >= {
            "summarize",
            "moderate",
            "lm",
        }
        assert s["tokens_per_s"] > 0 and 0 < s["mfu"] < 1.5


def test_every_rank_saves_its_shard(zero_runs):
    storage, runs = zero_runs
    for stage in (2, 3):
        ckpt = Path(runs[stage]["checkpoint"])
        assert ckpt.name == f"checkpoint_step{STEPS:07d}"
        files = {p.name for p in (ckpt / "ds").iterdir()}
        for rank in (0, 1):
            assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files
            assert (ckpt / "data_state" / f"rank{rank}.json").is_file()
        meta = json.loads((ckpt / "odyssey.json").read_text())
        assert meta["world_size"] == 2 and meta["step"] == STEPS and meta["zero_stage"] == stage
        assert (ckpt / "tokenizer.json").is_file()
    # Best-k by validation loss keeps at most 2 checkpoints (plus the latest).
    assert len(list((storage / "zero2").glob("checkpoint_step*"))) <= 2


def test_export_consolidates_zero_into_the_core_model(zero_runs, tmp_path):
    storage, _ = zero_runs
    out3 = export(storage / "zero3", tmp_path / "m3")
    out0 = export(storage / "zero0", tmp_path / "m0")
    model3, tok, meta = artifact.load_model(out3)
    model0, _, _ = artifact.load_model(out0)
    assert meta["step"] == STEPS
    for name, tensor in model0.state_dict().items():  # ZeRO-3's gathered shards = ZeRO-0's whole module
        torch.testing.assert_close(model3.state_dict()[name], tensor, rtol=1e-3, atol=1e-4)
    prompt = tok.prompt("summarize", "A library that parses JSON documents.")
    out = model3.generate([prompt], max_new_tokens=12, temperature=0.0, stop_ids=[tok.eos_id])[0]
    assert 0 < len(out) <= 12 and isinstance(tok.decode(out), str)


def test_bad_requests_fail_before_any_worker_starts(ray_cluster, blocks_dir, corpus_dir, tmp_path):
    with pytest.raises(ConfigError, match="data: no packed blocks at"):
        launch.run(config(tmp_path / "nothing", tmp_path, "missing"))
    with pytest.raises(
        ConfigError, match=r"scaling: 6 workers x 1.0 CPUs \(\+1 for data\) exceed the cluster's 4 CPUs"
    ):
        launch.run(config(corpus_dir, tmp_path, "big", "scaling.workers=6", "global_batch_tokens=6144"))
    with pytest.raises(ConfigError, match=r"data\.seq_len=64 but"):
        launch.run(
            config(
                corpus_dir,
                tmp_path,
                "len",
                "data.seq_len=64",
                "data.blocks=" + str(corpus_dir / "blocks-128"),
                "global_batch_tokens=1024",
            )
        )
    assert not list(tmp_path.glob("*/checkpoint_*"))


def test_diverging_loss_stops_without_a_checkpoint(ray_cluster, blocks_dir, corpus_dir, tmp_path):
    cfg = config(
        corpus_dir, tmp_path, "nan", "optim.lr=1.0e+37", "optim.warmup_steps=1", "steps=8", "log_every=4"
    )
    with pytest.raises(OdysseyError, match="loss or gradient norm became NaN or Inf at or before step"):
        launch.run(cfg)
    assert not list((tmp_path / "nan").glob("checkpoint_*"))


def _checkpoint_registered(run_dir: Path, step: int) -> bool:
    try:
        return f"checkpoint_step{step:07d}" in (run_dir / "checkpoint_manager_snapshot.json").read_text()
    except OSError:
        return False


@pytest.mark.slow
def test_killed_run_resumes_on_the_uninterrupted_curve(zero_runs, corpus_dir, tmp_path):
    """SIGKILL the whole `python -m train` process group once the step-8 checkpoint is registered, run
    the same command again: it resumes there and every step's loss equals the uninterrupted run's."""
    _, runs = zero_runs
    cmd = [
        sys.executable,
        "-m",
        "train",
        "--config",
        "tiny-cpu",
        *[a for s in settings(corpus_dir, tmp_path, "killed") for a in ("--set", s)],
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    # Ray Train registers a reported checkpoint at its next poll of the workers (every 2 s by default);
    # poll often so the kill lands a few steps after step 8, far from the end of the run.
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    run_dir = tmp_path / "killed"
    deadline = time.monotonic() + 300
    while not _checkpoint_registered(run_dir, 8):
        assert proc.poll() is None and time.monotonic() < deadline, (
            "the run ended before its first checkpoint"
        )
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    killed_at = max(losses(run_dir))
    assert killed_at < STEPS

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout + again.stderr
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["steps"] == STEPS
    resumed, reference = losses(run_dir), losses(Path(runs[2]["run_dir"]))
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), step


@pytest.fixture
def head_node():
    """`ray start --head` on loopback with token auth, stopped (with all it started) at teardown."""
    head = cluster.start_head(num_cpus=4)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
    }
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # the session cluster's: not this head's
        env.pop(name, None)
    try:
        yield head.dashboard_url, env
    finally:
        cluster.stop_head(head)


@pytest.mark.slow
def test_ray_job_submit_trains_and_reports(head_node, blocks_dir, corpus_dir, tmp_path, submit_job):
    url, env = head_node
    token = {"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"}
    assert httpx.get(f"{url}/api/jobs/", timeout=10).status_code == 401  # no token, no entry
    args = settings(corpus_dir, tmp_path, "job", "steps=6", "checkpoint_every=6", "eval_every=6")
    train = ["python", "-m", "train", "--config", "tiny-cpu", *[a for s in args for a in ("--set", s)]]
    submit = submit_job(url, env, ["--submission-id", "odyssey-test"], train)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    info = httpx.get(f"{url}/api/jobs/odyssey-test", headers=token, timeout=10).json()
    assert info["status"] == "SUCCEEDED"
    logs = httpx.get(f"{url}/api/jobs/odyssey-test/logs", headers=token, timeout=10).json()["logs"]
    summary = json.loads([line for line in logs.splitlines() if line.startswith('{"run_dir"')][-1])
    assert summary["steps"] == 6 and summary["checkpoint"].endswith("checkpoint_step0000006")
    assert summary["final_loss"] < summary["first_loss"]
