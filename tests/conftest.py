"""Shared fixtures: one tiny corpus, tokenizer and packed blocks per test session (built in seconds),
and a local Ray cluster that every test needing one shares and that is stopped at the end."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Every Ray cluster the tests start uses token auth, with a token of this session's own (Ray reads
# these when it is imported and when it starts processes; nothing is written to ~/.ray).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

from odyssey.data import packing
from odyssey.data.corpus import CorpusConfig, build_corpus, texts
from odyssey.tokenizer import Tokenizer

SEQ_LEN = 128


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "tiny"
    build_corpus(out, CorpusConfig.from_preset("tiny"))
    return out


@pytest.fixture(scope="session")
def tokenizer(corpus_dir) -> Tokenizer:
    tok = Tokenizer.train(texts(corpus_dir, "train"), vocab_size=2048)
    tok.save(corpus_dir / "tokenizer.json")
    return tok


@pytest.fixture(scope="session")
def blocks_dir(corpus_dir, tokenizer):
    out = corpus_dir / f"blocks-{SEQ_LEN}"
    packing.pack_corpus(corpus_dir, tokenizer, SEQ_LEN, out)
    return out


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster on loopback with token auth, shared by the session and shut down after it:
    the embedded cluster the entry points start (odyssey.cluster.connect), dashboard included, since Ray
    Train's placement-group cleaner asks its state API whether a run's controller is still alive (a Tune
    trial that ASHA stops leaves its worker group's resources to that cleaner). Four logical CPUs on two
    cores: two training workers (one thread each) plus room for Ray Data."""
    import ray

    from odyssey import cluster

    # Processes report their metrics to the node's exporter every 10 s by default; tests read them sooner.
    os.environ.setdefault("RAY_metrics_report_interval_ms", "500")
    cluster.connect(num_cpus=4)
    try:
        yield ray.get_runtime_context()
    finally:
        cluster.disconnect()


@pytest.fixture(scope="session")
def zero_runs(ray_cluster, blocks_dir, corpus_dir, tmp_path_factory):
    """The same tiny run (tiny_runs.py) under ZeRO 0, 2 and 3, on the session's local cluster: the
    uninterrupted curves that resumed, resized and multi-host runs are held to."""
    from tiny_runs import config

    from train import launch

    storage = tmp_path_factory.mktemp("runs")
    out = {}
    for stage in (0, 2, 3):
        out[stage] = launch.run(config(corpus_dir, storage, f"zero{stage}", f"deepspeed.zero_stage={stage}"))
    return storage, out


@pytest.fixture(scope="session")
def exported_models(tmp_path_factory, tokenizer):
    """Two freshly initialised tiny models (different seeds) in the serving format, with the session's
    tokenizer: what `odyssey export` writes, without a training run. The first also has model.onnx
    (`--format onnx`), for the ONNX Runtime backend."""
    from dataclasses import replace

    import torch

    from odyssey import artifact
    from odyssey.model import Transformer, pad_vocab, tiny

    out = tmp_path_factory.mktemp("models")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = Transformer(replace(tiny(), vocab_size=pad_vocab(tokenizer.vocab_size), max_seq_len=256))
        paths.append(artifact.save_model(out / f"tiny-{seed}", model, tokenizer, onnx=seed == 0))
    return paths


@pytest.fixture
def submit_job():
    """`ray job submit --working-dir <repo>` as users run it, returning the finished CLI process. The
    dashboard answers a little before the head's job agent does: retried while it says so."""

    def submit(address: str, env: dict, flags: list[str], entrypoint: list[str], timeout: float = 600):
        command = [
            f"{Path(sys.executable).parent}/ray", "job", "submit", "--address", address,
            "--working-dir", str(Path(__file__).resolve().parent.parent), *flags, "--", *entrypoint,
        ]  # fmt: skip
        for _ in range(30):
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
            if "No available agent" not in done.stdout + done.stderr:
                break
            time.sleep(2)
        return done

    return submit


@pytest.fixture
def submit_without_the_token(tmp_path):
    """`ray job submit` as someone without the cluster's token would run it (another home, no token
    in the environment, or a wrong one): the finished CLI process."""
    from odyssey import cluster

    def submit(address: str, env: dict, token: str | None = None) -> subprocess.CompletedProcess:
        tokenless = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
        tokenless.update(HOME=str(tmp_path), RAY_AUTH_MODE="token", **{cluster.SINGLE_MACHINE: "0"})
        if token:
            tokenless["RAY_AUTH_TOKEN"] = token
        command = [
            f"{Path(sys.executable).parent}/ray",
            "job",
            "submit",
            "--address",
            address,
            "--",
            "echo",
            "hi",
        ]
        return subprocess.run(command, env=tokenless, capture_output=True, text=True, timeout=120)

    return submit
