"""`odyssey data pack`: the corpus tokenized into fixed-length blocks that training streams.

Each block holds seq_len + 1 token ids (inputs are block[:-1], next-token targets block[1:]) and a loss
mask of the same length: 1 where a token is a target the model is trained to produce. Task examples
train on their target and <|eos|>, never on the prompt; `lm` text trains on every token.

Blocks are packed per task, so training can weigh the tasks (a mixture) without re-tokenizing. A task
example is never split across blocks (its target without its prompt would teach nothing): when the
next example does not fit, the rest of the block is padding. One longer than a block is cut, input
first. `lm` text is one stream cut into blocks.

Output (published complete or not at all):
    {out}/{task}/{split}-00000.parquet   columns input_ids, loss_mask: fixed_size_list<int32|uint8>[seq_len+1]
    {out}/manifest.json                  seq_len, tokenizer fingerprint, counts, shard sha256, throughput
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from odyssey import atomic
from odyssey.data.corpus import MANIFEST, read_manifest, read_split
from odyssey.errors import ConfigError
from odyssey.tasks import SPLITS, TASKS
from odyssey.tokenizer import Tokenizer

log = logging.getLogger(__name__)
SHARD_BLOCKS = 20_000


def pack_examples(
    tok: Tokenizer, task: str, inputs: list[list[int]], targets: list[list[int]], capacity: int
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Pack encoded (input, target) pairs of one task into blocks: ids (N, capacity) int32, mask
    (N, capacity) uint8, and counts of the examples that had to be cut (truncated_examples) and of
    those whose target was cut too (cut_targets: they end without <|eos|>)."""
    prefix = tok.prefix(task)
    budget = capacity - len(prefix) - 2  # room for input + target besides <|sep|> and <|eos|>
    if budget < 2:
        raise ConfigError(f"seq_len={capacity - 1} is too short for a {task} example")
    blocks: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    ids = np.full(capacity, tok.pad_id, dtype=np.int32)
    mask = np.zeros(capacity, dtype=np.uint8)
    fill, truncated, cut_targets = 0, 0, 0
    for inp, tgt in zip(inputs, targets):
        eos = [tok.eos_id]
        if len(inp) + len(tgt) > budget:  # cut: keep at least half the room for the target
            truncated += 1
            keep_tgt = min(len(tgt), max(budget // 2, budget - len(inp)))
            if keep_tgt < len(tgt):
                eos = []  # a cut target has no end to learn
                cut_targets += 1
            inp, tgt = inp[: budget - keep_tgt], tgt[:keep_tgt]
        head = len(prefix) + len(inp) + 1
        n = head + len(tgt) + len(eos)
        if fill + n > capacity:
            blocks.append(ids)
            masks.append(mask)
            ids = np.full(capacity, tok.pad_id, dtype=np.int32)
            mask = np.zeros(capacity, dtype=np.uint8)
            fill = 0
        ids[fill : fill + n] = [*prefix, *inp, tok.sep_id, *tgt, *eos]
        mask[fill + head : fill + n] = 1
        fill += n
    if fill:
        blocks.append(ids)
        masks.append(mask)
    stats = {"truncated_examples": truncated, "cut_targets": cut_targets}
    if not blocks:
        return np.zeros((0, capacity), np.int32), np.zeros((0, capacity), np.uint8), stats
    return np.stack(blocks), np.stack(masks), stats


def pack_stream(tok: Tokenizer, texts: list[list[int]], capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack encoded texts as one stream <|bos|> text <|eos|> <|bos|> text <|eos|> ... cut into blocks."""
    if not texts:
        return np.zeros((0, capacity), np.int32), np.zeros((0, capacity), np.uint8)
    lengths = np.array([len(t) + 2 for t in texts])
    stream = np.empty(int(lengths.sum()), dtype=np.int32)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    stream[starts] = tok.bos_id
    stream[starts + lengths - 1] = tok.eos_id
    body = np.ones(len(stream), dtype=bool)
    body[starts] = False
    body[starts + lengths - 1] = False
    stream[body] = np.fromiter((i for t in texts for i in t), dtype=np.int32, count=int(body.sum()))
    mask = np.ones(len(stream), dtype=np.uint8)
    mask[starts] = 0  # <|bos|> follows the previous <|eos|>: nothing to learn there
    n_blocks = -(-len(stream) // capacity)
    ids = np.full(n_blocks * capacity, tok.pad_id, dtype=np.int32)
    out_mask = np.zeros(n_blocks * capacity, dtype=np.uint8)
    ids[: len(stream)] = stream
    out_mask[: len(stream)] = mask
    return ids.reshape(n_blocks, capacity), out_mask.reshape(n_blocks, capacity)


def blocks_table(ids: np.ndarray, mask: np.ndarray) -> pa.Table:
    capacity = ids.shape[1]
    return pa.table(
        {
            "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel()), capacity),
            "loss_mask": pa.FixedSizeListArray.from_arrays(pa.array(mask.ravel()), capacity),
        }
    )


def _pack_split(corpus: Path, tok: Tokenizer, task: str, split: str, capacity: int, seed: int, stage: Path):
    """Read, encode, pack and write one task's split. Returns (counts, shards, tokens encoded)."""
    table = read_split(corpus, task, split, ["input", "target"])
    order = np.random.default_rng([seed, TASKS.index(task), SPLITS.index(split)]).permutation(table.num_rows)
    all_targets = table.column("target").to_pylist()
    targets = [all_targets[i] for i in order]
    stats = {"truncated_examples": 0, "cut_targets": 0}
    if task == "lm":
        tgt_ids = tok.encode_batch(targets) if targets else []
        n_tokens = sum(map(len, tgt_ids))
        ids, mask = pack_stream(tok, tgt_ids, capacity)
    else:
        all_inputs = table.column("input").to_pylist()
        inputs = [all_inputs[i] for i in order]
        encoded = tok.encode_batch(inputs + targets) if targets else []  # one batch: better core use
        in_ids, tgt_ids = encoded[: len(inputs)], encoded[len(inputs) :]
        n_tokens = sum(map(len, encoded))
        ids, mask, stats = pack_examples(tok, task, in_ids, tgt_ids, capacity)
    counts = {
        "examples": table.num_rows,
        "blocks": int(ids.shape[0]),
        "trained_tokens": int(mask.sum()),
        "filled": round(float((ids != tok.pad_id).mean()) if ids.size else 0.0, 4),
        **stats,
    }
    shards = []
    for i in range(0, ids.shape[0], SHARD_BLOCKS):
        path = stage / task / f"{split}-{i // SHARD_BLOCKS:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        part = slice(i, i + SHARD_BLOCKS)
        pq.write_table(blocks_table(ids[part], mask[part]), path, compression="zstd")
        shards.append(
            {
                "path": path.relative_to(stage).as_posix(),
                "blocks": int(ids[part].shape[0]),
                "sha256": atomic.sha256_file(path),
            }
        )
    return counts, shards, n_tokens


def pack_corpus(
    corpus: str | Path,
    tok: Tokenizer,
    seq_len: int,
    out: str | Path | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Tokenize and pack every task and split of a corpus. Returns the blocks manifest."""
    corpus = Path(corpus)
    corpus_manifest = read_manifest(corpus)
    if seq_len < 8:
        raise ConfigError(f"seq_len={seq_len} is too short; use 8 or more")
    out = Path(out) if out is not None else corpus / f"blocks-{seq_len}"
    jobs = [(task, split) for task in TASKS for split in SPLITS]
    t0 = time.perf_counter()
    with atomic.staged_dir(out, overwrite=overwrite) as stage:
        # Two splits in flight: while one holds the GIL packing in Python, the other is encoding in
        # Rust on every core (encode_batch releases the GIL). Results come back in job order.
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(
                pool.map(lambda job: _pack_split(corpus, tok, *job, seq_len + 1, seed, stage), jobs)
            )
        seconds = time.perf_counter() - t0
        tokens = sum(r[2] for r in results)
        counts: dict[str, dict[str, dict]] = {task: {} for task in TASKS}
        for (task, split), (split_counts, _, _) in zip(jobs, results):
            counts[task][split] = split_counts
        manifest = {
            "format": "odyssey-blocks/1",
            "seq_len": seq_len,
            "seed": seed,
            "tokenizer_sha256": tok.fingerprint,
            "vocab_size": tok.vocab_size,
            "corpus_manifest_sha256": atomic.sha256_file(corpus / MANIFEST),
            "corpus_seed": corpus_manifest["seed"],
            "counts": counts,
            "tokens": tokens,  # produced by the tokenizer: no padding, no control tokens
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / max(seconds, 1e-9)),
            "shards": [shard for r in results for shard in r[1]],
        }
        atomic.write_text(stage / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    log.info(
        "packed %d tokens into %s in %.1fs (%.0f tokens/s)", tokens, out, seconds, tokens / max(seconds, 1e-9)
    )
    return manifest


def read_blocks(blocks: str | Path, task: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """ids (N, seq_len + 1) int32 and loss mask (N, seq_len + 1) uint8 of one task and split."""
    files = sorted((Path(blocks) / task).glob(f"{split}-*.parquet"))
    manifest = json.loads((Path(blocks) / MANIFEST).read_text())
    capacity = manifest["seq_len"] + 1
    if not files:
        return np.zeros((0, capacity), np.int32), np.zeros((0, capacity), np.uint8)
    table = pa.concat_tables(pq.read_table(f) for f in files)
    ids = table.column("input_ids").combine_chunks().flatten().to_numpy().reshape(-1, capacity)
    mask = table.column("loss_mask").combine_chunks().flatten().to_numpy().reshape(-1, capacity)
    return ids, mask
