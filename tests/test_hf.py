"""Hugging Face's format, out and in (odyssey/hf.py), checked against `transformers` itself (no downloads):
our export loads in AutoModelForCausalLM/AutoTokenizer with our logits, greedy tokens, token ids and
chat prompts; a LlamaForCausalLM checkpoint loads into our model with its logits, serves through
artifact.load, trains under ZeRO-2 from `init.from` and exports back; what cannot convert is refused,
naming why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from odyssey import artifact, chat, hf
from odyssey.config import load_config
from odyssey.data.corpus import texts
from odyssey.engine import GenerationParams, generate
from odyssey.errors import ConfigError, OdysseyError
from odyssey.model import Transformer, pad_vocab, tiny
from odyssey.tokenizer import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is a local directory
import transformers  # after HF_HUB_OFFLINE: it reads the variable on import

VARIANTS = {  # ModelConfig changes: tied with grouped-query attention; untied; µP (folded on export)
    "tied-gqa": {"n_kv_head": 2},
    "untied": {"tie_embeddings": False},
    "mup": {"mup": True, "mup_base_width": 32, "tie_embeddings": False},  # width multiplier 4
}


def ours(tokenizer, seed: int = 0, **changes) -> Transformer:
    # init_std 0.1: logits far enough apart that greedy decoding has no near-ties to break differently
    cfg = replace(tiny(), vocab_size=pad_vocab(tokenizer.vocab_size), init_std=0.1, **changes)
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def prompts(tokenizer, corpus_dir, n: int = 4, length: int = 24) -> list[list[int]]:
    """The first `length` ids of the lm prompts of n corpus texts (each at least that long)."""
    out = []
    for text in texts(corpus_dir, "train"):
        ids = tokenizer.prompt("lm", text)
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            return out
    raise AssertionError("the corpus has too few long texts")


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def auto_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# --- out -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_export_gives_our_logits_and_greedy_tokens_in_transformers(
    variant, tokenizer, corpus_dir, tmp_path
):
    model = ours(tokenizer, **VARIANTS[variant])
    path = hf.save_pretrained(model, tokenizer, tmp_path / "hf")
    theirs = auto_model(path)
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] == (variant == "tied-gqa")  # µP's lm_head is tok_emb / m
    assert ("lm_head.weight" in hf.hf_state_dict(model)) == (variant != "tied-gqa")

    batch = torch.tensor(prompts(tokenizer, corpus_dir))
    torch.testing.assert_close(logits_of(theirs, batch), logits_of(model, batch), atol=1e-4, rtol=0)

    for prompt in prompts(tokenizer, corpus_dir, n=3, length=12):
        (mine,) = generate(model, tokenizer, [prompt], GenerationParams(max_tokens=32, temperature=0.0))
        made = theirs.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32)[0, len(prompt) :]
        expected = mine.token_ids + ([tokenizer.eos_id] if mine.finish_reason == "stop" else [])
        assert made.tolist() == expected


def test_the_exported_tokenizer_gives_our_ids_with_bos_when_asked(tokenizer, corpus_dir, tmp_path):
    path = hf.save_pretrained(ours(tokenizer), tokenizer, tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    sample = [t for t in list(texts(corpus_dir, "train"))[:300] if "<|" not in t]  # see odyssey/chat.py
    assert len(sample) > 250
    for text in sample:
        ids = tokenizer.encode(text)
        assert theirs(text, add_special_tokens=False).input_ids == ids
        assert theirs(text).input_ids == [tokenizer.bos_id, *ids]
        assert theirs.decode(ids) == tokenizer.decode(ids)


@pytest.mark.parametrize("task", ["lm", "code", "summarize"])
def test_apply_chat_template_renders_our_prompt(task, tokenizer, tmp_path):
    path = hf.save_pretrained(ours(tokenizer), tokenizer, tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "def add(a, b):\n    return a + b"},
        {"role": "assistant", "content": "It adds."},
        {"role": "user", "content": "And in one line?"},
    ]
    kwargs = {} if task == "lm" else {"task": task}
    rendered = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    assert rendered == chat.render(messages, task)
    ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kwargs)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == chat.chat_ids(tokenizer, messages, task)


# --- in --------------------------------------------------------------------------------------------


def llama_checkpoint(out: Path, tokenizer: Tokenizer, tied: bool, seed: int = 0, shard: bool = False) -> Path:
    """A LlamaForCausalLM of random weights, saved by transformers, with our tokenizer files beside it."""
    config = transformers.LlamaConfig(
        vocab_size=pad_vocab(tokenizer.vocab_size),
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(out, **({"max_shard_size": "200KB"} if shard else {}))
    (out / "tokenizer.json").write_text(hf.hf_tokenizer_json(tokenizer))
    for name, content in hf.tokenizer_files(tokenizer, 256).items():
        (out / name).write_text(json.dumps(content))
    return out


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied-sharded"])
def test_a_llama_checkpoint_loads_with_its_logits(tied, tokenizer, corpus_dir, tmp_path):
    path = llama_checkpoint(tmp_path / "llama", tokenizer, tied, shard=not tied)
    assert (path / "model.safetensors.index.json").is_file() != tied
    model, tok, config = hf.load_pretrained(path)
    assert model.cfg.tie_embeddings == tied and model.cfg.n_kv_head == 2 and model.cfg.rope_theta == 5000.0
    assert tok.encode("some text") == tokenizer.encode("some text") and config["model_type"] == "llama"
    batch = torch.tensor(prompts(tokenizer, corpus_dir))
    torch.testing.assert_close(logits_of(model, batch), logits_of(auto_model(path), batch), atol=1e-4, rtol=0)
    # Serving's way in: artifact.load (torch), the model's id over its weights; ONNX Runtime is refused.
    served, _, _ = artifact.load(path)
    torch.testing.assert_close(logits_of(served, batch), logits_of(model, batch))
    assert artifact.model_id(path).startswith("llama@")
    with pytest.raises(OdysseyError, match="--format onnx"):
        artifact.load(path, backend="onnxruntime")


def test_a_tokenizer_without_our_control_tokens_gets_them_and_the_embedding_grows(tmp_path, caplog):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    plain = HFTokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    plain.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    n = plain.get_vocab_size()
    config = transformers.LlamaConfig(
        vocab_size=n, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4
    )
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(config).eval()
    theirs.save_pretrained(tmp_path / "llama")
    plain.save(str(tmp_path / "llama" / "tokenizer.json"))

    with caplog.at_level("INFO", logger="odyssey.hf"):
        model, tok, _ = hf.load_pretrained(tmp_path / "llama")
    assert (
        "added control tokens" in caplog.text and f"grown from {n} to {pad_vocab(n + 8)} rows" in caplog.text
    )
    assert (tok.pad_id, tok.bos_id, tok.vocab_size) == (n, n + 1, n + 8)  # appended in our order
    assert model.cfg.vocab_size == pad_vocab(n + 8)
    emb = model.tok_emb.weight
    old = theirs.model.embed_tokens.weight
    torch.testing.assert_close(emb[n:], old.mean(0).expand(len(emb) - n, -1))
    ids = torch.tensor([tok.encode("the lazy dog jumps")])
    torch.testing.assert_close(logits_of(model, ids)[..., :n], logits_of(theirs, ids), atol=1e-4, rtol=0)


# --- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("attention_bias", True, "attention_bias=True"),
        ("mlp_bias", True, "mlp_bias=True"),
        ("hidden_act", "gelu", "hidden_act='gelu'"),
        ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "rope_scaling="),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4}, "rope_parameters.rope_type='yarn'"),
        ("sliding_window", 4096, "sliding_window=4096"),
        ("head_dim", 32, "head_dim=32 but hidden_size / num_attention_heads = 16"),
        ("model_type", "gpt2", "model_type 'gpt2'"),
    ],
)
def test_what_our_model_cannot_represent_is_refused_naming_the_field(field, value, says, tmp_path):
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": 320,
        field: value,
    }
    assert says in hf.unsupported(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(OdysseyError, match="config.json: " + says.split("=")[0].split(" ")[0]):
        hf.load_pretrained(tmp_path)


def test_pickled_weights_are_refused_and_sharded_paths_stay_inside(tmp_path):
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4, "vocab_size": 64}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(OdysseyError, match=r"only pytorch_model\.bin, a pickle, which can run any code"):
        hf.load_pretrained(tmp_path)
    index = {"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(OdysseyError, match=r"names shards .* not files beside it"):
        hf.load_pretrained(tmp_path)


def test_check_exportable_refuses_what_llama_cannot_express(tokenizer, exported_models):
    model = ours(tokenizer)
    hf.check_exportable(model, tokenizer)  # µP folds: no refusal for it (test above)
    model.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(OdysseyError, match=r"tensors \['extra'\] have no counterpart in LlamaForCausalLM"):
        hf.check_exportable(model, tokenizer)
    small = Transformer(replace(tiny(), vocab_size=64))
    with pytest.raises(OdysseyError, match="only 64 embedding rows"):
        hf.check_exportable(small, tokenizer)
    onnx_model, _, _ = artifact.load(exported_models[0], backend="onnxruntime")
    with pytest.raises(OdysseyError, match="load the model with backend torch"):
        hf.check_exportable(onnx_model, tokenizer)


# --- training from a Hugging Face checkpoint ----------------------------------------------------------


def train_config(corpus_dir, storage, init, *extra):
    from train.config import TrainConfig, recipe_path

    settings = [
        "name=from-hf",
        f"storage={storage}",
        f"data.corpus={corpus_dir}",
        "data.prepare=true",
        f"init.from={init}",
        "steps=5",
        "log_every=1",
        "eval_every=5",
        "checkpoint_every=5",
        *extra,
    ]
    return load_config(TrainConfig, recipe_path("tiny-cpu"), settings)


def test_init_from_refuses_a_bad_path_and_shape_fields(tokenizer, tmp_path):
    from train import launch

    with pytest.raises(ConfigError, match=r"init: from=.*nowhere.*no such directory"):
        train_config(tmp_path, tmp_path, tmp_path / "nowhere")
    path = llama_checkpoint(tmp_path / "llama", tokenizer, tied=True)
    with pytest.raises(ConfigError, match=r"sets model\.d_model, model\.n_layer: remove them"):
        launch.from_pretrained(train_config(tmp_path, tmp_path, path, "model.d_model=64", "model.n_layer=4"))
    cfg = launch.from_pretrained(train_config(tmp_path, tmp_path, path))
    assert (cfg.model.d_model, cfg.model.n_layer, cfg.model.kv_heads, cfg.model.ffn_dim) == (64, 2, 2, 160)
    assert Tokenizer.load(cfg.data.tokenizer).fingerprint == hf.pretrained_config(path)[1].fingerprint
    assert Path(cfg.data.blocks_dir).name == f"blocks-128-{Path(cfg.data.tokenizer).stem}"


def test_a_run_from_a_llama_checkpoint_trains_and_exports_back(ray_cluster, tokenizer, corpus_dir, tmp_path):
    """5 steps under ZeRO-2 on 2 workers from init.from, packed with the checkpoint's tokenizer; the run's
    checkpoint exported with `odyssey export --format hf` loads in transformers with our logits."""
    from train import checkpoint, launch
    from train.export import export

    init = llama_checkpoint(tmp_path / "llama", tokenizer, tied=False)
    summary = launch.run(train_config(corpus_dir, tmp_path / "runs", init))
    assert summary["steps"] == 5
    ckpt = Path(summary["checkpoint"])
    meta = checkpoint.read_meta(ckpt)
    assert meta["model"]["tie_embeddings"] is False and meta["model"]["d_model"] == 64
    run_tokenizer = Tokenizer.load(ckpt / "tokenizer.json")
    blocks = Path(meta["train"]["data"]["blocks"])
    assert json.loads((blocks / "manifest.json").read_text())["tokenizer_sha256"] == run_tokenizer.fingerprint

    cli = subprocess.run(
        [sys.executable, "-m", "workflows", "export", str(ckpt.parent), "--out", str(tmp_path / "hf"),
         "--format", "hf"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    trained, _, _ = artifact.load(export(ckpt, tmp_path / "ours"))
    batch = torch.tensor(prompts(run_tokenizer, corpus_dir))
    torch.testing.assert_close(
        logits_of(auto_model(tmp_path / "hf"), batch), logits_of(trained, batch), atol=1e-4, rtol=0
    )
    start, _, _ = hf.load_pretrained(init)  # trained from the checkpoint's weights, a little
    for name in ("blocks.0.attn.wq.weight", "lm_head.weight"):
        before, after = start.state_dict()[name], trained.state_dict()[name]
        assert not torch.equal(before, after)
        assert torch.cosine_similarity(before.flatten(), after.flatten(), dim=0) > 0.9, name

    bad = shutil.copytree(init, tmp_path / "biased")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    cli = subprocess.run(
        [sys.executable, "-m", "workflows", "export", str(bad), "--out", str(tmp_path / "x"), "--format", "hf"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 2 and "attention_bias=True" in cli.stderr and "Traceback" not in cli.stderr
