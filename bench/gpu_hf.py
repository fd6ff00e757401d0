"""On a GPU machine: vLLM serves the Hugging Face export (`odyssey export --format hf`, odyssey/hf.py) of a
gpt-125m-shaped model, and its greedy tokens are compared with our engine's on 20 prompts, 32 tokens
each. Target: equal tokens on every prompt. Writes bench/results/gpu_hf.json and .md with the card's name.

Random weights (no checkpoint travels to the device), drawn with init_std 0.1 so that the logits are far
enough apart for greedy decoding to have no near-ties that two correct implementations break differently;
float32 on both sides. Run it through bench/gpu_hf.sh (one device call).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench import report
from odyssey import hf
from odyssey.data.corpus import CorpusConfig, build_corpus, texts
from odyssey.engine import GenerationParams, generate
from odyssey.model import Transformer, gpt_125m, pad_vocab
from odyssey.tokenizer import Tokenizer

PROMPTS, TOKENS, PROMPT_TOKENS = 20, 32, 48


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    from vllm import LLM, SamplingParams  # on the GPU machine only

    work = Path(tempfile.mkdtemp(prefix="gpu_hf-"))
    build_corpus(work / "corpus", CorpusConfig.from_preset("tiny"))
    tok = Tokenizer.train(texts(work / "corpus", "train"), vocab_size=8192)
    prompts = [tok.prompt("lm", t)[:PROMPT_TOKENS] for t in texts(work / "corpus", "val")]
    prompts = [p for p in prompts if len(p) >= 8][:PROMPTS]
    torch.manual_seed(0)
    cfg = replace(gpt_125m(), vocab_size=pad_vocab(tok.vocab_size), init_std=0.1, max_seq_len=512)
    model = Transformer(cfg).eval()
    hf.save_pretrained(model, tok, work / "hf")

    t0 = time.perf_counter()
    ours = generate(model.to(args.device), tok, prompts, GenerationParams(max_tokens=TOKENS, temperature=0.0))
    ours_s = time.perf_counter() - t0
    llm = LLM(model=str(work / "hf"), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.4, seed=0)
    t0 = time.perf_counter()
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=TOKENS)
    )
    vllm_s = time.perf_counter() - t0
    theirs = [[t for t in o.outputs[0].token_ids if t != tok.eos_id] for o in outs]
    equal = [a.token_ids == b for a, b in zip(ours, theirs)]
    first_diff = [
        next((i for i, (x, y) in enumerate(zip(a.token_ids, b)) if x != y), min(len(a.token_ids), len(b)))
        for a, b in zip(ours, theirs)
    ]
    figures = {
        "card": torch.cuda.get_device_name(),
        "prompts": len(prompts),
        "tokens": TOKENS,
        "equal": sum(equal),
        "first_difference": [d for d, e in zip(first_diff, equal) if not e],
        "ours_s": round(ours_s, 2),
        "vllm_s": round(vllm_s, 2),
    }
    met = all(equal)
    table = [
        ("prompts with equal greedy tokens (vLLM vs ours)", f"{sum(equal)} / {len(prompts)}", "all: " + ("met" if met else "NOT met")),
        ("card", figures["card"], ""),
    ]  # fmt: skip
    notes = f"gpt-125m shape (random weights, init_std 0.1), float32, {TOKENS} greedy tokens per prompt."
    report.write("gpu_hf", figures, {"equal": "all", "met": met}, table, notes)
    print((report.RESULTS / "gpu_hf.md").read_text())


if __name__ == "__main__":
    main()
