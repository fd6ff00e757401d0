"""`odyssey demo` (`make demo`): the whole core pipeline in one process, top to bottom.

    corpus -> tokenizer -> packed blocks -> train the tiny model -> export -> reload -> one sample per task

It proves the pieces fit on any laptop in a minute or two. The distributed pipeline (Ray Train +
DeepSpeed, Serve) builds on exactly these pieces.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from odyssey import artifact, optim
from odyssey.config import to_dict
from odyssey.data import corpus as corpus_mod
from odyssey.data import packing
from odyssey.data.corpus import CorpusConfig
from odyssey.errors import ConfigError
from odyssey.model import ModelConfig, Transformer, pad_vocab, tiny
from odyssey.progress import Progress
from odyssey.tasks import MODERATION_LABELS, TASKS
from odyssey.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig.from_preset("tiny"))
    vocab_size: int = 4096
    seq_len: int = 256
    model: ModelConfig = field(default_factory=tiny)  # vocab and length follow the two above
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mixture: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TASKS, 1.0))  # task -> weight
    eval_blocks: int = 16  # validation blocks per task
    sample_tokens: int = 40
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0:
            raise ConfigError("steps and batch_size must be positive")
        unknown = set(self.mixture) - set(TASKS)
        if unknown:
            raise ConfigError(f"mixture: unknown task {sorted(unknown)[0]!r}; tasks: {', '.join(TASKS)}")
        if any(w < 0 for w in self.mixture.values()) or not any(w > 0 for w in self.mixture.values()):
            raise ConfigError("mixture: weights must be >= 0 and at least one > 0")


def prepare_data(cfg: DemoConfig, out: Path) -> tuple[Path, Tokenizer, Path]:
    corpus_dir = out / "corpus"
    corpus_mod.build_corpus(corpus_dir, cfg.corpus, overwrite=True)
    tok = Tokenizer.train(corpus_mod.texts(corpus_dir, "train"), cfg.vocab_size)
    tok.save(corpus_dir / "tokenizer.json")
    log.info("tokenizer: %d tokens, trained on the train split", tok.vocab_size)
    blocks_dir = corpus_dir / f"blocks-{cfg.seq_len}"
    packing.pack_corpus(corpus_dir, tok, cfg.seq_len, blocks_dir, seed=cfg.seed, overwrite=True)
    return corpus_dir, tok, blocks_dir


def load_split(blocks_dir: Path, split: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for task in TASKS:
        ids, mask = packing.read_blocks(blocks_dir, task, split)
        if len(ids):
            out[task] = (torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.bool_)))
    return out


def batch(data, tasks: list[str], weights: torch.Tensor, size: int, gen: torch.Generator):
    """A batch of blocks: each row's task drawn by mixture weight, then a block of that task."""
    rows = torch.multinomial(weights, size, replacement=True, generator=gen)
    picks = []
    for t in rows.tolist():
        ids, mask = data[tasks[t]]
        i = int(torch.randint(len(ids), (1,), generator=gen))
        picks.append((ids[i], mask[i]))
    ids = torch.stack([p[0] for p in picks])
    mask = torch.stack([p[1] for p in picks])
    return ids[:, :-1], ids[:, 1:], mask[:, 1:]  # inputs, targets, which targets are trained on


@torch.no_grad()
def evaluate(model: Transformer, data, max_blocks: int) -> dict[str, float]:
    model.eval()
    losses = {}
    for task, (ids, mask) in data.items():
        ids, mask = ids[:max_blocks], mask[:max_blocks]
        losses[task] = float(model(ids[:, :-1], ids[:, 1:], mask[:, 1:]))
    model.train()
    return losses


