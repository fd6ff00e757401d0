"""Hugging Face's format, out and in: the Llama layout that `transformers`, vLLM and lm-eval load.

Our model is a Llama: RMSNorm, rotary embeddings that rotate pairs (x[i], x[i + E/2]), SwiGLU,
grouped-query attention, no biases. Converting is renaming tensors and config fields:

    ours                          Hugging Face (LlamaForCausalLM)
    tok_emb                       model.embed_tokens
    blocks.N.attn_norm            model.layers.N.input_layernorm
    blocks.N.attn.wq|wk|wv|wo     model.layers.N.self_attn.q_proj|k_proj|v_proj|o_proj
    blocks.N.ffn_norm             model.layers.N.post_attention_layernorm
    blocks.N.ffn.w1|w3|w2         model.layers.N.mlp.gate_proj|up_proj|down_proj
    norm                          model.norm
    lm_head (untied; see below)   lm_head

µP folds into the weights, exactly: its attention scale 1/E (Llama's is 1/sqrt(E)) into q_proj, times
1/sqrt(E) (RoPE is linear, so scaling q before or after it is the same), and its logits' 1/m into
lm_head (a µP model's readout is always its own matrix).

`save_pretrained` writes what `AutoModelForCausalLM` and `AutoTokenizer.from_pretrained` load: the
weights (safetensors only), config.json, generation_config.json, and our tokenizer with a post-processor
that prepends <|bos|> (as Llama's do: `add_special_tokens=False` gives our ids exactly) and the chat
template of odyssey/chat.py. `load_pretrained` reads a Llama-family checkpoint back into our model and
tokenizer, and refuses, naming the field, what our model cannot represent.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as HFTokenizer

from odyssey import atomic
from odyssey.chat import CHAT_TEMPLATE
from odyssey.errors import ConfigError, OdysseyError
from odyssey.model import ModelConfig, Transformer, pad_vocab
from odyssey.tasks import BOS, EOS, PAD, SPECIAL_TOKENS
from odyssey.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CONFIG, TOKENIZER = "config.json", "tokenizer.json"
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"  # one file, or shards and their index
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "consolidated.00.pth")
MODEL_TYPES = ("llama", "mistral")  # mistral: the same layout, when it has no sliding window
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


# ---------------------------------------------------------------------------------------------------
# Tensor names


def tensor_names(n_layer: int) -> dict[str, str]:
    """Our state-dict key -> its Hugging Face name, for every tensor a model of n_layer blocks has."""
    names = {
        "tok_emb.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    per_block = {
        "attn_norm": "input_layernorm",
        "attn.wq": "self_attn.q_proj",
        "attn.wk": "self_attn.k_proj",
        "attn.wv": "self_attn.v_proj",
        "attn.wo": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn.w1": "mlp.gate_proj",
        "ffn.w3": "mlp.up_proj",
        "ffn.w2": "mlp.down_proj",
    }
    for i in range(n_layer):
        for ours, theirs in per_block.items():
            names[f"blocks.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


# ---------------------------------------------------------------------------------------------------
# Out: save_pretrained


def check_exportable(model: Transformer, tokenizer: Tokenizer) -> None:
    """Refuse, saying why and what to do, a model that LlamaForCausalLM cannot express. (µP is no
    reason: it folds into the weights, see the module docstring.)"""
    if type(model) is not Transformer:
        raise OdysseyError(
            f"{type(model).__name__} runs its blocks outside torch (their weights are not in it): load the "
            "model with backend torch to export it to Hugging Face's format"
        )
    unknown = sorted(set(model.state_dict()) - set(tensor_names(model.cfg.n_layer)))
    if unknown:
        raise OdysseyError(
            f"tensors {unknown[:5]} have no counterpart in LlamaForCausalLM: teach odyssey/hf.py's "
            "tensor_names where they go, or export with --format safetensors (the Odyssey format)"
        )
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise OdysseyError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.cfg.vocab_size} "
            "embedding rows: export the model with the tokenizer it was trained with"
        )


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under their Hugging Face names, µP folded in, in the model's dtype."""
    cfg = model.cfg
    dtype = model.tok_emb.weight.dtype
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    if cfg.mup:  # folded in float32, then back to the model's dtype
        for i in range(cfg.n_layer):
            q = f"blocks.{i}.attn.wq.weight"
            state[q] = state[q] / math.sqrt(cfg.head_dim)  # x 1/sqrt(E) here x 1/sqrt(E) there = 1/E
        state["lm_head.weight"] = state["lm_head.weight"] / cfg.width_mult  # µP is untied (model.py)
    names = tensor_names(cfg.n_layer)
    return {names[k]: v.to(dtype).contiguous() for k, v in state.items()}


def hf_config(model: Transformer, tokenizer: Tokenizer) -> dict:
    """config.json of LlamaForCausalLM. rope_theta is written twice: top-level (transformers 4, vLLM) and
    in rope_parameters (transformers 5); torch_dtype is the name both read."""
    cfg = model.cfg
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,  # never under µP: its readout is its own matrix
        "initializer_range": cfg.init_std,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": str(model.tok_emb.weight.dtype).removeprefix("torch."),
        "use_cache": True,
    }


