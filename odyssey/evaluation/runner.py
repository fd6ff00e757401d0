"""`odyssey eval MODEL`: held-out examples -> shards -> Ray tasks -> metrics -> report.

    report = evaluate("runs/demo/model", "runs/demo/corpus", out="runs/demo/eval")
    # runs/demo/eval/eval.json (everything) and eval.md (the table)

Each shard of each task is one Ray task (one CPU): it loads the model once per worker process (from
a path every node sees, as serving does) and returns raw answers; the driver turns them into metrics.
So an evaluation spreads over whatever cluster it runs on, and a laptop's embedded cluster runs it
over its cores. Every answer is the one serving would give (odyssey/answers.py, one settings object).
Passage search embeds passages and queries in shards, then ranks on the driver three ways: the model's
embedding, BM25 over the same passages (the baseline a model must beat to be worth its cost), and both
fused as /v1/find fuses them. Moderation is judged three ways too: the rules alone, the model alone,
and both as /v1/moderate decides; summaries beside the lead-sentence baseline.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from odyssey import answers, artifact, atomic, retrieval
from odyssey.answers import AnswerSettings
from odyssey.bm25 import BM25
from odyssey.data.corpus import read_manifest, read_split
from odyssey.data.text import sentences
from odyssey.errors import OdysseyError
from odyssey.evaluation import inference, metrics
from odyssey.evaluation.inference import JUDGES
from odyssey.progress import Progress
from odyssey.tasks import MODERATION_LABELS, TASKS

log = logging.getLogger(__name__)

BACKENDS = artifact.BACKENDS
FUSION_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)  # the model's weight beside BM25's in the fusion curve
_MODELS: dict = {}  # in each worker process: the model its last shard used, kept for the next shard


def _model(path: str, backend: str):
    if (path, backend) not in _MODELS:
        loaded = artifact.load(path, backend)
        _MODELS.clear()
        _MODELS[(path, backend)] = loaded[:2]
    return _MODELS[(path, backend)]


def run_shard(path: str, backend: str, kind: str, items: list, settings: AnswerSettings, code_checks: bool):
    """One Ray task: the model's raw answers to one shard (`find:*` shards are texts to embed)."""
    model, tok = _model(path, backend)
    if kind.startswith("find:"):
        return inference.embed(model, tok, items)
    if kind == "code":
        return inference.code(model, tok, items, settings, code_checks)
    return inference.ANSWER[kind](model, tok, items, settings)


