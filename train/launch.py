"""`python -m train` (and `odyssey train`): check the config, reach Ray, prepare data, run the
TorchTrainer, print one JSON line summarising the run.

    python -m train --config tiny-cpu [--set key=value ...] [--address ADDR]

Ray: inside `ray job submit` (RAY_ADDRESS is set) or with --address, it joins that cluster; otherwise it
starts an embedded one on loopback with token authentication. Everything that can be wrong with the
request (config fields, batch arithmetic, a missing dataset, more workers than the cluster holds) is
an error before any worker starts. Launching the same `name` again resumes the run from its latest
checkpoint.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import replace
from pathlib import Path

import yaml

from odyssey import cluster, entrypoint, failpoints, hf
from odyssey.config import load_config, to_dict
from odyssey.errors import ConfigError, OdysseyError
from odyssey.model import pad_vocab, tiny
from train import mixture
from train.config import CONFIG_DIR, TrainConfig, recipe_path

log = logging.getLogger("train")
FOLLOWS_DATA = ("vocab_size", "max_seq_len")  # model fields that resolve() sets from the data anyway


def resolve(cfg: TrainConfig) -> tuple[TrainConfig, mixture.DataPlan]:
    """The one config of the run, resolved once on the driver: absolute paths (workers may run
    elsewhere), the model of init.from when set, and the model sized to the data (vocabulary, context).
    Workers, checkpoints, the run's config.yaml and export all read this object. Returns it with the
    run's data plan."""
    cfg = replace(cfg, data=replace(cfg.data, corpus=str(Path(cfg.data.corpus).resolve())))
    if cfg.init.from_ is not None:
        cfg = from_pretrained(cfg)
    tokenizer = cfg.data.tokenizer and str(Path(cfg.data.tokenizer).resolve())
    data = replace(cfg.data, tokenizer=tokenizer, blocks=str(Path(cfg.data.blocks_dir).resolve()))
    cfg = replace(cfg, data=data, storage=str(Path(cfg.storage).resolve()))
    plan = mixture.plan(cfg)
    # A checkpoint's rows stay as they are (they may exceed the tokenizer's, padded its own way).
    vocab = cfg.model.vocab_size if cfg.init.from_ else pad_vocab(plan.manifest["vocab_size"])
    model = replace(cfg.model, vocab_size=vocab, max_seq_len=cfg.data.seq_len)
    return replace(cfg, model=model), plan


def from_pretrained(cfg: TrainConfig) -> TrainConfig:
    """init.from: the model's shape from the checkpoint's config.json, and its tokenizer (our control
    tokens added if need be: odyssey/hf.py) written beside the corpus as the tokenizer the run packs its
    blocks with (their default directory is named after it) and its checkpoints carry."""
    source = Path(cfg.init.from_).resolve()
    shape = [k for k, v in to_dict(cfg.model).items() if k not in FOLLOWS_DATA and v != to_dict(tiny())[k]]
    if shape:
        raise ConfigError(
            f"init.from={source} sets the model from its config.json, but the config sets "
            f"{', '.join('model.' + k for k in shape)}: remove them (or the `model:` section)"
        )
    if cfg.data.tokenizer is not None:
        raise ConfigError(
            f"init.from={source} brings its own tokenizer: remove data.tokenizer={cfg.data.tokenizer}"
        )
    model, tokenizer, _ = hf.pretrained_config(source)
    if cfg.data.seq_len > model.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds the {model.max_seq_len} positions of {source} "
            "(max_position_embeddings): lower data.seq_len"
        )
    path = Path(cfg.data.corpus) / "tokenizers" / f"{source.name}-{tokenizer.fingerprint[:12]}.json"
    if not path.is_file():
        tokenizer.save(path)
    init = replace(cfg.init, from_=str(source))
    return replace(cfg, init=init, model=model, data=replace(cfg.data, tokenizer=str(path)))


def check_resources(cfg: TrainConfig) -> None:
    import ray

    if cfg.scaling.autoscaling:
        return
    have = ray.cluster_resources()
    least = cfg.scaling.min_workers  # an elastic run starts with what there is, from min_workers up
    need_cpu = least * cfg.scaling.cpus_per_worker
    if have.get("CPU", 0) < need_cpu + 1:  # + 1 for Ray Data's readers
        raise ConfigError(
            f"scaling: {least} workers x {cfg.scaling.cpus_per_worker} CPUs (+1 for data) exceed the "
            f"cluster's {have.get('CPU', 0):g} CPUs; lower scaling.workers, or set scaling.autoscaling=true on an autoscaling cluster"
        )
    if cfg.scaling.use_gpu and have.get("GPU", 0) < least:
        raise ConfigError(
            f"scaling: {least} GPU workers but the cluster has {have.get('GPU', 0):g} GPUs; lower "
            f"scaling.workers, or set scaling.autoscaling=true on an autoscaling cluster"
        )