def hf_tokenizer_json(tokenizer: Tokenizer) -> str:
    """Our tokenizer.json, with a post-processor that prepends <|bos|> when a caller asks for special
    tokens (Llama's tokenizers do the same); without them it gives exactly our ids."""
    hf = HFTokenizer.from_str(tokenizer.to_json())
    hf.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.bos_id)]
    )
    return hf.to_str()


def tokenizer_files(tokenizer: Tokenizer, max_len: int) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json: which tokens are bos, eos and pad, and the
    chat template (odyssey/chat.py) that `apply_chat_template` renders."""
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    others = [t for t in SPECIAL_TOKENS if t not in special.values()]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "additional_special_tokens": others,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    return {
        "tokenizer_config.json": config,
        "special_tokens_map.json": {**special, "additional_special_tokens": others},
    }


def save_pretrained(
    model: Transformer, tokenizer: Tokenizer, out: str | Path, overwrite: bool = False
) -> Path:
    """Write `out` for `transformers`' from_pretrained (model and tokenizer), complete or not at all."""
    check_exportable(model, tokenizer)
    out = Path(out)
    config = hf_config(model, tokenizer)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    with atomic.staged_dir(out, overwrite=overwrite) as stage:
        save_file(hf_state_dict(model), str(stage / WEIGHTS), metadata={"format": "pt"})
        atomic.write_text(stage / CONFIG, json.dumps(config, indent=2) + "\n")
        atomic.write_text(stage / "generation_config.json", json.dumps(generation, indent=2) + "\n")
        atomic.write_text(stage / TOKENIZER, hf_tokenizer_json(tokenizer))
        for name, content in tokenizer_files(tokenizer, model.cfg.max_seq_len).items():
            atomic.write_text(stage / name, json.dumps(content, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------------
# In: load_pretrained


def load_pretrained(path: str | Path) -> tuple[Transformer, Tokenizer, dict]:
    """A Llama-family Hugging Face checkpoint directory -> (our model, float32, in eval mode; its
    tokenizer, with our control tokens added when it lacks them; its config.json)."""
    path = Path(path)
    config = check_pretrained(path)
    cfg, tokenizer, added = pretrained_config(path)
    state = read_weights(path, cfg)
    if added:
        state = grow_embeddings(state, cfg.vocab_size, first=tokenizer.hf.token_to_id(added[0]))
    model = Transformer(cfg)
    try:
        missing, _ = model.load_state_dict(state, strict=False)  # read_weights left nothing unexpected
    except RuntimeError as e:  # a tensor of another shape than config.json says
        raise OdysseyError(f"{path}: the weights do not fit its {CONFIG}: {e}") from None
    if missing:
        raise OdysseyError(f"{path}: the weights do not fit its {CONFIG}: missing {missing[:5]}")
    return model.eval(), tokenizer, config


def is_hf_dir(path: str | Path) -> bool:
    """Whether `path` looks like a Hugging Face model directory (config.json with a model_type), as
    opposed to ours (config.json with a format)."""
    config = Path(path) / CONFIG
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return isinstance(data, dict) and "model_type" in data and "format" not in data


def read_config(path: str | Path) -> dict:
    """A Hugging Face checkpoint's config.json, once `model_config` accepts it."""
    path = Path(path)
    if not is_hf_dir(path):
        what = "no such directory" if not path.is_dir() else f"no {CONFIG} with a model_type"
        raise OdysseyError(f"{path} is not a Hugging Face model directory ({what})")
    config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    model_config(config, path / CONFIG)
    return config


def check_pretrained(path: str | Path) -> dict:
    """What load_pretrained would refuse, without reading the weights: the config (see model_config),
    the weight files (safetensors only) and tokenizer.json. Returns config.json's contents."""
    config = read_config(path)
    weight_files(path)
    if not (Path(path) / TOKENIZER).is_file():
        raise OdysseyError(
            f"{path} has no {TOKENIZER}: write one with transformers' "
            "AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
        )
    return config


def pretrained_config(path: str | Path) -> tuple[ModelConfig, Tokenizer, list[str]]:
    """The model config and tokenizer that load_pretrained gives, without reading the weights: our
    control tokens that the checkpoint's tokenizer lacks are added (ids appended), and when they reach
    past its embedding rows, the model grows to pad_vocab(tokens) rows. Also the tokens added."""
    path = Path(path)
    cfg = model_config(read_config(path), path / CONFIG)
    hf = HFTokenizer.from_file(str(path / TOKENIZER))
    added = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
    if not added:
        return cfg, Tokenizer(hf), added
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    rows = max(cfg.vocab_size, pad_vocab(hf.get_vocab_size()))
    log.info(
        "%s: added control tokens %s to its tokenizer (ids %d-%d), the embedding %s; their rows start "
        "as the mean of the others",
        path, added, hf.token_to_id(added[0]), hf.get_vocab_size() - 1,
        f"grown from {cfg.vocab_size} to {rows} rows" if rows > cfg.vocab_size else f"keeps {rows} rows",
    )  # fmt: skip
    return replace(cfg, vocab_size=rows), Tokenizer(hf), added


def model_config(hf: dict, where: str | Path = CONFIG) -> ModelConfig:
    """Our ModelConfig of a Llama-family config.json; what our model cannot represent is refused,
    naming the field."""
    refusal = unsupported(hf)
    if refusal:
        raise OdysseyError(f"{where}: {refusal}")
    heads = hf.get("num_attention_heads")
    rope = hf.get("rope_parameters") or {}
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"],
            n_kv_head=hf.get("num_key_value_heads") or heads,
            ffn_hidden=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            init_std=float(hf.get("initializer_range", 0.02)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # Llama's default: untied
        )
    except KeyError as e:
        raise OdysseyError(f"{where}: no {e.args[0]!r}, which a Llama config.json has") from None
    except ConfigError as e:
        raise OdysseyError(f"{where}: our model cannot represent it: {e}") from None


def unsupported(hf: dict) -> str | None:
    """Why a config.json describes no model ours can be (naming the field and its value), or None."""
    kind, archs = hf.get("model_type"), hf.get("architectures") or []
    if kind not in MODEL_TYPES and "LlamaForCausalLM" not in archs:
        return f"model_type {kind!r}: only the Llama layout loads (model_type {' or '.join(MODEL_TYPES)})"
    if any(a not in ARCHITECTURES for a in archs):
        return f"architectures {archs}: only {' or '.join(ARCHITECTURES)} (a causal LM) loads"
    rope_type = (hf.get("rope_parameters") or {}).get("rope_type", "default")
    refused = {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",  # our MLP is SwiGLU
        "attention_bias": hf.get("attention_bias", False),
        "mlp_bias": hf.get("mlp_bias", False),
        "rope_scaling": hf.get("rope_scaling"),  # transformers 4's name for it
        "rope_parameters.rope_type": rope_type != "default",
        "partial_rotary_factor": hf.get("partial_rotary_factor", 1.0) != 1.0,
        "sliding_window": hf.get("sliding_window") is not None,  # here every token sees all before it
        "quantization_config": "quantization_config" in hf,
    }
    for name, bad in refused.items():
        if bad:
            value = rope_type if name == "rope_parameters.rope_type" else hf.get(name)
            return (
                f"{name}={value!r}: our model cannot represent it (a plain Llama: silu, no biases, "
                "no rope scaling, no sliding window, unquantized weights)"
            )
    heads, hidden, head_dim = hf.get("num_attention_heads"), hf.get("hidden_size"), hf.get("head_dim")
    if head_dim is not None and heads and hidden and head_dim * heads != hidden:
        return (
            f"head_dim={head_dim} but hidden_size / num_attention_heads = {hidden / heads:g}: "
            "our model needs them equal"
        )
    return None


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, or the shards its index names. Pickled
    weights are refused: loading a pickle can run any code its author put there."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    if (path / INDEX).is_file():
        shards = sorted(set(json.loads((path / INDEX).read_text(encoding="utf-8"))["weight_map"].values()))
        bad = [s for s in shards if Path(s).name != s or not (path / s).is_file()]
        if bad:
            raise OdysseyError(f"{path / INDEX} names shards {bad[:3]} that are not files beside it")
        return [path / s for s in shards]
    pickles = [name for name in PICKLES if (path / name).is_file()]
    if pickles:
        raise OdysseyError(
            f"{path} has only {pickles[0]}, a pickle, which can run any code when it is loaded: convert it "
            "to safetensors where you trust it (transformers: model.save_pretrained(dir)), then load that"
        )
    raise OdysseyError(f"{path} has no {WEIGHTS} (nor {INDEX})")


def read_weights(path: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict of a checkpoint's weights, as stored (any dtype). A tied model's lm_head copy, if
    saved, and old checkpoints' rotary-frequency buffers are dropped; any other stray tensor is refused."""
    theirs: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        theirs.update(load_file(str(file)))
    ours = {v: k for k, v in tensor_names(cfg.n_layer).items()}
    if cfg.tie_embeddings:
        theirs.pop("lm_head.weight", None)
    stray = sorted(k for k in theirs if k not in ours and not k.endswith("rotary_emb.inv_freq"))
    if stray:
        raise OdysseyError(f"{path}: tensors {stray[:5]} have no place in a Llama of {cfg.n_layer} layers")
    return {ours[k]: v for k, v in theirs.items() if k in ours}


def grow_embeddings(state: dict[str, torch.Tensor], rows: int, first: int) -> dict[str, torch.Tensor]:
    """tok_emb (and lm_head) with `rows` rows, every row from `first` (the first added token) on set to
    the mean of the rows before it: the added tokens start as an average token."""
    for key in ("tok_emb.weight", "lm_head.weight"):
        if key in state:
            old = state[key]
            grown = torch.cat([old, old.new_zeros(rows - len(old), old.shape[1])])
            grown[first:] = old[:first].float().mean(0).to(old.dtype)
            state[key] = grown
    return state
