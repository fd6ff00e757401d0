"""The ONNX Runtime backend against the torch model it was exported from: the same logits, cache
contents, embeddings, label scores and greedy text, and clear errors for a missing or broken file."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from odyssey import artifact
from odyssey.errors import OdysseyError
from odyssey.model import Transformer, tiny

ATOL = 1e-4  # float32 both sides; ONNX Runtime fuses and reorders some sums


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    # Grouped-query attention and a short context: the paths most likely to differ after export.
    model = Transformer(replace(tiny(), vocab_size=320, n_kv_head=2, max_seq_len=64)).eval()
    path = artifact.save_model(tmp_path_factory.mktemp("onnx") / "m", model, None, onnx=True)
    onnx, _, _ = artifact.load(path, "onnxruntime")
    return model, onnx, path


def test_forward_and_cached_decoding_agree(pair):
    model, onnx, _ = pair
    ids = torch.randint(0, 320, (3, 40))
    torch.testing.assert_close(onnx(ids), model(ids), atol=ATOL, rtol=0)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100]]  # left padding of different widths
    logits_t, cache_t = model.prefill(prompts, 30)
    logits_o, cache_o = onnx.prefill(prompts, 30)
    for _ in range(12):
        torch.testing.assert_close(logits_o, logits_t, atol=ATOL, rtol=0)
        next_ids = logits_t.argmax(-1)
        logits_t, logits_o = model.decode(next_ids, cache_t), onnx.decode(next_ids, cache_o)
    assert cache_o.length == cache_t.length == 7 + 12
    torch.testing.assert_close(
        cache_o.k[:, :, :, : cache_o.length], cache_t.k[:, :, :, : cache_t.length], atol=ATOL, rtol=0
    )


def test_generation_embeddings_and_scores_agree(pair):
    model, onnx, _ = pair
    prompts = [[5, 6, 7, 8, 9], [3, 4], [42, 43, 44]]
    assert onnx.generate(prompts, 25, temperature=0.0) == model.generate(prompts, 25, temperature=0.0)
    torch.testing.assert_close(onnx.embed(prompts), model.embed(prompts), atol=ATOL, rtol=0)
    continuations = [[1, 2], [3], [7, 8, 9]]
    torch.testing.assert_close(
        onnx.score(prompts, continuations), model.score(prompts, continuations), atol=1e-3, rtol=0
    )
    assert onnx.num_params() == model.num_params()


def test_missing_or_broken_onnx_is_named(pair, tmp_path):
    model, _, path = pair
    plain = artifact.save_model(tmp_path / "plain", model, None)
    with pytest.raises(
        OdysseyError, match=r"no model.onnx: export it with `odyssey export \.\.\. --format onnx`"
    ):
        artifact.load(plain, "onnxruntime")
    (plain / artifact.ONNX).write_bytes((path / artifact.ONNX).read_bytes()[:5000])  # truncated
    with pytest.raises(OdysseyError, match="ONNX Runtime cannot load it"):
        artifact.load(plain, "onnxruntime")
    with pytest.raises(OdysseyError, match=r"backend 'onnx': use one of torch, onnxruntime"):
        artifact.load(path, "onnx")


def test_int8_export_is_smaller_and_stays_close(pair, tmp_path):
    model, onnx, path = pair
    q = artifact.save_model(tmp_path / "int8", model, None, onnx=True, onnx_quantize="int8")
    assert artifact.read_config(q)["onnx"] == {"quantize": "int8"}
    assert (q / artifact.ONNX).stat().st_size < 0.6 * (path / artifact.ONNX).stat().st_size
    int8, _, _ = artifact.load(q, "onnxruntime")
    ids = torch.randint(0, 320, (2, 24))
    logits, reference = int8(ids), model(ids)
    assert not torch.equal(logits, onnx(ids))  # quantized: not the float graph
    torch.testing.assert_close(logits, reference, atol=0.05 * reference.abs().max().item(), rtol=0)
    prompts = [[5, 6, 7], [9]]
    cosine = (int8.embed(prompts) * model.embed(prompts)).sum(-1)
    assert (cosine > 0.99).all()


def test_the_backend_replaces_only_the_models_public_seam():
    """OrtTransformer swaps `hidden_states` (the blocks) and nothing private of the torch model, so a
    change inside odyssey/model.py cannot silently bypass the ONNX backend."""
    from odyssey.ort_model import OrtTransformer

    overridden = {n for n in vars(OrtTransformer) if hasattr(Transformer, n) and not n.startswith("__")}
    assert overridden == {"hidden_states", "num_params"}
