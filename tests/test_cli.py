"""The `odyssey` command end to end, as a user runs it: outputs, the JSON summary line, and errors
that name what to fix (exit status 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def odyssey(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "odyssey", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


SMALL = ["--set", "max_docs.debian=20", "--set", "max_docs.python_stdlib=5", "--set", "max_docs.legal=5"]


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
