"""Training checkpoints: complete or absent, verified when read, loadable at any world size.

A checkpoint is a directory of the run directory (`checkpoint_step0000060/`):
    ds/            DeepSpeed's files: model states, each rank's ZeRO optimizer partition, `latest`
    odyssey.json   step, tokens, world size, ZeRO stage, data position, model config, validation loss
    tokenizer.json so that `odyssey export` needs nothing else
    manifest.json  every other file with its size and SHA-256

Saving, on every rank at the same step: each rank writes its DeepSpeed shard straight into
`.checkpoint_step0000060.staging/` (the run directory is storage that every node sees), hashes the
files it wrote, and rank 0 gathers the lists, checks that every rank's shard is there, writes the
manifest and renames the staging directory to its name. Readers list only named directories that hold
a manifest, so they see a whole checkpoint or none; a save killed half-way leaves a staging directory
that nothing lists and the next start deletes. Then the checkpoint, already in storage, is reported
to Ray Train (NO_UPLOAD), which keeps the best `keep_checkpoints`.

Resuming: the newest checkpoint whose files match its manifest (a damaged one is named in the log and
the run's events, and skipped). Written by another world size (or ZeRO stage), it is converted to
DeepSpeed's universal format (`ds_to_universal`: each parameter's fp32 weights and optimizer moments
whole, in one file per parameter) and loaded with `load_universal`, which repartitions it over the
ranks at hand. The data position is global (train/mixture.py), so it carries over as it is.

DeepSpeed's shards are torch pickles; they are our own files, loaded only to resume or to export, and
only after their hashes match. What serving loads is the safetensors export.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch.distributed as dist

from odyssey import atomic, failpoints
from odyssey.errors import OdysseyError

TAG = "ds"
META = "odyssey.json"
MANIFEST = "manifest.json"
PREFIX = "checkpoint_step"


class DamagedCheckpoint(OdysseyError):
    """A checkpoint's files do not match its manifest."""


def name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


# --- saving ----------------------------------------------------------------------------------------


def save(engine, run_dir: Path, step: int, metrics: dict, meta: dict, tokenizer_path: Path | None) -> Path:
    """Called by every rank at the same step; returns the published checkpoint directory."""
    import ray.train
    from ray.train import CheckpointUploadMode

    rank, world = dist.get_rank(), dist.get_world_size()
    final = run_dir / name(step)
    stage = run_dir / f".{name(step)}.staging"
    if rank == 0:
        shutil.rmtree(stage, ignore_errors=True)  # a save of this step that was killed before
        stage.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(stage), tag=TAG, client_state={"step": step})
    if rank == 0:
        (stage / META).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copy(tokenizer_path, stage / "tokenizer.json")
    dist.barrier()  # every rank's files are written
    failpoints.hit("checkpoint.staged", step=step, rank=rank)
    mine = _hash_files(stage, rank, world)  # each rank hashes its own shard: in parallel
    everyone: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        files = {path: entry for part in everyone for path, entry in part.items()}
        missing = missing_shards(files, meta["zero_stage"], world)
        if missing:
            raise OdysseyError(
                f"checkpoint of step {step}: no {', '.join(missing)} after every rank saved; not published"
            )
        atomic.write_text(
            stage / MANIFEST, json.dumps({"step": step, "files": files}, indent=1, sort_keys=True) + "\n"
        )
        _publish(stage, final)
    dist.barrier()
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(str(final)) if rank == 0 else None,
        checkpoint_dir_name=final.name,
        checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
    )
    return final


def missing_shards(files, zero_stage: int, world: int) -> list[str]:
    """Which DeepSpeed files a complete checkpoint of `world` ranks would hold and `files` lacks: the
    model states (one file, or one per rank under ZeRO-3) and, under ZeRO 1-3, every rank's optimizer
    partition (`zero_pp_rank_R_...`, `bf16_zero_pp_rank_R_...` for ZeRO-1 in bf16)."""
    names = {Path(f).name for f in files}
    if zero_stage == 3:
        want = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)]
    else:
        want = ["mp_rank_00_model_states.pt"]
    missing = [w for w in want if w not in names]
    if zero_stage > 0:
        for r in range(world):
            shard = f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
            if not any(n.endswith(shard) for n in names):
                missing.append(shard)
    return missing


def _hash_files(directory: Path, rank: int, world: int) -> dict[str, dict]:
    """{relative path: {bytes, sha256}} of the files this rank is responsible for: its own ZeRO shards
    (their names carry the rank); rank 0 also everything that is no rank's."""
    owned = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        owner = next((r for r in range(world) if f"_pp_rank_{r}_" in path.name), 0)
        if owner == rank:
            owned[str(path.relative_to(directory))] = {
                "bytes": path.stat().st_size,
                "sha256": atomic.sha256_file(path),
            }
    return owned


