"""`train_loop_per_worker`: what every Ray Train worker runs, top to bottom.

    pick the newest intact checkpoint of the run, if any -> build the DeepSpeed engine around the core
    model for this world size -> load the checkpoint (resharded when another world size wrote it) ->
    record why this start happens (events.jsonl) -> for each step: this rank's micro-batches of the
    step's global batch, one optimizer step -> log, evaluate and checkpoint at their intervals.

This function runs again whenever Ray Train restarts the worker group: after a worker failure
(`max_failures`) or, for an elastic run, at another size. The learning rate is a pure function of the
step (odyssey/optim.py) and the data position is global (train/data.py), so a resume, at any size,
continues the uninterrupted run.
Every log_every steps: a progress line, metrics.jsonl and TensorBoard (rank 0). At every evaluation
and checkpoint: `ray.train.report`, what the Ray dashboard shows (a report is a barrier: not every step).
Losses and gradient norms are checked for NaN/Inf without a host sync per step (a flag accumulates on the device and is
read at every log), so a diverged run stops before it can write a checkpoint.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from odyssey import flops, logs, optim
from odyssey.config import from_dict
from train import checkpoint, events
from train import data as train_data
from train.config import TrainConfig
from train.engine import build_engine, loop_clips_gradients
from train.metrics import RunLog, console, memory_gb, peak_flops_per_device


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    cfg = from_dict(TrainConfig, config["train"])  # resolved on the driver (launch.resolve)
    run_dir, weights = Path(config["run_dir"]), config["mixture"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cuda = torch.cuda.is_available()  # a reserved GPU may have no CUDA behind it (the fake-GPU cluster)
    if not cuda:
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    logs.quiet()  # the libraries' routine notices (odyssey/logs.py), whatever started this run

    # Where to resume: rank 0 picks the newest checkpoint that verifies, every rank follows.
    choice = [events.resume_point(run_dir, config["launch_id"], world) if rank == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    ckpt_dir, meta, event = choice[0]
    universal = meta is not None and checkpoint.needs_resharding(meta, world, cfg.deepspeed.zero_stage)
    with logs.cpu_accelerator(expect_gpu=cfg.scaling.use_gpu):
        engine, model, flops_per_token = build_engine(cfg, cfg.model, world, universal)
    device = engine.device
    step, tokens, data_state = 0, 0, None
    if meta is not None:
        checkpoint.load(engine, ckpt_dir, universal, ctx.get_local_rank())
        step, tokens, data_state = meta["step"], meta["tokens"], meta["data"]
        if rank == 0:
            how = f", resharded from {meta['world_size']} workers to {world}" if universal else ""
            console(f"resumed from {ckpt_dir} at step {step} ({tokens:,} tokens){how}")
        if step >= cfg.steps and "metrics" in meta:
            # Relaunched after its last checkpoint: nothing to train, but whoever watches the reports (a Tune
            # trial restarted after an interruption) must still see the run's final metrics.
            ray.train.report(meta["metrics"])
    loader = train_data.make_loader(cfg, weights, config["rows_per_epoch"], rank, world, data_state)
    grad_accum = cfg.grad_accum_steps(world)
    val_data = {
        t: (torch.from_numpy(i.astype("int64")), torch.from_numpy(m.astype(bool)))
        for t, (i, m) in config["validation"].items()
    }

    peak = None  # FLOP/s of all devices together, taken at the first log (see below)
    log = RunLog(run_dir, cfg.steps, step, enabled=rank == 0)
    places = [None] * world  # where each rank runs: the record of which machines trained (and a resize's)
    dist.all_gather_object(places, (ray.get_runtime_context().get_node_id(), os.getpid()))
    event.update(world_size=world, step=step, tokens=tokens, resharded=universal)
    log.event(event.pop("event"), **event, nodes=[n for n, _ in places], pids=[p for _, p in places])
    nonfinite = torch.zeros((), device=device)
    first_loss = None
    timed_tokens, timed_seconds = 0, 0.0  # steady-state throughput: the first interval is start-up
    loss_sum = torch.zeros((), device=device)
    own_clipping = loop_clips_gradients(cfg)
    grad_norm = None
    while step < cfg.steps:
        step += 1
        optim.set_lr(
            engine.optimizer,
            optim.lr_at(step - 1, cfg.optim.lr, cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio),
        )
        for batch in loader.step_batches():  # grad_accum micro-batches: this rank's slice of the step
            inputs, targets, mask = (t.to(device) for t in batch)
            loss = engine(inputs, targets, mask)
            engine.backward(loss)  # at the accumulation boundary this also all-reduces the gradients
            if own_clipping and engine.is_gradient_accumulation_boundary():
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), cfg.optim.grad_clip or math.inf
                )
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            loss = loss.detach().float()
            nonfinite += ~torch.isfinite(loss)
            loss_sum += loss
        if not own_clipping:
            grad_norm = engine.get_global_grad_norm()
        if cfg.deepspeed.precision != "fp16":  # fp16 overflows are loss scaling's business: skipped steps
            nonfinite += ~torch.isfinite(
                torch.as_tensor(grad_norm if grad_norm is not None else 0.0, device=device)
            )
        tokens += cfg.global_batch_tokens

        logging_now = step % cfg.log_every == 0 or step == cfg.steps
        evaluating = step % cfg.eval_every == 0 or step % cfg.checkpoint_every == 0 or step == cfg.steps
        saving = step % cfg.checkpoint_every == 0 or step == cfg.steps
        if not (logging_now or evaluating or saving):
            continue
        steps_since = step - log.step_last
        mean_loss = _all_mean(loss_sum / (steps_since * grad_accum), device)  # also a sync point
        loss_sum.zero_()
        if _all_sum(nonfinite.item(), device) > 0:
            raise FloatingPointError(
                f"loss or gradient norm became NaN or Inf at or before step {step}; no checkpoint was written. Lower optim.lr "
                f"(now {cfg.optim.lr}), raise optim.warmup_steps, or use precision bf16 instead of fp16"
            )
        seconds = log.interval_seconds()
        if peak is None:
            # On CPUs the peak is a timed matmul: taken here, with every rank idle at the same moment and
            # start-up (Ray, Ray Data, DeepSpeed) over, so nothing but the matmul competes for the cores.
            own = peak_flops_per_device(cfg.deepspeed.precision, cuda, cfg.peak_tflops)
            peak = _all_sum(own, device)
        rate = steps_since * cfg.global_batch_tokens / seconds
        if first_loss is None:
            first_loss = mean_loss
        else:
            timed_tokens, timed_seconds = (
                timed_tokens + steps_since * cfg.global_batch_tokens,
                timed_seconds + seconds,
            )
        metrics = {
            "step": step,
            "tokens": tokens,
            "loss": mean_loss,
            "lr": engine.optimizer.param_groups[0]["lr"],
            "tokens_per_s": rate,
            "mfu": flops.mfu(flops_per_token, rate, peak),
            "memory_gb": _all_max(memory_gb(cuda), device),
            "world_size": world,
        }
        if grad_norm is not None:  # fp16 loss scaling may skip a step's norm
            metrics["grad_norm"] = float(grad_norm)
        if evaluating:
            metrics.update({f"val_loss_{t}": v for t, v in evaluate(engine, val_data, device).items()})
            task_losses = [v for k, v in metrics.items() if k.startswith("val_loss_")]
            metrics["val_loss"] = sum(task_losses) / len(task_losses) if task_losses else mean_loss
        if step == cfg.steps:
            avg = timed_tokens / timed_seconds if timed_seconds else rate
            metrics.update(
                first_loss=first_loss, avg_tokens_per_s=avg, avg_mfu=flops.mfu(flops_per_token, avg, peak)
            )
        log.write(step, tokens, metrics)
        if saving:
            meta = {
                "step": step,
                "tokens": tokens,
                "data": loader.state(),
                "world_size": world,
                "zero_stage": cfg.deepspeed.zero_stage,
                "model": config["train"]["model"],  # what export builds (the resolved one)
                "train": config["train"],
                "val_loss": metrics["val_loss"],
                "metrics": metrics,
            }
            tokenizer = Path(cfg.data.corpus) / "tokenizer.json"
            checkpoint.save(engine, run_dir, step, metrics, meta, tokenizer if tokenizer.is_file() else None)
        elif evaluating:  # Ray Train's record (the dashboard) at evaluations: a report is a barrier
            ray.train.report(metrics)
        log.mark(step)
    log.close()


@torch.no_grad()
def evaluate(engine, val_data: dict, device) -> dict[str, float]:
    """Mean loss per task over the same validation blocks on every rank (ZeRO-3 needs all ranks in
    every forward pass)."""
    engine.eval()
    losses = {}
    for task, (ids, mask) in val_data.items():
        ids, mask = ids.to(device), mask.to(device)
        losses[task] = float(engine(ids[:, :-1], ids[:, 1:], mask[:, 1:]))
    engine.train()
    return losses


def _all_mean(x: torch.Tensor | float, device) -> float:
    t = torch.as_tensor(x, dtype=torch.float64, device=device).clone()
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _all_sum(x: float, device) -> float:
    t = torch.tensor(float(x), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def _all_max(x: float, device) -> float:
    t = torch.tensor(float(x), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)
