"""The ONNX Runtime backend against the torch model it was exported from, both driven by the inference
engine: the same logits, cache contents, embeddings, label scores and greedy text, and clear errors
for a missing or broken file."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from odyssey import artifact
from odyssey.engine import Engine, EngineConfig, GenerationParams
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


def test_forward_and_the_engines_cache_agree(pair, tokenizer):
    model, onnx, _ = pair
    ids = torch.randint(0, 320, (3, 40))
    torch.testing.assert_close(onnx(ids), model(ids), atol=ATOL, rtol=0)
    # Prompts of different lengths, prefilled 4 tokens a step beside rows already decoding, the last
    # in the row the first leaves: forwards mix rows at different positions over rows used before.
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100], [7, 8, 9, 10, 11]]
    greedy = GenerationParams(max_tokens=6, temperature=0.0)
    engines = [
        Engine(m, tokenizer, EngineConfig(max_num_seqs=3, max_num_batched_tokens=4)) for m in (model, onnx)
    ]
    for engine in engines:
        for p in prompts:
            engine.add(p, greedy)
        while engine.has_work:
            engine.step()
    torch_pool, onnx_pool = (e.pool for e in engines)
    torch.testing.assert_close(onnx_pool.k, torch_pool.k, atol=ATOL, rtol=0)
    torch.testing.assert_close(onnx_pool.v, torch_pool.v, atol=ATOL, rtol=0)


def through_the_engine(model, tokenizer, prompts, continuations):
    """Greedy tokens, label scores and embeddings of `prompts`, all asked of one engine at once."""
    engine = Engine(model, tokenizer)
    seqs = [engine.add(p, GenerationParams(max_tokens=25, temperature=0.0)) for p in prompts]
    scored = [engine.add_score(p, continuations) for p in prompts]
    embedded = engine.add_embed(prompts)
    results = {}
    while engine.has_work:
        results.update((e.request.id, e.result) for e in engine.step())
    scores = torch.tensor([results[r.id] for r in scored])
    return [s.stream.ids for s in seqs], scores, torch.from_numpy(results[embedded.id])


def test_generation_embeddings_and_scores_agree(pair, tokenizer):
    model, onnx, _ = pair
    prompts = [[5, 6, 7, 8, 9], [3, 4], [42, 43, 44]]
    continuations = [[1, 2], [3], [7, 8, 9]]
    tokens_t, scores_t, embeddings_t = through_the_engine(model, tokenizer, prompts, continuations)
    tokens_o, scores_o, embeddings_o = through_the_engine(onnx, tokenizer, prompts, continuations)
    assert tokens_o == tokens_t
    torch.testing.assert_close(scores_o, scores_t, atol=1e-3, rtol=0)
    torch.testing.assert_close(embeddings_o, embeddings_t, atol=ATOL, rtol=0)
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
