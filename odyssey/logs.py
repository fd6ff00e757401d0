"""Quiet, useful logs: the libraries' chatter that Odyssey's processes turn down, and where.

A successful run should print Odyssey's own lines (`start: ...`, `step 20/400 | loss ...`), Ray's
lines about the cluster and the worker group, and every warning or error that signals a problem;
not the libraries' routine notices. Each entry below names the line it quiets and why it is noise.
Nothing is turned down above INFO except lines named one by one (a message pattern, a module).

Where each part runs:

- `quiet()`: any process (driver or Ray worker), idempotent, cheap, imports nothing heavy (no ray,
  no torch). `train_loop_per_worker` calls it, so the training workers are quiet whatever started
  the run; they are where the chatter is (Ray Data's per-dataset lines come from the workers that
  iterate their shards, Ray Train's report dumps from each rank). Not a `worker_process_setup_hook`
  in every worker process: any runtime env a driver passes to `ray.init` keeps its workers out of
  Ray's pool of prestarted ones, which doubled the start of every task and actor on 2 cores
  (the Train controller, the workers, evaluation tasks) for no line fewer in the demo's log.
- `quiet_driver()`: the driver; call it before the first `import ray` of the process (Ray reads the
  log-forwarding settings when it is imported).
- `muted(...)`, `cpu_accelerator(...)`: around the calls into a library that reports success with
  `print` or a WARNING (DeepSpeed).
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import importlib.util
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

# Libraries whose INFO lines say nothing a user of Odyssey acts on; their warnings and errors stay.
NOISY_LOGGERS = (
    "DeepSpeed",  # its INFO lines (WARNING is its default; DeepSpeed sets the level again when imported)
    "matplotlib",  # "generated new fontManager" (the first plot on a machine)
    "onnx_ir",
    "onnxscript",
    "absl",
    "bm25s",
    "httpx",  # a line per HTTP request
)

# Ray Data's notices in every process that iterates a dataset, at INFO unless said otherwise
# (ray/data/_internal/logging.py, execution/streaming_executor.py, progress/__init__.py). They are
# marked `hide`: Ray Data's console handler drops such records (its HiddenRecordFilter, the
# documented way to keep a record off the console), its log files in the session directory keep them.
RAY_DATA_CHATTER = {
    # register_dataset_logger, once per dataset execution while another one runs: every training
    # task's stream is a dataset of its own, all open at once, and each epoch starts a new execution.
    "ray.data._internal.logging": (r"registers for logging while another dataset",),
    # StreamingExecutor.shutdown after every execution that succeeded (one per task and epoch on every
    # worker). A failed one logs "⚠️ Dataset ... execution failed" instead: not matched, stays.
    "ray.data._internal.execution.streaming_executor": (r"Dataset \S+ execution finished in ",),
    # get_progress_manager, a WARNING once per process: train/mixture.py turns the bars off on purpose
    # (in a worker's log they are noise; the training progress line says what matters).
    "ray.data._internal.progress": (r"^Progress bars disabled\. ",),
}

# Ray Train V2's worker logs every ray.train.report at INFO with the whole TrainingReport, metrics dict
# included, from every rank ("Reporting training result 3: TrainingReport(checkpoint=..., metrics={...})
# from rank 1", ray/train/v2/_internal/execution/context.py, _wait_then_report). Its logger is named by
# the file's path (logging.getLogger(__file__)), so neither the `ray.train` logger nor RunConfig's
# LoggingConfig reaches it. The same figures are in the run's metrics.jsonl, TensorBoard and the
# dashboard. Its warnings and errors stay.
RAY_TRAIN_REPORT_MODULE = "ray.train.v2._internal.execution.context"

# torch >= 2.13 deprecates all_gather_into_tensor, which DeepSpeed's ZeRO calls on every rank (a
# FutureWarning with a source line, once per process): DeepSpeed's to change, nothing for a user to do.
WARNING_FILTERS = ((FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),)

# A line the driver drops from what Ray forwards from the workers (RAY_DEDUP_LOGS_SKIP_REGEX, applied by
# the driver's log deduplicator; the line stays in the worker's own log files). Ray Train V2's controller
# starts a PreemptionWatcher actor with max_restarts=-1 and the worker actors' handles as constructor
# arguments (ray/train/v2/_internal/callbacks/preemption_callback.py, after_worker_group_start); Ray's
# core worker logs an ERROR for any restartable actor whose arguments hold references to non-detached
# actors or objects (CoreWorker::CreateActor, core_worker.cc, "has constructor arguments in the object
# store and max_restarts > 0", ray-project/ray#53727). On every successful run, and about nothing we
# control: the arguments are inlined; what Ray counts are the handles inside, references to the worker
# group's actors, which live as long as the group the watcher serves (a new group gets a new watcher).
DRIVER_SKIP_REGEX = (
    r"Actor with class name: 'PreemptionWatcher' and ID: '\w+' has constructor arguments in the "
    r"object store and max_restarts > 0"
)
DEDUP_SKIP_ENV = "RAY_DEDUP_LOGS_SKIP_REGEX"

# What an error looks like in the log of any of our commands (a successful run has none).
ERROR_LINE = re.compile(
    r"^\d\d:\d\d:\d\d E "  # ours (odyssey's logging format)
    r"|\[\d{4}-\d\d-\d\d [\d:,]+ E \d+"  # Ray's C++ processes
    r"|\bERROR\b|Traceback \(most recent call last\)"  # Python's logging in Ray's format, tracebacks
)


class _HideOnConsole(logging.Filter):
    """Marks a record below ERROR whose message matches one of `patterns` as `hide` (Ray Data's console
    handler skips it); it passes every record on, so the log files still get them all."""

    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR and any(p.search(record.getMessage()) for p in self.patterns):
            record.hide = True
        return True


def quiet() -> None:
    """Turn the libraries' routine notices down in this process (see the module docstring)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, patterns in RAY_DATA_CHATTER.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HideOnConsole) for f in logger.filters):
            logger.addFilter(_HideOnConsole(patterns))
    for path in _ray_train_report_logger_names():
        logging.getLogger(path).setLevel(logging.WARNING)
    for category, message in WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category)


