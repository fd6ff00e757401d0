"""The transformer: causality, the inference engine's KV cache through it, embeddings, sampling,
parameters, saving. (Batching, scoring and stopping: tests/test_engine.py.)"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from odyssey import artifact
from odyssey.engine import Engine, GenerationParams, generate
from odyssey.errors import ConfigError, OdysseyError
from odyssey.model import PRESETS, ModelConfig, Transformer, pad_vocab, sample

CFG = ModelConfig(vocab_size=256, d_model=64, n_layer=2, n_head=4, max_seq_len=64)


def make(cfg: ModelConfig = CFG, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def random_ids(*shape, vocab=CFG.vocab_size, seed=1):
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_future_tokens_never_change_past_logits():
    model = make()
    ids = random_ids(2, 32)
    changed = ids.clone()
    changed[:, 20:] = random_ids(2, 12, seed=7)
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])  # the change is visible from position 20 on


@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_the_engines_cached_greedy_decoding_matches_the_full_forward(n_kv_head, tokenizer):
    """The engine's KV cache (odyssey/engine.py) through `hidden_states`, grouped-query attention too:
    greedy tokens equal the training forward's argmax over the whole sequence, token after token."""
    model = make(replace(CFG, n_kv_head=n_kv_head))
    prompt = random_ids(8).tolist()
    (out,) = generate(model, tokenizer, [prompt], GenerationParams(max_tokens=16, temperature=0.0))
    assert out.completion_tokens == 16
    with torch.no_grad():
        full = model(torch.tensor([prompt + out.token_ids]))[0]  # (T, V): position t predicts token t + 1
    assert out.token_ids == full[len(prompt) - 1 : -1].argmax(-1).tolist()


def test_the_engine_refuses_a_prompt_that_leaves_no_room(tokenizer):
    engine = Engine(make(), tokenizer)
    with pytest.raises(ValueError, match="exceed the model's context of 64"):
        engine.add([1] * 64, GenerationParams(max_tokens=1))
    with pytest.raises(ValueError, match="exceed the model's context of 64"):
        engine.add_score([1] * 62, [[5], [6, 7, 8]])
    engine.add([1] * 63, GenerationParams(max_tokens=10))  # one token of room: max_tokens is capped to it


def test_sampling_controls():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    assert sample(logits, temperature=0).item() == 2
    gen = torch.Generator().manual_seed(0)
    draws = {sample(logits, 1.0, top_k=2, generator=gen).item() for _ in range(200)}
    assert draws == {2, 3}  # only the two best tokens
    draws = {sample(logits, 1.0, top_p=0.5, generator=gen).item() for _ in range(200)}
    assert draws == {2}  # token 2 alone holds > 50% of the mass
    seeded = [sample(logits, 1.0, generator=torch.Generator().manual_seed(3)).item() for _ in range(2)]
    assert seeded[0] == seeded[1]
    # Any temperature > 0 a request may carry samples, the tiniest included (found by the fuzz suite:
    # 5e-324 was 0 in float32, and the softmax NaN).
    for tiny_t in (5e-324, 1e-300, 1e-40):
        assert sample(logits, tiny_t, generator=gen).item() == 2
        assert sample(logits, tiny_t, top_p=5e-324, generator=gen).item() == 2


def test_embed_gives_unit_vectors_whatever_the_padding():
    model = make()
    a, b = random_ids(6, seed=8).tolist(), random_ids(15, seed=9).tolist()
    emb = model.embed([a, b])
    assert emb.shape == (2, CFG.d_model)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(model.embed([a])[0], emb[0], atol=1e-5, rtol=1e-5)  # padding-invariant


def test_state_dict_keys_are_pinned():
    """Training, export and serving agree on these names; a rename must be deliberate."""
    keys = list(make(replace(CFG, n_layer=1)).state_dict())
    assert keys == [
        "tok_emb.weight",
        "blocks.0.attn_norm.weight",
        "blocks.0.attn.wq.weight",
        "blocks.0.attn.wk.weight",
        "blocks.0.attn.wv.weight",
        "blocks.0.attn.wo.weight",
        "blocks.0.ffn_norm.weight",
        "blocks.0.ffn.w1.weight",
        "blocks.0.ffn.w3.weight",
        "blocks.0.ffn.w2.weight",
        "norm.weight",
    ]


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=512, max_seq_len=64)).train()
    ids = random_ids(4, 33, vocab=512, seed=11)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = model(ids[:, :-1], ids[:, 1:])
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 5.5  # about ln(512): chance level
    assert loss.item() < 0.1


def test_loss_mask_selects_positions():
    model = make()
    ids = random_ids(2, 17)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 10:] = True
    per_token = torch.nn.functional.cross_entropy(
        model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten(), reduction="none"
    ).view(2, 16)
    torch.testing.assert_close(model(ids[:, :-1], ids[:, 1:], mask), per_token[:, 10:].mean())


