"""Where the data stages run their units of work: in this process, or as a Ray Data pipeline over the cluster.

`ordered_map(fn, items, workers)` applies `fn` to every item and yields the results in item order, so a
build or a pack gives the same bytes however many workers ran it:
- workers=0, or None while Ray is not up: here, two items in flight on threads (while one holds the
  GIL in Python, the other runs in native code that releases it: the tokenizer, numpy);
- otherwise a Ray Data pipeline: one block per item, `fn` in up to `workers` concurrent tasks of one
  CPU each (None: every CPU of the cluster), streamed. Ray Data bounds what is in flight, so the driver
  holds only the results it has not consumed yet. A task's native thread pools get one thread (the CPU
  it holds). When Ray is not up, this process joins RAY_ADDRESS or starts an embedded cluster.

Items and results travel pickled: keep both small (a unit of work, a chunk of texts, a few counts), and
let `fn` read and write the bulk itself. On a cluster of several machines, the paths it reads and
writes must be on a file system every node mounts at the same path.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from odyssey.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")

IN_PROCESS_THREADS = 2


def ray_is_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def ordered_map(fn: Callable[[T], R], items: Sequence[T], workers: int | None = None) -> Iterator[R]:
    """fn(item) for every item, in order; see the module docstring for where it runs."""
    if workers is not None and workers < 0:
        raise ConfigError(f"workers={workers}: give 0 (in this process) or more (Ray Data tasks)")
    if not items:
        return iter(())
    if workers == 0 or (workers is None and not ray_is_up()):
        return _in_process(fn, items)
    return _ray_data_map(fn, items, workers)


def where(workers: int | None) -> str:
    """How ordered_map(..., workers) runs, for logs."""
    if workers == 0 or (workers is None and not ray_is_up()):
        return "in this process"
    return f"Ray Data, {workers or 'every CPU'} workers"


def _in_process(fn: Callable[[T], R], items: Sequence[T]) -> Iterator[R]:
    with ThreadPoolExecutor(max_workers=IN_PROCESS_THREADS) as pool:
        yield from pool.map(fn, items)


def _ray_data_map(fn: Callable[[T], R], items: Sequence[T], workers: int | None) -> Iterator[R]:
    if not ray_is_up():
        from odyssey import cluster

        cluster.connect()
    import ray

    rows = [{"i": i, "item": pickle.dumps(item)} for i, item in enumerate(items)]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds.context.execution_options.preserve_order = True  # item order: the output never depends on timing
    ds.context.enable_progress_bars = False  # callers print their own progress (units, rate, ETA)
    ds.context.print_on_execution_start = False

    def run(row: dict) -> dict:
        os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the one CPU this task holds
        return {"i": row["i"], "out": pickle.dumps(fn(pickle.loads(row["item"])))}

    size = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    mapped = ds.map(run, compute=ray.data.TaskPoolStrategy(size=size), num_cpus=1)
    for row in mapped.iter_rows():
        yield pickle.loads(row["out"])
