"""Evaluation metrics on hand-made cases whose values are worked out by hand, BM25, the doctest
checks of generated code, and promotion's decision rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from odyssey.bm25 import BM25
from odyssey.code_checks import doctest_check, module_of, run_check
from odyssey.errors import OdysseyError
from odyssey.evaluation import metrics
from workflows.promote import _point_config_at, check_metrics, decide


def test_rouge_l_by_longest_common_subsequence():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5 words: P = 5/5, R = 5/6, F = 10/11.
    assert metrics.rouge_l(["the cat on the mat"], ["the cat sat on the mat"]) == pytest.approx(10 / 11)
    assert metrics.rouge_l(["identical words here"], ["identical words here"]) == 1.0
    assert metrics.rouge_l(["nothing shared"], ["entirely different"]) == 0.0
    assert metrics.rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)  # the mean over examples
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        metrics.rouge_l(["a", "b"], ["a"])


def test_per_label_precision_recall_f1():
    predicted = [{"safe"}, {"spam"}, {"spam", "profanity"}, {"safe"}]
    actual = [{"safe"}, {"spam"}, {"spam"}, {"profanity"}]
    s = metrics.label_scores(predicted, actual, ("safe", "profanity", "personal_data", "spam"))
    assert s["labels"]["spam"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert s["labels"]["profanity"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    safe = s["labels"]["safe"]  # tp 1, fp 1 (the 4th), fn 0
    assert (safe["precision"], safe["recall"], safe["f1"]) == (0.5, 1.0, pytest.approx(2 / 3))
    # personal_data: never present, never predicted: left out of the macro average.
    assert s["macro_f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert s["exact_match"] == 0.5


def test_recall_at_k_and_mrr_count_ties_against_the_model():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.2, 0.1], [0.0, 0.0, 0.0]])
    ranks = metrics.rank_of_correct(scores, [2, 1, 0])
    assert ranks == [2, 2, 3]  # a tie ranks the right passage below its equals; all-zero: last
    r = metrics.ranking(ranks, ks=(1, 2, 5))
    assert r == {
        "recall@1": 0.0,
        "recall@2": pytest.approx(2 / 3),
        "recall@5": 1.0,
        "mrr": pytest.approx((0.5 + 0.5 + 1 / 3) / 3),
    }


def test_perplexity_and_flatten():
    assert metrics.perplexity(10 * math.log(4), 10) == pytest.approx(4.0)
    tasks = {
        "lm": {"perplexity": 4.0},
        "code": {"parse_rate": 0.5, "pass_rate": None},
        "find": {"mrr": 0.3, "bm25": {"mrr": 0.9}},
    }
    assert metrics.flatten(tasks) == {"lm.perplexity": 4.0, "code.parse_rate": 0.5, "find.mrr": 0.3}


def test_bm25_ranks_the_lexical_match_first():
    bm25 = BM25(["the GPL-2 license text", "a recipe for bread", "BSD license, three clauses"])
    scores = bm25.scores("which license is GPL-2")
    assert scores.argmax() == 0 and scores[1] == 0.0
    assert (bm25.scores("the of") == 0).all()  # stop words only: no match, no error


ADD = 'def add(a, b):\n    """Sum.\n\n    >>> add(2, 3)\n    5\n    """'


def test_doctest_checks_pass_fail_and_contain_bad_code():
    check = doctest_check(ADD)
    assert check.function == "add" and check.module is None
    assert run_check(check, "    return a + b").passed
    wrong = run_check(check, "    return a - b")
    assert wrong.parses and not wrong.passed and "Got:\n    -1" in wrong.error
    assert not run_check(check, "    return (a").parses
    assert run_check(check, "").error.startswith("no code")
    endless = run_check(check, "    while True:\n        pass", cpu_seconds=1)
    assert endless.parses and not endless.passed and "CPU seconds" in endless.error
    # A method needs an instance: no check. No doctest: no check.
    assert doctest_check('def f(self):\n    """>>> 1\n    1\n    """') is None
    assert doctest_check('def f(x):\n    """Nothing to run."""') is None


def test_a_stdlib_function_runs_in_its_modules_namespace():
    assert module_of("python:asyncio/sslproto.py") == "asyncio.sslproto"
    assert module_of("python:antigravity.py") is None and module_of("legal:gpl") is None
    prompt = 'def read_uint2(f):\n    r"""\n    >>> import io\n    >>> read_uint2(io.BytesIO(b\'\\xff\\x00\'))\n    255\n    """'
    check = doctest_check(prompt, "python:pickletools.py")
    body = '    data = f.read(2)\n    if len(data) == 2:\n        return _unpack("<H", data)[0]\n    raise ValueError'
    assert run_check(check, body).passed  # _unpack is pickletools' own


def test_promotion_needs_one_better_metric_and_none_worse():
    serving = {"lm.perplexity": 100.0, "find.mrr": 0.5}
    ok, table = decide({"lm.perplexity": 90.0, "find.mrr": 0.5}, serving, ["lm.perplexity", "find.mrr"])
    assert ok and table["lm.perplexity"]["verdict"] == "better" and table["find.mrr"]["verdict"] == "equal"
    ok, table = decide({"lm.perplexity": 90.0, "find.mrr": 0.4}, serving, ["lm.perplexity", "find.mrr"])
    assert not ok and table["find.mrr"]["verdict"] == "worse"
    ok, _ = decide(dict(serving), serving, ["lm.perplexity", "find.mrr"])
    assert not ok  # equal everywhere: nothing to gain from a rollout
    ok, table = decide({"lm.perplexity": 90.0}, {"lm.perplexity": 100.0}, ["lm.perplexity", "code.pass_rate"])
    assert ok and table["code.pass_rate"]["verdict"] == "unmeasured"
    with pytest.raises(OdysseyError, match=r"unknown metric 'lm\.loss'"):
        check_metrics(["lm.loss"])


def test_promotion_rewrites_only_the_model_path_line(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(
        "applications:\n  - name: odyssey\n    args:\n      model_path: /old   # where\n      dtype: float32\n"
    )
    assert _point_config_at(config, tmp_path / "new").endswith(f"model_path = {tmp_path / 'new'}")
    assert config.read_text() == (
        f"applications:\n  - name: odyssey\n    args:\n      model_path: {tmp_path / 'new'}   # where\n      dtype: float32\n"
    )


def test_a_task_without_examples_reports_no_metric():
    from odyssey.evaluation.runner import _find_scores, _scores, markdown

    skipped = [{"skipped": "too long"}]
    assert _scores("lm", skipped) == {"n": 0, "skipped": 1}  # not a perplexity of nothing
    assert _scores("moderate", []) == {"n": 0, "skipped": 0}
    from odyssey.answers import AnswerSettings

    assert _find_scores(
        {"queries": [], "passages": [], "correct": [], "families": []},
        np.zeros((0, 1)),
        np.zeros((0, 1)),
        AnswerSettings(),
    ) == {
        "n": 0,
        "passages": 0,
    }
    tasks = {"lm": {"n": 0, "skipped": 1}, "moderate": {"n": 0, "skipped": 0}}
    assert metrics.flatten(tasks) == {}  # nothing for promotion to compare
    report = {"model_id": "m@0", "corpus": "c", "split": "test", "limit": None, "backend": "torch"}
    assert "| task |" in markdown({**report, "seconds": 1, "shards": 0, "tasks": tasks, "metrics": {}})
