"""`odyssey data pack`: the corpus tokenized into fixed-length blocks that training streams.

Each block holds seq_len + 1 token ids (inputs are block[:-1], next-token targets block[1:]) and a loss
mask of the same length: 1 where a token is a target the model is trained to produce. Task examples
train on their target and <|eos|>, never on the prompt; `lm` text trains on every token.

Blocks are packed per task, so training can weigh the tasks (a mixture) without re-tokenizing. A task
example is never split across blocks (its target without its prompt would teach nothing): when the
next example does not fit, the rest of the block is padding. One longer than a block is cut, input
first. `lm` text is one stream per unit cut into blocks (its last block padded).

The work comes in units: one row group of one corpus shard of one task's split (corpus.py writes row
groups of 10,000 examples). A unit is read, shuffled with its own seed, encoded, packed and written as
one blocks shard by itself, so memory holds one row group per worker whatever the corpus size, and the
output depends on nothing but the unit: in-process or on Ray Data, with any number of workers, the
same corpus, tokenizer and seed give byte-identical shards.

Output (published complete or not at all):
    {out}/{task}/{split}-00000.parquet   one per unit, in unit order; columns input_ids, loss_mask:
                                         fixed_size_list<int32|uint8>[seq_len+1]
    {out}/{task}/{split}.ids.npy         the same rows as one array, shards in order (row g is the
    {out}/{task}/{split}.mask.npy        g-th row of the shards): ids [N, seq_len+1] in the smallest
                                         unsigned dtype of the vocabulary, mask uint8 [N, seq_len+1]
    {out}/arrays.json                    per task and split: rows, each shard's offset; written last
    {out}/manifest.json                  seq_len, tokenizer fingerprint, counts, shard sha256, throughput

The Parquet shards are what Ray Data streams (data.load: stream); the arrays are what a training rank
reads its own rows from by random access, memory-mapped (data.load: index, train/mixture.py). Blocks
packed before the arrays existed get them from `ensure_arrays`, which training calls.
"""

from __future__ import annotations

import functools
import json
import logging
import mmap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer as HFTokenizer

from odyssey import atomic
from odyssey.data.corpus import MANIFEST, read_manifest
from odyssey.data.parallel import ordered_map, where
from odyssey.errors import ConfigError, OdysseyError
from odyssey.progress import Progress
from odyssey.tasks import SPLITS, TASKS
from odyssey.tokenizer import Tokenizer

log = logging.getLogger(__name__)


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


# --- units of work -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One row group of one corpus shard of one task's split: what a worker packs at a time."""

    index: int  # position in the run's order: task, split, shard, row group
    task: str
    split: str
    shard: int  # the corpus shard's position among its split's shards
    row_group: int
    part: int  # position among its split's units: names the blocks shard it writes
    source: str  # the corpus shard, an absolute path


@dataclass(frozen=True)
class UnitResult:
    """What a unit reports to the driver: its counts and its blocks shard ("" when it packed nothing)."""

    unit: int
    task: str
    split: str
    examples: int
    blocks: int
    trained_tokens: int
    non_pad: int  # tokens of its blocks that are not padding
    truncated_examples: int
    cut_targets: int
    tokens: int  # produced by the tokenizer: no padding, no control tokens
    path: str  # relative to the output directory
    sha256: str


def plan_units(corpus: Path) -> list[Unit]:
    """Every unit of a corpus, in the run's order: task, split, shard, row group."""
    units: list[Unit] = []
    for task in TASKS:
        for split in SPLITS:
            part = 0
            for shard, path in enumerate(sorted((corpus / "examples" / task).glob(f"{split}-*.parquet"))):
                for row_group in range(pq.ParquetFile(path).num_row_groups):
                    units.append(Unit(len(units), task, split, shard, row_group, part, str(path.resolve())))
                    part += 1
    return units


