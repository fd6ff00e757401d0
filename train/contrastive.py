"""The contrastive half of the multitask objective: `find`'s (query, passage) pairs, trained with InfoNCE
beside the language-model loss, in the same DeepSpeed step.

Driver: `read_pairs` embeds-ready ids of a split's pairs (odyssey/retrieval.py's `embed_batch`: the find
prompt, left-padded to one width per side), handed to every worker with the config.

Worker: each optimizer step takes the next `pairs_per_step` pairs of the run's global order (a seeded
permutation per epoch: a pure function of the step, so a resume at any world size continues it). Rank r
embeds its contiguous share; the shares are gathered, and every rank computes the same loss over all of
them, each query against every passage of the step (in-batch negatives across data-parallel ranks).
Gradients flow through the rank's own rows only, so each rank's loss is scaled by the world size:
DeepSpeed's average of the ranks' gradients is then exactly the gradient of the step's loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from odyssey import retrieval
from odyssey.data.corpus import read_split
from odyssey.errors import ConfigError
from odyssey.tokenizer import Tokenizer
from train.config import TrainConfig

VAL_PAIRS = 64  # validation pairs: the first of the split, the same at every evaluation


@dataclass
class Pairs:
    queries: np.ndarray  # (N, Lq) int32, left-padded
    passages: np.ndarray  # (N, Lp) int32, left-padded
    pad_id: int

    def __len__(self) -> int:
        return len(self.queries)

    def rows(self, index: np.ndarray) -> tuple[torch.Tensor, ...]:
        """(query ids, query mask, passage ids, passage mask) of the pairs at `index`."""
        q = torch.from_numpy(self.queries[index].astype(np.int64))
        p = torch.from_numpy(self.passages[index].astype(np.int64))
        return q, q != self.pad_id, p, p != self.pad_id


def plan(cfg: TrainConfig) -> dict[str, Pairs]:
    """{"train": pairs, "val": pairs (when the split has some)}; {} when the objective is off."""
    if not cfg.contrastive.weight:
        return {}
    train = read_pairs(cfg, "train")
    if train is None or len(train) < cfg.contrastive.pairs_per_step:
        raise ConfigError(
            f"contrastive.weight={cfg.contrastive.weight} but the corpus {cfg.data.corpus} has "
            f"{0 if train is None else len(train)} find train pairs, fewer than contrastive.pairs_per_step="
            f"{cfg.contrastive.pairs_per_step}: build a corpus with find examples, or set contrastive.weight: 0"
        )
    val = read_pairs(cfg, "val", VAL_PAIRS)
    return {"train": train, **({"val": val} if val is not None else {})}


def read_pairs(cfg: TrainConfig, split: str, limit: int | None = None) -> Pairs | None:
    """The split's find pairs as ids, or None when it has none."""
    table = read_split(cfg.data.corpus, "find", split, ["input", "target"])
    if limit is not None:
        table = table.slice(0, limit)
    if table.num_rows == 0:
        return None
    tok = Tokenizer.load(cfg.data.tokenizer_path)
    c, seq_len = cfg.contrastive, cfg.data.seq_len
    queries, _ = retrieval.embed_batch(tok, table.column("input").to_pylist(), min(c.query_tokens, seq_len))
    passages, _ = retrieval.embed_batch(
        tok, table.column("target").to_pylist(), min(c.passage_tokens, seq_len)
    )
    return Pairs(queries, passages, tok.pad_id)


def step_index(n_pairs: int, per_step: int, step: int, seed: int) -> np.ndarray:
    """Indices of the pairs of optimizer step `step` (0-based) in the run's global order."""
    positions = np.arange(step * per_step, (step + 1) * per_step)
    epochs, offsets = np.divmod(positions, n_pairs)
    out = np.empty(per_step, dtype=np.int64)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([seed, 2, int(epoch)]).permutation(n_pairs)
        out[epochs == epoch] = order[offsets[epochs == epoch]]
    return out


def share(per_step: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous share of a step's pairs; every share has at most ceil(P/W)."""
    size = math.ceil(per_step / world)
    return min(rank * size, per_step), min((rank + 1) * size, per_step)


def step_loss(
    engine, pairs: Pairs, index: np.ndarray, temperature: float, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the step's InfoNCE loss, detached; the term whose gradient on this rank is this rank's part).
    `index`: every pair of the step; this rank embeds its share, padded to the common share size so
    that every rank runs the same shapes (ZeRO-3 gathers parameters in lockstep)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    start, end = share(len(index), rank, world)
    size = math.ceil(len(index) / world)
    mine = (
        np.resize(index[start:end], size) if end > start else np.resize(index[:1], size)
    )  # padding rows: dropped
    q_ids, q_valid, p_ids, p_valid = (t.to(device) for t in pairs.rows(mine))
    q = engine(q_ids, embed_valid=q_valid)
    p = engine(p_ids, embed_valid=p_valid)
    if world > 1:
        q, p = _gathered(q, rank, world, len(index)), _gathered(p, rank, world, len(index))
    loss = retrieval.info_nce(q[: len(index)], p[: len(index)], temperature)
    return loss.detach(), loss * world


def _gathered(x: torch.Tensor, rank: int, world: int, total: int) -> torch.Tensor:
    """Every rank's share in rank order (total rows), this rank's rows carrying their gradient."""
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    rows = [
        part[: end - start]
        for part, (start, end) in zip(parts, (share(total, r, world) for r in range(world)))
    ]
    return torch.cat(rows)


@torch.no_grad()
def validation_loss(engine, pairs: Pairs, temperature: float, device) -> float:
    """InfoNCE over the validation pairs, every rank computing the same (all ranks run every forward)."""
    index = np.arange(min(len(pairs), VAL_PAIRS))
    q_ids, q_valid, p_ids, p_valid = (t.to(device) for t in pairs.rows(index))
    q, p = engine(q_ids, embed_valid=q_valid), engine(p_ids, embed_valid=p_valid)
    return float(retrieval.info_nce(q, p, temperature))
