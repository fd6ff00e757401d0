"""`odyssey data build`: the multitask corpus, from public text on this machine and the user's datasets.

Sources (SOURCES; a preset says how many documents of each it reads and how many examples per task it
needs, `min_examples`): the Python standard library and the installed Python distributions exist
wherever Python runs; the Debian package index and copyright files are extras where present
(ODYSSEY_DEBIAN_ROOT); `--source KIND:PATH` brings a public dataset through an adapter (adapters.py).
The build logs what each source gave, per task, and refuses a task left with fewer examples than the
preset needs, naming the task and the fix.

Output directory (published complete or not at all):
    examples/{task}/{split}-00000.parquet   the examples (schema.SCHEMA), shuffled by hash
    documents/part-00000.parquet            whole documents, for the retrieval index of `find`
    manifest.json                           counts per task and split, sources, near-duplicate groups,
                                            shard sha256, seed

The same seed on the same sources gives byte-identical shards. No text sits in two splits:
- an example whose (task, text) repeats one seen before is dropped;
- documents whose texts are near-duplicates (MinHash estimate of the Jaccard similarity of word
  shingles >= `near_duplicates`, neardup.py) form one group, and splits are drawn per group
  (sampling.split_of of the group's first doc_id), so a group never spans two splits.

The near-duplicate signatures (the build's costly part) run as a Ray Data pipeline when a cluster is
up or `workers` is given (parallel.py); the result does not depend on where they ran.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from odyssey import __version__, atomic
from odyssey.config import to_dict
from odyssey.data import adapters, debian, legal, moderation, neardup, pydist, python_stdlib
from odyssey.data.parallel import ordered_map, where
from odyssey.data.sampling import split_of, unit_hash
from odyssey.data.schema import DOCUMENT_SCHEMA, SCHEMA, Collected, Example
from odyssey.errors import ConfigError, SchemaError
from odyssey.progress import Progress
from odyssey.tasks import SPLITS, TASKS

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD_ROWS = 50_000
SIGNATURE_CHUNK = 2_000  # texts per near-duplicate signature task


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
    # Training examples each task needs; a task left with fewer is an error naming the fix.
    min_examples: dict[str, int] = field(default_factory=dict)
    # Jaccard threshold over word shingles above which documents are one near-duplicate group (None:
    # only exact repeats are dropped, and near-duplicates may sit in two splits).
    near_duplicates: float | None = neardup.DEFAULT_THRESHOLD

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
        unknown = set(self.min_examples) - set(TASKS)
        if unknown:
            raise ConfigError(f"min_examples: unknown task {sorted(unknown)[0]!r}; tasks: {', '.join(TASKS)}")
        if self.near_duplicates is not None and not 0 < self.near_duplicates <= 1:
            raise ConfigError(
                f"near_duplicates={self.near_duplicates}: give a Jaccard threshold in (0, 1], e.g. "
                f"{neardup.DEFAULT_THRESHOLD}, or null to keep near-duplicates apart"
            )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> CorpusConfig:
        presets = {
            # Seconds to build: tests and the demo.
            "tiny": dict(
                max_docs={"debian": 150, "python_stdlib": 40, "python_packages": 150, "legal": 60},
                moderation_examples=1200,
                max_examples_per_task=1500,
                min_examples=dict.fromkeys(TASKS, 50),
            ),
            "full": dict(max_docs={}, moderation_examples=20_000, min_examples=dict.fromkeys(TASKS, 500)),
            # Only the user's --source datasets: whatever tasks they hold.
            "none": dict(max_docs={}, moderation_examples=0),
        }
        if name not in presets:
            raise ConfigError(f"unknown corpus preset {name!r}; presets: {', '.join(presets)}")
        return cls(preset=name, **{**presets[name], **overrides})


# Sources that read this machine's files: name -> collect(limit, seed). Each says what it found.
SOURCES = {
    "python_stdlib": python_stdlib.collect,  # everywhere: the standard library and its reference topics
    "python_packages": pydist.collect,  # everywhere: the installed distributions' descriptions
    "legal": legal.collect,  # license texts: installed distributions' (everywhere), Debian's (extras)
    "debian": debian.collect,  # extras: Debian's package index, where present (ODYSSEY_DEBIAN_ROOT)
}


def collect_builtin(cfg: CorpusConfig) -> list[Collected]:
    """The preset's sources. They read this machine's files, so they run here, on the driver: a worker on
    another node would read that node's packages instead. Moderation, made from their text, comes after
    the split (add_moderation): its held-out examples use held-out templates."""
    if cfg.preset == "none":
        return []
    out = []
    for name, collect in SOURCES.items():
        t0 = time.perf_counter()
        out.append(collect(cfg.max_docs.get(name), cfg.seed))
        log.info("source %-16s %s (%.1fs)", name, _found(out[-1]), time.perf_counter() - t0)
    return out


def add_moderation(
    cfg: CorpusConfig, by_split: dict[str, list[Example]], base_docs: set[str]
) -> Collected | None:
    """The synthetic `moderate` examples (moderation.synthesize), made from the split examples of the
    documents in `base_docs` (the preset's sources), put into `by_split` in place: each in its base
    document's split. The per-task cap holds for `moderate` as a whole, as assign_splits applies it (hash
    order over the user's `moderate` examples and these together); an input already there is not added
    twice. Returns the source record's Collected (None when none are made)."""
    if not cfg.moderation_examples or not base_docs:
        return None
    base = {split: [ex for ex in examples if ex.doc_id in base_docs] for split, examples in by_split.items()}
    made = moderation.synthesize(base, cfg.moderation_examples, cfg.seed)
    have = [ex for examples in by_split.values() for ex in examples if ex.task == "moderate"]
    seen = {_key(ex) for ex in have}
    new = []
    for ex in made:
        if _key(ex) not in seen:
            seen.add(_key(ex))
            new.append(ex)
    keep = sorted(have + new, key=lambda e: unit_hash(cfg.seed, "order", e.doc_id, e.input, e.target))
    for examples in by_split.values():
        examples[:] = [ex for ex in examples if ex.task != "moderate"]
    for ex in keep[: cfg.max_examples_per_task]:
        by_split[ex.split].append(ex)
    c = Collected("moderation", [], made)
    log.info("source %-16s %s (synthetic, after the split)", "moderation", _found(c))
    return c


def _per_task(examples: list[Example]) -> dict[str, int]:
    counts = dict.fromkeys(TASKS, 0)
    for ex in examples:
        counts[ex.task] += 1
    return {t: n for t, n in counts.items() if n}


def _found(c: Collected) -> str:
    if not c.examples:
        return f"nothing found ({len(c.files)} files read)"
    tasks = ", ".join(f"{task} {n}" for task, n in _per_task(c.examples).items())
    return f"{len(c.files)} files -> {len(c.examples)} examples ({tasks})"


def _key(ex: Example) -> str:
    """The text that must not repeat: the passage for find, the text for lm, else the input."""
    return ex.target if ex.task in ("find", "lm") else ex.input


def _unique(collected: list[Collected]) -> list[Example]:
    """Every example once: a (task, text) seen before is dropped; a document's given split must agree."""
    given: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    out = []
    for c in collected:
        for ex in c.examples:
            if ex.split is not None and given.setdefault(ex.doc_id, ex.split) != ex.split:
                raise SchemaError(
                    f"{c.name.removeprefix('user:')}: document {ex.doc_id!r} is given split '{ex.split}' here and "
                    f"'{given[ex.doc_id]}' elsewhere; a document must stay in one split or its text leaks across them"
                )
            if (ex.task, _key(ex)) not in seen:
                seen.add((ex.task, _key(ex)))
                out.append(ex)
    return out


def signatures(texts: list[str], workers: int | None = None) -> np.ndarray:
    """neardup.signatures of every text, chunk by chunk (parallel.ordered_map), with a progress line."""
    chunks = [texts[i : i + SIGNATURE_CHUNK] for i in range(0, len(texts), SIGNATURE_CHUNK)]
    log.info(
        "near-duplicate signatures of %d texts in %d chunks, %s", len(texts), len(chunks), where(workers)
    )
    progress = Progress(len(chunks), unit="texts", emit=log.info)
    out, done = [], 0
    for sigs in ordered_map(neardup.signatures, chunks, workers):
        out.append(sigs)
        done += len(sigs)
        progress.update(len(out), done)
    return np.concatenate(out)


def near_duplicate_groups(
    cfg: CorpusConfig, examples: list[Example], workers: int | None = None
) -> tuple[dict[str, str], dict]:
    """doc_id -> its group's id (a doc_id) and the grouping's figures (neardup.group)."""
    docs = sorted({ex.doc_id for ex in examples})
    if cfg.near_duplicates is None:
        return {d: d for d in docs}, {"threshold": None, "documents": len(docs), "groups": len(docs)}
    t0 = time.perf_counter()
    sigs = signatures([_key(ex) for ex in examples], workers)
    groups, stats = neardup.group([ex.doc_id for ex in examples], sigs, cfg.near_duplicates)
    log.info(
        "near-duplicates (Jaccard >= %.2f): %d documents in %d groups, %d merged into another's group (%.1fs)",
        cfg.near_duplicates,
        stats["documents"],
        stats["groups"],
        stats["merged_documents"],
        time.perf_counter() - t0,
    )
    return groups, stats


def group_splits(cfg: CorpusConfig, examples: list[Example], groups: dict[str, str]) -> dict[str, str]:
    """doc_id -> split: a split given by the user's file holds for its whole group; else drawn per group."""
    given: dict[str, tuple[str, str]] = {}  # group -> (split, the doc that gave it)
    for ex in examples:
        if ex.split is None:
            continue
        group = groups[ex.doc_id]
        split, by = given.setdefault(group, (ex.split, ex.doc_id))
        if split != ex.split:
            raise SchemaError(
                f"documents {by!r} (split '{split}') and {ex.doc_id!r} (split '{ex.split}') are near-duplicates "
                f"(Jaccard >= {cfg.near_duplicates}); give them one split, or set near_duplicates higher"
            )
    return {
        doc: given[group][0]
        if group in given
        else split_of(group, cfg.seed, cfg.val_fraction, cfg.test_fraction)
        for doc, group in groups.items()
    }


def assign_splits(
    cfg: CorpusConfig, collected: list[Collected], workers: int | None = None
) -> tuple[dict[str, list[Example]], dict[str, str], dict]:
    """Drop repeats, group near-duplicate documents, split per group, apply the per-task cap.
    Returns (split -> examples, doc_id -> split, the near-duplicate figures)."""
    examples = _unique(collected)
    groups, stats = near_duplicate_groups(cfg, examples, workers)
    doc_split = group_splits(cfg, examples, groups)
    per_task: dict[str, list[Example]] = {t: [] for t in TASKS}
    for ex in examples:
        per_task[ex.task].append(replace(ex, split=doc_split[ex.doc_id]))
    by_split: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for examples_of_task in per_task.values():
        order = sorted(
            examples_of_task, key=lambda e: unit_hash(cfg.seed, "order", e.doc_id, e.input, e.target)
        )
        for ex in order[: cfg.max_examples_per_task]:
            by_split[ex.split].append(ex)
    return by_split, doc_split, stats


def check_needs(cfg: CorpusConfig, by_split: dict[str, list[Example]]) -> None:
    """A task with fewer training examples than the preset needs, or none held out to evaluate it on, is
    an error that says what to do."""
    fixes = (
        f"bring a dataset (`--source KIND:PATH`, kinds: {', '.join(adapters.KINDS)}) or read more documents "
        "(--set max_docs.SOURCE=N)"
    )
    have = {split: _per_task(examples) for split, examples in by_split.items()}
    for task, need in cfg.min_examples.items():
        train = have["train"].get(task, 0)
        if train < need:
            raise ConfigError(
                f"task '{task}': {train} training examples, the '{cfg.preset}' preset needs {need}. The sources "
                f"on this machine give too few: {fixes}, or accept fewer (--set min_examples.{task}={train})"
            )
        empty = [split for split in ("val", "test") if need and not have[split].get(task)]
        if empty:
            raise ConfigError(
                f"task '{task}': no {' or '.join(empty)} examples to evaluate it on ({train} training examples "
                f"from too few documents or near-duplicate groups): {fixes}, or raise val_fraction/test_fraction"
            )


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
        "per_task": _per_task(c.examples),
        "documents": len(c.documents),
        "sha256": digest.hexdigest(),
    }
    if len(c.files) <= 20:
        record["paths"] = [str(p) for p in c.files]
    return record


