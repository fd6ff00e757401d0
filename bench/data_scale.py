"""Benchmark: what a training rank reads under data.load=index and stream, and what index costs.

    python bench/data_scale.py [--steps 60] [--rounds 2] [--run-steps 40]

On the tiny-cpu recipe's data (built when missing), with the loaders the workers build (train/mixture.py),
in this process at rank r of W:
  1. bytes per rank  N steps at world 1, 2 and 4: the bytes of rows each rank's loader read (index: the
                     rows it trains; stream: every row it streamed), and the bytes the kernel read from
                     disk for it (the files' pages evicted before each rank, counted by `fincore` after:
                     pages, not rows). Target: index bytes per rank = 1/world of world 1's, within 10%.
  2. throughput      real runs (`train.launch.run`, tiny-cpu, 2 workers, the same steps), index and
                     stream alternated (ABAB...): tokens/s of each (the run's average after its first
                     log interval) and their ratio. Target: index / stream >= 0.95.
  3. resume          index, world 2 for k steps, then its state resumed at world 1 and at 4: the rows
                     of an uninterrupted world-1 run, row for row. (tests/test_train.py checks the real
                     runs' loss curves across resizes.)
The real runs go first. Writes bench/results/data_scale.json and .md. About 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

import numpy as np

from bench import report
from odyssey import cluster
from odyssey.config import load_config
from odyssey.data import packing
from train import events, launch, mixture
from train.config import TrainConfig, recipe_path

WORLDS = (1, 2, 4)
RECIPE = "tiny-cpu"


def recipe(corpus: str, *extra: str) -> tuple[TrainConfig, mixture.DataPlan]:
    """The recipe as a run resolves it (data built when missing), micro-batches small enough for 4 ranks."""
    cfg = load_config(TrainConfig, recipe_path(RECIPE), [f"data.corpus={corpus}", *extra])
    return launch.resolve(cfg)


# --- 1. bytes per rank --------------------------------------------------------------------------------


def index_loader(cfg: TrainConfig, plan: mixture.DataPlan, rank: int, world: int, state=None):
    return mixture.make_loader(cfg, plan.weights, plan.rows_per_epoch, rank, world, state)


def stream_loader(cfg: TrainConfig, plan: mixture.DataPlan, rank: int, world: int):
    """What make_loader builds under stream, with each rank's Ray Data iterator made here (no Train)."""
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # as data_config asks
    datasets = mixture.build_datasets(cfg.data, list(plan.weights))
    sources = {
        task: mixture.TaskStream(
            datasets[mixture.dataset_name("train", task)].iterator(),
            task,
            cfg.seed,
            cfg.data.shuffle_buffer_blocks,
            plan.rows_per_epoch[task],
        )
        for task in plan.weights
    }
    return mixture.MixtureLoader(
        sources, plan.weights, cfg.sequences_per_step, cfg.micro_batch_size, rank, world, cfg.seed
    )


def files_read(cfg: TrainConfig, plan: mixture.DataPlan, load: str) -> list[Path]:
    blocks = Path(cfg.data.blocks_dir)
    if load == "index":
        return [p for t in plan.weights for p in packing.array_paths(blocks, t, "train")]
    return [p for t in plan.weights for p in sorted((blocks / t).glob("train-*.parquet"))]


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (clean and unmapped ones: what this bench leaves)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident(paths: list[Path]) -> int | None:
    """Bytes of the files in the page cache (util-linux `fincore`); None where there is no fincore."""
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, paths)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(line) for line in out.split())


def bytes_per_rank(cfg, plan, load: str, steps: int) -> dict[str, list[dict]]:
    """Per world size, per rank: the loader's bytes of rows and the disk bytes its files' pages took."""
    paths = files_read(cfg, plan, load)
    out = {}
    for world in WORLDS:
        out[str(world)] = []
        for rank in range(world):
            evict(paths)
            before = resident(paths)
            loader = (
                index_loader(cfg, plan, rank, world)
                if load == "index"
                else stream_loader(cfg, plan, rank, world)
            )
            for _ in range(steps):
                loader.step_batches()
            after = resident(paths)
            out[str(world)].append(
                {"rows_bytes": loader.bytes_read, "disk_bytes": None if after is None else after - before}
            )
            del loader
            gc.collect()  # unmapped, so the next rank's eviction takes the pages
            print(f"{load} world {world} rank {rank}: {out[str(world)][-1]}", flush=True)
    return out


