"""`odyssey eval` for real: a hand-made held-out split with known answers, Ray tasks on the session's
cluster, both backends, and the report files. (The metrics' arithmetic: test_eval_units.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from odyssey import artifact
from odyssey.answers import AnswerSettings
from odyssey.data.corpus import CorpusConfig, build_corpus
from odyssey.evaluation import inference
from odyssey.evaluation.runner import evaluate

ADD = 'def add(a, b):\n    """Sum of a and b.\n\n    >>> add(2, 3)\n    5\n    """'
ROWS = [
    ("summarize", "Return the sum of two numbers, or raise on overflow.", "Add two numbers."),
    ("summarize", "Close the file and flush every buffer it holds.", "Close the file."),
    ("moderate", "The package is licensed under the MIT license.", "safe"),
    ("moderate", "Buy cheap pills now at http://spam.example/offer!!!", "spam"),
    ("find", "copyright of libalpha", "Files: *\nCopyright: 2001 Alpha Authors\nLicense: libalpha terms"),
    ("find", "license of zetaparser", "Files: src/*\nCopyright: 2020 Zeta\nLicense: zetaparser GPL-2"),
    ("find", "who wrote omegatool", "Files: omegatool/*\nCopyright: 1999 Omega Team, omegatool"),
    ("code", ADD, "    return a + b"),
    ("code", 'def close(self):\n    """Close it."""', "    self.closed = True"),
    ("lm", "", "def main():\n    print('hello world')\n"),
    ("lm", "", "The quick brown fox jumps over the lazy dog.\n"),
]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("handmade")
    source = out / "rows.jsonl"
    with source.open("w") as f:
        for i, (task, text, target) in enumerate(ROWS):
            f.write(
                json.dumps(
                    {"task": task, "input": text, "target": target, "doc_id": f"d{i}", "split": "test"}
                )
                + "\n"
            )
        # Training rows are required for a corpus; they play no part here.
        f.write(
            json.dumps({"task": "lm", "input": "", "target": "train text", "doc_id": "t", "split": "train"})
            + "\n"
        )
    build_corpus(out / "corpus", CorpusConfig.from_preset("none"), [source])
    return out / "corpus"


def test_every_task_is_scored_with_bm25_beside_the_model(ray_cluster, held_out, exported_models, tmp_path):
    report = evaluate(exported_models[0], held_out, shard_rows=2, out=tmp_path / "eval")
    tasks = report["tasks"]
    assert (
        report["shards"] == 1 + 1 + 2 + 2 + 1 + 1
    )  # summarize, moderate, find (3 queries + 3 passages), code, lm
    assert [tasks[t]["n"] for t in ("summarize", "moderate", "code", "lm")] == [2, 2, 2, 2]
    # Each query names a word only its own passage holds: BM25 ranks every right passage first.
    assert tasks["find"]["bm25"] == {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0, "mrr": 1.0}
    assert tasks["find"]["n"] == 3 and tasks["find"]["passages"] == 3
    # The model's ranking, recomputed here in-process from its embeddings: the report's dense MRR is that
    # one; the served figure fuses it with BM25 as /v1/find does.
    model, tok, _ = artifact.load(exported_models[0])
    find = [(q, p) for task, q, p in ROWS if task == "find"]
    queries = inference.embed(model, tok, [q for q, _ in find])
    passages = inference.embed(model, tok, [p for _, p in find])
    sims = queries @ passages.T
    ranks = [int((sims[i] >= sims[i, i]).sum()) for i in range(len(find))]  # ties count against
    assert tasks["find"]["dense"]["mrr"] == pytest.approx(np.mean([1 / r for r in ranks]), abs=1e-6)
    assert tasks["find"]["mrr"] == tasks["find"]["hybrid"]["mrr"]
    assert tasks["find"]["fusion_mrr"]["0.0"] == 1.0  # the model's weight 0: BM25's ranking alone
    # One executable check (add: a plain function whose reference passes); the method has none. Its
    # verdict is the one the model's greedy answer gets here.
    add = {"task": "code", "input": ADD, "target": "    return a + b", "doc_id": "d7"}
    verdict = inference.code(model, tok, [add], AnswerSettings())[0]["check"]["passed"]
    assert tasks["code"]["checks"] == 1 and tasks["code"]["pass_rate"] == float(verdict)
    assert set(tasks["moderate"]["labels"]) == {"safe", "profanity", "personal_data", "spam"}
    assert tasks["moderate"]["labels"]["spam"]["support"] == 1
    # Three judges: the rules see no spam (none of them looks for it); served = rules + model.
    assert set(tasks["moderate"]["judges"]) == {"rules", "model", "served"}
    assert tasks["moderate"]["judges"]["rules"]["labels"]["spam"]["recall"] == 0.0
    assert tasks["moderate"]["labels"] == tasks["moderate"]["judges"]["served"]["labels"]
    assert "lead_sentence" in tasks["summarize"]["baseline"]
    assert 1.0 < tasks["lm"]["perplexity"] < 3 * 2048  # an untrained model: about the vocabulary size
    assert tasks["lm"]["tokens"] > 20
    assert set(report["metrics"]) >= {
        "summarize.rouge_l",
        "moderate.macro_f1",
        "find.mrr",
        "code.pass_rate",
        "lm.perplexity",
    }
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["metrics"] == report["metrics"] and saved["model_id"].startswith("tiny-0@")
    table = (tmp_path / "eval" / "eval.md").read_text()
    assert "| find | mrr (all) |" in table and "BM25 1.0000" in table and "rules " in table

    # ONNX Runtime gives the same answers (greedy decoding, same scores within float error).
    onnx = evaluate(exported_models[0], held_out, shard_rows=2, backend="onnxruntime")
    for key, value in report["metrics"].items():
        assert onnx["metrics"][key] == pytest.approx(value, rel=1e-3), key


def test_eval_cli_names_a_bad_task_and_a_missing_model(tmp_path, exported_models, held_out):
    odyssey = Path(sys.executable).parent / "odyssey"
    bad = subprocess.run(
        [odyssey, "eval", str(exported_models[0]), "--corpus", str(held_out), "--tasks", "summarize,translate"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "--tasks: unknown task 'translate'" in bad.stderr
    missing = subprocess.run(
        [odyssey, "eval", str(tmp_path / "nothing"), "--corpus", str(held_out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        missing.returncode == 2
        and "nothing: no such path; give an exported model directory" in missing.stderr
    )


def test_code_checks_can_be_turned_off(exported_models):
    model, tok, _ = artifact.load(exported_models[0])
    rows = [{"task": "code", "input": ADD, "target": "    return a + b", "doc_id": "d"}]
    on = inference.code(model, tok, rows, AnswerSettings())
    off = inference.code(model, tok, rows, AnswerSettings(), run_checks=False)
    assert "check" in on[0] and "check" not in off[0]  # nothing executed
    assert on[0]["parses"] == off[0]["parses"]