def quiet_driver() -> None:
    """`quiet()` for a driver, and the lines its Ray client drops from what the workers print
    (DRIVER_SKIP_REGEX). Call it before the first `import ray` of the process: Ray reads the skip
    pattern when it is imported. A pattern the user set in RAY_DEDUP_LOGS_SKIP_REGEX is kept (either
    one skips a line); RAY_DEDUP_LOGS=0 turns skipping off with deduplication."""
    quiet()
    current = os.environ.get(DEDUP_SKIP_ENV)
    if current is None:
        os.environ[DEDUP_SKIP_ENV] = DRIVER_SKIP_REGEX
    elif DRIVER_SKIP_REGEX not in current:
        os.environ[DEDUP_SKIP_ENV] = f"(?:{current})|(?:{DRIVER_SKIP_REGEX})"
    ray_logging = sys.modules.get("ray._private.ray_logging")
    if ray_logging is not None:  # Ray came first: its deduplicators read the variable already
        pattern = re.compile(os.environ[DEDUP_SKIP_ENV])
        for name in ("stdout_deduplicator", "stderr_deduplicator"):
            deduplicator = getattr(ray_logging, name, None)
            if deduplicator is not None and hasattr(deduplicator, "skip_re"):
                deduplicator.skip_re = pattern


@contextlib.contextmanager
def muted(*modules: str) -> Iterator[None]:
    """Within: `print` calls made by the code of `modules` (module names; imported before or inside) are
    dropped, and the tqdm bars those already imported start are disabled. For libraries that report
    routine progress with print and tqdm (DeepSpeed's shm op build, zero_to_fp32): their exceptions,
    warnings and logging are untouched, and so is every other module's print."""
    original = builtins.print

    def filtered_print(*args, **kwargs):
        if sys._getframe(1).f_globals.get("__name__") in modules:
            return
        original(*args, **kwargs)

    bars = {}
    for name in modules:
        module = sys.modules.get(name)
        bar = getattr(module, "tqdm", None)
        if isinstance(bar, type):  # `from tqdm import tqdm` in that module
            bars[module] = bar
            module.tqdm = functools.partial(bar, disable=True)
    builtins.print = filtered_print
    try:
        yield
    finally:
        if builtins.print is filtered_print:
            builtins.print = original
        for module, bar in bars.items():
            module.tqdm = bar


@contextlib.contextmanager
def cpu_accelerator(expect_gpu: bool = False) -> Iterator[None]:
    """Around DeepSpeed's first import in a process. DeepSpeed picks its accelerator then, and where torch
    sees no CUDA device it falls back to CPU with a WARNING ("Setting accelerator to CPU. If you have GPU
    or other accelerator, we were unable to detect it.", deepspeed/accelerator/real_accelerator.py,
    get_accelerator). Where no GPU is expected either, DS_ACCELERATOR=cpu (DeepSpeed's override) makes
    the same choice without the warning. Where one is expected (a GPU run) the warning stays: it tells
    of a node whose GPU torch cannot use. A DS_ACCELERATOR of the user's is left alone."""
    import torch

    if expect_gpu or torch.cuda.is_available() or "DS_ACCELERATOR" in os.environ:
        yield
        return
    os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        yield
    finally:
        os.environ.pop("DS_ACCELERATOR", None)


def _ray_train_report_logger_names() -> set[str]:
    """The names Ray Train's report logger has (its module's __file__): from the module when it is
    imported, else where Ray is installed (without importing Ray: the driver may not have yet)."""
    names = set()
    module = sys.modules.get(RAY_TRAIN_REPORT_MODULE)
    if getattr(module, "__file__", None):
        names.add(module.__file__)
    try:
        spec = importlib.util.find_spec("ray")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        ray_dir = Path(next(iter(spec.submodule_search_locations)))
        names.add(str(ray_dir.joinpath(*RAY_TRAIN_REPORT_MODULE.split(".")[1:])) + ".py")
    return names
