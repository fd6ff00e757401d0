"""The `odyssey` command end to end, as a user runs it: outputs, the JSON summary line, and errors
that name what to fix (exit status 2, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def odyssey(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "workflows", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


SMALL = ["--set", "max_docs.debian=20", "--set", "max_docs.legal=5"]


def test_build_tokenize_pack(tmp_path):
    corpus = tmp_path / "corpus"
    built = odyssey("data", "build", "--out", str(corpus), "--preset", "tiny", *SMALL)
    assert built.returncode == 0, built.stderr
    assert last_json(built.stdout)["total_examples"] > 100
    assert "source legal" in built.stderr  # progress per source
    tok = odyssey("tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "1024")
    assert tok.returncode == 0, tok.stderr
    assert last_json(tok.stdout)["vocab_size"] == 1024
    packed = odyssey("data", "pack", "--corpus", str(corpus), "--seq-len", "64")
    assert packed.returncode == 0, packed.stderr
    assert last_json(packed.stdout)["tokens"] > 0 and (corpus / "blocks-64" / "manifest.json").is_file()
    # Both ran as Ray Data pipelines on an embedded cluster, with progress lines (units, rate, ETA).
    assert last_json(packed.stdout)["ran"].startswith("Ray Data") and "eta" in packed.stderr
    assert "near-duplicate signatures" in built.stderr and "Ray Data" in built.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "seeds=1"], "unknown field 'seeds'; did you mean 'seed'?"),
        (["--preset", "huge"], "preset: unknown corpus preset 'huge'"),
        (
            ["--set", "val_fraction=0.7", "--set", "test_fraction=0.4"],
            "val_fraction + test_fraction = 1.1 leaves nothing to train on",
        ),
        (["--preset", "none"], "the corpus would be empty"),
        (
            [
                "--set",
                "max_docs.python_stdlib=1",
                "--set",
                "min_examples.code=0",
                "--set",
                "val_fraction=0",
            ],
            "task 'summarize': no val examples to evaluate it on",
        ),
    ],
)
def test_build_errors_name_the_field(tmp_path, args, message):
    result = odyssey("data", "build", "--out", str(tmp_path / "c"), *args)
    assert result.returncode == 2
    assert f"odyssey: error: {message}" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "c").exists()


def test_bad_source_file_is_named(tmp_path):
    bad = tmp_path / "mine.jsonl"
    bad.write_text(
        '{"task": "code", "input": "def f():", "target": "pass", "doc_id": "a"}\n{"task": "code"}\n'
    )
    result = odyssey("data", "build", "--out", str(tmp_path / "c"), "--preset", "none", "--source", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{bad}: row 2, column 'input': missing" in result.stderr


def test_other_commands_fail_clearly(tmp_path):
    result = odyssey("data", "pack", "--corpus", str(tmp_path))
    assert result.returncode == 2 and "no tokenizer at" in result.stderr
    # The demo checks its training overrides before it starts a cluster.
    result = odyssey("demo", "--set", "train=[model.n_head=3]")
    assert result.returncode == 2 and "model: d_model=128 is not divisible by n_head=3" in result.stderr
    result = odyssey("demo", "--set", "steps=0")
    assert result.returncode == 2 and "steps=0: train at least one step" in result.stderr


def test_model_presets_table():
    result = odyssey("model", "presets")
    table = last_json(result.stdout)
    assert (
        15 < table["small"]["params_M"] < 25
        and table["gpt-1.3b"]["GFLOP_per_token"] > table["gpt-125m"]["GFLOP_per_token"]
    )


def test_train_and_tune_say_what_they_run_and_where_a_field_belongs(tmp_path):
    helped = subprocess.run([sys.executable, "-m", "train", "--help"], capture_output=True, text=True)
    text = " ".join(helped.stdout.split())  # argparse wraps lines at the terminal's width
    assert "recipes (train/configs/): gpt-1.3b, gpt-125m, gpt-350m, small-cpu, tiny-cpu" in text
    assert "(default: tiny-cpu)" in text and "override a field of the config" in text
    # No --config: the default is said out loud (a bad override then stops it before Ray starts).
    run = subprocess.run(
        [sys.executable, "-m", "train", "--set", "steps=0"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2 and "no --config given: using the recipe 'tiny-cpu'" in run.stderr
    # A training field set on a sweep's top level points under `train.`, to the closest real field.
    tune = subprocess.run(
        [sys.executable, "-m", "tune", "--set", "optim.lrr=1"], capture_output=True, text=True, timeout=120
    )
    assert tune.returncode == 2 and "did you mean 'train.optim.lr'?" in tune.stderr


def test_a_model_path_with_a_typo_is_no_such_path_with_the_near_miss(tmp_path):
    (tmp_path / "model").mkdir()
    result = odyssey("eval", str(tmp_path / "modell"), "--limit", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"modell: no such path (did you mean {tmp_path / 'model'}?)" in result.stderr
    assert "an exported model directory" in result.stderr  # exported models are accepted too
    result = odyssey("eval", str(tmp_path / "model"))
    assert result.returncode == 2 and "holds no model" in result.stderr


def test_stop_commands_stop_only_what_this_checkout_started(tmp_path):
    env = {**os.environ, "ODYSSEY_HOME": str(tmp_path)}
    env.pop("RAY_DASHBOARD_ADDRESS", None)
    for args, message in [
        (["demo", "stop"], "no demo of this checkout is serving"),
        (["serve", "stop"], "`odyssey serve` started none in this checkout"),
        (["cluster", "local-down"], "no local cluster of this checkout to stop"),
        (["cluster", "env"], "no local cluster of this checkout is up"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "workflows", *args], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


def test_serve_key_writes_one_key_then_prints_it(tmp_path):
    """`odyssey serve key`: API keys are on as shipped; the first call on a machine writes the key
    (owner-only) and says where, later ones print the same key; with auth off there is no key to print."""
    env = {**os.environ, "ODYSSEY_HOME": str(tmp_path)}
    env.pop("ODYSSEY_API_KEYS", None)

    def key(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "workflows", "serve", "key", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    first, again = key(), key()
    assert first.returncode == 0 and f"wrote a new key to {tmp_path / 'api_keys'}" in first.stderr
    assert first.stdout.strip() == again.stdout.strip() == (tmp_path / "api_keys").read_text().strip()
    assert "wrote" not in again.stderr
    off = key("--set", "gateway.auth=false")
    assert off.returncode == 2 and "gateway.auth is off" in off.stderr
