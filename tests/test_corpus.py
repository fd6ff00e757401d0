"""The multitask corpus: determinism, splits by document with no leakage, user files checked with
errors that name file/row/column, and outputs that are complete or absent."""

from __future__ import annotations

import json
import random
from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from odyssey.data import corpus, legal, neardup
from odyssey.data.corpus import CorpusConfig, build_corpus, read_split
from odyssey.data.sampling import split_of
from odyssey.data.schema import SCHEMA, read_examples
from odyssey.errors import ConfigError, OdysseyError, SchemaError
from odyssey.tasks import MODERATION_LABELS, SPLITS, TASKS, parse_labels
from serve.passages import PassageIndex, load_documents, split_documents

SMALL = CorpusConfig.from_preset(
    "tiny",
    max_docs={"debian": 30, "python_stdlib": 8, "python_packages": 30, "legal": 10},
    moderation_examples=200,
    max_examples_per_task=300,
    min_examples={},
)


def all_rows(corpus_dir) -> list[dict]:
    return [r for t in TASKS for s in SPLITS for r in read_split(corpus_dir, t, s).to_pylist()]


def test_every_task_and_split_is_present(corpus_dir):
    manifest = corpus.read_manifest(corpus_dir)
    for task in TASKS:
        assert manifest["counts"][task]["train"] > 0, task
        assert sum(manifest["counts"][task].values()) == sum(
            read_split(corpus_dir, task, s).num_rows for s in SPLITS
        )
    rows = all_rows(corpus_dir)
    assert all(r["split"] in SPLITS and r["task"] in TASKS for r in rows)
    assert {s: sum(r["split"] == s for r in rows) for s in SPLITS}["train"] > 0.8 * len(rows)
    for shard in manifest["shards"]:
        assert pq.read_metadata(corpus_dir / shard["path"]).num_rows == shard["rows"]


def test_build_is_deterministic_for_a_seed(tmp_path):
    a = build_corpus(tmp_path / "a", SMALL)
    b = build_corpus(tmp_path / "b", SMALL)
    assert a["shards"] == b["shards"]  # same paths, rows and sha256
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()
    c = build_corpus(tmp_path / "c", CorpusConfig(**{**SMALL.__dict__, "seed": 1}))
    assert [s["sha256"] for s in c["shards"]] != [s["sha256"] for s in a["shards"]]


def near_duplicate_leaks(corpus_dir) -> list[tuple[str, str, float]]:
    """Pairs of texts in two splits that are near-duplicates, by the measure the build groups with."""
    rows = all_rows(corpus_dir)
    key = {t: "target" if t in ("find", "lm") else "input" for t in TASKS}
    return neardup.cross_split_pairs((r["doc_id"], r["split"], r[key[r["task"]]]) for r in rows)


def test_no_document_or_passage_leaks_across_splits(corpus_dir):
    rows = all_rows(corpus_dir)
    doc_splits = defaultdict(set)
    for r in rows:
        doc_splits[r["doc_id"]].add(r["split"])
    assert all(len(s) == 1 for s in doc_splits.values())
    # The texts that must be unique: passages (find), texts (lm), inputs (other tasks).
    for task in TASKS:
        key = "target" if task in ("find", "lm") else "input"
        by_split = {s: {r[key] for r in rows if r["task"] == task and r["split"] == s} for s in SPLITS}
        assert not by_split["train"] & by_split["val"], task
        assert not by_split["train"] & by_split["test"], task
        assert not by_split["val"] & by_split["test"], task
    # Nor near-duplicates: no text has a near-twin in another split.
    assert near_duplicate_leaks(corpus_dir) == []
    figures = corpus.read_manifest(corpus_dir)["near_duplicates"]
    assert figures["threshold"] == neardup.DEFAULT_THRESHOLD and figures["groups"] <= figures["documents"]


def planted_source(tmp_path):
    """30 unrelated documents and two near-identical ones (one word changed) whose doc_ids alone would
    put them in different splits."""
    rng = random.Random(0)
    vocabulary = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(3000)
    ]

    def text() -> str:
        return " ".join(rng.choices(vocabulary, k=80))

    a, b = next(
        (f"planted:{i}a", f"planted:{i}b")
        for i in range(10_000)
        if split_of(f"planted:{i}a", 0, 0.05, 0.05) != split_of(f"planted:{i}b", 0, 0.05, 0.05)
    )
    words = text().split()
    twin = words.copy()
    twin[40] = "changed"
    rows = [
        {"task": "summarize", "input": text(), "target": "A summary.", "doc_id": f"other:{i}"}
        for i in range(30)
    ]
    rows += [
        {"task": "summarize", "input": " ".join(words), "target": "A summary.", "doc_id": a},
        {"task": "summarize", "input": " ".join(twin), "target": "A summary.", "doc_id": b},
    ]
    return write_jsonl(tmp_path / "planted.jsonl", rows), (a, b)


