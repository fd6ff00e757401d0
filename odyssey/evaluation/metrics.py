"""The scores of every task, as pure functions of answers and references.

    summarize  ROUGE-L F-measure (the rouge-score package, Porter stemming), mean over examples
    moderate   precision, recall and F1 of each label, macro F1, exact match of the whole label set
    find       recall@k and MRR of the right passage's rank (the model's and BM25's)
    code       share of answers that parse, exact match, pass rate of executable checks
    lm         perplexity: exp(mean negative log-likelihood per token)

`DIRECTIONS` says which way is better for each reported metric, for promotion (`odyssey promote`).
"""

from __future__ import annotations

import math

import numpy as np

RECALL_AT = (1, 5, 10)

# +1: higher is better; -1: lower is better. Keys are `task.metric` as reports flatten them.
DIRECTIONS = {
    "summarize.rouge_l": +1,
    "moderate.macro_f1": +1,
    "moderate.exact_match": +1,
    **{f"find.recall@{k}": +1 for k in RECALL_AT},
    "find.mrr": +1,
    "code.parse_rate": +1,
    "code.exact_match": +1,
    "code.pass_rate": +1,
    "lm.perplexity": -1,
}


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure; 0.0 for no examples."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]))


def label_scores(predicted: list[set[str]], actual: list[set[str]], labels: tuple[str, ...]) -> dict:
    """Per-label precision/recall/F1/support, their macro F1 (over labels with support or predictions),
    and exact match of whole label sets. A label never predicted has precision 0 (not undefined)."""
    if len(predicted) != len(actual):
        raise ValueError(f"{len(predicted)} predictions for {len(actual)} examples")
    per_label = {}
    for label in labels:
        tp = sum(label in p and label in a for p, a in zip(predicted, actual))
        fp = sum(label in p and label not in a for p, a in zip(predicted, actual))
        fn = sum(label not in p and label in a for p, a in zip(predicted, actual))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    counted = [
        s["f1"] for label, s in per_label.items() if s["support"] or any(label in p for p in predicted)
    ]
    exact = sum(p == a for p, a in zip(predicted, actual)) / len(actual) if actual else 0.0
    return {
        "labels": per_label,
        "macro_f1": float(np.mean(counted)) if counted else 0.0,
        "exact_match": exact,
    }


def rank_of_correct(scores: np.ndarray, correct: list[int]) -> list[int]:
    """scores (Q, P): each query's scores over passages; correct[q]: the right passage's index.
    Returns each right passage's 1-based rank; ties count against it (ranked below its equals), so
    a scorer that gives everything 0 does not look good."""
    ranks = []
    for q, c in enumerate(correct):
        row = scores[q]
        ranks.append(int((row >= row[c]).sum()))
    return ranks


def ranking(ranks: list[int], ks: tuple[int, ...] = RECALL_AT) -> dict[str, float]:
    """recall@k (the right passage among the top k) and mean reciprocal rank."""
    if not ranks:
        return {**{f"recall@{k}": 0.0 for k in ks}, "mrr": 0.0}
    r = np.asarray(ranks)
    return {**{f"recall@{k}": float((r <= k).mean()) for k in ks}, "mrr": float((1.0 / r).mean())}


def perplexity(total_nll: float, tokens: int) -> float:
    if tokens <= 0:
        raise ValueError("perplexity needs at least one token")
    return math.exp(total_nll / tokens)


def flatten(tasks: dict) -> dict[str, float]:
    """A report's task results -> {"task.metric": value} for every metric of DIRECTIONS it has (a
    metric without examples, e.g. a pass rate with no executable checks, is None and left out)."""
    flat = {}
    for key in DIRECTIONS:
        task, metric = key.split(".", 1)
        value = tasks.get(task, {}).get(metric)
        if value is not None:
            flat[key] = value
    return flat
