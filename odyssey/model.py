"""The Odyssey language model: one decoder-only transformer that serves every task.

Read top to bottom: the config and its named presets, the building blocks (RMSNorm, rotary
embeddings, attention, SwiGLU), then the model: a training forward, and for inference
the seam an inference engine drives (`hidden_states` over its KV cache: odyssey/engine.py), `embed`
(for passage search) and `sample`.
One forward serves training: the language-model loss, or with `embed_valid` the rows' embeddings
that train/'s contrastive objective trains (and `embed` reads at inference, the same function).

Nothing here knows about Ray or DeepSpeed: train/ and serve/ wrap this module from the outside.

Shape names: B batch, T tokens in this call, S tokens in the KV cache, D d_model, H query heads,
K key/value heads, E head_dim, V vocab, F ffn hidden width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from odyssey.errors import ConfigError

# ---------------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    vocab_size: int = 4096  # embedding rows; >= the tokenizer's vocab, a multiple of 64 (see pad_vocab)
    d_model: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int | None = (
        None  # grouped-query attention: fewer K/V heads shrink the KV cache; None = n_head
    )
    ffn_hidden: int | None = None  # SwiGLU width; None = 8/3 d_model (the FLOPs of a 4x GELU MLP), rounded up
    max_seq_len: int = 256
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # The output projection: the input embedding itself (tied, GPT-2's choice), or a matrix of its own
    # (lm_head), as checkpoints imported from Hugging Face (odyssey/hf.py) may have.
    tie_embeddings: bool = True
    # µP (maximal update parametrization): hyperparameters tuned at width `mup_base_width` transfer to
    # wider models. It rescales hidden-matrix init, their Adam learning rate, the attention scale and
    # the output logits by the width multiplier d_model / mup_base_width (see init_weights, param_groups).
    # Its readout is a matrix of its own (the mup package's MuReadout), so tie_embeddings must be false.
    mup: bool = False
    mup_base_width: int = 256

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "max_seq_len", "mup_base_width"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            divisors = [
                h for h in range(1, self.d_model + 1) if self.d_model % h == 0 and self.d_model // h % 2 == 0
            ]
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                f"pick n_head from {divisors[-8:]} or change d_model"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"head_dim = d_model / n_head = {self.head_dim} must be even (RoPE rotates pairs)"
            )
        if self.n_kv_head is not None and (self.n_kv_head <= 0 or self.n_head % self.n_kv_head):
            raise ConfigError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.ffn_hidden is not None and self.ffn_hidden <= 0:
            raise ConfigError(f"ffn_hidden must be positive or null, got {self.ffn_hidden}")
        if self.init_std <= 0 or self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("init_std, norm_eps and rope_theta must be positive")
        if self.mup and self.tie_embeddings:
            # Measured (bench/tune_efficiency.py): tied, the one matrix that embeds the input and scores the
            # output trains worse at width 512 than at 64 under the same learning rate; untied, wider is better.
            raise ConfigError(
                "mup: true needs its own readout matrix: set tie_embeddings: false (a tied embedding does not "
                "transfer its learning rate across widths)"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return _round_up(int(8 * self.d_model / 3), 64)

    @property
    def width_mult(self) -> float:
        """µP's width multiplier m; 1.0 under standard parametrization."""
        return self.d_model / self.mup_base_width if self.mup else 1.0

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
        return replace(PRESETS[name](), **overrides)


# Named recipes. The gpt-* shapes follow GPT-3's table (Brown et al. 2020) with a GPT-2-sized
# vocabulary (50257 padded to a multiple of 64).


def tiny() -> ModelConfig:
    """1M parameters: CPU tests and the demo, seconds per run."""
    return ModelConfig(vocab_size=4096, d_model=128, n_layer=2, n_head=4, max_seq_len=256)


def small() -> ModelConfig:
    """~20M parameters: CPU benchmarks."""
    return ModelConfig(vocab_size=8192, d_model=512, n_layer=5, n_head=8, max_seq_len=512)


def gpt_125m() -> ModelConfig:
    return ModelConfig(vocab_size=50304, d_model=768, n_layer=12, n_head=12, max_seq_len=2048)


def gpt_350m() -> ModelConfig:
    return ModelConfig(vocab_size=50304, d_model=1024, n_layer=24, n_head=16, max_seq_len=2048)


def gpt_1_3b() -> ModelConfig:
    return ModelConfig(vocab_size=50304, d_model=2048, n_layer=24, n_head=16, max_seq_len=2048)


PRESETS = {"tiny": tiny, "small": small, "gpt-125m": gpt_125m, "gpt-350m": gpt_350m, "gpt-1.3b": gpt_1_3b}