def share(per_world: dict[str, list[dict]], key: str) -> dict[str, float]:
    """The busiest rank's bytes at world W, times W, over world 1's: 1.0 when each rank reads 1/W."""
    one = per_world["1"][0][key]
    return {w: round(max(r[key] for r in ranks) * int(w) / one, 3) for w, ranks in per_world.items()}


# --- 2. throughput ------------------------------------------------------------------------------------


def train_run(corpus: str, storage: Path, load: str, round_: int, steps: int) -> dict:
    sets = [
        f"name={load}-{round_}", f"storage={storage}", f"data.corpus={corpus}", f"data.load={load}",
        f"steps={steps}", "log_every=5", f"eval_every={steps}", f"checkpoint_every={steps}",
    ]  # fmt: skip
    load_before, t0 = os.getloadavg()[0], time.perf_counter()  # a shared machine: how busy it was
    summary = launch.run(load_config(TrainConfig, recipe_path(RECIPE), sets))
    wall = time.perf_counter() - t0
    last = events.read_metrics(Path(summary["run_dir"]))[-1]
    return {
        "load": load,
        "tokens_per_s": summary["tokens_per_s"],
        "wall_s": round(wall, 1),
        "load_avg_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],  # before, after
        "data_bytes_read": last["data_bytes_read"],
        "data_bytes_read_max_rank": last["data_bytes_read_max_rank"],
    }


# --- 3. resume at another world size ------------------------------------------------------------------


def rows(ranks: list, steps: int) -> list[np.ndarray]:
    return [np.concatenate([b[0].numpy() for ld in ranks for b in ld.step_batches()]) for _ in range(steps)]


