"""Benchmark: what a same-budget model does on every task, against each task's baseline.

    python bench/tasks.py [--recipe tiny-cpu] [--set key=value ...] [--minutes 25] [--steps N]
                          [--limit 300] [--find-limit 2000]

1. Train a recipe on the full corpus (every source; its corpus, tokenizer and blocks are prepared
   first, outside the budget, in runs/data/bench-tasks) for a fixed budget of training wall time,
   `--minutes` in all. With `--steps N` the run trains exactly N steps. Without it the steps come from
   this machine: a calibration run of 3 steps (its own run directory) times a step (LM batch +
   contrastive pairs, median of the steps after the first) and the fixed cost of a run (start-up,
   validation, checkpoint); the real run gets floor((budget - calibration wall - fixed cost) / seconds
   per step) steps. Every run directory is under runs/bench-tasks, wiped first, so a stale run is never
   resumed; eval_every = checkpoint_every = steps (one checkpoint, at the end).
   Which recipe: the `small` model trains at ~450 tokens/s on 2 cores (bench/results/train_throughput),
   so 25 minutes give it ~0.7 M tokens, 0.03 tokens per parameter: a model that has learnt nothing yet,
   whatever the objective. The `tiny` one (1 M parameters) gets ~7 M tokens, ~7 tokens per parameter,
   in the same time: the default here (`--recipe small-cpu` runs the other; a GPU runs gpt-125m).
2. Export the run's best checkpoint; choose the fusion weight of the model's ranking beside BM25's on the
   `val` split (the weight of `odyssey eval`'s fusion curve with the best MRR); `evaluate()` the `test`
   split with it (the embedded Ray cluster, code checks on): each task's first `--limit` examples; `find` its first `--find-limit` queries (its
   whole test split when smaller) against their unique passages.
3. The baseline the issue asks for, in process on the same model: the embedding before this change,
   the masked mean of the final hidden states of the raw text's tokens (no prompt, cut to the context),
   L2-normalised; the same queries, passages and right answers as the runner; MRR and recall@10.
4. Figures per task and targets: find's dense, BM25, hybrid and mean-pooled rankings (overall and per
   family); moderation's judges (rules, model, served) on every example and on `rules_hidden`; code's
   parse and pass rates per family; ROUGE-L beside the lead sentence; perplexity; the run's training.
   Writes bench/results/tasks.json and .md.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

import numpy as np

from bench import report

ROOT = Path(__file__).resolve().parent.parent
STORAGE = ROOT / "runs" / "bench-tasks"
CALIBRATION_STEPS = 3
# The full corpus (every source, its own tokenizer and blocks), kept outside the wiped run directories.
DEFAULT_SET = ["data.corpus=runs/data/bench-tasks", "data.prepare_preset=full"]  # from the checkout's root
ROWS_PER_FORWARD = 32


# --- training -------------------------------------------------------------------------------------


def train_run(
    recipe: str, extra: list[str], name: str, steps: int, log_every: int
) -> tuple[dict, list[dict], float]:
    """One fresh run of `steps` steps: (launch summary, metrics.jsonl rows, wall seconds)."""
    from odyssey.config import load_config
    from train import events, launch
    from train.config import TrainConfig, recipe_path

    shutil.rmtree(STORAGE / name, ignore_errors=True)
    overrides = [
        f"name={name}",
        f"storage={STORAGE}",
        f"steps={steps}",
        f"log_every={log_every}",
        f"eval_every={steps}",
        f"checkpoint_every={steps}",
        *extra,
    ]
    t0 = time.perf_counter()
    summary = launch.run(load_config(TrainConfig, recipe_path(recipe), overrides))
    wall = time.perf_counter() - t0
    return summary, events.read_metrics(Path(summary["run_dir"])), wall


def budget_steps(recipe: str, extra: list[str], minutes: float, step_tokens: int) -> tuple[int, dict]:
    """Steps that fit the training budget, from a calibration run of CALIBRATION_STEPS steps."""
    _, rows, wall = train_run(recipe, extra, "calibrate", CALIBRATION_STEPS, log_every=1)
    rates = [r["tokens_per_s"] for r in rows[1:]] or [rows[-1]["tokens_per_s"]]
    step_s = step_tokens / statistics.median(rates)
    fixed_s = max(0.0, wall - CALIBRATION_STEPS * step_s)
    left = minutes * 60 - wall - fixed_s
    steps = max(1, math.floor(left / step_s))
    calibration = {
        "steps": CALIBRATION_STEPS,
        "wall_s": round(wall, 1),
        "step_s": round(step_s, 2),
        "fixed_s": round(fixed_s, 1),
        "derived_steps": steps,
    }
    print(f"calibration: {calibration}", flush=True)
    return steps, calibration


# --- the mean-pooled baseline -----------------------------------------------------------------------


def find_rows(corpus: Path, split: str, limit: int | None) -> dict:
    """Queries, passages (unique targets, in order), each query's right passage and family: the runner's."""
    from odyssey.data.corpus import read_split

    table = read_split(corpus, "find", split)
    rows = table.slice(0, limit if limit is not None else table.num_rows).to_pylist()
    passages = list(dict.fromkeys(r["target"] for r in rows))
    where = {p: i for i, p in enumerate(passages)}
    return {
        "queries": [r["input"] for r in rows],
        "passages": passages,
        "correct": [where[r["target"]] for r in rows],
        "families": [r["family"] or "" for r in rows],
    }


def mean_pooled(model, tok, texts: list[str]) -> np.ndarray:
    """Unit vectors (N, D): the masked mean of the final hidden states of each raw text's tokens (no
    prompt, cut to the context), left-padded: what Transformer.embed returned before the find prompt."""
    import torch
    import torch.nn.functional as F

    limit = model.cfg.max_seq_len
    rows = [tok.encode(t)[:limit] or [tok.pad_id] for t in texts]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths pad little
    out = np.zeros((len(rows), model.cfg.d_model), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(order), ROWS_PER_FORWARD):
            part = order[start : start + ROWS_PER_FORWARD]
            ids, valid = model._left_pad([rows[i] for i in part], tok.pad_id)
            T = ids.shape[1]
            positions = (valid.long().cumsum(1) - 1).clamp(min=0)
            h = model.hidden_states(ids, *model.rope_at(positions), model._padded_mask(valid, 0, T))
            w = valid.unsqueeze(-1).type_as(h)
            pooled = (h * w).sum(1) / w.sum(1)
            out[part] = F.normalize(pooled.float(), dim=-1).numpy()
    return out


def mean_pooled_scores(model_dir: Path, find: dict) -> dict:
    """MRR and recall@k of the mean-pooled ranking, overall and per family (the runner's shape)."""
    from odyssey import artifact
    from odyssey.evaluation import metrics

    model, tok, _ = artifact.load(model_dir)
    queries = mean_pooled(model, tok, find["queries"])
    passages = mean_pooled(model, tok, find["passages"])
    ranks = metrics.rank_of_correct(queries @ passages.T, find["correct"])
    families = find["families"]
    return {
        **metrics.ranking(ranks),
        "families": {
            f: {"n": families.count(f), **metrics.ranking([r for r, g in zip(ranks, families) if g == f])}
            for f in sorted(set(families) - {""})
        },
    }


# --- figures, targets, table ------------------------------------------------------------------------


def unsafe_macro_f1(judged: dict) -> float | None:
    """Mean F1 over the unsafe labels that have examples in the subset (None: none have)."""
    from odyssey.tasks import UNSAFE_LABELS

    f1 = [judged["labels"][x]["f1"] for x in UNSAFE_LABELS if judged["labels"][x]["support"]]
    return float(np.mean(f1)) if f1 else None


def figures_of(ev: dict, pooled: dict, training: dict) -> dict:
    from odyssey.evaluation.inference import JUDGES

    t = ev["tasks"]
    find = t["find"]
    rankings = ("dense", "bm25", "hybrid")

    def four(scope: dict, pooled_scope: dict) -> dict:
        out = {name: {m: scope[name][m] for m in ("mrr", "recall@10")} for name in rankings}
        out["mean_pooled"] = {m: pooled_scope[m] for m in ("mrr", "recall@10")}
        return out

    mod = t["moderate"]

    def judges(scope: dict) -> dict:
        return {
            j: {
                "macro_f1": scope["judges"][j]["macro_f1"],
                "unsafe_macro_f1": unsafe_macro_f1(scope["judges"][j]),
                "f1": {label: s["f1"] for label, s in scope["judges"][j]["labels"].items()},
            }
            for j in JUDGES
        }

    code = t["code"]
    summ = t["summarize"]
    return {
        "eval": {"split": ev["split"], "seconds": ev["seconds"], "limits": ev["limits"]},
        "training": training,
        "find": {
            "n": find["n"],
            "passages": find["passages"],
            "all": four(find, pooled),
            "families": {
                f: {"n": s["n"], **four(s, pooled["families"][f])} for f, s in find["families"].items()
            },
        },
        "moderate": {
            "n": mod["n"],
            "all": judges(mod),
            **(
                {"rules_hidden": {"n": mod["rules_hidden"]["n"], **judges(mod["rules_hidden"])}}
                if "rules_hidden" in mod
                else {}
            ),
        },
        "code": {
            "n": code["n"],
            "parse_rate": code.get("parse_rate"),
            "pass_rate": code.get("pass_rate"),
            "checks": code.get("checks"),
            "families": {
                f: {k: s.get(k) for k in ("n", "parse_rate", "pass_rate", "checks")}
                for f, s in code.get("families", {}).items()
            },
        },
        "summarize": {
            "n": summ["n"],
            "rouge_l": summ.get("rouge_l"),
            "lead_sentence_rouge_l": summ.get("baseline", {}).get("lead_sentence"),
        },
        "lm": {"perplexity": t["lm"].get("perplexity"), "tokens": t["lm"].get("tokens")},
    }


def targets_of(f: dict) -> dict:
    """Each target: kind (must / goal), what, measured, met (None: nothing to judge)."""
    syn = f["find"]["families"].get("synopsis")
    every = f["find"]["all"]
    hidden = f["moderate"].get("rules_hidden")
    model_f1 = hidden and hidden["model"]["unsafe_macro_f1"]
    rules_f1 = hidden and hidden["rules"]["unsafe_macro_f1"]
    code, summ = f["code"], f["summarize"]

    def cmp(a, b, factor=1.0, strict=False):
        if a is None or b is None:
            return None
        return a > factor * b if strict else a >= factor * b

    return {
        "synopsis_dense_vs_bm25": {
            "kind": "goal",
            "what": "dense MRR >= BM25 MRR on the synopsis family",
            "met": cmp(syn["dense"]["mrr"], syn["bm25"]["mrr"]) if syn else None,
        },
        "hybrid_vs_bm25": {
            "kind": "must",
            "what": "hybrid MRR >= BM25 MRR (all queries)",
            "met": cmp(every["hybrid"]["mrr"], every["bm25"]["mrr"]),
        },
        "dense_vs_mean_pooled": {
            "kind": "must",
            "what": "dense MRR >= 2x the mean-pooled MRR (all queries)",
            "met": cmp(every["dense"]["mrr"], every["mean_pooled"]["mrr"], 2.0),
        },
        "rules_hidden_model_vs_rules": {
            "kind": "must",
            "what": "rules_hidden: model-only macro F1 over the unsafe labels > rules-only",
            "met": cmp(model_f1, rules_f1, strict=True),
        },
        "code_pass_rate": {
            "kind": "goal",
            "what": "code pass rate reported, > 0",
            "met": None if code["pass_rate"] is None else code["pass_rate"] > 0,
        },
        "summarize_vs_lead": {
            "kind": "report",
            "what": "summarize ROUGE-L reported beside the lead sentence",
            "met": summ["rouge_l"] is not None and summ["lead_sentence_rouge_l"] is not None,
        },
    }


def _v(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _met(t: dict) -> str:
    return f"{t['kind']}: {t['what']}: " + {True: "met", False: "NOT met", None: "n/a"}[t["met"]]


def table_of(f: dict, targets: dict) -> list[tuple[str, str, str]]:
    tr = f["training"]
    rows = [
        (
            "training",
            f"{tr['steps']} steps, {tr['tokens']:,} tokens, {tr['wall_s']:.0f} s wall "
            f"({tr['budget_wall_s']:.0f} s with calibration); loss {_v(tr['first_loss'])} -> {_v(tr['final_loss'])}, "
            f"contrastive {_v(tr['contrastive_loss'])}, val contrastive {_v(tr['val_contrastive_loss'])}",
            f"fixed at --steps {tr['steps']}"
            if tr["calibration"] is None
            else f"<= {tr['budget_minutes']:g} min of training: "
            + ("met" if tr["budget_wall_s"] <= tr["budget_minutes"] * 60 else "NOT met"),
        )
    ]
    fusion = tr.get("fusion")
    if fusion:
        curve = ", ".join(f"{w}: {_v(m)}" for w, m in fusion["val_mrr_by_dense_weight"].items())
        rows.append((
            "find: the model's weight in the fusion beside BM25's 1, chosen on val",
            f"{fusion['chosen_dense_weight']:g} (val MRR by weight: {curve})",
            "",
        ))  # fmt: skip
    fd = f["find"]
    on = {
        ("all", "hybrid"): _met(targets["hybrid_vs_bm25"]),
        ("all", "dense"): _met(targets["dense_vs_mean_pooled"]),
        ("synopsis", "dense"): _met(targets["synopsis_dense_vs_bm25"]),
    }
    for scope, s in [("all", {"n": fd["n"], **fd["all"]}), *fd["families"].items()]:
        for name in ("dense", "bm25", "hybrid", "mean_pooled"):
            rows.append((
                f"find ({scope}, {s['n']} queries): {name.replace('_', '-')}",
                f"MRR {_v(s[name]['mrr'])}, recall@10 {_v(s[name]['recall@10'])}",
                on.get((scope, name), ""),
            ))  # fmt: skip
    mod = f["moderate"]
    for scope in ("all", "rules_hidden"):
        if scope not in mod:
            continue
        for j, s in ((j, mod[scope][j]) for j in ("rules", "model", "served")):
            labels = ", ".join(f"{label} {_v(v, 3)}" for label, v in s["f1"].items())
            target = (
                _met(targets["rules_hidden_model_vs_rules"])
                if scope == "rules_hidden" and j == "model"
                else ""
            )
            rows.append((
                f"moderate ({scope}, {mod[scope]['n'] if scope != 'all' else mod['n']} examples): {j}",
                f"macro F1 {_v(s['macro_f1'], 3)} (unsafe labels {_v(s['unsafe_macro_f1'], 3)}); F1 {labels}",
                target,
            ))  # fmt: skip
    code = f["code"]
    for scope, s in [("all", code), *code["families"].items()]:
        rows.append((
            f"code ({scope}, {s['n']} examples)",
            f"parse rate {_v(s['parse_rate'])}, pass rate {_v(s['pass_rate'])} of {s['checks'] or 0} checks",
            _met(targets["code_pass_rate"]) if scope == "all" else "",
        ))  # fmt: skip
    sm = f["summarize"]
    rows.append((
        f"summarize ({sm['n']} examples): ROUGE-L model vs lead sentence",
        f"{_v(sm['rouge_l'])} vs {_v(sm['lead_sentence_rouge_l'])}",
        _met(targets["summarize_vs_lead"]),
    ))  # fmt: skip
    rows.append((f"lm: perplexity ({f['lm']['tokens']} tokens)", _v(f["lm"]["perplexity"], 3), ""))
    return rows


# --- main -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="tiny-cpu", help="a train/configs recipe (see the docstring)")
    parser.add_argument(
        "--set",
        action="append",
        default=None,
        help="recipe overrides, key=value (default: the full corpus, DEFAULT_SET)",
    )
    parser.add_argument("--minutes", type=float, default=25.0, help="training budget, calibration included")
    parser.add_argument(
        "--steps", type=int, default=None, help="train exactly this many steps (no calibration)"
    )
    parser.add_argument("--limit", type=int, default=300, help="test examples per task")
    parser.add_argument("--name", default="tasks", help="results file name (bench/gpu_tasks.sh: gpu_tasks)")
    parser.add_argument("--find-limit", type=int, default=2000, help="find's test queries")
    args = parser.parse_args()
    args.set = DEFAULT_SET if args.set is None else args.set
    os.chdir(ROOT)  # relative paths of the recipe and DEFAULT_SET are the checkout's
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )

    import torch

    from odyssey import cluster
    from odyssey.answers import AnswerSettings
    from odyssey.config import load_config
    from odyssey.evaluation.runner import evaluate
    from odyssey.tasks import TASKS
    from train import mixture
    from train.config import TrainConfig, recipe_path
    from train.export import exported_model

    cfg = load_config(TrainConfig, recipe_path(args.recipe), args.set)
    mixture.prepare(cfg)  # corpus, tokenizer, blocks: outside the training budget
    corpus = Path(cfg.data.corpus).resolve()
    STORAGE.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    try:
        calibration = None
        steps = args.steps
        if steps is None:
            steps, calibration = budget_steps(args.recipe, args.set, args.minutes, cfg.global_batch_tokens)
            shutil.rmtree(STORAGE / "calibrate", ignore_errors=True)  # its checkpoint serves nothing
        summary, rows, wall = train_run(
            args.recipe, args.set, "run", steps, log_every=min(cfg.log_every, steps)
        )
        budget_wall = time.perf_counter() - t_start
        last = rows[-1]
        training = {
            "recipe": args.recipe,
            "budget_minutes": args.minutes,
            "calibration": calibration,
            "steps": last["step"],
            "tokens": last["tokens"],
            "wall_s": round(wall, 1),
            "budget_wall_s": round(budget_wall, 1),
            "tokens_per_s": summary["tokens_per_s"],
            "first_loss": summary["first_loss"],
            "final_loss": last.get("loss"),
            "contrastive_loss": last.get("contrastive_loss"),
            "val_contrastive_loss": last.get("val_contrastive_loss"),
            "val_loss": last.get("val_loss"),
        }
        print(f"training: {training}", flush=True)

        torch.set_num_threads(os.cpu_count() or 1)
        others = [t for t in TASKS if t != "find"]
        with exported_model(summary["run_dir"]) as model_dir:
            # The fusion weight of the model's ranking is chosen on the validation split, then the
            # test split is evaluated with it: the test only reports.
            val_find = evaluate(model_dir, corpus, ["find"], "val", args.find_limit)["tasks"]["find"]
            curve = val_find["fusion_mrr"]
            weight = float(max(curve, key=lambda w: (curve[w], -abs(float(w) - 1.0))))
            settings = AnswerSettings(find_dense_weight=weight)
            training["fusion"] = {"val_mrr_by_dense_weight": curve, "chosen_dense_weight": weight}
            print(f"fusion weight chosen on val: {weight} ({curve})", flush=True)
            ev_find = evaluate(model_dir, corpus, ["find"], "test", args.find_limit, settings=settings)
            ev = evaluate(model_dir, corpus, others, "test", args.limit, settings=settings, code_checks=True)
            ev["tasks"].update(ev_find["tasks"])
            ev["seconds"] = round(ev["seconds"] + ev_find["seconds"], 1)
            ev["limits"] = {"find": args.find_limit, "others": args.limit}
            t0 = time.perf_counter()
            pooled = mean_pooled_scores(model_dir, find_rows(corpus, "test", args.find_limit))
            print(f"mean-pooled baseline: {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        cluster.disconnect()

    figures = figures_of(ev, pooled, training)
    figures["bench_wall_s"] = round(time.perf_counter() - t_start, 1)
    targets = targets_of(figures)
    notes = (
        f"`{args.recipe}` ({' '.join(args.set)}) trained for a fixed budget "
        + (
            f"of {args.steps} steps"
            if args.steps
            else f"({args.minutes:g} min of training wall time, calibration included)"
        )
        + f", exported (best checkpoint) and evaluated on the `test` split: at most {args.limit} "
        f"examples per task, {args.find_limit} find queries. mean-pooled: the same model's embedding "
        "before this change (mean of the final hidden states of the raw text, no prompt). Targets: "
        "must ones gate the change, goals are reported."
    )
    path = report.write(args.name, figures, targets, table_of(figures, targets), notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
