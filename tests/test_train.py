"""Distributed pretraining for real: Ray Train, 2 CPU workers over gloo, DeepSpeed ZeRO 0/2/3, real
checkpoints, export to the serving format; and the run surviving what a cluster does to it: the driver
killed and relaunched, a worker SIGKILLed mid-run and mid-save, a damaged checkpoint, and resumes at
another world size (ZeRO shards resharded through DeepSpeed's universal format), each checked against
the uninterrupted run's loss curve. (`ray job submit` of training: tests/test_cluster.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import STEPS, config, losses, settings

from odyssey import artifact, failpoints, retrieval
from odyssey.engine import GenerationParams, generate
from odyssey.errors import ConfigError, OdysseyError
from odyssey.model import Transformer
from train import checkpoint, contrastive, events, launch
from train.export import export

REPO = Path(__file__).resolve().parent.parent


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


def test_the_contrastive_objective_trains_under_zero2_with_two_workers(zero_runs, corpus_dir, tmp_path):
    """InfoNCE on find's pairs (train/contrastive.py) runs in the same steps as the LM loss: the same
    numbers at every ZeRO stage at first (the negatives gathered across the two ranks), and the trained
    model's embeddings tell a query's passage from the others far better than the initial model's do
    on the pairs it trained on, and better on train pairs it never saw. (Its gradient reaching the
    shared trunk, and the one embedding function of training, evaluation and serving: test_answers.py.)"""
    storage, runs = zero_runs
    rows = {stage: events.read_metrics(Path(s["run_dir"])) for stage, s in runs.items()}
    first = {stage: r[0]["contrastive_loss"] for stage, r in rows.items()}
    assert first[2] == pytest.approx(first[0], rel=1e-4) and first[3] == pytest.approx(first[0], rel=1e-4)
    assert all("val_contrastive_loss" in r for r in rows[2] if r["step"] % 8 == 0)

    cfg = config(corpus_dir, storage, "zero2")
    pairs, c = contrastive.read_pairs(cfg, "train"), cfg.contrastive
    trained_on = np.unique(
        [
            i
            for step in range(STEPS)
            for i in contrastive.step_index(len(pairs), c.pairs_per_step, step, cfg.seed)
        ]
    )
    never_seen = np.setdiff1d(np.arange(len(pairs)), trained_on)
    model, _, _ = artifact.load(export(Path(runs[2]["run_dir"]), tmp_path / "model"))
    torch.manual_seed(cfg.seed)  # the engine's initial weights (train/engine.py)
    initial = Transformer(model.cfg)

    def loss(m, index) -> float:
        q, q_valid, p, p_valid = pairs.rows(index[:64])
        with torch.no_grad():
            return float(
                retrieval.info_nce(m(q, embed_valid=q_valid), m(p, embed_valid=p_valid), c.temperature)
            )

    assert loss(model, trained_on) < loss(initial, trained_on) - 0.5
    assert loss(model, never_seen) < loss(initial, never_seen)


def test_every_rank_saves_its_shard(zero_runs):
    storage, runs = zero_runs
    for stage in (2, 3):
        ckpt = Path(runs[stage]["checkpoint"])
        assert ckpt.name == f"checkpoint_step{STEPS:07d}"
        files = {p.name for p in (ckpt / "ds").iterdir()}
        for rank in (0, 1):
            assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files
        manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
        on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()} - {"manifest.json"}
        assert set(manifest) == on_disk  # every file, each rank's shard among them, sized and hashed
        assert checkpoint.verify(ckpt)["step"] == STEPS
        meta = json.loads((ckpt / "odyssey.json").read_text())
        assert meta["world_size"] == 2 and meta["step"] == STEPS and meta["zero_stage"] == stage
        assert meta["data"]["step"] == STEPS and sum(meta["data"]["taken"].values()) == STEPS * 16
        assert (ckpt / "tokenizer.json").is_file()
    # Ray Train keeps keep_checkpoints of them; none is left half-written.
    names = sorted(p.name for p in (storage / "zero2").iterdir() if "checkpoint_step" in p.name)
    assert names == [f"checkpoint_step{s:07d}" for s in (8, 16, 24, 32)]


def test_each_worker_reads_only_the_rows_it_trains(zero_runs):
    """data.load=index (every run here but the next test's): a rank reads its half of each step's rows."""
    _, runs = zero_runs
    last = events.read_metrics(Path(runs[2]["run_dir"]))[-1]
    row = 129 * (2 + 1)  # seq_len + 1 tokens: uint16 ids (a 2048-token vocabulary) + uint8 loss mask
    assert last["data_bytes_read"] == STEPS * 16 * row and last["data_bytes_read_max_rank"] == STEPS * 8 * row


def test_the_stream_path_trains_with_every_worker_streaming_the_tasks(ray_cluster, corpus_dir, tmp_path):
    """data.load=stream: Ray Data reads the Parquet shards and every worker streams them, whole batches
    of 64 rows (int32 ids + uint8 mask), more than its own rows."""
    summary = launch.run(config(corpus_dir, tmp_path, "stream", "data.load=stream", "steps=8"))
    assert summary["steps"] == 8 and np.isfinite(summary["final_loss"])
    last = events.read_metrics(Path(summary["run_dir"]))[-1]
    assert last["data_bytes_read_max_rank"] >= 64 * 129 * (4 + 1) > 8 * 8 * 129 * (2 + 1)


def test_export_consolidates_zero_into_the_core_model(zero_runs, tmp_path):
    storage, _ = zero_runs
    out3 = export(storage / "zero3", tmp_path / "m3")
    out0 = export(storage / "zero0", tmp_path / "m0")
    model3, tok, meta = artifact.load(out3)
    model0, _, _ = artifact.load(out0)
    assert meta["step"] == STEPS
    for name, tensor in model0.state_dict().items():  # ZeRO-3's gathered shards = ZeRO-0's whole module
        torch.testing.assert_close(model3.state_dict()[name], tensor, rtol=1e-3, atol=1e-4)
    prompt = tok.prompt("summarize", "A library that parses JSON documents.")
    # The exported model decodes through the engine, whatever it has learnt to answer first: an end of
    # text at once is an answer too (then no tokens, and the reason is "stop").
    (out,) = generate(model3, tok, [prompt], GenerationParams(max_tokens=12, temperature=0.0))
    ended = out.finish_reason == "stop"  # at the end-of-text token, which counts as generated
    assert len(out.token_ids) + ended == out.completion_tokens <= 12 and out.text == tok.decode(out.token_ids)
    assert out.finish_reason == ("length" if out.completion_tokens == 12 else "stop")


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


# --- elastic, fault-tolerant runs --------------------------------------------------------------------
# A run that resumes at another world size, or after a kill, must go on exactly where the uninterrupted
# run was: same weights, optimizer state, data position and batch. Its per-step losses are compared with
# the uninterrupted run's (zero_runs). A resumed run that "trains like a fresh model" would be ~2 nats
# off at its first step (a fresh model's loss is the run's step-1 loss), far outside the tolerance.
TOLERANCE = 1e-3  # relative; the arithmetic is the same, only reduction orders differ across sizes


def assert_continues(run_dir: Path, reference: dict[int, float], after: int) -> None:
    resumed = losses(run_dir)
    assert sorted(s for s in resumed if s > after) == list(range(after + 1, STEPS + 1))
    fresh_gap = abs(reference[1] - reference[after + 1])
    # The check can tell a fresh model: a restart from scratch would be this far off, 50x the tolerance
    # (the LM loss falls a little slower early on since the contrastive loss shares the trunk).
    assert fresh_gap > 50 * TOLERANCE * reference[after + 1]
    for step in range(after + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=TOLERANCE), (
            step,
            resumed[step],
            reference[step],
        )


def seed_run(run_dir: Path, *checkpoints: Path) -> None:
    """A run directory whose checkpoints another run wrote: what stopping that run after them and
    launching it again at another size would find."""
    run_dir.mkdir()
    for ckpt in checkpoints:
        shutil.copytree(ckpt, run_dir / ckpt.name)


def test_a_zero2_run_shrinks_to_one_worker_and_grows_back_on_the_uninterrupted_curve(
    zero_runs, corpus_dir, tmp_path
):
    _, runs = zero_runs
    ref_dir = Path(runs[2]["run_dir"])
    reference = losses(ref_dir)
    seed_run(tmp_path / "shrink", ref_dir / checkpoint.name(16))  # written by 2 workers
    shrunk = launch.run(config(corpus_dir, tmp_path, "shrink", "scaling.workers=1"))
    seed_run(tmp_path / "grow", tmp_path / "shrink" / checkpoint.name(24))  # written by 1 worker
    grown = launch.run(config(corpus_dir, tmp_path, "grow", "scaling.workers=2"))

    assert_continues(tmp_path / "shrink", reference, 16)
    assert_continues(tmp_path / "grow", reference, 24)
    for run, (old, new, step) in (("shrink", (2, 1, 16)), ("grow", (1, 2, 24))):
        start = events.read_events(tmp_path / run)[0]
        assert (start["event"], start["old_world_size"], start["world_size"], start["step"]) == (
            "resume",
            old,
            new,
            step,
        )
        assert start["resharded"] is True and start["tokens"] == step * 2048
    assert (
        json.loads((tmp_path / "shrink" / checkpoint.name(24) / "odyssey.json").read_text())["world_size"]
        == 1
    )
    assert shrunk["tokens"] == grown["tokens"] == STEPS * 2048  # the same tokens as the uninterrupted run


def test_a_zero3_run_skips_a_damaged_checkpoint_and_resumes_on_one_worker(zero_runs, corpus_dir, tmp_path):
    _, runs = zero_runs
    ref_dir = Path(runs[3]["run_dir"])
    run_dir = tmp_path / "zero3-shrink"
    seed_run(run_dir, ref_dir / checkpoint.name(16), ref_dir / checkpoint.name(24))
    shard = run_dir / checkpoint.name(24) / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in rank 1's optimizer partition
    shard.write_bytes(bytes(data))

    launch.run(config(corpus_dir, tmp_path, "zero3-shrink", "deepspeed.zero_stage=3", "scaling.workers=1"))
    start = events.read_events(run_dir)[0]
    assert start["checkpoint"] == checkpoint.name(16) and start["resharded"] is True
    assert len(start["damaged_skipped"]) == 1
    assert (
        f"{checkpoint.name(24)}: ds/zero_pp_rank_1_mp_rank_00_optim_states.pt does not match"
        in start["damaged_skipped"][0]
    )
    assert_continues(run_dir, losses(ref_dir), 16)
    assert checkpoint.verify(run_dir / checkpoint.name(24))["world_size"] == 1  # rewritten whole


@pytest.mark.slow
def test_a_worker_killed_mid_save_and_another_mid_run_cost_at_most_a_checkpoint_interval(
    zero_runs, corpus_dir, tmp_path, monkeypatch
):
    """Rank 1 SIGKILLs itself once its step-16 shard is written but before the checkpoint is published
    (failpoint), then rank 1 of the restarted group is SIGKILLed from outside at step 20 or later. Ray
    Train restarts the group each time (max_failures=2) from the newest intact checkpoint; meanwhile a
    reader lists the run's checkpoints every few ms and every one it sees must verify."""
    _, runs = zero_runs
    run_dir = tmp_path / "chaos"
    arm = {"checkpoint.staged": {"action": "kill", "step": 16, "rank": 1, "once": str(tmp_path / "fired")}}
    monkeypatch.setenv(failpoints.ENV, json.dumps(arm))
    seen, bad, stop = set(), [], threading.Event()

    def chaos():
        killed = False
        while not stop.is_set():
            for ckpt in checkpoint.published(run_dir) if run_dir.is_dir() else []:
                if ckpt.name not in seen:
                    try:
                        checkpoint.verify(ckpt)
                        seen.add(ckpt.name)
                    except checkpoint.DamagedCheckpoint as e:
                        bad.append(str(e))
            try:  # metrics.jsonl may be mid-line
                far = checkpoint.name(16) in seen and max(losses(run_dir)) >= 20
            except ValueError:
                far = False
            if not killed and far:
                starts = [e for e in events.read_events(run_dir) if e["event"] != "worker_failure"]
                os.kill(starts[-1]["pids"][1], signal.SIGKILL)  # rank 1 of the restarted group
                killed = True
            time.sleep(0.005)

    watcher = threading.Thread(target=chaos, daemon=True)
    watcher.start()
    try:
        summary = launch.run(config(corpus_dir, tmp_path, "chaos", "max_failures=2"))
    finally:
        stop.set()
        watcher.join(10)
    assert not bad, bad  # no reader ever saw a partial checkpoint
    assert summary["steps"] == STEPS and summary["restarts"] == 2 and summary["world_size"] == 2
    evs = events.read_events(run_dir)
    assert [e["event"] for e in evs if e["event"] != "worker_failure"] == ["start", "restart", "restart"]
    failures = [e for e in evs if e["event"] == "worker_failure"]
    assert len(failures) == 2 and all(f["died"] == [1] for f in failures), (
        failures
    )  # rank 0 only lost its peer
    _, mid_save, mid_run = (e for e in evs if e["event"] != "worker_failure")
    assert mid_save["checkpoint"] == checkpoint.name(8)  # the step-16 save never published
    assert mid_save["staging_removed"] == [f".{checkpoint.name(16)}.staging"]
    assert mid_run["checkpoint"] == checkpoint.name(16)
    for restart in (mid_save, mid_run):
        assert restart["reason"].startswith("rank 1 died: ActorDiedError") and restart["world_size"] == 2
        assert 0 < restart["steps_lost"] <= 8  # at most one checkpoint interval
    reference = losses(Path(runs[2]["run_dir"]))
    assert losses(run_dir)[STEPS] == pytest.approx(reference[STEPS], rel=TOLERANCE)
    assert_continues(run_dir, reference, 16)
    assert not list(run_dir.glob(".*staging")) and {p.name for p in checkpoint.published(run_dir)} <= seen | {
        checkpoint.name(STEPS)
    }
