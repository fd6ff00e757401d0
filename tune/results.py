"""What a sweep leaves in its directory:

    trials.json / trials.md   one row per trial: its values, best and last metric, tokens trained, state
    sweep.png                 the metric against each searched field (stopped trials hollow)
    best.yaml                 the best trial's training config as a ready recipe:
                              `python -m train --config runs/tune/NAME/best.yaml`
    best-target.yaml          --transfer: the same hyperparameters on the recipe's wide µP model

A trial's state: `completed` (trained all its tokens), `stopped` (halving, ASHA or a budget ended it early), or
`error` (its message kept, e.g. a diverged loss).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from odyssey.atomic import write_text
from odyssey.config import to_dict
from tune import space

if TYPE_CHECKING:
    from tune.config import Plan


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    best: float | None  # the best value of the metric the trial reported
    last: float | None  # its last reported value
    tokens: int  # trained
    planned_tokens: int
    state: str  # completed | stopped | error
    error: str | None = None


def collect(grid, p: Plan) -> list[TrialRow]:
    """Rows from Tune's ResultGrid, in trial order."""
    metric, sign = p.cfg.metric, 1 if p.cfg.mode == "min" else -1
    rows = []
    for result in grid:
        params = {q.field: result.config.get(q.field) for q in p.params}
        planned = space.train_config(p.base, params)
        planned_tokens = planned.steps * planned.global_batch_tokens
        history = result.metrics_dataframe
        values = (
            [float(v) for v in history[metric].dropna()] if history is not None and metric in history else []
        )
        tokens = int(history["tokens"].max()) if values else 0
        if result.error is not None:
            state, error = "error", _error_message(result.error)
        else:
            state, error = ("completed" if tokens >= planned_tokens else "stopped"), None
        rows.append(
            TrialRow(
                trial_id=result.metrics.get("trial_id") or Path(result.path).name,
                params=params,
                best=min(values, key=lambda v: sign * v) if values else None,
                last=values[-1] if values else None,
                tokens=tokens,
                planned_tokens=planned_tokens,
                state=state,
                error=error,
            )
        )
    return sorted(rows, key=lambda r: r.trial_id)


def _error_message(error: BaseException) -> str:
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return str(cause).strip().splitlines()[-1][:300] if str(cause).strip() else type(cause).__name__


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The trial whose recipe to run: by its last metric among trials that trained all their tokens (a
    stopped trial's loss was taken earlier in training), else among all that reported."""
    sign = 1 if mode == "min" else -1
    for pool in ([r for r in rows if r.state == "completed"], [r for r in rows if r.last is not None]):
        pool = [r for r in pool if r.last is not None and math.isfinite(r.last)]
        if pool:
            return min(pool, key=lambda r: sign * r.last)
    return None


def report(rows: list[TrialRow], p: Plan) -> dict:
    """Write the table, the plot and the best recipe(s); return the summary the CLI prints."""
    out = p.sweep_dir
    write_text(out / "trials.json", json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    write_text(out / "trials.md", markdown(rows, p))
    plot(rows, p, out / "sweep.png")
    best = best_row(rows, p.cfg.mode)
    summary = {
        "sweep_dir": str(out),
        "trials": {s: sum(r.state == s for r in rows) for s in ("completed", "stopped", "error")},
        "tokens": sum(r.tokens for r in rows),
        "table": str(out / "trials.md"),
        "plot": str(out / "sweep.png"),
        "best": None,
    }
    if best is None:
        return summary
    summary["best"] = {"trial": best.trial_id, "params": best.params, p.cfg.metric: best.last}
    header = (
        f"Best of sweep {p.cfg.name!r} ({p.cfg.metric} {best.last:.4f}, trial {best.trial_id}): "
        + ", ".join(f"{k}={v}" for k, v in best.params.items())
    )
    recipe = space.train_config(p.base, best.params)
    summary["recipe"] = str(
        _write_recipe(out / "best.yaml", replace(recipe, name=f"{p.cfg.name}-best"), header)
    )
    if p.target is not None:
        target = space.train_config(p.target, best.params)
        summary["target_recipe"] = str(
            _write_recipe(
                out / "best-target.yaml",
                replace(target, name=f"{p.cfg.name}-target"),
                header + f"; transferred by µP from d_model={recipe.model.d_model} to {target.model.d_model}",
            )
        )
    return summary


def _write_recipe(path: Path, cfg, header: str) -> Path:
    body = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    write_text(path, f"# {header}\n# Run it: python -m train --config {path}\n{body}")
    return path


def markdown(rows: list[TrialRow], p: Plan) -> str:
    fields = [q.field for q in p.params]
    head = ["trial", *fields, f"best {p.cfg.metric}", f"last {p.cfg.metric}", "tokens", "state"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.trial_id, *(_fmt(r.params[f]) for f in fields), _fmt(r.best), _fmt(r.last)]
        cells += [f"{r.tokens:,} / {r.planned_tokens:,}", r.state + (f": {r.error}" if r.error else "")]
        lines.append("| " + " | ".join(cells) + " |")
    total = sum(r.tokens for r in rows)
    return "\n".join(lines) + f"\n\n{len(rows)} trials, {total:,} tokens trained in all.\n"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plot(rows: list[TrialRow], p: Plan, path: Path) -> None:
    """The metric (best per trial) against each searched field."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [q for q in p.params if all(isinstance(v, (int, float)) for v in q.values)] or p.params
    fig, axes = plt.subplots(1, len(numeric), figsize=(4.2 * len(numeric), 3.4), squeeze=False)
    for ax, q in zip(axes[0], numeric):
        for state, style in (
            ("completed", {"color": "C0"}),
            ("stopped", {"facecolors": "none", "edgecolors": "C1"}),
        ):
            pts = [(r.params[q.field], r.best) for r in rows if r.state == state and r.best is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.scatter(
                    [str(x) for x in xs] if not isinstance(xs[0], (int, float)) else xs,
                    ys,
                    label=state,
                    **style,
                )
        if q.log_scale:
            ax.set_xscale("log")
        ax.set_xlabel(q.field)
        ax.set_ylabel(p.cfg.metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"sweep {p.cfg.name}: {len(rows)} trials")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
