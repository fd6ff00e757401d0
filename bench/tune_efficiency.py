"""Benchmark: what early stopping and a learned search save, and whether µP makes the learning rate transfer.

    python bench/tune_efficiency.py [--part sweeps|mup|both] [--steps 48] [--mup-steps 200]

Part 1, sweeps (real `python -m tune` sweeps: one-worker Ray Train + DeepSpeed trials of tiny-cpu, two at a
time, on an embedded cluster). One search space, 6 learning rates x 2 warm-ups = 12 points:
  grid                 every point, trained in full (the reference)
  random + halving     the default search: 10 of the 12 points, drawn without repeats (seeds 0, 1, 2);
                       successive halving cuts the cohort at 4, 12 and 36 of the 48 steps, keeping the
                       best third each time
  optuna + ASHA        what the default was: TPE proposes 10 points, asynchronous ASHA at the same rungs
Figures: the best validation loss each found (its best trial that trained all its tokens) and the tokens
all its trials trained together. Target: over the 3 seeds, median within 2% of the grid's loss at <= 30%
of its tokens, no seed worse than 4%.

Part 2, µP (the core model, a plain single-process loop; no Ray: µP is a property of the model): loss vs.
learning rate at widths 64, 128, 256, 512 (head width 32, 2 layers, untied readout) under µP (base width
64) and under standard parametrization, same data, steps, schedule and seed; then a second seed at every
width at width 64's best µP learning rate. Targets: there, every doubling of width lowers the loss by more
than the seeds' spread; each width's best µP learning rate is within one grid step (x2) of width 64's, on
a curve whose ends lie above its minimum by more than that spread.

Writes bench/results/tune_efficiency.{json,md,png}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from bench import report

WORK = Path("runs/bench-tune")
LRS = [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2]
WARMUPS = [0, 16]
MUP_WIDTHS = [64, 128, 256, 512]  # x2 apart; µP's base width is the first
MUP_LAYERS, MUP_HEAD = 2, 32  # depth and head width fixed: n_head grows with the width
MUP_LRS = [2.0**k for k in range(-10, -6)]  # a x2 grid around width 64's best
SP_LRS = [2.0**k for k in range(-12, -7, 2)]  # a x4 grid: the contrast
MUP_STEPS, MUP_BATCH = 200, 16  # 410k tokens: at 8 sequences a step, seeds differed by up to 0.17 nats


# --- part 1: sweeps ----------------------------------------------------------------------------------


def sweep_config(name: str, algorithm: str, scheduler: str, trials: int, steps: int, seed: int = 0):
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
            "search": {"algorithm": algorithm, "seed": seed},
            "scheduler": {"kind": scheduler, "grace_fraction": 1 / 12, "reduction_factor": 3},
            "budget": {"trials": trials},
            "trial": {"workers": 1, "max_concurrent": 2},
        },
    )


SEEDS = (0, 1, 2)
HALVING = tuple(f"random-halving-s{seed}" for seed in SEEDS)  # the default search, over 3 seeds
SWEEPS = ("grid", *HALVING, "optuna-asha")


def run_sweeps(steps: int, trials: int, names: tuple[str, ...], previous: dict) -> dict:
    """Each named sweep afresh; the others as the previous run left them."""
    from tune import sweep

    out = {name: r for name, r in previous.items() if name in SWEEPS}
    for name in names:
        if name == "grid":
            cfg = sweep_config(name, "grid", "fifo", 1, steps)
        elif name.startswith("random-halving"):
            cfg = sweep_config(name, "random", "halving", trials, steps, seed=int(name.rsplit("s", 1)[1]))
        else:
            cfg = sweep_config(name, "optuna", "asha", trials, steps)
        shutil.rmtree(WORK / name, ignore_errors=True)
        t0 = time.perf_counter()
        summary = sweep.run(cfg)
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


def mup_data() -> dict:
    """tiny-cpu's packed training blocks and the validation blocks training evaluates on."""
    import numpy as np
    import torch

    from odyssey.config import load_config
    from odyssey.data import packing
    from odyssey.model import pad_vocab
    from odyssey.tasks import TASKS
    from train import mixture
    from train.config import TrainConfig, recipe_path

    cfg = load_config(TrainConfig, recipe_path("tiny-cpu"))
    mixture.prepare(cfg)
    train = [packing.read_blocks(cfg.data.blocks_dir, t, "train") for t in TASKS]
    val = list(mixture.read_validation(cfg).values())

    def tensors(blocks):
        ids = torch.from_numpy(np.concatenate([i for i, _ in blocks]).astype("int64"))
        return ids, torch.from_numpy(np.concatenate([m for _, m in blocks]).astype(bool))

    return {
        "train": tensors(train),
        "val": tensors(val),
        "vocab": pad_vocab(mixture.read_manifest(cfg)["vocab_size"]),
        "seq_len": cfg.data.seq_len,
    }


