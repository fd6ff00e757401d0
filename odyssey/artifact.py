"""A model on disk, as training exports it and serving loads it:

    model.safetensors   weights (safetensors: loading never unpickles, so a file cannot run code)
    config.json         {"format", "model": ModelConfig fields, ...metadata}
    tokenizer.json      the tokenizer it was trained with
    model.onnx          optional (`odyssey export --format onnx`): the blocks for ONNX Runtime
                        (odyssey/ort_model.py), traced from these same weights

The directory is written complete or not at all. `load` (and `read_config`, `model_id`) also take a
Hugging Face Llama directory (odyssey/hf.py: `odyssey export --format hf` writes one), on the torch backend.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from odyssey import __version__, atomic, hf
from odyssey.config import from_dict, to_dict
from odyssey.errors import ConfigError, OdysseyError
from odyssey.model import ModelConfig, Transformer
from odyssey.tokenizer import Tokenizer

FORMAT = "odyssey-model/1"
WEIGHTS, CONFIG, TOKENIZER, ONNX = "model.safetensors", "config.json", "tokenizer.json", "model.onnx"
BACKENDS = ("torch", "onnxruntime")


def save_model(
    out: str | Path,
    model: Transformer,
    tokenizer: Tokenizer | None = None,
    metadata: dict | None = None,
    overwrite: bool = True,
    onnx: bool = False,
    onnx_quantize: str | None = None,
) -> Path:
    """Write the model directory; with onnx=True also model.onnx (float32, or int8 with
    onnx_quantize="int8"), in the same all-or-nothing step."""
    out = Path(out)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    config = {
        "format": FORMAT,
        "odyssey_version": __version__,
        "model": to_dict(model.cfg),
        **({"onnx": {"quantize": onnx_quantize}} if onnx else {}),
        **(metadata or {}),
    }
    with atomic.staged_dir(out, overwrite=overwrite) as stage:
        save_file(state, str(stage / WEIGHTS), metadata={"format": "pt", "odyssey": FORMAT})
        atomic.write_text(stage / CONFIG, json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(stage / TOKENIZER)
        if onnx:
            from odyssey import ort_model

            ort_model.export(model, stage / ONNX, quantize=onnx_quantize)
    return out


def read_config(path: str | Path) -> dict:
    """config.json of a model directory: ours, or a Hugging Face Llama's (checked by odyssey/hf.py)."""
    path = Path(path)
    if hf.is_hf_dir(path):
        return hf.read_config(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise OdysseyError(
            f"{path} is not an exported model (needs {CONFIG} and {WEIGHTS}); export one with `odyssey export`"
        )
    config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    if config.get("format") != FORMAT:
        raise OdysseyError(f"{path / CONFIG}: format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def weights_digest(path: str | Path) -> str:
    """The first 12 hex digits of the weights' SHA-256: with the model's name, its id in serving and
    in evaluation reports (passage vectors and scores belong to exactly these weights). A sharded
    Hugging Face checkpoint: the SHA-256 of its shards' digests, in order."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return atomic.sha256_file(path / WEIGHTS)[:12]
    digests = "".join(atomic.sha256_file(f) for f in hf.weight_files(path))
    return hashlib.sha256(digests.encode()).hexdigest()[:12]


def model_id(path: str | Path, config: dict | None = None) -> str:
    """name@digest; the name is config.json's `name`, else the directory's."""
    path = Path(path)
    config = config if config is not None else read_config(path)
    return f"{config.get('name') or path.resolve().name}@{weights_digest(path)}"


def read_model_config(path: str | Path) -> tuple[ModelConfig, dict]:
    """The ModelConfig of an exported model directory, and its whole config.json."""
    path = Path(path)
    config = read_config(path)
    try:
        return from_dict(ModelConfig, config["model"], "model"), config
    except ConfigError as e:
        raise OdysseyError(f"{path / CONFIG}: {e}") from None


def read_tokenizer(path: str | Path, cfg: ModelConfig) -> Tokenizer | None:
    path = Path(path)
    tokenizer = Tokenizer.load(path / TOKENIZER) if (path / TOKENIZER).is_file() else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise OdysseyError(
            f"{path}: tokenizer has {tokenizer.vocab_size} tokens, the model only {cfg.vocab_size} rows"
        )
    return tokenizer


def load(
    path: str | Path,
    backend: str = "torch",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    threads: int = 1,
) -> tuple[Transformer, Tokenizer | None, dict]:
    """The one way to get the model of an exported directory: (model in eval mode, its tokenizer if
    saved, the config.json contents). `backend`: "torch" (the weights on `device` in `dtype`) or
    "onnxruntime" (model.onnx in an ONNX Runtime session of `threads` threads; the same interface).
    A Hugging Face Llama directory loads through odyssey/hf.py, on the torch backend."""
    path = Path(path)
    if backend not in BACKENDS:
        raise OdysseyError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if hf.is_hf_dir(path):
        if backend != "torch":
            raise OdysseyError(
                f"{path} is a Hugging Face checkpoint, which runs on backend torch; for {backend}, convert it "
                f"with `odyssey export {path} --out DIR --format onnx` and load DIR"
            )
        model, tokenizer, config = hf.load_pretrained(path)
        return model.to(device=device, dtype=dtype), tokenizer, config
    cfg, config = read_model_config(path)
    if backend == "onnxruntime":
        if not (path / ONNX).is_file():
            raise OdysseyError(f"{path} has no {ONNX}: export it with `odyssey export ... --format onnx`")
        from odyssey.ort_model import OrtTransformer  # onnxruntime: imported only by who uses it

        model = OrtTransformer.from_files(cfg, path / ONNX, path / WEIGHTS, threads)
        return model, read_tokenizer(path, cfg), config
    model = Transformer(cfg)
    state = load_file(str(path / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise OdysseyError(
            f"{path / WEIGHTS} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.to(device=device, dtype=dtype).eval()
    return model, read_tokenizer(path, cfg), config