def test_safetensors_round_trip(tmp_path, tokenizer):
    model = make(replace(CFG, vocab_size=pad_vocab(tokenizer.vocab_size)))
    path = artifact.save_model(tmp_path / "m", model, tokenizer, metadata={"step": 7})
    loaded, tok, config = artifact.load(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert loaded.cfg == model.cfg and config["step"] == 7
    assert tok.fingerprint == tokenizer.fingerprint
    ids = random_ids(1, 10)
    torch.testing.assert_close(loaded(ids), model(ids))
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_loading_refuses_a_mismatched_checkpoint(tmp_path):
    path = artifact.save_model(tmp_path / "m", make())
    config = json.loads((path / "config.json").read_text())
    config["model"]["n_layer"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(OdysseyError, match="does not fit its config"):
        artifact.load(path)
    with pytest.raises(OdysseyError, match="not an exported model"):
        artifact.load(tmp_path)


def test_presets_and_flops():
    assert set(PRESETS) == {"tiny", "small", "gpt-125m", "gpt-350m", "gpt-1.3b"}
    with torch.device("meta"):
        sizes = {name: Transformer(recipe()).num_params() for name, recipe in PRESETS.items()}
    assert 15e6 < sizes["small"] < 25e6
    assert (
        110e6 < sizes["gpt-125m"] < 140e6
        and 300e6 < sizes["gpt-350m"] < 400e6
        and 1.2e9 < sizes["gpt-1.3b"] < 1.4e9
    )
    model = make()
    n_matmul = sum(p.numel() for p in model.parameters() if p.ndim == 2)
    assert model.flops_per_token(64) == 6 * n_matmul + 12 * CFG.n_layer * CFG.d_model * 64


def test_an_untied_output_head_projects_trains_and_counts_like_an_embedding():
    """tie_embeddings=False (Hugging Face checkpoints may have it): lm_head is the output projection, in
    the embedding's optimizer group, and the input embedding, a lookup only, no longer counts as a matmul."""
    untied = make(replace(CFG, n_layer=1, tie_embeddings=False))
    assert list(untied.state_dict())[:2] == ["tok_emb.weight", "lm_head.weight"]
    ids = random_ids(1, 8)
    h = untied.hidden_states(ids, untied.rope_cos[:8], untied.rope_sin[:8])
    torch.testing.assert_close(untied(ids), h @ untied.lm_head.weight.T)
    embed_group = untied.param_groups(0.1)[1]["params"]
    assert any(p is untied.lm_head.weight for p in embed_group) and len(embed_group) == 2
    n_matmul = sum(p.numel() for p in untied.parameters() if p.ndim == 2) - untied.tok_emb.weight.numel()
    assert untied.flops_per_token(64) == 6 * n_matmul + 12 * CFG.d_model * 64
    tied = make(replace(CFG, n_layer=1))
    assert tied.lm_head is None and untied.num_params() == tied.num_params() + CFG.vocab_size * CFG.d_model


def test_config_errors_say_the_fix():
    with pytest.raises(ConfigError, match=r"d_model=100 is not divisible by n_head=3"):
        ModelConfig(d_model=100, n_head=3)
    with pytest.raises(ConfigError, match="n_kv_head=3 must divide n_head=4"):
        ModelConfig(n_kv_head=3)
    with pytest.raises(ConfigError, match="unknown model preset 'gpt-2'"):
        ModelConfig.from_preset("gpt-2")


def test_mup_parametrization_scales_by_the_width_multiplier():
    """µP (Tensor Programs V, Table 3, as the mup package's MuReadout and MuAdam): hidden matrices start
    at init_std / sqrt(m) and take lr / m; the embedding and the readout start at init_std and take the
    full lr; the readout's logits are divided by m; attention scores by the head width, not its root."""
    wide = replace(CFG, d_model=256, n_head=16, mup=True, mup_base_width=64, tie_embeddings=False)  # m = 4
    model = make(wide)
    groups = {g["lr_scale"]: g for g in model.param_groups(weight_decay=0.1)}
    assert sorted(groups) == [0.25, 1.0]
    hidden = groups[0.25]
    assert {id(p) for p in hidden["params"]} == {
        id(p)
        for n, p in model.named_parameters()
        if p.ndim == 2 and n not in ("tok_emb.weight", "lm_head.weight")
    }
    assert hidden["weight_decay"] == 0.1
    readout = next(g for g in model.param_groups(0.1) if any(p is model.lm_head.weight for p in g["params"]))
    assert readout["lr_scale"] == 1.0 and readout["weight_decay"] == 0.0
    std = {n: p.std().item() for n, p in model.named_parameters()}
    assert std["blocks.0.attn.wq.weight"] == pytest.approx(CFG.init_std / 2, rel=0.05)  # / sqrt(m)
    assert std["blocks.0.ffn.w2.weight"] == pytest.approx(CFG.init_std / 2 / 2, rel=0.05)  # and / sqrt(2 L)
    assert std["lm_head.weight"] == pytest.approx(CFG.init_std, rel=0.05)
    assert std["tok_emb.weight"] == pytest.approx(CFG.init_std, rel=0.05)
    h = torch.randn(2, 3, 256)
    assert torch.allclose(
        model.logits(h), h @ model.lm_head.weight.T / 4, atol=1e-6
    )  # the readout multiplier
    assert model.blocks[0].attn.scale == 1 / 16
    sp = make(replace(wide, mup=False))
    assert {g["lr_scale"] for g in sp.param_groups(0.1)} == {1.0} and sp.blocks[0].attn.scale == 0.25
    assert torch.allclose(sp.logits(h), h @ sp.lm_head.weight.T, atol=1e-6)
    with pytest.raises(
        ConfigError, match="mup: true needs its own readout matrix: set tie_embeddings: false"
    ):
        replace(wide, tie_embeddings=True)
