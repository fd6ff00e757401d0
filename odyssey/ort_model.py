"""The model under ONNX Runtime: the transformer's blocks exported to ONNX with KV-cache inputs and
outputs, and run by ONNX Runtime where the torch blocks ran.

    export(model, "model.onnx")               # torch.onnx (the dynamo exporter); batch, tokens, cache dynamic
    model, tokenizer, config = load(model_dir, threads=1)   # a Transformer whose blocks run in ONNX Runtime

The graph is exactly `Transformer.hidden_states` (embedding lookup, every block, the final norm):

    inputs   input_ids (B, T) int64
             cos, sin  (B, 1, T, E/2) float32   rotary angles of each token's position
             mask      (B, 1, T, S) bool        which keys each query sees, S = P + T
             past_k, past_v (L, B, K, P, E)     the cache so far (P = 0: no cache)
    outputs  hidden    (B, T, D)
             new_k, new_v (L, B, K, T, E)       this call's keys and values, for the cache

Everything around it (padding, masks, positions, the KV cache, the tied output projection, sampling)
stays torch code: the inference engine's (odyssey/engine.py) and the model's own (odyssey/model.py), so
both backends share one engine and one embed, and differ only in who runs the blocks. The output
projection stays outside the graph because the callers want different rows of it: prefill and decode
the last position's, label scoring every position's, passage embedding none.

The graph cannot write into the engine's cache, so each call hands it the past of its rows (their
first P positions, P the furthest any row has come) and writes the keys and values it returns into the
cache afterwards (`_past`).

ONNX files are protobuf: loading one runs no code, like safetensors.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open

from odyssey.errors import OdysseyError
from odyssey.model import Transformer, rope_tables

INPUTS = ("input_ids", "cos", "sin", "mask", "past_k", "past_v")
OUTPUTS = ("hidden", "new_k", "new_v")
OPSET = 18


class _StepCache:
    """What Attention sees as its KV cache while the graph is traced: the past comes in as an input,
    this call's keys and values go out as outputs (the graph cannot write into a caller's buffer)."""

    def __init__(self, past_k: torch.Tensor, past_v: torch.Tensor):
        self.past_k, self.past_v = past_k, past_v
        self.new_k: list[torch.Tensor] = []
        self.new_v: list[torch.Tensor] = []

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.new_k.append(k)
        self.new_v.append(v)
        return torch.cat([self.past_k[layer], k], 2), torch.cat([self.past_v[layer], v], 2)


class _Step(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids, cos, sin, mask, past_k, past_v):
        cache = _StepCache(past_k, past_v)
        hidden = self.model.hidden_states(input_ids, cos, sin, mask, cache)
        return hidden, torch.stack(cache.new_k), torch.stack(cache.new_v)


QUANTIZE = (None, "int8")


def export(model: Transformer, path: str | Path, quantize: str | None = None) -> Path:
    """Write `model`'s blocks (float32) to an ONNX file at `path`; returns it.

    quantize="int8": ONNX Runtime's dynamic quantization of the result: the matmul weights stored as int8
    (per tensor), activations quantized on the fly for each call. About a quarter of the size and
    faster matmuls on CPU, at the price of small output differences (bench/onnx.py measures both)."""
    if quantize not in QUANTIZE:
        raise OdysseyError(f"quantize={quantize!r}; choose from {QUANTIZE}")
    path = Path(path)
    model = model.float().eval()
    cfg = model.cfg
    B, T, P = 2, 3, 2  # example shapes for tracing; every one of them is dynamic in the file
    positions = torch.arange(P, P + T).expand(B, T)
    cos, sin = model.rope_at(positions)
    past = torch.zeros(cfg.n_layer, B, cfg.kv_heads, P, cfg.head_dim)
    example = (
        torch.zeros(B, T, dtype=torch.long),
        cos,
        sin,
        torch.ones(B, 1, T, P + T, dtype=torch.bool),
        past,
        past.clone(),
    )
    batch, tokens, cached = torch.export.Dim("batch"), torch.export.Dim("tokens"), torch.export.Dim("past")
    keys = torch.export.Dim.AUTO  # P + T: the exporter derives it
    dynamic = (
        {0: batch, 1: tokens},
        {0: batch, 2: tokens},
        {0: batch, 2: tokens},
        {0: batch, 2: tokens, 3: keys},
        {1: batch, 3: cached},
        {1: batch, 3: cached},
    )
    big = sum(p.numel() for p in model.parameters()) * 4 > 1.5 * 2**30  # protobuf's 2 GiB limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on dimension names and deprecations
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
        program = torch.onnx.export(
            _Step(model),
            example,
            dynamo=True,
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    if quantize is None:
        program.save(str(path), external_data=big)
        return path
    from onnxruntime.quantization import QuantType, quantize_dynamic

    float_path = path.with_name(path.stem + ".float32.onnx")
    program.save(str(float_path), external_data=big)
    logging.disable(logging.WARNING)  # its advice, on the root logger, to pre-process image models
    try:
        quantize_dynamic(float_path, path, weight_type=QuantType.QInt8, use_external_data_format=big)
    finally:
        logging.disable(logging.NOTSET)
        float_path.unlink()
    return path


def _array(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().numpy()


class OrtTransformer(Transformer):
    """A Transformer whose `hidden_states` runs in an ONNX Runtime session. It holds the embedding (the tied
    output projection), the final norm and the rotary tables in torch; the blocks live in the graph."""

    def __init__(self, cfg, onnx_path: str | Path, threads: int = 1, n_params: int | None = None):
        with torch.device("meta"):  # shapes only: the blocks' torch weights are never allocated
            super().__init__(cfg)
        self.blocks = nn.ModuleList()
        self.to_empty(device="cpu")  # the embedding and norm, filled by `load`
        self.rope_cos, self.rope_sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.n_params = n_params
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # the CPUs the replica reserved, no more
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for a bad or truncated file
            raise OdysseyError(f"{onnx_path}: ONNX Runtime cannot load it ({e}); export it again") from None
        names = tuple(i.name for i in self.session.get_inputs())
        if names != INPUTS:
            raise OdysseyError(f"{onnx_path}: inputs {names}, expected {INPUTS}; export it again")

    @classmethod
    def from_files(cls, cfg, onnx_path: Path, weights_path: Path, threads: int = 1) -> OrtTransformer:
        """The graph of `onnx_path`, with the embedding, the final norm (and an untied lm_head) read from
        the safetensors file it was traced from (the blocks' weights there are never loaded)."""
        with safe_open(str(weights_path), framework="pt") as weights:
            n_params = sum(int(np.prod(weights.get_slice(k).get_shape())) for k in weights.keys())  # noqa: SIM118
            model = cls(cfg, onnx_path, threads, n_params)
            model.tok_emb.weight.data.copy_(weights.get_tensor("tok_emb.weight"))
            model.norm.weight.data.copy_(weights.get_tensor("norm.weight"))
            if model.lm_head is not None:  # an untied output projection
                model.lm_head.weight.data.copy_(weights.get_tensor("lm_head.weight"))
        return model.eval()

    def num_params(self) -> int:
        return self.n_params if self.n_params is not None else super().num_params()

    def hidden_states(self, ids, cos, sin, mask=None, cache=None):
        B, T = ids.shape
        cfg = self.cfg
        if cos.dim() == 2:  # positions shared by every row: (T, E/2) -> (B, 1, T, E/2)
            cos, sin = cos.expand(B, 1, T, -1), sin.expand(B, 1, T, -1)
        if cache is not None:  # the caller's mask is over the cache's positions; the graph's over past + new
            past_k, past_v, mask = _past(cache, T)
        else:
            if mask is None:  # a whole causal sequence (the training forward): spell the causal mask out
                mask = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
            mask = mask.expand(B, 1, T, mask.shape[-1])
            past_k = past_v = torch.zeros(cfg.n_layer, B, cfg.kv_heads, 0, cfg.head_dim)
        feed = dict(zip(INPUTS, map(_array, (ids, cos.float(), sin.float(), mask, past_k, past_v))))
        hidden, new_k, new_v = self.session.run(OUTPUTS, feed)
        if cache is not None:
            for layer in range(cfg.n_layer):
                cache.write(layer, torch.from_numpy(new_k[layer]), torch.from_numpy(new_v[layer]))
        return torch.from_numpy(hidden)


def _past(cache, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The graph's inputs for an engine's CacheView (odyssey/engine.py): the past keys and values of
    its rows (L, B, K, P, E), P = max(starts), and the mask (B, 1, T, P + T) over them followed by this
    call's T keys, as the graph concatenates them. Row b's own past is its first starts[b] positions;
    beyond them, up to P, lies what another sequence left there, which no query sees. A query sees this
    call's keys up to its own, so no mask row is empty (padding queries included: their output is
    never read)."""
    P = int(cache.starts.max())
    rows = cache.slice if cache.slice is not None else cache.rows  # a view when the rows are contiguous
    past_k, past_v = cache.pool.k[:, rows, :, :P], cache.pool.v[:, rows, :, :P]
    B = len(cache.rows)
    own = torch.arange(P)[None, :] < cache.starts[:, None]  # (B, P)
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
    mask = torch.cat([own[:, None, :].expand(B, T, P), causal.expand(B, T, T)], -1)
    return past_k, past_v, mask.unsqueeze(1)