def _encode_and_pack(
    tok: Tokenizer, task: str, inputs: list[str], targets: list[str], capacity: int
) -> tuple[np.ndarray, np.ndarray, dict[str, int], int]:
    """Blocks, loss masks, cut counts and tokens encoded of one unit's (shuffled) examples."""
    if task == "lm":
        tgt_ids = tok.encode_batch(targets) if targets else []
        ids, mask = pack_stream(tok, tgt_ids, capacity)
        return ids, mask, {"truncated_examples": 0, "cut_targets": 0}, sum(map(len, tgt_ids))
    encoded = tok.encode_batch(inputs + targets) if targets else []  # one batch: better core use
    in_ids, tgt_ids = encoded[: len(inputs)], encoded[len(inputs) :]
    ids, mask, stats = pack_examples(tok, task, in_ids, tgt_ids, capacity)
    return ids, mask, stats, sum(map(len, encoded))


def pack_unit(unit: Unit, tok: Tokenizer, capacity: int, seed: int, out: Path) -> UnitResult:
    """Read, shuffle, encode, pack and write one unit into `out` (the staged output directory)."""
    table = pq.ParquetFile(unit.source).read_row_group(unit.row_group, columns=["input", "target"])
    key = [seed, TASKS.index(unit.task), SPLITS.index(unit.split), unit.shard, unit.row_group]
    table = table.take(np.random.default_rng(key).permutation(table.num_rows))
    inputs, targets = table.column("input").to_pylist(), table.column("target").to_pylist()
    ids, mask, stats, tokens = _encode_and_pack(tok, unit.task, inputs, targets, capacity)
    path, sha256 = "", ""
    if ids.shape[0]:
        path = f"{unit.task}/{unit.split}-{unit.part:05d}.parquet"
        (out / unit.task).mkdir(parents=True, exist_ok=True)
        pq.write_table(blocks_table(ids, mask), out / path, compression="zstd")
        sha256 = atomic.sha256_file(out / path)
    return UnitResult(
        unit=unit.index,
        task=unit.task,
        split=unit.split,
        examples=table.num_rows,
        blocks=int(ids.shape[0]),
        trained_tokens=int(mask.sum()),
        non_pad=int((ids != tok.pad_id).sum()),
        tokens=tokens,
        path=path,
        sha256=sha256,
        **stats,
    )


@dataclass(frozen=True)
class UnitPacker:
    """pack_unit as one picklable callable for parallel.ordered_map: it carries the tokenizer as JSON
    and each process builds it once (_tokenizer), wherever the units run."""

    tokenizer_json: str
    capacity: int
    seed: int
    out: str

    def __call__(self, unit: Unit) -> UnitResult:
        return pack_unit(unit, _tokenizer(self.tokenizer_json), self.capacity, self.seed, Path(self.out))


@functools.lru_cache(maxsize=2)
def _tokenizer(spec: str) -> Tokenizer:
    return Tokenizer(HFTokenizer.from_str(spec))


# --- the whole corpus ------------------------------------------------------------------------------------


def _split_counts(results: list[UnitResult], capacity: int) -> dict:
    blocks = sum(r.blocks for r in results)
    non_pad = sum(r.non_pad for r in results)
    return {
        "examples": sum(r.examples for r in results),
        "blocks": blocks,
        "trained_tokens": sum(r.trained_tokens for r in results),
        "filled": round(non_pad / (blocks * capacity), 4) if blocks else 0.0,
        "truncated_examples": sum(r.truncated_examples for r in results),
        "cut_targets": sum(r.cut_targets for r in results),
    }


def _counts(results: list[UnitResult], capacity: int) -> dict[str, dict[str, dict]]:
    """The manifest's counts: per task and split, summed over their units."""
    return {
        task: {
            split: _split_counts([r for r in results if (r.task, r.split) == (task, split)], capacity)
            for split in SPLITS
        }
        for task in TASKS
    }


