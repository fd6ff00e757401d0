"""`odyssey eval MODEL`: held-out examples -> shards -> Ray tasks -> metrics -> report.

    report = evaluate("runs/demo/model", "runs/demo/corpus", out="runs/demo/eval")
    # runs/demo/eval/eval.json (everything) and eval.md (the table)

Each shard of each task is one Ray task (one CPU): it loads the model once per worker process (from
a path every node sees, as serving does) and returns raw answers; the driver turns them into metrics.
So an evaluation spreads over whatever cluster it runs on, and a laptop's embedded cluster runs it
over its cores. Passage search embeds passages and queries in shards, then ranks on the driver,
beside BM25 over the same passages (the baseline a model must beat to be worth its cost).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from odyssey import artifact, atomic
from odyssey.bm25 import BM25
from odyssey.data.corpus import read_manifest, read_split
from odyssey.errors import OdysseyError
from odyssey.evaluation import inference, metrics
from odyssey.evaluation.inference import AnswerSettings
from odyssey.progress import Progress
from odyssey.tasks import MODERATION_LABELS, TASKS

log = logging.getLogger(__name__)

BACKENDS = artifact.BACKENDS
_MODELS: dict = {}  # in each worker process: the model its last shard used, kept for the next shard


def _model(path: str, backend: str):
    if (path, backend) not in _MODELS:
        loaded = artifact.load(path, backend)
        _MODELS.clear()
        _MODELS[(path, backend)] = loaded[:2]
    return _MODELS[(path, backend)]


def run_shard(path: str, backend: str, kind: str, items: list, settings: AnswerSettings):
    """One Ray task: the model's raw answers to one shard (`find:*` shards are texts to embed)."""
    model, tok = _model(path, backend)
    if kind.startswith("find:"):
        return inference.embed(model, tok, items)
    return inference.ANSWER[kind](model, tok, items, settings)


def check_tasks(tasks: list[str] | None) -> list[str]:
    tasks = list(tasks or TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise OdysseyError(f"--tasks: unknown task {unknown[0]!r}; tasks: {', '.join(TASKS)}")
    return tasks


def _jobs(corpus: Path, tasks: list[str], split: str, limit: int | None, shard_rows: int):
    """[(kind, items)] and, for `find`, the passages and each query's right passage."""
    jobs, find = [], None
    for task in tasks:
        table = read_split(corpus, task, split)
        rows = table.slice(0, limit if limit is not None else table.num_rows).to_pylist()
        if task == "find":
            passages = list(dict.fromkeys(r["target"] for r in rows))  # unique, in order
            where = {p: i for i, p in enumerate(passages)}
            find = {"queries": [r["input"] for r in rows], "passages": passages}
            find["correct"] = [where[r["target"]] for r in rows]
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
        rouge = metrics.rouge_l([a["prediction"] for a in done], [a["reference"] for a in done])
        return {**out, "rouge_l": rouge}
    if task == "moderate":
        scored = metrics.label_scores(
            [set(a["predicted"]) for a in done], [set(a["actual"]) for a in done], MODERATION_LABELS
        )
        return {**out, **scored}
    if task == "code":
        checks = [a["check"] for a in done if "check" in a]
        return {
            **out,
            "parse_rate": float(np.mean([a["parses"] for a in done])),
            "exact_match": float(np.mean([a["exact"] for a in done])),
            "checks": len(checks),
            "pass_rate": float(np.mean([c["passed"] for c in checks])) if checks else None,
        }
    if task == "lm":
        tokens = sum(a["tokens"] for a in done)
        return {
            **out,
            "tokens": tokens,
            "perplexity": metrics.perplexity(sum(a["nll"] for a in done), tokens),
        }
    raise ValueError(task)


def _find_scores(find: dict, queries: np.ndarray, passages: np.ndarray) -> dict:
    if not find["queries"]:
        return {"n": 0, "passages": 0}
    dense = queries @ passages.T  # (Q, P) cosine similarities: both sides are unit vectors
    bm25 = BM25(find["passages"])
    lexical = np.stack([bm25.scores(q) for q in find["queries"]])
    return {
        "n": len(find["queries"]),
        "passages": len(find["passages"]),
        **metrics.ranking(metrics.rank_of_correct(dense, find["correct"])),
        "bm25": metrics.ranking(metrics.rank_of_correct(lexical, find["correct"])),
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
        task.remote(str(model), backend, kind, items, settings): i for i, (kind, items) in enumerate(jobs)
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
            report_tasks[name] = _find_scores(find, vectors["find:queries"], vectors["find:passages"])
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
        "tasks": report_tasks,
        "metrics": metrics.flatten(report_tasks),
        "shards": len(jobs),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if out is not None:
        write_report(report, Path(out))
    return report


def markdown(report: dict) -> str:
    lines = [
        f"# Evaluation of `{report['model_id']}`",
        "",
        f"{report['corpus']}, split `{report['split']}`"
        + (f", at most {report['limit']} examples per task" if report["limit"] else "")
        + f"; backend {report['backend']}; {report['seconds']} s over {report['shards']} Ray tasks.",
        "",
        "| task | metric | model | baseline | examples |",
        "|---|---|---|---|---|",
    ]
    for task, r in report["tasks"].items():
        n = f"{r['n']}" + (f" ({r['skipped']} too long)" if r.get("skipped") else "")
        if task == "code" and r.get("checks") is not None:
            n += f"; {r['checks']} executable checks"
        for key, value in report["metrics"].items():
            if key.startswith(f"{task}."):
                metric = key.split(".", 1)[1]
                base = r.get("bm25", {}).get(metric)
                lines.append(
                    f"| {task} | {metric} | {value:.4f} | {'' if base is None else f'BM25 {base:.4f}'} | {n} |"
                )
        if task == "moderate":
            for label, s in r.get("labels", {}).items():
                lines.append(
                    f"| moderate | {label} P / R / F1 | {s['precision']:.3f} / {s['recall']:.3f} / "
                    f"{s['f1']:.3f} | | {s['support']} with the label |"
                )
        if task == "code" and r.get("pass_rate") is None:
            lines.append(f"| code | pass_rate | n/a: no executable check in this split | | {n} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "eval.json", json.dumps(report, indent=2) + "\n")
    atomic.write_text(out / "eval.md", markdown(report))