def test_near_duplicate_documents_land_in_one_split(tmp_path):
    source, (a, b) = planted_source(tmp_path)
    manifest = build_corpus(tmp_path / "grouped", CorpusConfig.from_preset("none"), [source])
    split = {r["doc_id"]: r["split"] for r in all_rows(tmp_path / "grouped")}
    assert split[a] == split[b]
    figures = manifest["near_duplicates"]
    assert figures["threshold"] == neardup.DEFAULT_THRESHOLD
    assert figures["documents"] == 32 and figures["groups"] == 31 and figures["merged_documents"] == 1
    assert near_duplicate_leaks(tmp_path / "grouped") == []
    # The leak check fails on the same corpus built without grouping: the twins sit in two splits.
    ungrouped = CorpusConfig.from_preset("none", near_duplicates=None)
    build_corpus(tmp_path / "ungrouped", ungrouped, [source])
    assert [(x, y) for x, y, _ in near_duplicate_leaks(tmp_path / "ungrouped")] in ([(a, b)], [(b, a)])


def test_a_machine_without_debian_builds_every_task_and_the_finder_index(tmp_path, monkeypatch):
    """macOS, Fedora, Alpine: no Debian files. The portable sources (the standard library, the installed
    Python distributions and their license files) give every task of the tiny preset."""
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("ODYSSEY_DEBIAN_ROOT", str(tmp_path / "empty"))
    manifest = build_corpus(tmp_path / "c", CorpusConfig.from_preset("tiny"))
    sources = {s["name"]: s for s in manifest["sources"]}
    assert sources["debian"]["files"] == 0 and sources["debian"]["examples"] == 0
    need = CorpusConfig.from_preset("tiny").min_examples
    assert all(manifest["counts"][task]["train"] >= need[task] > 0 for task in TASKS)
    assert (
        sources["python_packages"]["per_task"]["summarize"] > 0 and sources["legal"]["per_task"]["find"] > 0
    )
    documents = load_documents()
    assert documents and not any("common-licenses" in d.doc_id for d in documents)
    index = PassageIndex(split_documents(documents))
    hits = index.bm25_scores("permission is hereby granted free of charge")
    assert len(index) > 0 and hits.max() > 0


def test_a_task_the_sources_leave_short_is_an_error_that_names_it(tmp_path):
    source = write_jsonl(tmp_path / "one.jsonl", [GOOD])
    cfg = CorpusConfig.from_preset("none", min_examples={"code": 1})
    with pytest.raises(
        ConfigError, match=r"task 'code': 0 training examples, the 'none' preset needs 1.*--source KIND:PATH"
    ):
        build_corpus(tmp_path / "c", cfg, [source])
    assert not (tmp_path / "c").exists()


def test_find_passages_sit_in_their_documents(corpus_dir):
    docs = pq.read_table(corpus_dir / "documents" / "part-00000.parquet").to_pylist()
    text = {d["doc_id"]: d["text"] for d in docs}
    finds = [r for r in all_rows(corpus_dir) if r["task"] == "find"]
    assert finds and all(r["target"] in text[r["doc_id"]] for r in finds)
    assert all({d["split"] for d in docs} <= set(SPLITS) for d in docs)


def test_passages_keep_their_heading_and_are_substrings():
    text = "TERMS\n\n2. Grant of Copyright License.\n\nSubject to the terms of this License, each Contributor hereby grants to You a license.\n\nshort\n"
    passages = legal.split_passages(text)
    assert passages == [
        "2. Grant of Copyright License.\n\nSubject to the terms of this License, each Contributor hereby grants to You a license."
    ]
    assert legal.structured_query(passages[0], "Apache-2.0") == "grant of copyright license, Apache-2.0"


def test_moderation_labels_are_true_to_their_text(corpus_dir):
    rows = [r for r in all_rows(corpus_dir) if r["task"] == "moderate"]
    labels = [parse_labels(r["target"]) for r in rows]
    assert all(lbl <= set(MODERATION_LABELS) and lbl for lbl in labels)
    seen = {label for lbl in labels for label in lbl}
    assert seen == set(MODERATION_LABELS)
    for r, lbl in zip(rows, labels):
        if "personal_data" in lbl or "spam" in lbl:
            assert (
                any(c.isdigit() for c in r["input"])
                or "http" in r["input"]
                or "!" in r["input"]
                or "@" in r["input"]
            )
        if lbl == {"safe"}:
            assert "@" not in r["input"] and "http://" not in r["input"]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) if isinstance(r, dict) else r for r in rows) + "\n")
    return path