def _publish(stage: Path, final: Path) -> None:
    """Rename the verified staging directory into place; a checkpoint of the same step (one skipped as
    damaged) is replaced only once the new one is complete."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(stage, final)
    fd = os.open(final.parent, os.O_RDONLY)  # the rename itself must survive a crash
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(run_dir: Path) -> list[str]:
    """Delete what killed saves left behind (staging directories); returns their names."""
    gone = []
    for path in run_dir.glob(f".{PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)
        gone.append(path.name)
    return gone


# --- reading ---------------------------------------------------------------------------------------


def verify(checkpoint_dir: Path) -> dict:
    """The checkpoint's meta, once every file matches the manifest; else DamagedCheckpoint naming it."""
    checkpoint_dir = Path(checkpoint_dir)
    manifest_path = checkpoint_dir / MANIFEST
    if not manifest_path.is_file():
        raise DamagedCheckpoint(f"{checkpoint_dir}: no {MANIFEST} (not a complete Odyssey checkpoint)")
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError) as e:
        raise DamagedCheckpoint(f"{checkpoint_dir}: unreadable {MANIFEST} ({e})") from e
    for rel, entry in sorted(files.items()):
        path = checkpoint_dir / rel
        if not path.is_file():
            raise DamagedCheckpoint(f"{checkpoint_dir}: {rel} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise DamagedCheckpoint(
                f"{checkpoint_dir}: {rel} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
            )
        if atomic.sha256_file(path) != entry["sha256"]:
            raise DamagedCheckpoint(f"{checkpoint_dir}: {rel} does not match its SHA-256 in the manifest")
    return read_meta(checkpoint_dir)


def read_meta(checkpoint_dir: Path) -> dict:
    path = Path(checkpoint_dir) / META
    if not path.is_file():
        raise OdysseyError(f"{checkpoint_dir} is not an Odyssey training checkpoint (no {META})")
    return json.loads(path.read_text(encoding="utf-8"))


def published(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first: named directories with a manifest (never a staging one)."""
    return sorted(p for p in Path(run_dir).glob(f"{PREFIX}*") if (p / MANIFEST).is_file())


def first_intact(candidates) -> tuple[Path | None, dict | None, list[str]]:
    """(the first candidate that verifies, its meta, [why each one before it was skipped])."""
    skipped = []
    for path in candidates:
        try:
            return path, verify(path), skipped
        except DamagedCheckpoint as e:
            skipped.append(str(e))
    return None, None, skipped


def newest_intact(run_dir: Path) -> tuple[Path | None, dict | None, list[str]]:
    return first_intact(reversed(published(run_dir)))


def final_metrics(run_dir: Path, steps: int) -> dict | None:
    """The metrics of the run's last step when its newest intact checkpoint is that step (the run has
    nothing left to train), else None."""
    _, meta, _ = newest_intact(run_dir)
    return meta.get("metrics") if meta is not None and meta["step"] >= steps else None


def find(path: str | Path, best: bool = False) -> Path:
    """A checkpoint directory, or the latest (best: lowest validation loss) intact checkpoint of a run
    directory. The one returned has been verified against its manifest."""
    path = Path(path)
    if (path / META).is_file():
        verify(path)
        return path
    found = published(path)
    if not found:
        raise OdysseyError(
            f"no training checkpoint in {path}; give a run directory or one of its checkpoint_* directories"
        )
    if best:
        order = sorted(found, key=lambda p: read_meta(p).get("val_loss", float("inf")))
    else:
        order = reversed(found)
    chosen, _, skipped = first_intact(order)
    if chosen is None:
        raise DamagedCheckpoint("no intact checkpoint: " + "; ".join(skipped))
    return chosen


# --- loading ---------------------------------------------------------------------------------------


def needs_resharding(meta: dict, world: int, zero_stage: int) -> bool:
    """Whether the checkpoint must go through the universal format to load into this run."""
    if meta["zero_stage"] == 0 and zero_stage == 0:
        return False  # the whole module and optimizer in one file: any world size loads it
    if (meta["zero_stage"] == 0) != (zero_stage == 0):
        raise OdysseyError(
            f"the checkpoint was written with ZeRO stage {meta['zero_stage']} and this run uses {zero_stage}; "
            f"resume with deepspeed.zero_stage={meta['zero_stage']} (stages 1-3 convert into each other, 0 does not)"
        )
    return meta["world_size"] != world or meta["zero_stage"] != zero_stage


def load(engine, checkpoint_dir: Path, universal: bool, local_rank: int) -> None:
    """Restore model and optimizer into the engine (built with `load_universal` when `universal`)."""
    if not universal:
        path, _ = engine.load_checkpoint(
            str(checkpoint_dir), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    else:
        # One conversion per node (its local rank 0), into node-local disk, read by the node's ranks.
        out = (
            Path(tempfile.gettempdir())
            / "odyssey-universal"
            / hashlib.sha1(str(checkpoint_dir).encode()).hexdigest()[:16]
        )
        if local_rank == 0 and not (out / TAG / "zero").is_dir():
            to_universal(checkpoint_dir, out)
        dist.barrier()
        path, _ = engine.load_checkpoint(
            str(out), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        dist.barrier()
        if local_rank == 0:
            shutil.rmtree(out, ignore_errors=True)
    if path is None:
        raise OdysseyError(f"{checkpoint_dir}: DeepSpeed found no checkpoint under tag {TAG!r}")


def to_universal(checkpoint_dir: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal, in this process, its chatter kept off the console. Written into a
    staging directory and renamed: a conversion killed half-way is not mistaken for a whole one."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    with atomic.staged_dir(out, overwrite=True) as stage:
        args = argparse.Namespace(
            input_folder=str(checkpoint_dir / TAG),
            output_folder=str(stage / TAG),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=False,
        )
        with contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal.main(args)
