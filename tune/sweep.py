"""`python -m tune` (and `odyssey tune`): plan a sweep, run it with Ray Tune, write what it found.

    python -m tune --config tiny-lr [--set key=value ...] [--transfer] [--address ADDR]

Top to bottom:
    plan      the recipe + `train:` settings + the trial's resources -> the trials' base training config
              (paths made absolute: trials run in other processes, from other directories); the space
              checked against it; with --transfer the model narrowed to the µP proxy.
    run       data prepared once on the driver; Ray reached (embedded cluster by default); a Tuner built
              (search algorithm, successive halving or ASHA on tokens trained, concurrency capped to the cluster, token and
              time budgets) or, when the sweep directory already holds this sweep, restored: finished
              trials are kept, unfinished ones restart (their training runs resume from checkpoints).
    report    tune/results.py: the trials table, the metric-vs-hyperparameter PNG, the best recipe.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from pathlib import Path

import yaml

from odyssey import cluster, entrypoint
from odyssey.atomic import write_text
from odyssey.config import flatten_keys, from_dict, load_config, read_yaml, set_values, to_dict
from odyssey.errors import ConfigError
from odyssey.model import ModelConfig
from train import mixture
from train.config import TrainConfig, recipe_path
from tune import halving, results, space
from tune.config import CONFIG_DIR, Plan, SweepConfig, sweep_path

log = logging.getLogger("tune")
WIDTH_FIELDS = (
    "model.d_model",
    "model.n_head",
    "model.n_kv_head",
    "model.ffn_hidden",
    "model.mup",
    "model.mup_base_width",
)


def plan(cfg: SweepConfig, transfer: bool = False) -> Plan:
    sweep_dir = Path(cfg.storage).resolve() / cfg.name
    recipe = _train_config(set_values(read_yaml(recipe_path(cfg.recipe)), flatten_keys(cfg.train)), "train")
    data = replace(
        recipe.data,
        corpus=str(Path(recipe.data.corpus).resolve()),
        blocks=str(Path(recipe.data.blocks).resolve()) if recipe.data.blocks else None,
    )
    recipe = replace(recipe, data=data)
    resources = {
        "scaling.workers": cfg.trial.workers,
        "scaling.cpus_per_worker": cfg.trial.cpus_per_worker,
        "scaling.use_gpu": cfg.trial.use_gpu,
    }
    trials = _train_config(set_values(to_dict(recipe), resources), "trial")
    target = None
    if transfer:
        clash = [name for name in space.flatten(cfg.space) if name in WIDTH_FIELDS]
        if clash:
            raise ConfigError(
                f"space.{clash[0]}: --transfer tunes at one proxy width and transfers to the recipe's; "
                f"do not search {', '.join(WIDTH_FIELDS)}"
            )
        proxy, wide = mup_pair(recipe.model, cfg.transfer.proxy_width)
        trials = replace(trials, model=proxy)
        target = to_dict(replace(recipe, model=wide))
    base = to_dict(trials)
    params = space.parse_space(cfg.space, cfg.search.algorithm, base)
    most = _most_tokens(base, params)
    rungs = []
    if cfg.scheduler.kind == "halving":
        if cfg.search.algorithm == "optuna":
            raise ConfigError(
                "search.algorithm=optuna learns from finished trials, but scheduler.kind=halving proposes its whole "
                "cohort before any finishes; use search.algorithm=random (or grid), or scheduler.kind=asha"
            )
        steps = halving.rung_steps(
            base["steps"], cfg.scheduler.grace_fraction, cfg.scheduler.reduction_factor
        )
        rungs = [most * s // base["steps"] for s in steps]
    return Plan(cfg, transfer, sweep_dir, base, params, most, rungs, target)


def mup_pair(model: ModelConfig, proxy_width: int | None) -> tuple[ModelConfig, ModelConfig]:
    """(proxy, target) for µP transfer: both under µP with the proxy's width as base width, heads of the
    same width, a readout of their own (µP's, untied from the embedding), every other field the target's."""
    head_dim = model.head_dim
    width = proxy_width or max(head_dim, model.d_model // 4 // head_dim * head_dim)
    if width % head_dim or width > model.d_model:
        raise ConfigError(
            f"transfer.proxy_width={width} must be a multiple of the head width {head_dim} and at most the "
            f"target's d_model={model.d_model}"
        )
    heads = width // head_dim
    kv = None if model.n_kv_head is None else max(1, model.n_kv_head * heads // model.n_head)
    ffn = None if model.ffn_hidden is None else model.ffn_hidden * width // model.d_model
    try:
        proxy = replace(
            model,
            d_model=width,
            n_head=heads,
            n_kv_head=kv,
            ffn_hidden=ffn,
            mup=True,
            mup_base_width=width,
            tie_embeddings=False,
        )
    except ConfigError as e:
        raise ConfigError(f"transfer.proxy_width={width}: {e}") from None
    return proxy, replace(model, mup=True, mup_base_width=width, tie_embeddings=False)


def _train_config(data: dict, where: str) -> TrainConfig:
    try:
        return from_dict(TrainConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _most_tokens(base: dict, params: list[space.Param]) -> int:
    """Steps x global batch at the largest values the space allows."""
    most = {"steps": base["steps"], "global_batch_tokens": base["global_batch_tokens"]}
    for p in params:
        if p.field in most:
            most[p.field] = max(int(v) for v in p.values)
    return most["steps"] * most["global_batch_tokens"]


# --- run ---------------------------------------------------------------------------------------------


def run(cfg: SweepConfig, transfer: bool = False, address: str | None = None) -> dict:
    p = plan(cfg, transfer)
    _prepare_data(p)  # before the sweep directory exists: a missing dataset leaves nothing behind
    _claim(p)
    need_cpu = cfg.trial.workers * cfg.trial.cpus_per_worker + 1  # + 1 for the trial's Ray Data work
    cluster.connect(
        address,
        num_cpus=max(os.cpu_count() or 1, math.ceil(need_cpu * (cfg.trial.max_concurrent or 1))),
    )
    cluster.keep_ray_helpers_here()  # before any trial does: they would pin them to its node
    tuner = _tuner(p, _concurrency(cfg, need_cpu))
    # A sweep that already reported (trials.json) is finished: read its trials back, train nothing. Its
    # experiment state may still list a trial that halving paused at its end as unfinished.
    from ray import tune

    finished = (p.sweep_dir / "trials.json").is_file() and tune.Tuner.can_restore(str(p.sweep_dir))
    grid = tuner.get_results() if finished else tuner.fit()
    rows = results.collect(grid, p)
    return results.report(rows, p)


def _claim(p: Plan) -> None:
    """One sweep per directory: the same sweep resumes there; a different one is refused."""
    record = {"sweep": to_dict(p.cfg), "transfer": p.transfer}
    path = p.sweep_dir / "sweep.yaml"
    if path.is_file():
        previous = yaml.safe_load(path.read_text(encoding="utf-8"))
        if previous != record:
            changed = sorted(
                k
                for k in set(previous["sweep"]) | set(record["sweep"])
                if previous["sweep"].get(k) != record["sweep"].get(k)
            ) or ["transfer"]
            raise ConfigError(
                f"{p.sweep_dir} holds a sweep with other settings ({', '.join(changed)} differ); give this one "
                f"another name (--set name=...) or remove that directory"
            )
        return
    write_text(path, yaml.safe_dump(record, sort_keys=False))


def _prepare_data(p: Plan) -> None:
    """Build missing data once, here, rather than in racing trials: for the base and each listed seq_len."""
    seq_lens = next((q.values for q in p.params if q.field == "data.seq_len" and q.discrete), (None,))
    for seq_len in seq_lens:
        values = {} if seq_len is None else {"data.seq_len": seq_len}
        mixture.plan(space.train_config(p.base, values))  # a missing dataset: an error now, not per trial


def _concurrency(cfg: SweepConfig, need_cpu: float) -> int:
    import ray

    if cfg.trial.max_concurrent:
        return cfg.trial.max_concurrent
    have = ray.cluster_resources()
    fit = int(have.get("CPU", 0) // need_cpu)
    if cfg.trial.use_gpu:
        fit = min(fit, int(have.get("GPU", 0) // cfg.trial.workers))
    if fit < 1:
        raise ConfigError(
            f"trial: one trial needs {cfg.trial.workers} workers x {cfg.trial.cpus_per_worker} CPUs (+1)"
            f"{' and GPUs' if cfg.trial.use_gpu else ''}, more than the cluster's {have}; lower trial.workers, "
            f"or set trial.max_concurrent on an autoscaling cluster"
        )
    return fit


def _tuner(p: Plan, concurrency: int):
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from tune.budget import TokenBudget
    from tune.trial import run_trial

    cfg = p.cfg
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=p.base, trials_dir=str(p.trials_dir), rungs=p.rungs),
        # The trial's process only drives its TorchTrainer: a sliver of a CPU (Tune refuses none); the
        # workers hold the resources, and max_concurrent_trials keeps trials from outnumbering them.
        {"CPU": 0.01},
    )
    if tune.Tuner.can_restore(str(p.sweep_dir)):
        log.info("resuming the sweep in %s: finished trials are kept, unfinished ones restart", p.sweep_dir)
        return tune.Tuner.restore(str(p.sweep_dir), trainable, resume_unfinished=True, resume_errored=False)

    algorithm = cfg.search.algorithm
    samples = 1 if algorithm == "grid" else cfg.budget.trials
    points = _distinct_points(p) if algorithm == "random" else None
    if points is not None:
        samples = len(points)
    scheduler = _scheduler(p, cohort(p, samples), concurrency)
    if algorithm == "optuna":
        search_alg = ConcurrencyLimiter(_optuna(cfg), max_concurrent=concurrency)
    elif isinstance(scheduler, halving.SuccessiveHalving):  # paused trials must not count as running
        search_alg = halving.GatedVariants(
            scheduler.full, random_state=cfg.search.seed, points_to_evaluate=points
        )
    else:  # Tune's max_concurrent_trials does not reach this one: it takes its own cap
        search_alg = BasicVariantGenerator(
            random_state=cfg.search.seed, max_concurrent=concurrency, points_to_evaluate=points
        )
    return tune.Tuner(
        trainable,
        param_space={q.field: q.to_tune(algorithm) for q in p.params},
        tune_config=tune.TuneConfig(
            metric=cfg.metric,
            mode=cfg.mode,
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=samples,
            time_budget_s=cfg.budget.time_s,
        ),
        run_config=tune.RunConfig(
            name=cfg.name,
            storage_path=str(p.sweep_dir.parent),
            stop=TokenBudget(cfg.budget.tokens) if cfg.budget.tokens else None,
            failure_config=tune.FailureConfig(max_failures=0),  # a diverged trial is a result, not a retry
            verbose=1,
        ),
    )


def cohort(p: Plan, samples: int) -> int:
    """How many trials the sweep will run: every combination of a grid once per sample."""
    if p.cfg.search.algorithm == "grid":
        return samples * math.prod(len(q.values) for q in p.params)
    return samples


def _distinct_points(p: Plan) -> list[dict] | None:
    """Random search over lists only: up to budget.trials distinct combinations in a seeded order (Tune's
    own sampling draws with replacement and would train some points twice). None: a range is searched."""
    import itertools
    import random

    if not all(q.discrete for q in p.params):
        return None
    combos = [
        dict(zip((q.field for q in p.params), v)) for v in itertools.product(*(q.values for q in p.params))
    ]
    random.Random(p.cfg.search.seed).shuffle(combos)
    if len(combos) < p.cfg.budget.trials:
        log.info("the space holds %d combinations: %d trials, each once", len(combos), len(combos))
    return combos[: p.cfg.budget.trials]


def _optuna(cfg: SweepConfig):
    """TPE that starts learning early: a quarter of the trials (at least 2) random, then proposals from a
    joint model of the fields (multivariate) rather than one per field (Optuna's default: 10 random)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    startup = max(2, cfg.budget.trials // 4)
    sampler = optuna.samplers.TPESampler(n_startup_trials=startup, multivariate=True, seed=cfg.search.seed)
    return OptunaSearch(sampler=sampler)


def _scheduler(p: Plan, cohort: int, concurrency: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    cfg = p.cfg.scheduler
    if cfg.kind == "halving":
        return halving.SuccessiveHalving(p.rungs, cfg.reduction_factor, cohort, concurrency)
    if cfg.kind == "asha":
        return ASHAScheduler(
            time_attr="tokens",
            max_t=p.trial_tokens,
            grace_period=max(1, int(cfg.grace_fraction * p.trial_tokens)),
            reduction_factor=cfg.reduction_factor,
        )
    return FIFOScheduler()


# --- CLI ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = entrypoint.parser(
        "python -m tune",
        "Sweep training hyperparameters with Ray Tune (successive halving, ASHA, Optuna, µP transfer).",
        "sweep",
        CONFIG_DIR,
        "tiny-lr",
    )
    parser.add_argument(
        "--transfer",
        action="store_true",
        help="µP: sweep a narrow proxy, write a recipe for the recipe's width",
    )
    args = parser.parse_args(argv)
    sweep = entrypoint.config_name(args)
    return entrypoint.run(
        "tune",
        lambda: run(load_config(SweepConfig, sweep_path(sweep), args.overrides), args.transfer, args.address),
    )