def train(cfg: DemoConfig, model: Transformer, train_data, val_data) -> dict:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    tasks = [t for t in TASKS if t in train_data and cfg.mixture.get(t, 0) > 0]
    weights = torch.tensor([cfg.mixture[t] for t in tasks], dtype=torch.float)
    opt = optim.adamw(model, cfg.lr, cfg.weight_decay)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    progress = Progress(cfg.steps, emit=log.info)
    first_loss = loss = None
    t_start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        optim.set_lr(opt, optim.lr_at(step - 1, cfg.lr, cfg.warmup_steps, cfg.steps))
        inputs, targets, mask = batch(train_data, tasks, weights, cfg.batch_size, gen)
        loss = model(inputs, targets, mask)
        if not torch.isfinite(loss):
            raise RuntimeError(
                f"loss is {loss.item()} at step {step}; lower lr (now {cfg.lr}) or raise warmup_steps"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        first_loss = first_loss if first_loss is not None else loss.item()
        progress.update(step, step * tokens_per_step, loss=loss.item())
    seconds = time.perf_counter() - t_start
    val = evaluate(model, val_data, cfg.eval_blocks)
    return {
        "steps": cfg.steps,
        "tokens": cfg.steps * tokens_per_step,
        "first_loss": round(first_loss, 4),
        "final_loss": round(loss.item(), 4),
        "val_loss": {t: round(v, 4) for t, v in val.items()},
        "tokens_per_s": round(cfg.steps * tokens_per_step / seconds),
        "train_seconds": round(seconds, 1),
    }


def show_samples(model: Transformer, tok: Tokenizer, corpus_dir: Path, cfg: DemoConfig) -> list[dict]:
    """One held-out example per task: prompt, expected, and what the model says."""
    samples = []
    room = cfg.seq_len - cfg.sample_tokens
    for task in TASKS:
        table = corpus_mod.read_split(corpus_dir, task, "test")
        if table.num_rows == 0:
            continue
        row = table.slice(0, 1).to_pylist()[0]
        # lm: the model continues the first 200 characters of a held-out text.
        text, expected = (
            (row["input"], row["target"]) if task != "lm" else (row["target"][:200], row["target"][200:])
        )
        prompt = tok.prompt(task, text)[:room]
        out = model.generate(
            [prompt], cfg.sample_tokens, temperature=0.0, stop_ids=[tok.eos_id], pad_id=tok.pad_id
        )[0]
        sample = {
            "task": task,
            "input": text[:160],
            "expected": expected[:160],
            "generated": tok.decode(out)[:160],
        }
        if task == "moderate":  # label scoring: the label the model finds likeliest
            labels = [[*tok.encode(label), tok.eos_id] for label in MODERATION_LABELS]
            scores = model.score([prompt] * len(labels), labels, tok.pad_id)
            sample["label_scores"] = {
                label: round(float(s), 2) for label, s in zip(MODERATION_LABELS, scores)
            }
        if task == "find":  # passage search by embedding: where does the right passage rank?
            passages = table.column("target").to_pylist()[:50]
            query = model.embed([tok.prompt(task, row["input"])[:room]], tok.pad_id)
            docs = model.embed([tok.encode(p)[: cfg.seq_len] or [tok.pad_id] for p in passages], tok.pad_id)
            rank = int((docs @ query.T).squeeze(1).argsort(descending=True).tolist().index(0)) + 1
            sample["passage_rank"] = f"{rank} of {len(passages)}"
        samples.append(sample)
    return samples


def run(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    t0 = time.perf_counter()
    corpus_dir, tok, blocks_dir = prepare_data(cfg, out)
    model_cfg = replace(cfg.model, vocab_size=pad_vocab(tok.vocab_size), max_seq_len=cfg.seq_len)
    model = Transformer(model_cfg)
    log.info(
        "model: %.2fM parameters, %.1f MFLOP/token; training %d steps of %d x %d tokens",
        model.num_params() / 1e6,
        model.flops_per_token(cfg.seq_len) / 1e6,
        cfg.steps,
        cfg.batch_size,
        cfg.seq_len,
    )
    train_data, val_data = load_split(blocks_dir, "train"), load_split(blocks_dir, "val")
    result = train(cfg, model, train_data, val_data)
    model_dir = artifact.save_model(
        out / "model", model, tok, metadata={"demo": to_dict(cfg), "result": result}
    )
    model, tok, _ = artifact.load_model(model_dir)  # what serving will do: weights from safetensors only
    samples = show_samples(model, tok, corpus_dir, cfg)
    for s in samples:
        print(f"\n[{s['task']}]")
        for key in ("input", "expected", "generated", "label_scores", "passage_rank"):
            if key in s:
                print(f"  {key:>12}: {s[key]!r}" if isinstance(s[key], str) else f"  {key:>12}: {s[key]}")
    summary = {
        "run_dir": str(out),
        "model": str(model_dir),
        **result,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps({**summary, "samples": samples}, indent=2) + "\n")
    return summary
