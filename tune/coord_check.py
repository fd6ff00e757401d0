"""The µP coordinate check (Yang et al. 2022, "Tensor Programs V", appendix D): train models of growing
width for a few steps on the same batch and measure each layer's typical activation size (mean |x| per
coordinate). Under µP it stays flat as the model widens, which is what lets hyperparameters tuned on a
narrow proxy transfer; under standard parametrization Adam's updates grow the activations with width.

Pure model code (no Ray, no DeepSpeed): it uses the same model, optimizer groups and learning-rate
scaling that training uses, so it checks what trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from odyssey import optim
from odyssey.model import ModelConfig, Transformer


@dataclass
class CoordCheck:
    widths: list[int]
    mup: bool
    scales: dict[str, list[float]] = field(default_factory=dict)  # layer -> mean |x| at each width

    def growth(self, layer: str) -> float:
        """Activation size at the widest model over the narrowest's (1.0: flat)."""
        return self.scales[layer][-1] / self.scales[layer][0]


def coord_check(
    base: ModelConfig,
    widths: list[int],
    mup: bool,
    steps: int = 4,
    lr: float = 1e-2,
    batch: int = 8,
    seq_len: int = 64,
    seeds: tuple[int, ...] = (0, 1),
) -> CoordCheck:
    """For each width (head width fixed, base width = the narrowest), `steps` AdamW steps on one random
    batch, then the mean |x| of the embedding output, each block's output and the logits, averaged over seeds.
    Both parametrizations with an untied readout, as µP requires."""
    out = CoordCheck(sorted(widths), mup)
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, base.vocab_size, (batch, seq_len + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    for width in out.widths:
        cfg = replace(
            base,
            d_model=width,
            n_head=max(1, width // base.head_dim),
            n_kv_head=None,
            ffn_hidden=None,
            max_seq_len=max(base.max_seq_len, seq_len),
            mup=mup,
            mup_base_width=out.widths[0],
            tie_embeddings=False,  # µP's readout is its own matrix; the standard model alike, for the contrast
        )
        per_seed = [_scales(cfg, inputs, targets, steps, lr, seed) for seed in seeds]
        for layer in per_seed[0]:
            out.scales.setdefault(layer, []).append(sum(s[layer] for s in per_seed) / len(per_seed))
    return out


def _scales(cfg: ModelConfig, inputs, targets, steps: int, lr: float, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    opt = optim.adamw(model, lr, weight_decay=0.0)
    for _ in range(steps):
        loss = model(inputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seen: dict[str, float] = {}

    def keep(name):
        return lambda _mod, _inp, output: seen.__setitem__(name, output.detach().abs().mean().item())

    hooks = [model.tok_emb.register_forward_hook(keep("embedding"))]
    hooks += [b.register_forward_hook(keep(f"block{i}")) for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        seen["logits"] = model(inputs).abs().mean().item()
    for h in hooks:
        h.remove()
    return seen
