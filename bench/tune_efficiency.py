"""Benchmark: what early stopping and a learned search save, and whether µP makes the learning rate transfer.

    python bench/tune_efficiency.py [--part sweeps|mup|both] [--steps 48] [--mup-steps 120]

Part 1, sweeps (real `python -m tune` sweeps: one-worker Ray Train + DeepSpeed trials of tiny-cpu, two at a
time, on an embedded cluster). One search space, 6 learning rates x 2 warm-ups = 12 points:
  grid            every point, trained in full (the reference)
  optuna + ASHA   TPE proposes 8 points of the same space; ASHA (rungs at 1/12, 1/4 and 3/4 of the
                  tokens, keep the best third) stops the laggards
  random + ASHA   the same budget with random proposals (the baseline of the search itself)
  optuna + ASHA, budget   as optuna + ASHA, the sweep stopped at 30% of the grid's tokens (budget.tokens)
Figures: the best validation loss each found (its best trial that trained all its tokens) and the tokens
all its trials trained together. Target: optuna + ASHA within 2% of the grid's loss at <= 30% of its tokens.

Part 2, µP (the core model, a plain single-process loop; no Ray: µP is a property of the model): loss vs.
learning rate for widths 32, 128, 512 (x4 apart, head width 32, 2 layers) under standard parametrization
and under µP (base width 32), same data, steps, schedule and seeds. Target: under µP the best learning
rate moves by at most one grid step (x2) across the widths.

Writes bench/results/tune_efficiency.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from bench import report

WORK = Path("runs/bench-tune")
LRS = [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2]
WARMUPS = [0, 16]
MUP_WIDTHS = [32, 128, 512]
MUP_LRS = [2.0**k for k in range(-12, -4)]  # 2.4e-4 ... 3.1e-2, a x2 grid


# --- part 1: sweeps ----------------------------------------------------------------------------------


def sweep_config(
    name: str, algorithm: str, scheduler: str, trials: int, steps: int, tokens: int | None = None
):
    from odyssey.config import from_dict
    from tune.config import SweepConfig

    eval_every = steps // 12
    return from_dict(
        SweepConfig,
        {
            "name": name,
            "storage": str(WORK.resolve()),
            "recipe": "tiny-cpu",
            "train": {
                "steps": steps,
                "eval_every": eval_every,
                "log_every": eval_every,
                "checkpoint_every": steps,
            },
            "space": {
                "optim.lr": {"grid" if algorithm == "grid" else "choice": LRS},
                "optim.warmup_steps": {"grid" if algorithm == "grid" else "choice": WARMUPS},
            },
            "search": {"algorithm": algorithm, "seed": 0},
            "scheduler": {"kind": scheduler, "grace_fraction": 1 / 12, "reduction_factor": 3},
            "budget": {"trials": trials, "tokens": tokens},
            "trial": {"workers": 1, "max_concurrent": 2},
        },
    )


SWEEPS = ("grid", "optuna-asha", "random-asha", "optuna-asha-budget")


def run_sweeps(steps: int, trials: int, names: tuple[str, ...], previous: dict) -> dict:
    """Each named sweep afresh; the others as the previous run left them. `*-budget`: the same sweep with
    budget.tokens = 30% of the grid's tokens (the sweep stops once its trials have trained that many)."""
    from tune import sweep

    out = dict(previous)
    grid_tokens = 12 * steps * 2048  # every point of the space, full length
    for name in names:
        algorithm, scheduler = ("grid", "fifo") if name == "grid" else (name.split("-")[0], "asha")
        n = 1 if name == "grid" else trials
        tokens = int(0.3 * grid_tokens) if name.endswith("-budget") else None
        shutil.rmtree(WORK / name, ignore_errors=True)
        t0 = time.perf_counter()
        summary = sweep.run(sweep_config(name, algorithm, scheduler, n, steps, tokens))
        rows = json.loads((Path(summary["sweep_dir"]) / "trials.json").read_text())
        out[name] = {
            "best_val_loss": summary["best"]["val_loss"] if summary["best"] else None,
            "best_params": summary["best"]["params"] if summary["best"] else None,
            "tokens": summary["tokens"],
            "trials": summary["trials"],
            "seconds": round(time.perf_counter() - t0, 1),
            "rows": [{k: r[k] for k in ("params", "last", "tokens", "state")} for r in rows],
        }
        print(
            f"{name}: best {out[name]['best_val_loss']:.4f}, {summary['tokens']:,} tokens, {out[name]['seconds']} s",
            flush=True,
        )
    grid = out["grid"]
    for name in out:
        if name != "grid":
            out[name]["loss_vs_grid"] = out[name]["best_val_loss"] / grid["best_val_loss"] - 1
            out[name]["tokens_vs_grid"] = out[name]["tokens"] / grid["tokens"]
    return out


