"""`train_loop_per_worker`: what every Ray Train worker runs, top to bottom (in the spirit of
torchtitan's train / train_step / forward_backward_step: each part a named method of `Worker`).

    pick the newest intact checkpoint of the run, if any -> build the DeepSpeed engine around the core
    model for this world size -> load the checkpoint (resharded when another world size wrote it) ->
    record why this start happens (events.jsonl) -> for each step: this rank's micro-batches of the
    step's global batch, one optimizer step -> log, evaluate and checkpoint at their intervals.

This function runs again whenever Ray Train restarts the worker group: after a worker failure
(`max_failures`) or, for an elastic run, at another size. The learning rate is a pure function of the
step (odyssey/optim.py) and the data position is global (train/mixture.py), so a resume, at any size,
continues the uninterrupted run.
Every log_every steps: a progress line, metrics.jsonl and TensorBoard (rank 0). At every evaluation
and checkpoint: `ray.train.report`, what the Ray dashboard shows (a report is a barrier: not every step).
Losses and gradient norms are checked for NaN/Inf without a host sync per step (a flag accumulates on the device and is
read at every log), so a diverged run stops before it can write a checkpoint.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from odyssey import failpoints, flops, logs, optim
from odyssey.config import from_dict, to_dict
from train import checkpoint, contrastive, events, mixture
from train.config import TrainConfig
from train.engine import build_engine, loop_clips_gradients
from train.metrics import RunLog, console, memory_gb, peak_flops_per_device

PAUSE_TIMEOUT_S = 600  # how long a run held at a `pause_at` step waits to be stopped before it fails


def train_loop_per_worker(config: dict) -> None:
    worker = Worker(config)  # resumed from the newest intact checkpoint, if any
    cadence = Cadence(
        worker.cfg.steps,
        worker.cfg.log_every,
        worker.cfg.eval_every,
        worker.cfg.checkpoint_every,
        frozenset(worker.cfg.checkpoint_at) | frozenset(worker.cfg.pause_at),
    )
    while worker.step < worker.cfg.steps:
        worker.train_step()
        if cadence.logs(worker.step) or cadence.evaluates(worker.step):
            worker.report(evaluate=cadence.evaluates(worker.step), save=cadence.saves(worker.step))
        failpoints.hit("train.step", step=worker.step, rank=worker.rank, world=worker.world)  # drills
        if worker.step in worker.cfg.pause_at:
            worker.hold()
    worker.log.close()


@dataclass(frozen=True)
class Cadence:
    """Which steps log, evaluate and checkpoint. The last step does all three, and every checkpoint is
    evaluated (the run's best checkpoint is chosen by validation loss)."""

    steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    checkpoint_at: frozenset[int] = frozenset()  # more steps that checkpoint (a sweep's rungs)

    def logs(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.steps

    def saves(self, step: int) -> bool:
        return step % self.checkpoint_every == 0 or step == self.steps or step in self.checkpoint_at

    def evaluates(self, step: int) -> bool:
        return step % self.eval_every == 0 or self.saves(step)


class Worker:
    """One rank of the run: its engine, its slice of the data and the counters between reports."""

    def __init__(self, config: dict):
        import ray.train

        self.cfg = cfg = from_dict(TrainConfig, config["train"])  # resolved on the driver (launch.resolve)
        self.run_dir = Path(config["run_dir"])
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.cuda = (
            torch.cuda.is_available()
        )  # a reserved GPU may have no CUDA behind it (the fake-GPU cluster)
        if not self.cuda:
            torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        logs.quiet()  # the libraries' routine notices (odyssey/logs.py), whatever started this run
        data_state, event = self._resume(config["launch_id"], ctx.get_local_rank())
        self.loader = mixture.make_loader(
            cfg, config["mixture"], config["rows_per_epoch"], self.rank, self.world, data_state
        )
        self.grad_accum = cfg.grad_accum_steps(self.world)
        self.val_data = {
            t: (torch.from_numpy(i.astype("int64")), torch.from_numpy(m.astype(bool)))
            for t, (i, m) in config["validation"].items()
        }
        self.pairs = config.get("pairs") or {}  # find's pairs for the contrastive objective; {} = off
        self.log = RunLog(self.run_dir, cfg.steps, self.step, enabled=self.rank == 0)
        self._record_start(event)
        # Between reports: summed on the device, read at the next report (no host sync per step).
        self.loss_sum = torch.zeros((), device=self.device)
        self.contrastive_sum = torch.zeros((), device=self.device)
        self.nonfinite = torch.zeros((), device=self.device)
        self.grad_norm = None
        self.own_clipping = loop_clips_gradients(cfg)
        # Over the run: the first report's loss, and steady-state throughput (the first interval is start-up).
        self.first_loss, self.timed_tokens, self.timed_seconds = None, 0, 0.0
        self.peak = None  # FLOP/s of all devices together, taken at the first report (see _interval_metrics)

    def _resume(self, launch_id: str, local_rank: int) -> tuple[dict | None, dict]:
        """Rank 0 picks the newest checkpoint that verifies and every rank follows: the engine is built for
        this world size and the checkpoint loaded (resharded when another world size wrote it).
        Returns (the data position to resume, the event that says why this start happens)."""
        cfg = self.cfg
        choice = [events.resume_point(self.run_dir, launch_id, self.world) if self.rank == 0 else None]
        dist.broadcast_object_list(choice, src=0)
        ckpt_dir, meta, event = choice[0]
        self.resharded = meta is not None and checkpoint.needs_resharding(
            meta, self.world, cfg.deepspeed.zero_stage
        )
        with logs.cpu_accelerator(expect_gpu=cfg.scaling.use_gpu):
            self.engine, self.model, self.flops_per_token = build_engine(
                cfg, cfg.model, self.world, self.resharded, pretrained=meta is None
            )
        self.device = self.engine.device
        self.step, self.tokens = 0, 0
        if meta is None:
            return None, event
        checkpoint.load(self.engine, ckpt_dir, self.resharded, local_rank)
        self.step, self.tokens = meta["step"], meta["tokens"]
        if self.rank == 0:
            how = f", resharded from {meta['world_size']} workers to {self.world}" if self.resharded else ""
            console(f"resumed from {ckpt_dir} at step {self.step} ({self.tokens:,} tokens){how}")
        return meta["data"], event

    def _record_start(self, event: dict) -> None:
        """events.jsonl: why this start happened, at which step, on which machines: each rank's Ray node,
        its address and the process (all ranks gather)."""
        import ray

        places = [None] * self.world
        here = (ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), os.getpid())
        dist.all_gather_object(places, here)
        event.update(world_size=self.world, step=self.step, tokens=self.tokens, resharded=self.resharded)
        nodes, hosts, pids = (list(column) for column in zip(*places))
        self.log.event(event.pop("event"), **event, nodes=nodes, hosts=hosts, pids=pids)

    def train_step(self) -> None:
        """One optimizer step: this rank's micro-batches of the step's global batch."""
        cfg = self.cfg
        self.step += 1
        lr = optim.lr_at(
            self.step - 1, cfg.optim.lr, cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio
        )
        optim.set_lr(self.engine.optimizer, lr)
        for i, batch in enumerate(self.loader.step_batches()):  # grad_accum micro-batches
            self._forward_backward(batch, contrastive_step=i == 0)
        if not self.own_clipping:
            self.grad_norm = self.engine.get_global_grad_norm()
        if cfg.deepspeed.precision != "fp16":  # fp16 overflows are loss scaling's business: skipped steps
            norm = self.grad_norm if self.grad_norm is not None else 0.0
            self.nonfinite += ~torch.isfinite(torch.as_tensor(norm, device=self.device))
        self.tokens += cfg.global_batch_tokens

    def _forward_backward(self, batch, contrastive_step: bool) -> None:
        """One micro-batch's language-model loss; on the step's first micro-batch, plus the contrastive
        loss of the step's pairs (train/contrastive.py), scaled by the accumulation steps that DeepSpeed
        divides every micro-batch's loss by: the step's gradient is the LM mean + weight x contrastive."""
        engine = self.engine
        inputs, targets, mask = (t.to(self.device) for t in batch)
        loss = engine(inputs, targets, mask)
        objective = loss
        if contrastive_step and self.pairs:
            c = self.cfg.contrastive
            index = contrastive.step_index(
                len(self.pairs["train"]), c.pairs_per_step, self.step - 1, self.cfg.seed
            )
            value, term = contrastive.step_loss(
                engine, self.pairs["train"], index, c.temperature, self.device
            )
            objective = loss + c.weight * self.grad_accum * term
            self.nonfinite += ~torch.isfinite(value)
            self.contrastive_sum += value
        engine.backward(objective)  # at the accumulation boundary this also all-reduces the gradients
        if self.own_clipping and engine.is_gradient_accumulation_boundary():
            clip = self.cfg.optim.grad_clip or math.inf
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
        loss = loss.detach().float()
        self.nonfinite += ~torch.isfinite(loss)
        self.loss_sum += loss

    def hold(self) -> None:
        """At a `pause_at` step, its checkpoint written and reported: train no further until the sweep's
        scheduler stops the worker group (it pauses the trial at a rung, and resumes it from this
        checkpoint), so a trial never trains tokens past a rung that the cut then throws away."""
        if self.rank == 0:
            console(f"step {self.step}: checkpoint written at a rung; waiting for the sweep's cut")
        time.sleep(PAUSE_TIMEOUT_S)  # the worker group is stopped in here, as Tune pauses the trial
        raise RuntimeError(
            f"step {self.step} is in pause_at, but nothing stopped the run within {PAUSE_TIMEOUT_S} s: "
            "pause_at is for a sweep under successive halving (tune/halving.py); remove it from a plain run"
        )

    def report(self, evaluate: bool, save: bool) -> None:
        """The interval's metrics (+ validation losses, + the run's averages at its end) into the run's
        log; a checkpoint, or at an evaluation a report to Ray Train (a barrier: not every step)."""
        metrics = self._interval_metrics()
        if evaluate:
            metrics.update(self._validation(metrics["loss"]))
        if self.step == self.cfg.steps:
            avg = self.timed_tokens / self.timed_seconds if self.timed_seconds else metrics["tokens_per_s"]
            mfu = flops.mfu(self.flops_per_token, avg, self.peak)
            metrics.update(first_loss=self.first_loss, avg_tokens_per_s=avg, avg_mfu=mfu)
        self.log.write(self.step, self.tokens, metrics)
        if save:
            self._save(metrics)
        elif evaluate:
            import ray.train

            ray.train.report(metrics)
        self.log.mark(self.step)

    def _interval_metrics(self) -> dict:
        """Loss, rate, MFU and memory since the last report, over every rank; a NaN or Inf there ends the
        run before it can write a checkpoint."""
        cfg, device = self.cfg, self.device
        steps_since = self.step - self.log.step_last
        mean_loss = _all_mean(self.loss_sum / (steps_since * self.grad_accum), device)  # also a sync point
        self.loss_sum.zero_()
        contrastive_loss = float(self.contrastive_sum) / steps_since  # the same on every rank
        self.contrastive_sum.zero_()
        if _all_sum(self.nonfinite.item(), device) > 0:
            raise FloatingPointError(
                f"loss or gradient norm became NaN or Inf at or before step {self.step}; no checkpoint was written. Lower optim.lr "
                f"(now {cfg.optim.lr}), raise optim.warmup_steps, or use precision bf16 instead of fp16"
            )
        seconds = self.log.interval_seconds()
        if self.peak is None:
            # On CPUs the peak is a timed matmul: taken here, with every rank idle at the same moment and
            # start-up (Ray, Ray Data, DeepSpeed) over, so nothing but the matmul competes for the cores.
            own = peak_flops_per_device(cfg.deepspeed.precision, self.cuda, cfg.peak_tflops)
            self.peak = _all_sum(own, device)
        rate = steps_since * cfg.global_batch_tokens / seconds
        if self.first_loss is None:
            self.first_loss = mean_loss
        else:
            self.timed_tokens += steps_since * cfg.global_batch_tokens
            self.timed_seconds += seconds
        metrics = {
            "step": self.step,
            "tokens": self.tokens,
            "loss": mean_loss,
            "lr": self.engine.optimizer.param_groups[0]["lr"],
            "tokens_per_s": rate,
            "mfu": flops.mfu(self.flops_per_token, rate, self.peak),
            "memory_gb": _all_max(memory_gb(self.cuda), device),
            "data_bytes_read": _all_sum(self.loader.bytes_read, device),  # since this start, all ranks
            "data_bytes_read_max_rank": _all_max(self.loader.bytes_read, device),
            "world_size": self.world,
        }
        if self.pairs:
            metrics["contrastive_loss"] = contrastive_loss
        if self.grad_norm is not None:  # fp16 loss scaling may skip a step's norm
            metrics["grad_norm"] = float(self.grad_norm)
        return metrics

    def _validation(self, train_loss: float) -> dict:
        losses = {f"val_loss_{t}": v for t, v in evaluate(self.engine, self.val_data, self.device).items()}
        out = {**losses, "val_loss": sum(losses.values()) / len(losses) if losses else train_loss}
        if (
            "val" in self.pairs
        ):  # reported beside val_loss, which stays the language model's (best checkpoint)
            self.engine.eval()
            t = self.cfg.contrastive.temperature
            out["val_contrastive_loss"] = contrastive.validation_loss(
                self.engine, self.pairs["val"], t, self.device
            )
            self.engine.train()
        return out

    def _save(self, metrics: dict) -> None:
        """A checkpoint with what a resume (at any world size) and export need."""
        cfg = self.cfg
        meta = {
            "step": self.step,
            "tokens": self.tokens,
            "data": self.loader.state(),
            "world_size": self.world,
            "zero_stage": cfg.deepspeed.zero_stage,
            "model": to_dict(cfg.model),  # what export builds (the resolved one)
            "train": to_dict(cfg),
            "val_loss": metrics["val_loss"],
            "metrics": metrics,
        }
        tokenizer = Path(cfg.data.tokenizer_path)  # the run's: the corpus's, or init.from's
        checkpoint.save(
            self.engine, self.run_dir, self.step, metrics, meta, tokenizer if tokenizer.is_file() else None
        )


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
