"""The DeepSpeed side of training: its JSON config generated from our typed config, activation
checkpointing applied from outside the model, and the engine built around the core Transformer."""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from odyssey import hf, logs, optim
from odyssey.model import ModelConfig, Transformer
from train.config import TrainConfig


def loop_clips_gradients(cfg: TrainConfig) -> bool:
    """DeepSpeed clips fp32 ZeRO-0 gradients but keeps no norm there (get_global_grad_norm() is None), and
    the norm is what the logs show and the NaN/Inf check reads. So on that path the loop clips instead:
    the same arithmetic, on the same all-reduced gradients, with the norm kept."""
    return cfg.deepspeed.zero_stage == 0 and cfg.deepspeed.precision == "fp32"


def deepspeed_config(cfg: TrainConfig, cuda: bool, world: int, universal: bool = False) -> dict:
    """`cuda`: whether this worker trains on a CUDA device (a reserved GPU may have none behind it).
    `world`: the workers of this (re)start: the accumulation steps keep the global batch at any size.
    `universal`: the checkpoint to resume is in DeepSpeed's universal format (train/checkpoint.py)."""
    ds = cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage > 0:
        # Overlapping communication with compute pays off on GPUs; on CPU/gloo it only adds threads.
        zero.update(contiguous_gradients=True, overlap_comm=cuda)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(world),
        "train_batch_size": cfg.sequences_per_step,
        "gradient_clipping": 0.0 if loop_clips_gradients(cfg) else cfg.optim.grad_clip,
        "zero_optimization": zero,
        # Our own AdamW (torch's), over the model's parameter groups: µP scales each group's lr.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # progress is ours (train/metrics.py)
        "wall_clock_breakdown": False,
    }
    if universal:
        config["checkpoint"] = {"load_universal": True}
    if ds.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif ds.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations during backward instead of keeping them: memory for compute.
    The blocks' forward methods are wrapped in place, so parameter names (and checkpoints) do not change."""
    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def build_engine(
    cfg: TrainConfig, model_cfg: ModelConfig, world: int, universal: bool = False, pretrained: bool = True
):
    """(engine, model, training FLOPs per token), every rank starting from the same initial weights:
    seeded, or with `pretrained` (a start, not a resume) and init.from set, the checkpoint's. Those are
    loaded before DeepSpeed sees the model; so are the FLOPs counted: ZeRO-3 leaves each rank's
    parameters empty, which would count as a model without weights."""
    import deepspeed
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    if pretrained and cfg.init.from_ is not None:
        model.load_state_dict(hf.load_pretrained(cfg.init.from_)[0].state_dict())  # shapes: launch.resolve
    if cfg.deepspeed.activation_checkpointing:
        apply_activation_checkpointing(model)
    flops_per_token = model.flops_per_token(cfg.data.seq_len)
    # Saved with every checkpoint: ds_to_universal refuses to convert one without it. No tensor
    # parallelism here, so no parameter needs a merge rule beyond the version.
    setattr(
        model,
        UNIVERSAL_CHECKPOINT_INFO,
        {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
    )
    optimizer = optim.adamw(
        model, cfg.optim.lr, cfg.optim.weight_decay, betas=(cfg.optim.beta1, cfg.optim.beta2)
    )
    # DeepSpeed prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" when it
    # sets up its communication on CPU (deepspeed/comm/torch.py, build_shm_op), cached build or not.
    with logs.muted("deepspeed.comm.torch"):
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=deepspeed_config(cfg, torch.cuda.is_available(), world, universal),
        )
    return engine, model, flops_per_token
