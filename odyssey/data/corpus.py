"""`odyssey data build`: the multitask corpus, from public text on this machine and the user's files.

Output directory (published complete or not at all):
    examples/{task}/{split}-00000.parquet   the examples (schema.SCHEMA), shuffled by hash
    documents/part-00000.parquet            whole legal documents, for the retrieval index of `find`
    manifest.json                           counts per task and split, sources, shard sha256, seed

The same seed on the same machine gives byte-identical shards. Splits are drawn per document
(sampling.split_of), and an example whose (task, input) repeats one seen before is dropped, so the
same text never sits in two splits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from odyssey import __version__, atomic
from odyssey.config import to_dict
from odyssey.data import debian, legal, moderation, python_stdlib
from odyssey.data.sampling import split_of, unit_hash
from odyssey.data.schema import DOCUMENT_SCHEMA, SCHEMA, Collected, Example, read_examples
from odyssey.errors import ConfigError, SchemaError
from odyssey.tasks import SPLITS, TASKS

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD_ROWS = 50_000


@dataclass
class CorpusConfig:
    preset: Literal["tiny", "full", "none"] = "tiny"  # none: only the user's --source files
    seed: int = 0
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    # Documents read per source (None: all). A preset sets these; --set overrides them.
    max_docs: dict[str, int | None] = field(default_factory=dict)
    moderation_examples: int = 0
    max_examples_per_task: int | None = None  # per task and split-independent: a cap after dedup

    def __post_init__(self) -> None:
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1):
            raise ConfigError("val_fraction and test_fraction must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction} leaves nothing to train on"
            )
        unknown = set(self.max_docs) - set(SOURCES)
        if unknown:
            raise ConfigError(
                f"max_docs: unknown source {sorted(unknown)[0]!r}; sources: {', '.join(SOURCES)}"
            )
        if self.moderation_examples < 0:
            raise ConfigError("moderation_examples must be >= 0")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> CorpusConfig:
        presets = {
            # Seconds to build: tests and the demo.
            "tiny": dict(
                max_docs={"debian": 150, "python_stdlib": 40, "legal": 60},
                moderation_examples=1200,
                max_examples_per_task=1500,
            ),
            "full": dict(max_docs={}, moderation_examples=20_000),
            "none": dict(max_docs={}, moderation_examples=0),
        }
        if name not in presets:
            raise ConfigError(f"unknown corpus preset {name!r}; presets: {', '.join(presets)}")
        return cls(preset=name, **{**presets[name], **overrides})


SOURCES = {"debian": debian.collect, "python_stdlib": python_stdlib.collect, "legal": legal.collect}


def collect_builtin(cfg: CorpusConfig) -> list[Collected]:
    if cfg.preset == "none":
        return []
    out = []
    for name, collect in SOURCES.items():
        t0 = time.perf_counter()
        got = collect(cfg.max_docs.get(name), cfg.seed)
        log.info(
            "source %-14s %6d files  %7d examples  %5.1fs",
            name,
            len(got.files),
            len(got.examples),
            time.perf_counter() - t0,
        )
        out.append(got)
    if cfg.moderation_examples:
        base = [ex for c in out for ex in c.examples]
        made = moderation.synthesize(base, cfg.moderation_examples, cfg.seed)
        log.info("source %-14s %6s files  %7d examples (synthetic)", "moderation", "-", len(made))
        out.append(Collected("moderation", [], made))
    return out


def assign_splits(cfg: CorpusConfig, collected: list[Collected]) -> dict[str, list[Example]]:
    """Split every example by its document, drop repeats, apply the per-task cap. Returns split -> examples."""
    doc_split = {ex.doc_id: ex.split for c in collected for ex in c.examples if ex.split is not None}
    seen: set[tuple[str, str]] = set()
    per_task: dict[str, list[Example]] = {t: [] for t in TASKS}
    for c in collected:
        for ex in c.examples:
            split = doc_split.setdefault(
                ex.doc_id, ex.split or split_of(ex.doc_id, cfg.seed, cfg.val_fraction, cfg.test_fraction)
            )
            if ex.split is not None and ex.split != split:
                raise SchemaError(
                    f"{c.name.removeprefix('user:')}: document {ex.doc_id!r} is given split '{ex.split}' here and "
                    f"'{split}' elsewhere; a document must stay in one split or its text leaks across them"
                )
            # The text that must not repeat: the passage for find, the text for lm, else the input.
            key = (ex.task, ex.target if ex.task in ("find", "lm") else ex.input)
            if key in seen:
                continue
            seen.add(key)
            per_task[ex.task].append(Example(ex.task, ex.input, ex.target, ex.doc_id, split))
    by_split: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for examples in per_task.values():
        order = sorted(examples, key=lambda e: unit_hash(cfg.seed, "order", e.doc_id, e.input, e.target))
        for ex in order[: cfg.max_examples_per_task]:
            by_split[ex.split].append(ex)
    return by_split


def _write_shards(table: pa.Table, directory: Path, stem: str, out_root: Path) -> list[dict]:
    directory.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, start in enumerate(range(0, max(table.num_rows, 1), SHARD_ROWS)):
        part = table.slice(start, SHARD_ROWS)
        path = directory / f"{stem}-{i:05d}.parquet"
        pq.write_table(part, path, compression="zstd", row_group_size=10_000)
        shards.append(
            {
                "path": path.relative_to(out_root).as_posix(),
                "rows": part.num_rows,
                "sha256": atomic.sha256_file(path),
            }
        )
    return shards


def _source_record(c: Collected) -> dict:
    digest = hashlib.sha256()
    for path in c.files:
        digest.update(str(path).encode() + b"\0" + atomic.sha256_file(path).encode() + b"\n")
    record = {
        "name": c.name,
        "files": len(c.files),
        "examples": len(c.examples),
        "sha256": digest.hexdigest(),
    }
    if len(c.files) <= 20:
        record["paths"] = [str(p) for p in c.files]
    return record


def build_corpus(
    out: str | Path, cfg: CorpusConfig, user_files: list[str | Path] = (), overwrite: bool = False
) -> dict:
    """Build the corpus into `out`; returns the manifest. Every user file is read and checked before
    anything is written; the output appears complete or not at all."""
    out = Path(out)
    user_paths = [Path(p) for p in user_files]
    t0 = time.perf_counter()
    collected = [Collected(f"user:{p}", [p], read_examples(p)) for p in user_paths]  # fail fast on bad input
    collected = collect_builtin(cfg) + collected
    if not any(c.examples for c in collected):
        raise ConfigError("the corpus would be empty: use --preset tiny|full or give --source files")
    by_split = assign_splits(cfg, collected)

    documents = [d for c in collected for d in c.documents]
    with atomic.staged_dir(out, overwrite=overwrite) as stage:
        shards: list[dict] = []
        counts: dict[str, dict[str, int]] = {t: dict.fromkeys(SPLITS, 0) for t in TASKS}
        for split, examples in by_split.items():
            for task in TASKS:
                rows = [ex for ex in examples if ex.task == task]
                counts[task][split] = len(rows)
                if not rows:
                    continue
                table = pa.Table.from_pydict(
                    {col: [getattr(ex, col) for ex in rows] for col in SCHEMA.names}, schema=SCHEMA
                )
                shards += _write_shards(table, stage / "examples" / task, split, stage)
        if documents:
            docs = sorted(documents, key=lambda d: d.doc_id)
            table = pa.Table.from_pydict(
                {
                    "doc_id": [d.doc_id for d in docs],
                    "title": [d.title for d in docs],
                    "text": [d.text for d in docs],
                    "split": [
                        split_of(d.doc_id, cfg.seed, cfg.val_fraction, cfg.test_fraction) for d in docs
                    ],
                },
                schema=DOCUMENT_SCHEMA,
            )
            shards += _write_shards(table, stage / "documents", "part", stage)
        manifest = {
            "format": "odyssey-corpus/1",
            "odyssey_version": __version__,
            "config": to_dict(cfg),
            "seed": cfg.seed,
            "counts": counts,
            "total_examples": sum(sum(v.values()) for v in counts.values()),
            "documents": len(documents),
            "sources": [_source_record(c) for c in collected],
            "shards": shards,
        }
        atomic.write_text(stage / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    log.info("corpus: %d examples in %s (%.1fs)", manifest["total_examples"], out, time.perf_counter() - t0)
    return manifest


def read_manifest(corpus: str | Path) -> dict:
    path = Path(corpus) / MANIFEST
    if not path.is_file():
        raise ConfigError(
            f"{corpus} is not a corpus (no {MANIFEST}); build one with `odyssey data build --out {corpus}`"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def read_split(corpus: str | Path, task: str, split: str, columns: list[str] | None = None) -> pa.Table:
    """One task's examples of one split (an empty table when there are none)."""
    files = sorted((Path(corpus) / "examples" / task).glob(f"{split}-*.parquet"))
    if not files:
        return SCHEMA.empty_table().select(columns or SCHEMA.names)
    return pa.concat_tables(pq.read_table(f, columns=columns) for f in files)


def texts(corpus: str | Path, split: str = "train") -> Iterator[str]:
    """Every input and target text of one split: what the tokenizer learns from (train only, so
    held-out text shapes nothing)."""
    for task in TASKS:
        table = read_split(corpus, task, split, ["input", "target"])
        for column in ("input", "target"):
            yield from (t for t in table.column(column).to_pylist() if t)