def build_corpus(
    out: str | Path,
    cfg: CorpusConfig,
    sources: list[str | Path] = (),
    overwrite: bool = False,
    workers: int | None = None,
) -> dict:
    """Build the corpus into `out`; returns the manifest. `sources`: files in the corpus schema, or
    KIND:PATH_OR_NAME datasets (adapters.py). Every source is read and checked before anything is
    written; the output appears complete or not at all."""
    out = Path(out)
    t0 = time.perf_counter()
    collected = [adapters.collect(str(spec)) for spec in sources]  # fail fast on bad input
    for c in collected:
        log.info("source %-16s %s", c.name, _found(c))
    builtin = collect_builtin(cfg)
    collected = builtin + collected
    if not any(c.examples for c in collected):
        raise ConfigError("the corpus would be empty: use --preset tiny|full or give --source datasets")
    by_split, doc_split, near_dups = assign_splits(cfg, collected, workers)
    made = add_moderation(cfg, by_split, {ex.doc_id for c in builtin for ex in c.examples})
    if made is not None:  # the manifest lists it after the preset's sources, as before
        collected.insert(len(builtin), made)
    check_needs(cfg, by_split)

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
            split = [
                doc_split.get(d.doc_id) or split_of(d.doc_id, cfg.seed, cfg.val_fraction, cfg.test_fraction)
                for d in docs
            ]
            table = pa.Table.from_pydict(
                {
                    "doc_id": [d.doc_id for d in docs],
                    "title": [d.title for d in docs],
                    "text": [d.text for d in docs],
                    "split": split,
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
            "near_duplicates": near_dups,
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
    columns = list(columns or SCHEMA.names)
    table = pa.concat_tables(pq.read_table(f, columns=[c for c in columns if c != "family"]) for f in files)
    if "family" in columns:  # a corpus built before the column existed has none: every family ""
        stored = pa.concat_tables(
            pq.read_table(f, columns=[c for c in ("family",) if c in pq.read_schema(f).names]) for f in files
        )
        family = (
            stored.column("family") if stored.num_columns else pa.array([""] * table.num_rows, pa.string())
        )
        table = table.append_column("family", family)
    return table.select(columns)


def texts(corpus: str | Path, split: str = "train") -> Iterator[str]:
    """Every input and target text of one split: what the tokenizer learns from (train only, so
    held-out text shapes nothing)."""
    for task in TASKS:
        table = read_split(corpus, task, split, ["input", "target"])
        for column in ("input", "target"):
            yield from (t for t in table.column(column).to_pylist() if t)
