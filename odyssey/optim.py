"""Optimizer and learning-rate schedule shared by every training loop (the demo's and train/'s)."""

from __future__ import annotations

import math

import torch

from odyssey.model import Transformer


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to base_lr, then cosine decay to min_ratio * base_lr at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(
    model: Transformer, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW over the model's parameter groups (no decay on embeddings and gains; µP lr scales)."""
    groups = model.param_groups(weight_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