# --- part 2: µP learning-rate transfer ---------------------------------------------------------------


def mup_curves(steps: int, batch: int = 4, seeds: tuple[int, ...] = (0,)) -> dict:
    """Final validation loss for every (parametrization, width, lr)."""
    import numpy as np
    import torch

    from odyssey import optim
    from odyssey.config import load_config
    from odyssey.data import packing
    from odyssey.model import ModelConfig, Transformer, pad_vocab
    from odyssey.tasks import TASKS
    from train import mixture
    from train.config import TrainConfig, recipe_path

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(TrainConfig, recipe_path("tiny-cpu"))
    mixture.prepare(cfg)
    manifest = mixture.read_manifest(cfg)
    train = [packing.read_blocks(cfg.data.blocks_dir, t, "train") for t in TASKS]
    val = mixture.read_validation(cfg).values()  # what training evaluates on: 16 blocks per task
    train_ids = torch.from_numpy(np.concatenate([i for i, _ in train]).astype("int64"))
    train_mask = torch.from_numpy(np.concatenate([m for _, m in train]).astype(bool))
    val_ids = torch.from_numpy(np.concatenate([i for i, _ in val]).astype("int64"))
    val_mask = torch.from_numpy(np.concatenate([m for _, m in val]).astype(bool))
    assert val_mask[:, 1:].any(), "no validation tokens"
    vocab = pad_vocab(manifest["vocab_size"])

    curves: dict = {"sp": {}, "mup": {}}
    for param in ("sp", "mup"):
        for width in MUP_WIDTHS:
            model_cfg = ModelConfig(
                vocab_size=vocab,
                d_model=width,
                n_layer=2,
                n_head=width // 32,
                max_seq_len=cfg.data.seq_len,
                mup=param == "mup",
                mup_base_width=MUP_WIDTHS[0],
            )
            losses = []
            for lr in MUP_LRS:
                finals = []
                for seed in seeds:
                    torch.manual_seed(seed)
                    model = Transformer(model_cfg)
                    opt = optim.adamw(model, lr, 0.0)
                    order = torch.Generator().manual_seed(seed)
                    for step in range(steps):
                        optim.set_lr(opt, optim.lr_at(step, lr, steps // 10, steps))
                        rows = torch.randint(0, len(train_ids), (batch,), generator=order)
                        ids, mask = train_ids[rows], train_mask[rows]
                        loss = model(ids[:, :-1], ids[:, 1:], mask[:, 1:])
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                        opt.step()
                    with torch.no_grad():
                        v = float(model(val_ids[:, :-1], val_ids[:, 1:], val_mask[:, 1:]))
                    finals.append(v if math.isfinite(v) else float("inf"))
                losses.append(sum(finals) / len(finals))
                print(f"{param} width {width} lr {lr:.2e}: val loss {losses[-1]:.4f}", flush=True)
            curves[param][str(width)] = losses
    shifts = {}
    for param, by_width in curves.items():
        best = {w: int(np.argmin(ls)) for w, ls in by_width.items()}
        shifts[param] = {
            "best_lr": {w: MUP_LRS[i] for w, i in best.items()},
            "shift_steps": max(best.values()) - min(best.values()),
        }
    return {
        "lrs": MUP_LRS,
        "widths": MUP_WIDTHS,
        "steps": steps,
        "batch": batch,
        "curves": curves,
        "best": shifts,
    }


# --- report ------------------------------------------------------------------------------------------


def plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mup = figures.get("mup")
    sweeps = figures.get("sweeps")
    panels = (2 if mup else 0) + (1 if sweeps else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8), squeeze=False)
    axes = list(axes[0])
    if sweeps:
        ax = axes.pop(0)
        for name, s in sweeps.items():
            ax.scatter(s["tokens"] / 1e6, s["best_val_loss"], s=60, label=name)
        ax.set_xlabel("tokens trained by the whole sweep (M)")
        ax.set_ylabel("best validation loss")
        ax.set_title("sweeps: loss found vs. tokens spent")
        ax.grid(alpha=0.3)
        ax.legend()
    if mup:
        top = max(v for c in mup["curves"].values() for ls in c.values() for v in ls if math.isfinite(v))
        low = min(v for c in mup["curves"].values() for ls in c.values() for v in ls)
        for ax, param in zip(axes, ("sp", "mup")):
            for width, losses in mup["curves"][param].items():
                ax.plot(mup["lrs"], [min(v, top) for v in losses], marker="o", label=f"width {width}")
            ax.set_xscale("log", base=2)
            ax.set_ylim(low - 0.05 * (top - low), top)
            ax.set_xlabel("learning rate")
            ax.set_ylabel("validation loss")
            ax.set_title("standard parametrization" if param == "sp" else "µP")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _verdict(target: str, met: bool) -> str:
    return f"{target}: {'met' if met else '**not met**'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["sweeps", "mup", "both"], default="both")
    parser.add_argument("--steps", type=int, default=48, help="training steps of one full trial")
    parser.add_argument("--trials", type=int, default=8, help="trials of each ASHA sweep")
    parser.add_argument("--mup-steps", type=int, default=120)
    parser.add_argument(
        "--sweeps", nargs="+", choices=SWEEPS, default=list(SWEEPS), help="which sweeps to run (part 1)"
    )
    args = parser.parse_args()

    previous = report.RESULTS / "tune_efficiency.json"
    figures = (
        json.loads(previous.read_text())["figures"] if previous.is_file() and args.part != "both" else {}
    )
    if args.part in ("sweeps", "both"):
        from odyssey import cluster

        cluster.connect(num_cpus=max(os.cpu_count() or 1, 5))
        try:
            figures["sweeps"] = run_sweeps(
                args.steps, args.trials, tuple(args.sweeps), figures.get("sweeps", {})
            )
        finally:
            cluster.disconnect()
    if args.part in ("mup", "both"):
        figures["mup"] = mup_curves(args.mup_steps)

    targets = {"loss_vs_grid_max": 0.02, "tokens_vs_grid_max": 0.30, "mup_lr_shift_steps_max": 1}
    table = []
    if "sweeps" in figures:
        s = figures["sweeps"]
        table.append(
            (
                "grid (12 points, full length): best val loss / tokens",
                f"{s['grid']['best_val_loss']:.4f} / {s['grid']['tokens']:,}",
                "reference",
            )
        )
        for name in (n for n in SWEEPS[1:] if n in s):
            r = s[name]
            table.append(
                (
                    f"{name}: best val loss vs grid / tokens vs grid",
                    f"{r['best_val_loss']:.4f} ({r['loss_vs_grid']:+.1%}) / {r['tokens']:,} ({r['tokens_vs_grid']:.0%})",
                    _verdict("within 2% at <= 30%", r["loss_vs_grid"] <= 0.02 and r["tokens_vs_grid"] <= 0.30)
                    if name.startswith("optuna")
                    else "baseline",
                )
            )
    if "mup" in figures:
        m = figures["mup"]
        for param, label in (("sp", "standard"), ("mup", "µP")):
            best = m["best"][param]
            lrs = ", ".join(f"{w}: {lr:.1e}" for w, lr in best["best_lr"].items())
            table.append(
                (
                    f"{label}: best lr per width ({lrs})",
                    f"moves {best['shift_steps']} grid steps (x2 each)",
                    _verdict("<= 1", best["shift_steps"] <= 1) if param == "mup" else "",
                )
            )
            losses = ", ".join(f"{w}: {min(ls):.3f}" for w, ls in m["curves"][param].items())
            table.append((f"{label}: best val loss per width", losses, ""))
    report.write(
        "tune_efficiency",
        figures,
        targets,
        table,
        notes="Plot: bench/results/tune_efficiency.png. Trials: tiny-cpu, one worker each, two at a time, on 2 cores.",
    )
    plot(figures, report.RESULTS / "tune_efficiency.png")
    print((report.RESULTS / "tune_efficiency.md").read_text())


if __name__ == "__main__":
    main()
