"""Training checkpoints: every rank's DeepSpeed shard plus what resuming needs, as one Ray Train checkpoint.

A checkpoint directory (`checkpoint_step0000060/` under the run directory):
    ds/                      DeepSpeed's files: model states, each rank's ZeRO optimizer partition
    data_state/rank{r}.json  rank r's data position and RNG state
    odyssey.json             step, tokens, world size, model config, validation loss (rank 0)
    tokenizer.json           so that `odyssey export` needs nothing else

Every rank writes its part into a local temporary directory, all ranks meet at a barrier, then every
rank calls `ray.train.report(..., checkpoint=...)`: Ray merges the parts into one directory in the run's
storage. DeepSpeed's shards are torch pickles; they are our own files, loaded only to resume or to
export. What serving loads is the safetensors export.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from odyssey.errors import OdysseyError

TAG = "ds"
META = "odyssey.json"


def save(engine, step: int, metrics: dict, meta: dict, data_state: dict, tokenizer_path: Path | None) -> None:
    """Called by every rank at the same step."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory(prefix="odyssey-ckpt-") as tmp:
        tmp = Path(tmp)
        engine.save_checkpoint(str(tmp), tag=TAG, client_state={"step": step})
        (tmp / "data_state").mkdir()
        state = {"data": data_state, "torch_rng": torch.get_rng_state().tolist()}
        (tmp / "data_state" / f"rank{rank}.json").write_text(json.dumps(state))
        if rank == 0:
            (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
            if tokenizer_path is not None:
                shutil.copy(tokenizer_path, tmp / "tokenizer.json")
        torch.distributed.barrier()  # every shard is on disk before any rank reports
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
            checkpoint_dir_name=f"checkpoint_step{step:07d}",
        )


def load(engine, checkpoint_dir: Path, rank: int, world_size: int) -> tuple[dict, dict]:
    """Restore model and optimizer into the engine; return (meta, this rank's data state)."""
    meta = read_meta(checkpoint_dir)
    if meta["world_size"] != world_size:
        raise OdysseyError(
            f"{checkpoint_dir} was written by {meta['world_size']} workers and this run has {world_size}; "
            f"resume with scaling.workers={meta['world_size']}"
        )
    path, _ = engine.load_checkpoint(
        str(checkpoint_dir), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise OdysseyError(f"{checkpoint_dir}: DeepSpeed found no checkpoint under tag {TAG!r}")
    state = json.loads((checkpoint_dir / "data_state" / f"rank{rank}.json").read_text())
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return meta, state["data"]


def read_meta(checkpoint_dir: Path) -> dict:
    path = Path(checkpoint_dir) / META
    if not path.is_file():
        raise OdysseyError(f"{checkpoint_dir} is not an Odyssey training checkpoint (no {META})")
    return json.loads(path.read_text(encoding="utf-8"))


def find(path: str | Path, best: bool = False) -> Path:
    """A checkpoint directory, or the latest (best: lowest validation loss) checkpoint of a run directory."""
    path = Path(path)
    if (path / META).is_file():
        return path
    found = [p for p in sorted(path.glob("checkpoint_*")) if (p / META).is_file()]
    if not found:
        raise OdysseyError(
            f"no training checkpoint in {path}; give a run directory or one of its checkpoint_* directories"
        )
    if best:
        return min(found, key=lambda p: read_meta(p).get("val_loss", float("inf")))
    return max(found, key=lambda p: read_meta(p)["step"])