GOOD = {"task": "summarize", "input": "A long text about things.", "target": "Things.", "doc_id": "mine:1"}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {**GOOD, "task": "sumarize"},
            r"row 2, column 'task': 'sumarize' is not a task; did you mean 'summarize'\?",
        ),
        ({**GOOD, "target": ""}, r"row 2, column 'target': empty"),
        ({**GOOD, "input": 7}, r"row 2, column 'input': expected a string, got int"),
        ({**GOOD, "doc_id": " "}, r"row 2, column 'doc_id': empty"),
        ({**GOOD, "split": "dev"}, r"row 2, column 'split': 'dev' is not a split"),
        ({**GOOD, "lable": "x"}, r"row 2, column 'lable': unknown column"),
        ({k: v for k, v in GOOD.items() if k != "doc_id"}, r"row 2, column 'doc_id': missing"),
        ("{not json", r"row 2: not valid JSON"),
        ("[1, 2]", r"row 2: expected a JSON object"),
    ],
)
def test_jsonl_errors_name_file_row_and_column(tmp_path, row, message):
    path = write_jsonl(tmp_path / "mine.jsonl", [GOOD, row])
    with pytest.raises(SchemaError, match=rf"mine\.jsonl: {message}"):
        read_examples(path)


def test_invalid_utf8_and_split_conflicts(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"task": "\xff"}\n')
    with pytest.raises(SchemaError, match=r"bin\.jsonl: row 2: not valid UTF-8"):
        read_examples(path)
    path = write_jsonl(
        tmp_path / "s.jsonl", [{**GOOD, "split": "train"}, {**GOOD, "input": "other", "split": "test"}]
    )
    with pytest.raises(
        SchemaError, match=r"s\.jsonl: row 2, column 'split': document 'mine:1' is in 'test' here"
    ):
        read_examples(path)


def test_parquet_errors_name_file_row_and_column(tmp_path):
    bad_type = pa.table({"task": ["code"], "input": ["x"], "target": ["y"], "doc_id": [1]})
    pq.write_table(bad_type, tmp_path / "t.parquet")
    with pytest.raises(SchemaError, match=r"t\.parquet: column 'doc_id' has type int64; expected string"):
        read_examples(tmp_path / "t.parquet")
    rows = pa.table(
        {"task": ["code", "code"], "input": ["x", "x"], "target": ["y", None], "doc_id": ["a", "b"]}
    )
    pq.write_table(rows, tmp_path / "r.parquet")
    with pytest.raises(SchemaError, match=r"r\.parquet: row 2, column 'target': empty"):
        read_examples(tmp_path / "r.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(SchemaError, match=r"junk\.parquet: not a readable Parquet file"):
        read_examples(tmp_path / "junk.parquet")
    with pytest.raises(SchemaError, match="unsupported file type"):
        read_examples(write_jsonl(tmp_path / "x.csv", [GOOD]))


def test_user_sources_join_the_corpus(tmp_path):
    pq.write_table(
        pa.Table.from_pylist(
            [{**GOOD, "doc_id": f"mine:{i}", "input": f"text {i} " * 5, "split": None} for i in range(40)],
            schema=SCHEMA,
        ),
        tmp_path / "mine.parquet",
    )
    held = write_jsonl(
        tmp_path / "held.jsonl", [{**GOOD, "doc_id": "held:1", "split": "test", "input": "held out text"}]
    )
    cfg = CorpusConfig.from_preset("none")
    manifest = build_corpus(tmp_path / "out", cfg, [tmp_path / "mine.parquet", held])
    rows = all_rows(tmp_path / "out")
    assert len(rows) == 41 and manifest["total_examples"] == 41
    assert next(r for r in rows if r["doc_id"] == "held:1")["split"] == "test"  # a given split is kept
    assert {s["name"] for s in manifest["sources"]} == {f"user:{tmp_path / 'mine.parquet'}", f"user:{held}"}


def test_a_bad_source_writes_nothing_and_keeps_the_old_corpus(tmp_path):
    out = tmp_path / "corpus"
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    build_corpus(out, CorpusConfig.from_preset("none"), [good])
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "task": "nope"}])
    with pytest.raises(SchemaError, match=r"bad\.jsonl: row 2"):
        build_corpus(out, CorpusConfig.from_preset("none"), [bad], overwrite=True)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.jsonl",
        "corpus",
        "good.jsonl",
    ]  # no staging left
    with pytest.raises(OdysseyError, match="already exists"):
        build_corpus(out, CorpusConfig.from_preset("none"), [good])


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(corpus.pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        build_corpus(
            tmp_path / "c", CorpusConfig.from_preset("none"), [write_jsonl(tmp_path / "g.jsonl", [GOOD])]
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.jsonl"]