def _gather(running: Iterator[UnitResult], total: int) -> list[UnitResult]:
    """Every unit's result as it finishes, with a progress line (units done, tokens/s, ETA); returned in
    unit order, so the manifest does not depend on which worker finished first."""
    progress = Progress(total, unit="tok", emit=log.info)
    results: list[UnitResult] = []
    tokens = 0
    for result in running:
        results.append(result)
        tokens += result.tokens
        progress.update(len(results), tokens)
    return sorted(results, key=lambda r: r.unit)


def pack_corpus(
    corpus: str | Path,
    tok: Tokenizer,
    seq_len: int,
    out: str | Path | None = None,
    seed: int = 0,
    overwrite: bool = False,
    workers: int | None = None,
) -> dict:
    """Tokenize and pack every task and split of a corpus, unit by unit. Returns the blocks manifest.

    workers: where the units run (parallel.ordered_map): 0 in this process; None on Ray Data when this
    process is connected to a cluster (every CPU), else in this process; n > 0 on Ray Data, n tasks at a
    time. The output is the same bytes whichever runs it. On Ray the tasks read the corpus and write the
    blocks themselves: on one machine any local path will do, on a cluster of several the corpus and
    `out` must be on a file system every node mounts at the same path (NFS, ...).
    """
    corpus = Path(corpus)
    corpus_manifest = read_manifest(corpus)
    if seq_len < 8:
        raise ConfigError(f"seq_len={seq_len} is too short; use 8 or more")
    out = Path(out) if out is not None else corpus / f"blocks-{seq_len}"
    units = plan_units(corpus)
    capacity = seq_len + 1
    t0 = time.perf_counter()
    with atomic.staged_dir(out, overwrite=overwrite) as stage:
        stage = stage.resolve()  # the workers' working directory is not ours
        packer = UnitPacker(tok.to_json(), capacity, seed, str(stage))
        results = _gather(ordered_map(packer, units, workers), len(units))
        shards = [{"path": r.path, "blocks": r.blocks, "sha256": r.sha256} for r in results if r.path]
        write_arrays(stage, seq_len, tok.vocab_size, shards)
        seconds = time.perf_counter() - t0
        tokens = sum(r.tokens for r in results)
        manifest = {
            "format": "odyssey-blocks/1",
            "seq_len": seq_len,
            "seed": seed,
            "tokenizer_sha256": tok.fingerprint,
            "vocab_size": tok.vocab_size,
            "corpus_manifest_sha256": atomic.sha256_file(corpus / MANIFEST),
            "corpus_seed": corpus_manifest["seed"],
            "counts": _counts(results, capacity),
            "tokens": tokens,  # produced by the tokenizer: no padding, no control tokens
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / max(seconds, 1e-9)),
            "units": len(units),
            "ran": where(workers),
            "shards": shards,
        }
        atomic.write_text(stage / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    log.info(
        "packed %d tokens into %s in %.1fs (%.0f tokens/s, %d units, %s)",
        tokens,
        out,
        seconds,
        tokens / max(seconds, 1e-9),
        len(units),
        where(workers),
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
    return _rows(table, "input_ids", capacity), _rows(table, "loss_mask", capacity)


def _rows(table: pa.Table, column: str, capacity: int) -> np.ndarray:
    return table.column(column).combine_chunks().flatten().to_numpy().reshape(-1, capacity)


# --- token arrays: random access to the rows ----------------------------------------------------------

ARRAYS = "arrays.json"


def array_paths(blocks: str | Path, task: str, split: str) -> tuple[Path, Path]:
    """Where one task and split's ids and loss mask arrays are."""
    return Path(blocks) / task / f"{split}.ids.npy", Path(blocks) / task / f"{split}.mask.npy"


def ids_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id: half of int32's bytes up to 65,536 ids."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_arrays(blocks: str | Path, seq_len: int, vocab_size: int, shards: list[dict]) -> dict:
    """The token arrays of every task and split, copied from the Parquet shards (manifest["shards"]:
    path, blocks, sha256) one shard at a time, each file atomically; arrays.json last, so that its
    presence says they are complete. Returns what arrays.json holds."""
    dtype, splits = ids_dtype(vocab_size), {}
    for task in TASKS:
        for split in SPLITS:
            own = sorted(
                (s for s in shards if s["path"].startswith(f"{task}/{split}-")), key=lambda s: s["path"]
            )
            splits.setdefault(task, {})[split] = _write_split(
                Path(blocks), task, split, own, seq_len + 1, dtype
            )
    index = {"format": "odyssey-arrays/1", "seq_len": seq_len, "dtype": dtype.name, "splits": splits}
    atomic.write_text(Path(blocks) / ARRAYS, json.dumps(index, indent=2) + "\n")
    return index


def _write_split(
    blocks: Path, task: str, split: str, shards: list[dict], capacity: int, dtype: np.dtype
) -> dict:
    """One task and split's arrays: rows in shard order, each shard's first row recorded (its offset)."""
    rows = sum(s["blocks"] for s in shards)
    ids_path, mask_path = array_paths(blocks, task, split)
    offsets, at = [], 0
    with atomic.staged_file(ids_path) as ids_tmp, atomic.staged_file(mask_path) as mask_tmp:
        ids = np.lib.format.open_memmap(ids_tmp, "w+", dtype, (rows, capacity))
        mask = np.lib.format.open_memmap(mask_tmp, "w+", np.uint8, (rows, capacity))
        for shard in shards:
            table = pq.read_table(blocks / shard["path"])
            n = table.num_rows
            if n != shard["blocks"]:
                raise OdysseyError(
                    f"{blocks / shard['path']}: {n} blocks, the manifest says {shard['blocks']}"
                )
            shard_ids = _rows(table, "input_ids", capacity)
            if n and shard_ids.max() > np.iinfo(dtype).max:
                raise OdysseyError(f"{blocks / shard['path']}: a token id exceeds {dtype.name}")
            ids[at : at + n] = shard_ids
            mask[at : at + n] = _rows(table, "loss_mask", capacity)
            offsets.append({"path": shard["path"], "offset": at, "rows": n, "sha256": shard["sha256"]})
            at += n
        ids.flush()
        mask.flush()
        del ids, mask  # unmapped before the files are renamed into place
    return {"rows": rows, "shards": offsets}


def ensure_arrays(blocks: str | Path) -> dict:
    """The token arrays of a blocks directory, written when they are missing (blocks packed before the
    arrays existed) or are not those of its shards; the contents of arrays.json."""
    blocks = Path(blocks)
    manifest = json.loads((blocks / MANIFEST).read_text(encoding="utf-8"))
    path = blocks / ARRAYS
    if path.is_file():
        index = json.loads(path.read_text(encoding="utf-8"))
        have = sorted(
            (s["path"], s["sha256"])
            for task in index["splits"].values()
            for sp in task.values()
            for s in sp["shards"]
        )
        if have == sorted((s["path"], s["sha256"]) for s in manifest["shards"]):
            return index
    log.info("writing the token arrays of %s (random access for training; once)", blocks)
    return write_arrays(blocks, manifest["seq_len"], manifest["vocab_size"], manifest["shards"])


def open_arrays(blocks: str | Path, task: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """ids and loss mask of one task and split, memory-mapped read-only: a row's pages are read when the
    row is. Without read-around (MADV_RANDOM) a fault would read ~128 KiB about it: a rank would read its
    neighbours' rows as well as its own."""
    arrays = []
    for path in array_paths(blocks, task, split):
        rows = np.load(path, mmap_mode="r")
        advice = getattr(mmap, "MADV_RANDOM", None)
        if advice is not None and rows.size:
            rows._mmap.madvise(advice)  # numpy keeps the mapping there; no public way to advise it
        arrays.append(rows)
    return arrays[0], arrays[1]
