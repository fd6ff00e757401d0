"""`odyssey export CHECKPOINT_OR_RUN --out DIR`: a ZeRO training checkpoint consolidated into the
serving format (odyssey/artifact.py: safetensors + config.json + tokenizer.json).

ZeRO 1-3 keep the fp32 master weights partitioned across the ranks' optimizer files; DeepSpeed's
zero_to_fp32 gathers them. ZeRO 0 keeps the whole module in the model-states file. Either way the
result loads into the core Transformer with every key matched, and DeepSpeed is needed only here.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from odyssey import artifact, logs
from odyssey.config import from_dict
from odyssey.errors import OdysseyError
from odyssey.model import ModelConfig, Transformer
from odyssey.tokenizer import Tokenizer
from train import checkpoint


def consolidated_state_dict(checkpoint_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    tag_dir = checkpoint_dir / checkpoint.TAG
    if zero_stage == 0:
        # Our own checkpoint, written by our own run: DeepSpeed stores the module with torch.save.
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    with logs.cpu_accelerator():  # consolidation runs on the CPU, with or without a GPU here
        from deepspeed.utils import zero_to_fp32

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # DeepSpeed sets its level when imported
    # zero_to_fp32 tells each stage with print ("Processing zero checkpoint ...", "Parsing checkpoint
    # created by ...", "Detected checkpoint of type ...", "Reconstructed fp32 state dict ...") and a tqdm
    # bar per checkpoint shard: routine for a checkpoint our own run wrote. Its errors are exceptions.
    with logs.muted(zero_to_fp32.__name__):
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=checkpoint.TAG)


def export(
    source: str | Path,
    out: str | Path,
    best: bool = False,
    overwrite: bool = False,
    onnx: bool = False,
    quantize: str | None = None,
) -> Path:
    """Export a checkpoint (or a run's latest, or best with best=True) to `out`; returns `out`. With
    onnx=True the directory also gets model.onnx, for the ONNX Runtime backend."""
    ckpt = checkpoint.find(source, best=best)
    meta = checkpoint.read_meta(ckpt)
    model = Transformer(from_dict(ModelConfig, meta["model"], "model"))
    state = consolidated_state_dict(ckpt, meta["zero_stage"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise OdysseyError(
            f"{ckpt}: weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    tokenizer = Tokenizer.load(ckpt / "tokenizer.json") if (ckpt / "tokenizer.json").is_file() else None
    metadata = {
        "source_checkpoint": str(ckpt),
        "step": meta["step"],
        "tokens": meta["tokens"],
        "val_loss": meta["val_loss"],
    }
    return artifact.save_model(
        out, model, tokenizer, metadata=metadata, overwrite=overwrite, onnx=onnx, onnx_quantize=quantize
    )


def is_exported(path: str | Path) -> bool:
    path = Path(path)
    return (path / artifact.CONFIG).is_file() and (path / artifact.WEIGHTS).is_file()


@contextlib.contextmanager
def exported_model(source: str | Path, onnx: bool = False) -> Iterator[Path]:
    """An exported model directory for `source`: itself when it is one, else its checkpoint (a run's
    best) exported into a temporary directory that is removed afterwards."""
    if is_exported(source):
        yield Path(source)
        return
    require_model_source(source)
    with tempfile.TemporaryDirectory(prefix="odyssey-export-") as tmp:
        yield export(source, Path(tmp) / Path(source).resolve().name, best=True, onnx=onnx)


def require_model_source(source: str | Path) -> None:
    """A clear error for a path that is neither an exported model nor a run or checkpoint: a typo gets
    "no such path" and the closest name beside it."""
    path = Path(source)
    what = "an exported model directory (`odyssey export`), a run directory or one of its checkpoint_* directories"
    if not path.exists():
        siblings = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
        close = difflib.get_close_matches(path.name, siblings, n=1)
        hint = f" (did you mean {path.parent / close[0]}?)" if close else ""
        raise OdysseyError(f"{source}: no such path{hint}; give {what}")
    if not (path / checkpoint.META).is_file() and not checkpoint.published(path):
        raise OdysseyError(f"{source} holds no model: give {what}")


def training_corpus(source: str | Path) -> Path:
    """The corpus the run behind `source` (a run, a checkpoint, or a model exported from one) trained
    on, from the run's config.yaml."""
    source = Path(source)
    if is_exported(source):
        origin = artifact.read_config(source).get("source_checkpoint")
        if origin is None:
            raise OdysseyError(f"{source} does not say which run it came from: pass --corpus")
        source = Path(origin)
    ckpt = checkpoint.find(source)
    config = ckpt.parent / "config.yaml"
    if not config.is_file():
        raise OdysseyError(f"{config} is missing: pass --corpus")
    return Path(yaml.safe_load(config.read_text(encoding="utf-8"))["data"]["corpus"])