def pad_vocab(n_tokens: int, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer of n_tokens: padded so the output matmul tiles evenly."""
    return _round_up(n_tokens, multiple)


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


# ---------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotation angles: two (max_len, E/2) tables."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + E/2]) of x (B, heads, T, E) by the angles of their positions.

    cos/sin are (T, E/2) for one shared set of positions or (B, 1, T, E/2) for per-row positions
    (left-padded inference batches).
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        # µP scales attention logits by 1/E instead of 1/sqrt(E): once training correlates q and k,
        # q.k grows like E, not sqrt(E).
        self.scale = 1.0 / cfg.head_dim if cfg.mup else 1.0 / math.sqrt(cfg.head_dim)

    def forward(self, x, cos, sin, mask=None, cache=None, layer: int = 0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, E)
        k = self.wk(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, E)
        v = self.wv(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, E)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.store(layer, k, v)  # (B, K, S, E)
        # No mask: a full causal sequence (training), the fast fused path. With a mask: padded or
        # cached inference, where the causal structure is spelled out in the mask itself.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
            enable_gqa=self.n_kv != self.n_head,
        )  # (B, H, T, E)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        return x + self.ffn(self.ffn_norm(x))


# ---------------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)  # also the output projection when tied
        # Untied: an output projection of its own. Tied: no lm_head, so the state dict has one copy.
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Derived from the config, so not part of the state dict (persistent=False).
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every tensor:
        - tok_emb: normal(0, init_std); tied, it is input embedding and output projection at once.
        - lm_head (untied only): normal(0, init_std), like the embedding it stands in for.
        - wq, wk, wv, w1, w3: normal(0, init_std / sqrt(m)), m = µP width multiplier (1 without µP),
          so that under µP their variance falls like 1/fan_in as the model widens.
        - wo, w2 (the projections back into the residual stream): as above, further divided by
          sqrt(2 n_layer) so that the residual stream's variance does not grow with depth (GPT-2).
        - norm weights: ones.
        """
        std = self.cfg.init_std
        hidden_std = std / math.sqrt(self.cfg.width_mult)
        nn.init.normal_(self.tok_emb.weight, 0.0, std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, 0.0, std)
        for block in self.blocks:
            for lin in (block.attn.wq, block.attn.wk, block.attn.wv, block.ffn.w1, block.ffn.w3):
                nn.init.normal_(lin.weight, 0.0, hidden_std)
            for lin in (block.attn.wo, block.ffn.w2):
                nn.init.normal_(lin.weight, 0.0, hidden_std / math.sqrt(2 * self.cfg.n_layer))
            block.attn_norm.weight.fill_(1.0)
            block.ffn_norm.weight.fill_(1.0)
        self.norm.weight.fill_(1.0)

    # --- training ----------------------------------------------------------------------------------

    def forward(self, input_ids, targets=None, loss_mask=None, embed_valid=None):
        """input_ids (B, T) -> logits (B, T, V); with targets (B, T): the mean cross-entropy over the
        positions where loss_mask (B, T) is set (all positions when it is None). With embed_valid (B, T)
        instead: left-padded rows (True on real tokens) -> their embeddings (B, D), see `embedding`.
        (One forward for both, so DeepSpeed's engine runs either.)"""
        T = input_ids.shape[1]
        if self.cfg.max_seq_len < T:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        if embed_valid is not None:
            return self.embedding(input_ids, embed_valid)
        h = self.hidden_states(input_ids, self.rope_cos[:T], self.rope_sin[:T])
        logits = self.logits(h)
        if targets is None:
            return logits
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        if loss_mask is None:
            return losses.mean()
        mask = loss_mask.flatten().float()
        return (losses * mask).sum() / mask.sum().clamp(min=1.0)

    def hidden_states(self, ids, cos, sin, mask=None, cache=None):
        """ids (B, T) -> final hidden states (B, T, D): the embedding lookup, every block, the final norm.

        The backend seam: everything else (padding, masks, positions, the KV cache's bookkeeping, the
        output projection, sampling) calls this one method, so a backend that runs the blocks elsewhere
        replaces it alone (odyssey/ort_model.py: ONNX Runtime). cos, sin: `rope_at(positions)`, or
        (T, E/2) slices of the tables when every row starts at position 0; mask (B, 1, T, S): which keys
        each query sees (None: causal); cache: the engine's KV cache view (odyssey/engine.py), whose
        `store(layer, k, v)` each layer calls and which returns the keys and values to attend."""
        x = self.tok_emb(ids)  # (B, T, D)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, cache, i)
        return self.norm(x)

    def logits(self, h):
        # The output projection (tied: the embedding); µP divides the logits by the width multiplier so
        # that their scale after training does not grow with width.
        out = self.tok_emb if self.lm_head is None else self.lm_head
        logits = F.linear(h, out.weight)  # (B, T, V)
        return logits / self.cfg.width_mult if self.cfg.mup else logits

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups. Hidden matrices decay; embeddings (an untied lm_head too) and norm gains do
        not. Under µP the hidden matrices' Adam learning rate is scaled by 1/m (`lr_scale`); the optimizer
        loop sets each group's lr to base_lr * lr_scale."""
        hidden, embed, gains = [], [], []
        for name, p in self.named_parameters():
            is_embedding = name in ("tok_emb.weight", "lm_head.weight")
            (embed if is_embedding else hidden if p.ndim == 2 else gains).append(p)
        m = self.cfg.width_mult
        return [
            {"params": hidden, "weight_decay": weight_decay, "lr_scale": 1.0 / m},
            {"params": embed, "weight_decay": 0.0, "lr_scale": 1.0},
            {"params": gains, "weight_decay": 0.0, "lr_scale": 1.0},
        ]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token, PaLM's convention: 6 N + 12 L D T.

        N counts every weight that takes part in a matmul; the tied embedding is counted once, as the
        output projection, and an untied one not at all (the input lookup is no matmul). 12 L D T is
        attention's score and value matmuls over a context of T, counted in full even though the causal
        half is masked away.
        """
        T = seq_len or self.cfg.max_seq_len
        lookup_only = "tok_emb.weight" if self.lm_head is not None else None
        n_matmul = sum(p.numel() for n, p in self.named_parameters() if p.ndim == 2 and n != lookup_only)
        return 6.0 * n_matmul + 12.0 * self.cfg.n_layer * self.cfg.d_model * T

    # --- inference ---------------------------------------------------------------------------------

    def _left_pad(self, prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        T = max(len(p) for p in prompts)
        device = self.tok_emb.weight.device
        ids = torch.full((len(prompts), T), pad_id, dtype=torch.long, device=device)
        valid = torch.zeros(len(prompts), T, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            ids[i, T - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
            valid[i, T - len(p) :] = True
        return ids, valid

    def _padded_mask(self, key_valid, q_start: int, T: int):
        """(B, 1, T, S) boolean mask: a query at cache position q_start + i sees key j when j <= q_start + i
        and key j is a real token. Its own position is always visible, so a pad query's row is never
        empty (an empty row would give NaN)."""
        S = key_valid.shape[1]
        q_pos = torch.arange(q_start, q_start + T, device=key_valid.device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=key_valid.device)[None, :]  # (1, S)
        mask = (k_pos <= q_pos) & key_valid[:, None, :]  # (B, T, S)
        return (mask | (k_pos == q_pos)).unsqueeze(1)

    def rope_at(self, positions):
        """positions (B, T) -> the rotary angles hidden_states takes: cos, sin (B, 1, T, E/2)."""
        return self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)

    def embedding(self, ids, valid):
        """Left-padded rows (B, T) and their real-token mask (B, T) -> unit vectors (B, D): the final
        hidden state of each row's last token. Inputs end in the `find` prompt's end-of-input token
        (odyssey/retrieval.py), whose state has read the whole input; the contrastive objective trains
        exactly this vector, for queries and passages alike. Differentiable: training calls it too."""
        T = ids.shape[1]
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        h = self.hidden_states(ids, *self.rope_at(positions), self._padded_mask(valid, 0, T))  # (B, T, D)
        return F.normalize(h[:, -1].float(), dim=-1)

    @torch.no_grad()
    def embed(self, prompts: list[list[int]], pad_id: int = 0) -> torch.Tensor:
        """One unit vector per prompt (B, D): `embedding` of the prompts, left-padded."""
        ids, valid = self._left_pad(prompts, pad_id)
        if self.cfg.max_seq_len < ids.shape[1]:
            raise ValueError(f"{ids.shape[1]} tokens exceed max_seq_len={self.cfg.max_seq_len}")
        return self.embedding(ids, valid)


def sample(
    logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, generator=None
):
    """Pick one token per row of logits (B, V): greedy at temperature 0, else from the softmax
    restricted to the top_k tokens and the smallest set whose probability reaches top_p."""
    if temperature <= 0:
        return logits.argmax(-1)
    # float64, shifted so the largest is 0 before dividing: any temperature > 0 a request can carry
    # (5e-324 too, which float32 rounds to 0) then sends the others to -inf (greedy, as it should)
    # instead of every logit to +-inf and the softmax to NaN.
    logits = logits.double()
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # tokens after the nucleus is already full
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