def check_tasks(tasks: list[str] | None) -> list[str]:
    tasks = list(tasks or TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise OdysseyError(f"--tasks: unknown task {unknown[0]!r}; tasks: {', '.join(TASKS)}")
    return tasks


def _jobs(corpus: Path, tasks: list[str], split: str, limit: int | None, shard_rows: int):
    """[(kind, items)] and, for `find`, the passages and each query's right passage and family."""
    jobs, find = [], None
    for task in tasks:
        table = read_split(corpus, task, split)
        rows = table.slice(0, limit if limit is not None else table.num_rows).to_pylist()
        if task == "find":
            passages = list(dict.fromkeys(r["target"] for r in rows))  # unique, in order
            where = {p: i for i, p in enumerate(passages)}
            find = {"queries": [r["input"] for r in rows], "passages": passages}
            find["correct"] = [where[r["target"]] for r in rows]
            find["families"] = [r["family"] or "" for r in rows]
            for kind, texts in (("find:queries", find["queries"]), ("find:passages", passages)):
                jobs += [(kind, texts[i : i + shard_rows]) for i in range(0, len(texts), shard_rows)]
        else:
            jobs += [(task, rows[i : i + shard_rows]) for i in range(0, len(rows), shard_rows)]
    return jobs, find


def _scores(task: str, answers: list[dict]) -> dict:
    done = [a for a in answers if "skipped" not in a]
    out: dict = {"n": len(done), "skipped": len(answers) - len(done)}
    if not done:  # nothing answered: no metric, rather than a 0 that promotion would compare
        return out
    if task == "summarize":
        return {**out, **_summary_scores(done)}
    if task == "moderate":
        return {**out, **_moderation_scores(done)}
    if task == "code":
        return {**out, **_code_scores(done), "families": _by_family(done, _code_scores)}
    if task == "lm":
        tokens = sum(a["tokens"] for a in done)
        return {
            **out,
            "tokens": tokens,
            "perplexity": metrics.perplexity(sum(a["nll"] for a in done), tokens),
        }
    raise ValueError(task)


def _summary_scores(done: list[dict]) -> dict:
    """ROUGE-L of the model's summaries, and of the lead-sentence baseline (the input's first sentence)."""
    references = [a["reference"] for a in done]
    lead = [next(iter(sentences(a["input"])), "") for a in done]
    return {
        "rouge_l": metrics.rouge_l([a["prediction"] for a in done], references),
        "baseline": {"lead_sentence": metrics.rouge_l(lead, references)},
    }


def _moderation_scores(done: list[dict]) -> dict:
    """Label scores of each judge (rules alone, model alone, served = both as /v1/moderate decides), over
    every example and over those whose unsafe content no rule can see (family rules_hidden, with the
    safe ones): where the model must earn its place. The top-level figures are the served ones."""

    def judged(rows: list[dict]) -> dict:
        actual = [set(a["actual"]) for a in rows]
        return {j: metrics.label_scores([set(a[j]) for a in rows], actual, MODERATION_LABELS) for j in JUDGES}

    judges = judged(done)
    hidden = [a for a in done if a["family"] in ("rules_hidden", "safe")]
    out = {**judges["served"], "judges": judges}
    if any(a["family"] == "rules_hidden" for a in hidden):
        out["rules_hidden"] = {"n": len(hidden), "judges": judged(hidden)}
    return out


def _code_scores(done: list[dict]) -> dict:
    checks = [a["check"] for a in done if "check" in a]
    return {
        "parse_rate": float(np.mean([a["parses"] for a in done])),
        "exact_match": float(np.mean([a["exact"] for a in done])),
        "checks": len(checks),
        "pass_rate": float(np.mean([c["passed"] for c in checks])) if checks else None,
    }


def _by_family(done: list[dict], score) -> dict:
    families = sorted({a.get("family", "") for a in done} - {""})
    return {
        f: {"n": sum(a["family"] == f for a in done), **score([a for a in done if a["family"] == f])}
        for f in families
    }


def _find_scores(find: dict, queries: np.ndarray, passages: np.ndarray, settings: AnswerSettings) -> dict:
    """MRR and recall@k of three rankings of the same passages: the model's embedding alone (dense),
    BM25 alone (the baseline), and both fused as /v1/find does (hybrid: the top-level figures); over
    all queries and per family of queries."""
    if not find["queries"]:
        return {"n": 0, "passages": 0}
    dense = queries @ passages.T  # (Q, P) cosine similarities: both sides are unit vectors
    bm25 = BM25(find["passages"])
    lexical = np.stack([bm25.scores(q) for q in find["queries"]])
    depth = answers.find_depth(settings, 10, len(find["passages"]))

    def fused(weight: float) -> np.ndarray:
        return np.stack([retrieval.fuse(lexical[q], dense[q], depth, weight) for q in range(len(dense))])

    hybrid = fused(settings.find_dense_weight)
    # MRR at other weights of the model's ranking: on the validation split, where to set it.
    curve = {
        str(w): metrics.ranking(metrics.rank_of_correct(fused(w), find["correct"]))["mrr"]
        for w in FUSION_WEIGHTS
    }
    ranks = {
        name: metrics.rank_of_correct(s, find["correct"])
        for name, s in (("dense", dense), ("bm25", lexical), ("hybrid", hybrid))
    }
    families = find["families"]

    def ranked(keep: list[int]) -> dict:
        return {name: metrics.ranking([r[i] for i in keep]) for name, r in ranks.items()}

    every = ranked(list(range(len(families))))
    per_family = {
        f: {"n": families.count(f), **ranked([i for i, g in enumerate(families) if g == f])}
        for f in sorted(set(families) - {""})
    }
    return {
        "n": len(families),
        "passages": len(find["passages"]),
        **every["hybrid"],
        **every,
        "families": per_family,
        "dense_weight": settings.find_dense_weight,
        "fusion_mrr": curve,
    }


def evaluate(
    model: str | Path,
    corpus: str | Path,
    tasks: list[str] | None = None,
    split: str = "test",
    limit: int | None = None,
    shard_rows: int = 32,
    backend: str = "torch",
    settings: AnswerSettings | None = None,
    code_checks: bool = True,
    out: str | Path | None = None,
) -> dict:
    """Evaluate an exported model on a corpus split; with `out`, write eval.json and eval.md there."""
    from odyssey import cluster

    model, corpus, tasks = Path(model).resolve(), Path(corpus).resolve(), check_tasks(tasks)
    settings = settings or AnswerSettings()
    if backend not in BACKENDS:
        raise OdysseyError(f"--backend: {backend!r}; backends: {', '.join(BACKENDS)}")
    if (limit is not None and limit < 1) or shard_rows < 1:
        raise OdysseyError("--limit and shard rows must be >= 1")
    config = artifact.read_config(model)  # a clear error before any task starts
    read_manifest(corpus)
    t0 = time.perf_counter()
    jobs, find = _jobs(corpus, tasks, split, limit, shard_rows)
    cluster.connect()  # before importing ray: it reads its auth mode once, on import
    import ray

    task = ray.remote(num_cpus=1)(run_shard)
    pending = {
        task.remote(str(model), backend, kind, items, settings, code_checks): i
        for i, (kind, items) in enumerate(jobs)
    }
    results: list = [None] * len(jobs)
    progress = Progress(len(jobs), unit="rows", every_s=5.0, emit=log.info)
    rows_done = 0
    progress.update(0, 0)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        results[i] = ray.get(ready[0])
        rows_done += len(jobs[i][1])
        progress.update(len(jobs) - len(pending), rows_done)

    by_kind: dict[str, list] = {}
    for (kind, _), result in zip(jobs, results):
        by_kind.setdefault(kind, []).append(result)
    report_tasks = {}
    for name in tasks:
        if name == "find":
            vectors = {
                k: np.concatenate(by_kind.get(k, [np.zeros((0, 1))]))
                for k in ("find:queries", "find:passages")
            }
            report_tasks[name] = _find_scores(
                find, vectors["find:queries"], vectors["find:passages"], settings
            )
            continue
        answers = [a for part in by_kind.get(name, []) for a in part]
        report_tasks[name] = _scores(name, answers)
    report = {
        "model": str(model),
        "model_id": artifact.model_id(model, config),
        "backend": backend,
        "corpus": str(corpus),
        "split": split,
        "limit": limit,
        "settings": asdict(settings),
        "code_checks": code_checks,
        "tasks": report_tasks,
        "metrics": metrics.flatten(report_tasks),
        "shards": len(jobs),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if out is not None:
        write_report(report, Path(out))
    return report


def markdown(report: dict) -> str:
    """The report as one table: each task's figure for the model as served, beside its baselines
    (BM25 for find, the rules for moderation, the lead sentence for summaries) and the model's parts."""
    lines = [
        f"# Evaluation of `{report['model_id']}`",
        "",
        f"{report['corpus']}, split `{report['split']}`"
        + (f", at most {report['limit']} examples per task" if report["limit"] else "")
        + f"; backend {report['backend']}; {report['seconds']} s over {report['shards']} Ray tasks.",
        "",
        "| task | metric | served | baselines and parts | examples |",
        "|---|---|---|---|---|",
    ]
    for task, r in report["tasks"].items():
        n = f"{r['n']}" + (f" ({r['skipped']} too long)" if r.get("skipped") else "")
        lines += [
            f"| {task} | {metric} | {value} | {beside} | {count or n} |"
            for metric, value, beside, count in _rows(task, r)
        ]
    return "\n".join(lines) + "\n"


def _rows(task: str, r: dict) -> list[tuple[str, str, str, str]]:
    """(metric, served value, baselines, examples) rows of one task's results."""
    if not r.get("n"):
        return [("-", "no examples", "", "")]
    if task == "summarize":
        return [("rouge_l", f"{r['rouge_l']:.4f}", f"lead sentence {r['baseline']['lead_sentence']:.4f}", "")]
    if task == "find":
        rows = []
        for scope, s in [("all", r), *r["families"].items()]:
            for metric in ("mrr", "recall@10"):
                beside = f"BM25 {s['bm25'][metric]:.4f}, dense {s['dense'][metric]:.4f}"
                rows.append(
                    (f"{metric} ({scope})", f"{s['hybrid'][metric]:.4f}", beside, f"{s['n']} queries")
                )
        return rows
    if task == "moderate":
        rows = []
        for scope, s in [("all", r), ("rules_hidden", r.get("rules_hidden"))]:
            if s is not None:
                rows += [
                    (f"{m} ({scope})", *rest) for m, *rest in _judged_rows(s["judges"], s.get("n", r["n"]))
                ]
        return rows
    if task == "code":
        rows = []
        for scope, s in [("all", r), *r.get("families", {}).items()]:
            passed = "n/a" if s.get("pass_rate") is None else f"{s['pass_rate']:.4f} of {s['checks']} checks"
            rows.append(
                (
                    f"parse_rate ({scope})",
                    f"{s['parse_rate']:.4f}",
                    f"pass rate {passed}",
                    f"{s.get('n', r['n'])}",
                )
            )
        return rows
    if task == "lm":
        return [("perplexity", f"{r['perplexity']:.3f}", "", f"{r['tokens']} tokens")]
    return []


def _judged_rows(judges: dict, n: int) -> list[tuple[str, str, str, str]]:
    """Macro F1 and each label's F1: served, beside the rules alone and the model alone."""

    def f1(judge: str, label: str | None) -> float:
        s = judges[judge]
        return s["macro_f1"] if label is None else s["labels"][label]["f1"]

    return [
        (
            "macro_f1" if label is None else f"{label} F1",
            f"{f1('served', label):.3f}",
            f"rules {f1('rules', label):.3f}, model {f1('model', label):.3f}",
            str(n),
        )
        for label in (None, *judges["served"]["labels"])
    ]


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "eval.json", json.dumps(report, indent=2) + "\n")
    atomic.write_text(out / "eval.md", markdown(report))