def run(cfg: TrainConfig, address: str | None = None, callbacks: list | None = None) -> dict:
    """Train; returns the summary (also the last line the CLI prints). `callbacks`: Ray Train callbacks
    (a Tune trial passes the one that forwards every report to Tune)."""
    cfg, data = resolve(cfg)
    # Logical CPUs of an embedded cluster: one per worker plus room for Ray Data's readers (each
    # worker sets its own thread count, so this does not oversubscribe the cores).
    cluster.connect(
        address,
        num_cpus=max(os.cpu_count() or 1, int(cfg.scaling.max_workers * cfg.scaling.cpus_per_worker) + 2),
    )
    check_resources(cfg)

    import ray.train
    from ray.train.torch import TorchTrainer

    from train.callbacks import FailureRecord
    from train.loop import train_loop_per_worker
    from train.network import PinnedTorchConfig

    run_dir = Path(cfg.storage) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    cluster.keep_ray_helpers_here()
    # Fault injection (odyssey/failpoints.py) reaches the workers only when armed here.
    armed = {failpoints.ENV: os.environ[failpoints.ENV]} if os.environ.get(failpoints.ENV) else None
    launch_id = uuid.uuid4().hex[:12]  # tells a restart inside this launch from a relaunch
    trainer = TorchTrainer(
        train_loop_per_worker,
        torch_config=PinnedTorchConfig(
            backend=None if cfg.scaling.backend == "auto" else cfg.scaling.backend
        ),
        train_loop_config={
            "train": to_dict(cfg),
            "mixture": data.weights,
            "rows_per_epoch": data.rows_per_epoch,
            "validation": data.validation,
            "pairs": data.pairs,
            "run_dir": str(run_dir),
            "launch_id": launch_id,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.workers,
            elastic_resize_monitor_interval_s=cfg.scaling.resize_check_s,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={
                "CPU": cfg.scaling.cpus_per_worker,
                **({"GPU": 1} if cfg.scaling.use_gpu else {}),
            },
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=cfg.storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            callbacks=[FailureRecord(run_dir), *(callbacks or [])],
            worker_runtime_env={"env_vars": armed} if armed else None,
        ),
        **data.trainer_datasets(),  # data.load=stream only: under index each worker reads its own rows
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps the worker's exception; show the worker's message
        raise failed(run_dir, launch_id, cfg.max_failures, e) from e
    return summarize(run_dir, result)


def failed(run_dir: Path, launch_id: str, max_failures: int, error: Exception) -> OdysseyError:
    """Why the run ended, and what to do: when its workers failed more often than max_failures allows,
    how often, the last failure, and the checkpoint that running the same command again resumes from."""
    from train import checkpoint, events

    failures = events.failures_of_launch(run_dir, launch_id)
    if max_failures >= 0 and len(failures) > max_failures:
        last = failures[-1]
        who = f"rank {', '.join(map(str, last['died']))} died" if last.get("died") else "a worker failed"
        latest, meta, _ = checkpoint.newest_intact(run_dir)
        resume = (
            f"the latest intact checkpoint is {latest} (step {meta['step']}): run the same command to resume"
            if latest
            else "no checkpoint was saved: running the same command starts over"
        )
        return OdysseyError(
            f"training failed: the workers failed {len(failures)} times, more than max_failures="
            f"{max_failures} allows (last: {who}: {last['error']}); {resume}, after fixing the cause "
            "(or raise max_failures where workers are lost routinely, e.g. spot instances)"
        )
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return OdysseyError(f"training failed: {type(cause).__name__}: {cause}")


def summarize(run_dir: Path, result) -> dict:
    from train import events

    history = events.read_metrics(run_dir)
    last = result.metrics or (history[-1] if history else {})
    val = {k.removeprefix("val_loss_"): round(v, 4) for k, v in last.items() if k.startswith("val_loss_")}
    restarts = [e for e in events.read_events(run_dir) if e["event"] in ("restart", "resize")]
    return {
        "run_dir": str(run_dir),
        "steps": last.get("step"),
        "tokens": last.get("tokens"),
        "first_loss": round(history[0]["loss"], 4) if history else last.get("first_loss"),
        "final_loss": round(last["loss"], 4) if "loss" in last else None,
        "val_loss": {"mean": round(last["val_loss"], 4), **val} if "val_loss" in last else None,
        "tokens_per_s": round(last.get("avg_tokens_per_s", last.get("tokens_per_s", 0.0))),
        "mfu": round(last.get("avg_mfu", last.get("mfu", 0.0)), 4),
        "world_size": last.get("world_size"),
        "restarts": len(restarts),  # worker-group restarts and resizes, over every launch of the run
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = entrypoint.parser(
        "python -m train",
        "Pretrain the multitask model: Ray Train + DeepSpeed.",
        "recipe",
        CONFIG_DIR,
        "tiny-cpu",
    ).parse_args(argv)
    recipe = entrypoint.config_name(args)
    return entrypoint.run(
        "train", lambda: run(load_config(TrainConfig, recipe_path(recipe), args.overrides), args.address)
    )