def train_once(data: dict, mup: bool, width: int, lr: float, seed: int, steps: int, batch: int) -> float:
    """Final validation loss of one run: the core model and optimizer groups training uses, AdamW with
    warm-up and cosine decay, gradient clipping at 1.0; the seed fixes init and data order."""
    import torch

    from odyssey import optim
    from odyssey.model import ModelConfig, Transformer

    cfg = ModelConfig(
        vocab_size=data["vocab"],
        d_model=width,
        n_layer=MUP_LAYERS,
        n_head=width // MUP_HEAD,
        max_seq_len=data["seq_len"],
        mup=mup,
        mup_base_width=MUP_WIDTHS[0],
        tie_embeddings=False,  # µP's readout is its own matrix; the standard model alike
    )
    torch.manual_seed(seed)
    model = Transformer(cfg)
    opt = optim.adamw(model, lr, 0.0)
    order = torch.Generator().manual_seed(seed)
    (train_ids, train_mask), (val_ids, val_mask) = data["train"], data["val"]
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
    return v if math.isfinite(v) else float("inf")


def mup_curves(steps: int, batch: int) -> dict:
    """Loss vs. learning rate at every width, µP and standard parametrization (seed 0); then, at width
    64's best µP learning rate, a second seed at every width: the seed-to-seed spread the width
    differences are held against."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    data = mup_data()
    lrs = {"mup": MUP_LRS, "sp": SP_LRS}
    done = _runs_done()

    def run(param: str, width: int, lr: float, seed: int) -> float:
        """One run, or its loss from an interrupted run of this bench (runs/bench-tune/mup-runs.jsonl)."""
        key = f"{param} {width} {lr!r} {seed} {steps} {batch}"
        if key not in done:
            t0 = time.perf_counter()
            done[key] = train_once(data, param == "mup", width, lr, seed, steps, batch)
            with MUP_RUNS.open("a") as f:
                f.write(json.dumps({"key": key, "val_loss": done[key]}) + "\n")
            took = time.perf_counter() - t0
            print(
                f"{param} width {width} lr {lr:.2e} seed {seed}: val loss {done[key]:.4f} ({took:.0f} s)",
                flush=True,
            )
        return done[key]

    curves = {p: {str(w): [run(p, w, lr, 0) for lr in lrs[p]] for w in MUP_WIDTHS} for p in ("mup", "sp")}
    pick = min(range(len(MUP_LRS)), key=lambda i: curves["mup"][str(MUP_WIDTHS[0])][i])
    seeds = {str(w): [curves["mup"][str(w)][pick], run("mup", w, MUP_LRS[pick], 1)] for w in MUP_WIDTHS}
    return {
        "lrs": lrs,
        "widths": MUP_WIDTHS,
        "steps": steps,
        "batch": batch,
        "curves": curves,
        "transfer_lr": MUP_LRS[pick],
        "seeds": seeds,
        "verdict": mup_verdict(curves, seeds, pick),
    }


MUP_RUNS = WORK / "mup-runs.jsonl"


def _runs_done() -> dict[str, float]:
    """Losses of the runs an interrupted bench finished: a rerun trains only the missing ones."""
    if not MUP_RUNS.is_file():
        return {}
    return {r["key"]: r["val_loss"] for r in map(json.loads, MUP_RUNS.read_text().splitlines())}


def mup_verdict(curves: dict, seeds: dict, pick: int) -> dict:
    """The acceptance of µP: at width 64's best learning rate, every doubling of width lowers the loss (mean
    of 2 seeds) by more than the larger seed spread of the two widths; each width's best learning rate is
    within one grid step of width 64's, on a curve whose ends both lie above its minimum by more than the
    largest seed spread. Standard parametrization's best learning rates beside it."""
    widths = [str(w) for w in MUP_WIDTHS]
    mean = {w: sum(seeds[w]) / 2 for w in widths}
    spread = {w: abs(seeds[w][0] - seeds[w][1]) for w in widths}
    gains = [mean[a] - mean[b] for a, b in itertools.pairwise(widths)]
    margins = [max(spread[a], spread[b]) for a, b in itertools.pairwise(widths)]
    best = {p: {w: min(range(len(c[w])), key=c[w].__getitem__) for w in widths} for p, c in curves.items()}
    noise = max(spread.values())
    bowl = {w: min(curves["mup"][w][0], curves["mup"][w][-1]) - min(curves["mup"][w]) > noise for w in widths}
    return {
        "mean": mean,
        "spread": spread,
        "gains": gains,
        "margins": margins,
        "wider_is_better": all(g > m for g, m in zip(gains, margins)),
        "best_index": best,
        "shift_steps": {p: max(abs(i - b[widths[0]]) for i in b.values()) for p, b in best.items()},
        "bowl": bowl,
        "transfers": all(abs(i - pick) <= 1 for i in best["mup"].values()) and all(bowl.values()),
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
                ax.plot(mup["lrs"][param], [min(v, top) for v in losses], marker="o", label=f"width {width}")
            if param == "mup":
                ax.axvline(mup["transfer_lr"], color="grey", linestyle=":", label="width 64's best")
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


def sweep_rows(s: dict) -> list[tuple]:
    grid = s["grid"]
    table = [
        (
            "grid (12 points, full length): best val loss / tokens",
            f"{grid['best_val_loss']:.4f} / {grid['tokens']:,}",
            "reference",
        )
    ]
    for name in (n for n in SWEEPS[1:] if n in s):
        r = s[name]
        table.append(
            (
                f"{name}: best val loss vs grid / tokens vs grid",
                f"{r['best_val_loss']:.4f} ({r['loss_vs_grid']:+.1%}) / {r['tokens']:,} ({r['tokens_vs_grid']:.0%})",
                "before (ASHA, TPE)" if name == "optuna-asha" else "",
            )
        )
    done = [s[n] for n in HALVING if n in s]
    if done:
        gap = statistics.median(r["loss_vs_grid"] for r in done)
        share = statistics.median(r["tokens_vs_grid"] for r in done)
        worst = max(r["loss_vs_grid"] for r in done)
        met = gap <= 0.02 and share <= 0.30 and worst <= 0.04 and len(done) == len(HALVING)
        table.append(
            (
                f"random + halving (the default), median of {len(done)} seeds (worst seed)",
                f"{gap:+.1%} ({worst:+.1%}) at {share:.0%} of the tokens",
                _verdict("within 2% at <= 30%, no seed worse than 4%", met),
            )
        )
    return table


def mup_rows(m: dict) -> list[tuple]:
    v, widths = m["verdict"], [str(w) for w in m["widths"]]
    table = []
    means = ", ".join(f"{w}: {v['mean'][w]:.3f} ±{v['spread'][w] / 2:.3f}" for w in widths)
    table.append(
        (
            f"µP at width 64's best lr ({m['transfer_lr']:.1e}): val loss, mean of 2 seeds (± half their spread)",
            means,
            _verdict("falls with every doubling by more than the seed spread", v["wider_is_better"]),
        )
    )
    for param, label in (("mup", "µP"), ("sp", "standard")):
        lrs = m["lrs"][param]
        best = ", ".join(f"{w}: {lrs[v['best_index'][param][w]]:.1e}" for w in widths)
        table.append(
            (
                f"{label}: best lr per width ({'x2' if param == 'mup' else 'x4'} grid)",
                f"{best}; moves {v['shift_steps'][param]} grid steps",
                _verdict(
                    "<= 1 step from width 64's, on a curve with both ends above its minimum", v["transfers"]
                )
                if param == "mup"
                else "contrast",
            )
        )
        losses = ", ".join(f"{w}: {min(m['curves'][param][w]):.3f}" for w in widths)
        table.append((f"{label}: best val loss per width", losses, ""))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part", choices=["sweeps", "mup", "both", "report"], default="both", help="report: rewrite md/png"
    )
    parser.add_argument("--steps", type=int, default=48, help="training steps of one full trial")
    parser.add_argument("--trials", type=int, default=10, help="trials of each sampled sweep")
    parser.add_argument("--mup-steps", type=int, default=MUP_STEPS)
    parser.add_argument("--mup-batch", type=int, default=MUP_BATCH)
    parser.add_argument(
        "--sweeps", nargs="+", choices=SWEEPS, default=list(SWEEPS), help="which sweeps to run (part 1)"
    )
    args = parser.parse_args()

    previous = report.RESULTS / "tune_efficiency.json"

    def stored() -> dict:
        return json.loads(previous.read_text())["figures"] if previous.is_file() else {}

    figures = stored() if args.part != "both" else {}
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
        figures["mup"] = mup_curves(args.mup_steps, args.mup_batch)
    now = stored()  # what this run computed, with its commit; the other part as stored now
    commits = dict(now.get("commits", {}))
    for part in ("sweeps", "mup"):
        if args.part in (part, "both"):
            commits[part] = report.STARTED["sha"]
        elif part in now:
            figures[part] = now[part]
    figures["commits"] = commits

    targets = {
        "loss_vs_grid_median_max": 0.02,
        "loss_vs_grid_worst_max": 0.04,
        "tokens_vs_grid_max": 0.30,
        "mup_lr_shift_steps_max": 1,
    }
    table = (sweep_rows(figures["sweeps"]) if "sweeps" in figures else []) + (
        mup_rows(figures["mup"]) if "mup" in figures and "verdict" in figures["mup"] else []
    )
    report.write(
        "tune_efficiency",
        figures,
        targets,
        table,
        notes=f"Commits: sweeps {commits.get('sweeps', '?')}, µP {commits.get('mup', '?')}. "
        "Plot: bench/results/tune_efficiency.png. Sweeps: tiny-cpu trials of 48 steps, one worker each, two "
        "at a time, on 2 cores; halving cuts at 4, 12 and 36 steps keeping the best third. µP: "
        f"{MUP_LAYERS} layers, head width {MUP_HEAD}, base width {MUP_WIDTHS[0]}, "
        f"{figures.get('mup', {}).get('steps')} steps of {figures.get('mup', {}).get('batch')} sequences.",
    )
    plot(figures, report.RESULTS / "tune_efficiency.png")
    print((report.RESULTS / "tune_efficiency.md").read_text())


if __name__ == "__main__":
    main()
