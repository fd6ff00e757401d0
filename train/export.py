"""`odyssey export SOURCE --out DIR [--format safetensors|onnx|hf]`: a ZeRO training checkpoint
consolidated into the serving format (odyssey/artifact.py: safetensors + config.json + tokenizer.json),
or into Hugging Face's Llama format (odyssey/hf.py: `export_hf`). SOURCE may also be a model already
exported, in either format: the way to add model.onnx to one, or to bring a Hugging Face checkpoint into
ours.

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

from odyssey import artifact, hf, logs
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
    """Export a checkpoint (or a run's latest, or best with best=True), or a model directory, to `out`
    in the serving format; returns `out`. With onnx=True the directory also gets model.onnx, for the
    ONNX Runtime backend."""
    model, tokenizer, metadata = read_source(source, best)
    return artifact.save_model(
        out, model, tokenizer, metadata=metadata, overwrite=overwrite, onnx=onnx, onnx_quantize=quantize
    )


def export_hf(source: str | Path, out: str | Path, best: bool = False, overwrite: bool = False) -> Path:
    """Export like `export`, into Hugging Face's Llama format (odyssey/hf.py); returns `out`."""
    model, tokenizer, _ = read_source(source, best)
    if tokenizer is None:
        raise OdysseyError(
            f"{source} has no tokenizer.json, which a Hugging Face model directory needs: export from a "
            "checkpoint of a run (it carries the run's tokenizer)"
        )
    return hf.save_pretrained(model, tokenizer, out, overwrite=overwrite)


def read_source(source: str | Path, best: bool = False) -> tuple[Transformer, Tokenizer | None, dict]:
    """(model, tokenizer, where it came from) of a checkpoint, a run (its latest, or best), or a model
    directory (ours, or a Hugging Face Llama's)."""
    if is_exported(source):
        model, tokenizer, config = artifact.load(source)
        keep = ("source_checkpoint", "step", "tokens", "val_loss")  # a re-export still names its run
        return model, tokenizer, {k: config[k] for k in keep if k in config} or {"source_model": str(source)}
    require_model_source(source)
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
    return model, tokenizer, metadata


def is_exported(path: str | Path) -> bool:
    """A model directory that artifact.load takes: ours, or a Hugging Face checkpoint."""
    path = Path(path)
    return hf.is_hf_dir(path) or ((path / artifact.CONFIG).is_file() and (path / artifact.WEIGHTS).is_file())


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
    what = (
        "an exported model directory (`odyssey export`, or a Hugging Face Llama's), a run directory or one "
        "of its checkpoint_* directories"
    )
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