def resume_check(cfg, plan, k: int, steps: int) -> dict:
    """World 2 for k steps, then its state at world 1 and at 4: equal to an uninterrupted world 1?"""
    whole = rows([index_loader(cfg, plan, 0, 1)], steps)
    two = [index_loader(cfg, plan, r, 2) for r in range(2)]
    rows(two, k)
    state = two[0].state()
    out = {
        "stopped_at_step": k,
        "steps_after": steps - k,
        "rows_compared": (steps - k) * cfg.sequences_per_step,
    }
    for then in (1, 4):
        resumed = rows([index_loader(cfg, plan, r, then, state) for r in range(then)], steps - k)
        out[f"world_2_then_{then}"] = all(
            np.array_equal(a, b) for a, b in zip(whole[k:], resumed, strict=True)
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="loader steps per rank for the bytes (part 1)")
    parser.add_argument("--rounds", type=int, default=2, help="index, stream pairs of real runs (part 2)")
    parser.add_argument("--run-steps", type=int, default=40, help="steps of each real run (part 2)")
    parser.add_argument("--data", default="runs/data/tiny", help="corpus directory (built when missing)")
    args = parser.parse_args()

    cluster.connect(num_cpus=max(os.cpu_count() or 1, 4))  # what launch.run starts for tiny-cpu
    cfg, plan = recipe(args.data, "micro_batch_size=4")  # 16 rows a step: 4 micro-batches at world 1, 1 at 4
    runs = []  # first: no Ray Data execution of this process's own competes with the runs
    with tempfile.TemporaryDirectory() as storage:
        for round_ in range(args.rounds):
            for load in ("index", "stream"):
                runs.append(train_run(args.data, Path(storage), load, round_, args.run_steps))
                print(f"round {round_ + 1}: {runs[-1]}", flush=True)
    t0 = time.perf_counter()
    bytes_ = {load: bytes_per_rank(cfg, plan, load, args.steps) for load in ("index", "stream")}
    bytes_s = time.perf_counter() - t0
    resume = resume_check(cfg, plan, k=args.steps // 3, steps=args.steps)
    rates = {load: [r["tokens_per_s"] for r in runs if r["load"] == load] for load in ("index", "stream")}
    medians = {load: statistics.median(v) for load, v in rates.items()}
    ratio = medians["index"] / medians["stream"]
    per_round = [round(i / s, 3) for i, s in zip(rates["index"], rates["stream"], strict=True)]

    index_share = share(bytes_["index"], "rows_bytes")
    has_disk = bytes_["index"]["1"][0]["disk_bytes"] is not None
    figures = {
        "recipe": RECIPE,
        "seq_len": cfg.data.seq_len,
        "rows_per_step": cfg.sequences_per_step,
        "loader_steps": args.steps,
        "row_bytes": {
            "index": (cfg.data.seq_len + 1) * (packing.ids_dtype(plan.manifest["vocab_size"]).itemsize + 1),
            "stream": (cfg.data.seq_len + 1) * (4 + 1),  # int32 ids + uint8 mask, as Ray Data hands them over
        },
        "train_rows": sum(plan.rows_per_epoch.values()),
        "bytes_per_rank": bytes_,
        "index_share_of_world_1": index_share,  # busiest rank x W / world 1: 1.0 = exactly 1/W
        "stream_share_of_world_1": share(bytes_["stream"], "rows_bytes"),
        "index_disk_share_of_world_1": share(bytes_["index"], "disk_bytes") if has_disk else None,
        "stream_disk_share_of_world_1": share(bytes_["stream"], "disk_bytes") if has_disk else None,
        "bytes_seconds": round(bytes_s, 1),
        "resume": resume,
        "throughput": {
            "run_steps": args.run_steps,
            "workers": 2,
            "runs": runs,
            "tokens_per_s": medians,
            "index_vs_stream": round(ratio, 3),
            "index_vs_stream_per_round": per_round,
        },
    }
    targets = {
        "index_share_of_world_1": [0.9, 1.1],
        "index_vs_stream_tokens_per_s": 0.95,
        "resume_exact": True,
    }
    ok = all(0.9 <= v <= 1.1 for v in index_share.values())
    table = [
        *[
            (
                f"bytes of rows read per rank, index, world {w} (busiest rank; x{w} / world 1)",
                f"{max(r['rows_bytes'] for r in bytes_['index'][w]):,} ({index_share[w]:.2f})",
                "1/world of world 1 ±10%",
            )
            for w in bytes_["index"]
        ],
        *[
            (
                f"bytes of rows read per rank, stream, world {w} (busiest rank; x{w} / world 1)",
                f"{max(r['rows_bytes'] for r in bytes_['stream'][w]):,} ({figures['stream_share_of_world_1'][w]:.2f})",
                "",
            )
            for w in bytes_["stream"]
        ],
    ]
    if has_disk:
        for load in ("index", "stream"):
            disk = figures[f"{load}_disk_share_of_world_1"]
            table.append(
                (
                    f"bytes read from disk per rank, {load} (busiest rank at world 1 / 2 / 4; x world / world 1)",
                    " / ".join(
                        f"{max(r['disk_bytes'] for r in bytes_[load][w]):,} ({disk[w]:.2f})" for w in disk
                    ),
                    "",
                )
            )
    table += [
        ("training tokens/s, index vs stream (tiny-cpu, 2 workers, median of rounds)", f"{medians['index']:,.0f} vs {medians['stream']:,.0f} = {ratio:.3f}", ">= 0.95"),
        ("per round, index / stream", str(per_round), ""),
        ("launch to summary, index vs stream (s, per run)", str({r["load"]: r["wall_s"] for r in runs[-2:]}), ""),
        (f"resume at world 2 step {resume['stopped_at_step']} -> world 1 / world 4: rows equal to the uninterrupted run ({resume['rows_compared']} rows)", f"{resume['world_2_then_1']} / {resume['world_2_then_4']}", "True"),
    ]  # fmt: skip
    notes = (
        f"Loader bytes: rows x bytes per row (index: uint16 ids + uint8 mask = {figures['row_bytes']['index']} B a row; "
        f"stream: int32 ids + uint8 mask = {figures['row_bytes']['stream']} B, every row up to the last one a rank needs). "
        "Disk bytes: the pages the kernel read for each rank alone (evicted before it; read-around off for the "
        "arrays), so they count whole 4 KiB pages and the Parquet shards' compressed bytes: a row of the arrays "
        "shares its pages with its neighbours, so at small rows a rank's disk bytes fall less than its row bytes. "
        f"Index within target: {ok}."
    )
    path = report.write("data_scale", figures, targets, table, notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
