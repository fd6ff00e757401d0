"""Benchmark: multitask corpus build, tokenization and packing: throughput, scaling on Ray Data, memory.

    python bench/data.py [--preset full|tiny] [--repeats 3] [--seq-len 512] [--workers 2]

Starts one local Ray cluster of `--workers` CPUs (odyssey.cluster.connect), then, in the same run:
- builds the corpus and trains the tokenizer (timed once);
- tokenizes and packs the corpus in-process `repeats` times (the median counts: these machines are
  shared and noisy). Target: >= 1M tokens/s on a 2-core machine;
- the encoder as shipped (ignore_merges on) against plain BPE merging, interleaved, as a ratio;
- corpus build + tokenize + pack on Ray Data with `--workers` workers against 1, interleaved, `repeats`
  times each: medians and the ratio. Target: packing >= 1.5x faster on 2 workers than on 1;
- peak memory (RSS of the driver and of every Ray worker process, sampled every 0.2 s) while packing
  the corpus and a copy 4x as large on Ray Data: packing streams by row group, so memory must not
  grow with the corpus. Target: peak(4x) / peak(1x) <= 1.25.

Writes bench/results/data.json and data.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

import psutil
from tokenizers import Tokenizer as HFTokenizer

from bench import report
from odyssey import cluster
from odyssey.data import corpus, packing
from odyssey.data.corpus import MANIFEST, CorpusConfig
from odyssey.tokenizer import Tokenizer

TARGET_TOKENS_PER_S = 1_000_000
TARGET_PACK_SCALING = 1.5  # 2 workers vs 1
TARGET_MEMORY_RATIO = 1.25  # peak RSS packing 4x the corpus vs 1x
MEMORY_SCALE = 4


def encode_rate(tok: Tokenizer, texts: list[str]) -> float:
    t0 = time.perf_counter()
    n = sum(map(len, tok.encode_batch(texts)))
    return n / (time.perf_counter() - t0)


def plain_bpe(tok: Tokenizer) -> Tokenizer:
    spec = json.loads(tok.to_json())
    spec["model"]["ignore_merges"] = False
    return Tokenizer(HFTokenizer.from_str(json.dumps(spec)))


def build(out: Path, cfg: CorpusConfig, workers: int | None = None) -> dict:
    """build_corpus, its near-duplicate signatures on `workers` Ray Data tasks (None: every CPU)."""
    return corpus.build_corpus(out, cfg, workers=workers)


# --- Ray Data scaling: build + tokenize + pack on N workers ----------------------------------------------


def build_and_pack(out: Path, cfg: CorpusConfig, tok: Tokenizer, seq_len: int, workers: int) -> dict:
    t0 = time.perf_counter()
    build(out / "corpus", cfg, workers)
    build_s = time.perf_counter() - t0
    m = packing.pack_corpus(out / "corpus", tok, seq_len, out / "blocks", workers=workers)
    shutil.rmtree(out)
    return {
        "build_s": build_s,
        "pack_s": m["seconds"],
        "tokens": m["tokens"],
        "pack_tokens_per_s": m["tokens_per_s"],
        "tokens_per_s": m["tokens"] / (build_s + m["seconds"]),
    }


def scaling(tmp: Path, cfg: CorpusConfig, tok: Tokenizer, seq_len: int, workers: int, repeats: int) -> dict:
    """Median figures per worker count, the counts interleaved so both see the same machine weather."""
    runs: dict[int, list[dict]] = {1: [], workers: []}
    for i in range(repeats):
        for w in runs:
            r = build_and_pack(tmp / f"scale-{w}-{i}", cfg, tok, seq_len, w)
            runs[w].append(r)
            print(
                f"build + pack on {w} worker(s), {i + 1}/{repeats}: build {r['build_s']:.1f} s, "
                f"pack {r['pack_s']:.1f} s, {r['tokens_per_s']:,.0f} tokens/s",
                flush=True,
            )
    medians = {
        w: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0] if k != "tokens"}
        for w, rs in runs.items()
    }
    return {
        "workers": {str(w): m for w, m in medians.items()},
        "pack_ratio": round(medians[workers]["pack_tokens_per_s"] / medians[1]["pack_tokens_per_s"], 2),
        "end_to_end_ratio": round(medians[workers]["tokens_per_s"] / medians[1]["tokens_per_s"], 2),
    }


# --- memory: packing 1x vs 4x the corpus -----------------------------------------------------------------


def tree_rss() -> int:
    """RSS of this process and of the Ray worker processes it started (their command lines begin with
    ray::), in bytes."""
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            if " ".join(child.cmdline()).startswith("ray::"):
                total += child.memory_info().rss
        except psutil.Error:  # gone between listing and reading
            pass
    return total


class PeakRSS:
    """Samples tree_rss every `every_s` seconds in a thread while the `with` block runs."""

    def __init__(self, every_s: float = 0.2):
        self.every_s, self.peak = every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss())
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss())


def scaled_corpus(src: Path, dst: Path, times: int) -> Path:
    """A corpus `times` as large: every example shard of `src` copied `times` times under new shard
    names, with a manifest whose shards and counts say so (packing reads the shards and the manifest)."""
    manifest = json.loads((src / MANIFEST).read_text())
    examples = [s for s in manifest["shards"] if s["path"].startswith("examples/")]
    shards = [s for s in manifest["shards"] if s not in examples]  # documents: copied as they are

    def split_of(path: Path) -> Path:  # examples/lm/train-00003.parquet -> examples/lm/train
        return path.parent / path.stem.rsplit("-", 1)[0]

    per_split = Counter(split_of(Path(s["path"])) for s in examples)
    copies = [(Path(s["path"]), s) for s in shards]
    for k in range(times):
        for shard in examples:
            path = Path(shard["path"])
            index = k * per_split[split_of(path)] + int(path.stem.rsplit("-", 1)[1])
            copy = path.with_name(f"{split_of(path).name}-{index:05d}.parquet")
            copies.append((path, {**shard, "path": copy.as_posix()}))
    for path, shard in copies:
        (dst / shard["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / path, dst / shard["path"])
    manifest["shards"] = [shard for _, shard in copies]
    manifest["counts"] = {t: {s: n * times for s, n in c.items()} for t, c in manifest["counts"].items()}
    manifest["total_examples"] *= times
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return dst


def packing_memory(tmp: Path, src: Path, tok: Tokenizer, seq_len: int, workers: int) -> dict:
    """Peak RSS packing the corpus and a copy MEMORY_SCALE times as large, on Ray Data."""
    figures = {}
    for scale, corpus_dir in ((1, src), (MEMORY_SCALE, scaled_corpus(src, tmp / "scaled", MEMORY_SCALE))):
        with PeakRSS() as rss:
            m = packing.pack_corpus(corpus_dir, tok, seq_len, tmp / f"mem-{scale}", workers=workers)
        shutil.rmtree(tmp / f"mem-{scale}")
        figures[f"{scale}x"] = {
            "examples": sum(c["examples"] for t in m["counts"].values() for c in t.values()),
            "units": m["units"],
            "tokens": m["tokens"],
            "peak_rss_mib": round(rss.peak / 2**20),
        }
        print(f"pack {scale}x on Ray Data: peak RSS {rss.peak / 2**20:,.0f} MiB", flush=True)
    figures["ratio"] = round(
        figures[f"{MEMORY_SCALE}x"]["peak_rss_mib"] / max(figures["1x"]["peak_rss_mib"], 1), 3
    )
    return figures


# --- the run ---------------------------------------------------------------------------------------------


def in_process_packs(out: Path, tok: Tokenizer, seq_len: int, repeats: int, tmp: Path) -> list[dict]:
    packs = []
    for i in range(repeats):
        m = packing.pack_corpus(out, tok, seq_len, tmp / f"blocks-{i}", workers=0)
        packs.append(m)
        print(
            f"pack {i + 1}/{repeats} in-process: {m['tokens']:,} tokens, {m['tokens_per_s']:,.0f} tokens/s",
            flush=True,
        )
    return packs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="full", choices=["full", "tiny"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=2, help="Ray Data workers to compare with 1")
    args = parser.parse_args()

    cluster.connect(num_cpus=args.workers)  # one embedded Ray cluster (loopback, token auth) for the run
    cfg = CorpusConfig.from_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        out = tmp / "corpus"
        t0 = time.perf_counter()
        manifest = build(out, cfg)
        build_s = time.perf_counter() - t0
        chars = sum(len(t) for t in corpus.texts(out, "train"))

        t0 = time.perf_counter()
        tok = Tokenizer.train(corpus.texts(out, "train"), args.vocab_size)
        tokenizer_s = time.perf_counter() - t0

        packs = in_process_packs(out, tok, args.seq_len, args.repeats, tmp)
        pack_rates = [m["tokens_per_s"] for m in packs]
        pack_s = statistics.median(m["seconds"] for m in packs)
        tokens = packs[0]["tokens"]

        lm_texts = corpus.read_split(out, "lm", "train", ["target"]).column("target").to_pylist()
        plain = plain_bpe(tok)
        shipped_rates, plain_rates = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same machine weather
            shipped_rates.append(encode_rate(tok, lm_texts))
            plain_rates.append(encode_rate(plain, lm_texts))

        ray_scaling = scaling(tmp, cfg, tok, args.seq_len, args.workers, args.repeats)
        memory = packing_memory(tmp, out, tok, args.seq_len, args.workers)
    cluster.disconnect()

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
        "ray_data": ray_scaling,
        "packing_memory": memory,
        "counts": manifest["counts"],
        "sources": {s["name"]: s["per_task"] for s in manifest["sources"]},
        "near_duplicates": manifest["near_duplicates"],
    }
    targets = {
        "pack_tokens_per_s": TARGET_TOKENS_PER_S,
        "met": pack_rate >= TARGET_TOKENS_PER_S,
        "ray_pack_scaling": TARGET_PACK_SCALING,
        "ray_pack_scaling_met": ray_scaling["pack_ratio"] >= TARGET_PACK_SCALING,
        "packing_memory_ratio": TARGET_MEMORY_RATIO,
        "packing_memory_met": memory["ratio"] <= TARGET_MEMORY_RATIO,
    }
    path = report.write("data", figures, targets, table_rows(args, figures, targets))
    print(path.read_text())


def table_rows(args: argparse.Namespace, f: dict, targets: dict) -> list[tuple[str, str, str]]:
    met = {True: "met", False: "NOT met"}
    w, scale = args.workers, f["ray_data"]
    one, many = scale["workers"]["1"], scale["workers"][str(w)]
    mem = f["packing_memory"]
    nd = f["near_duplicates"]
    small, large = mem["1x"], mem[f"{MEMORY_SCALE}x"]
    return [
        (
            f"corpus build (`odyssey data build --preset {args.preset}`)",
            f"{f['build_s']:.1f} s, {f['examples']:,} examples",
            "",
        ),
        (
            f"tokenizer training (vocab {args.vocab_size})",
            f"{f['tokenizer_train_s']:.1f} s on {f['train_chars'] / 1e6:.1f} M chars",
            "",
        ),
        (
            f"tokenize + pack in-process (seq_len {args.seq_len}), median of {args.repeats}",
            f"**{f['pack_tokens_per_s']['median'] / 1e6:.2f} M tokens/s** "
            f"({f['tokens'] / 1e6:.1f} M tokens in {f['pack_s_median']:.1f} s)",
            f">= {TARGET_TOKENS_PER_S / 1e6:.0f} M tokens/s: {met[targets['met']]}",
        ),
        ("end to end: build + tokenizer + pack", f"{f['end_to_end_tokens_per_s'] / 1e6:.2f} M tokens/s", ""),
        ("encoder, ignore_merges vs plain BPE (same run)", f"{f['encode_tokens_per_s']['ratio']:.2f}x", ""),
        (
            f"tokenize + pack on Ray Data, {w} workers vs 1 (interleaved, median of {args.repeats})",
            f"**{scale['pack_ratio']:.2f}x** ({many['pack_tokens_per_s'] / 1e6:.2f} vs "
            f"{one['pack_tokens_per_s'] / 1e6:.2f} M tokens/s)",
            f">= {TARGET_PACK_SCALING}x: {met[targets['ray_pack_scaling_met']]}",
        ),
        (
            f"build + tokenize + pack on Ray Data, {w} workers vs 1",
            f"{scale['end_to_end_ratio']:.2f}x ({many['build_s']:.1f} + {many['pack_s']:.1f} s vs "
            f"{one['build_s']:.1f} + {one['pack_s']:.1f} s)",
            "",
        ),
        (
            f"peak RSS (driver + Ray workers) packing {MEMORY_SCALE}x the corpus vs 1x, {w} workers",
            f"**{mem['ratio']:.2f}x** ({large['peak_rss_mib']:,} vs {small['peak_rss_mib']:,} MiB; "
            f"{large['units']} vs {small['units']} units)",
            f"<= {TARGET_MEMORY_RATIO}x: {met[targets['packing_memory_met']]}",
        ),
        (
            f"near-duplicate groups (Jaccard >= {nd['threshold']}, 5-word shingles)",
            f"{nd['documents']:,} documents in {nd['groups']:,} groups ({nd['merged_documents']:,} merged; "
            f"largest {nd['largest_group']:,})",
            "",
        ),
    ]


if __name__ == "__main__":
    main()
