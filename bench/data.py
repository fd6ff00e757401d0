"""Benchmark: multitask corpus build and tokenization throughput.

    python bench/data.py [--preset full|tiny] [--repeats 3] [--seq-len 512]

Builds the corpus, trains the tokenizer, then tokenizes and packs the corpus `repeats` times (the
median counts: these machines are shared and noisy). Side by side in the same run, the encoder as
shipped (ignore_merges on) against plain BPE merging, as a ratio. Target: tokenize + pack at
>= 1M tokens/s on a 2-core machine. Writes bench/results/data.json and data.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from tokenizers import Tokenizer as HFTokenizer

from bench import report
from odyssey.data import corpus, packing
from odyssey.data.corpus import CorpusConfig
from odyssey.tokenizer import Tokenizer

TARGET_TOKENS_PER_S = 1_000_000


def encode_rate(tok: Tokenizer, texts: list[str]) -> float:
    t0 = time.perf_counter()
    n = sum(map(len, tok.encode_batch(texts)))
    return n / (time.perf_counter() - t0)


def plain_bpe(tok: Tokenizer) -> Tokenizer:
    spec = json.loads(tok.to_json())
    spec["model"]["ignore_merges"] = False
    return Tokenizer(HFTokenizer.from_str(json.dumps(spec)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="full", choices=["full", "tiny"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "corpus"
        t0 = time.perf_counter()
        manifest = corpus.build_corpus(out, CorpusConfig.from_preset(args.preset))
        build_s = time.perf_counter() - t0
        chars = sum(len(t) for t in corpus.texts(out, "train"))

        t0 = time.perf_counter()
        tok = Tokenizer.train(corpus.texts(out, "train"), args.vocab_size)
        tokenizer_s = time.perf_counter() - t0

        packs = []
        for i in range(args.repeats):
            m = packing.pack_corpus(out, tok, args.seq_len, Path(tmp) / f"blocks-{i}")
            packs.append(m)
            print(
                f"pack {i + 1}/{args.repeats}: {m['tokens']:,} tokens, {m['tokens_per_s']:,.0f} tokens/s",
                flush=True,
            )
        pack_rates = [m["tokens_per_s"] for m in packs]
        pack_s = statistics.median(m["seconds"] for m in packs)
        tokens = packs[0]["tokens"]

        lm_texts = corpus.read_split(out, "lm", "train", ["target"]).column("target").to_pylist()
        plain = plain_bpe(tok)
        shipped_rates, plain_rates = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same machine weather
            shipped_rates.append(encode_rate(tok, lm_texts))
            plain_rates.append(encode_rate(plain, lm_texts))

    pack_rate = statistics.median(pack_rates)
    end_to_end = tokens / (build_s + tokenizer_s + pack_s)
    figures = {
        "preset": args.preset,
        "examples": manifest["total_examples"],
        "train_chars": chars,
        "tokens": tokens,
        "build_s": round(build_s, 2),
        "tokenizer_train_s": round(tokenizer_s, 2),
        "pack_s_median": round(pack_s, 2),
        "pack_tokens_per_s": {"median": round(pack_rate), "runs": pack_rates},
        "end_to_end_tokens_per_s": round(end_to_end),
        "encode_tokens_per_s": {
            "shipped_ignore_merges": round(statistics.median(shipped_rates)),
            "plain_bpe": round(statistics.median(plain_rates)),
            "ratio": round(statistics.median(shipped_rates) / statistics.median(plain_rates), 2),
        },
        "counts": manifest["counts"],
    }
    targets = {"pack_tokens_per_s": TARGET_TOKENS_PER_S, "met": pack_rate >= TARGET_TOKENS_PER_S}
    ratio = figures["encode_tokens_per_s"]["ratio"]
    table = [
        (
            "corpus build (`odyssey data build --preset " + args.preset + "`)",
            f"{build_s:.1f} s, {manifest['total_examples']:,} examples",
            "",
        ),
        (
            "tokenizer training (vocab " + str(args.vocab_size) + ")",
            f"{tokenizer_s:.1f} s on {chars / 1e6:.1f} M chars",
            "",
        ),
        (
            f"tokenize + pack (seq_len {args.seq_len}), median of {args.repeats}",
            f"**{pack_rate / 1e6:.2f} M tokens/s** ({tokens / 1e6:.1f} M tokens in {pack_s:.1f} s)",
            f">= {TARGET_TOKENS_PER_S / 1e6:.0f} M tokens/s: {'met' if targets['met'] else 'NOT met'}",
        ),
        ("end to end: build + tokenizer + pack", f"{end_to_end / 1e6:.2f} M tokens/s", ""),
        ("encoder, ignore_merges vs plain BPE (same run)", f"{ratio:.2f}x", ""),
    ]
    path = report.write("data", figures, targets, table)
    print(path.read_text())


if __name__ == "__main__":
    main()
