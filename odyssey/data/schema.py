"""The one schema of every task's examples, and the reading of user-supplied files in it.

    task    one of odyssey.tasks.TASKS
    input   what the model is given (empty for `lm`)
    target  what it must produce (the text itself for `lm`)
    doc_id  the document the example comes from: splits are drawn per document, so no passage of
            a validation or test document is ever trained on
    split   train | val | test (optional in user files: drawn from doc_id when absent)
    family  optional: which kind of example of its task (e.g. `find`'s "synopsis" or "keyword"
            queries, `moderate`'s "rules_hidden" examples), so evaluation reports each kind apart

A user file that breaks the schema is refused with an error naming the file, the row (1-based: the
line of a JSONL file) and the column.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from odyssey.errors import SchemaError
from odyssey.tasks import SPLITS, TASKS

REQUIRED = ("task", "input", "target", "doc_id")
COLUMNS = (*REQUIRED, "split", "family")
SCHEMA = pa.schema([(name, pa.string()) for name in COLUMNS])


@dataclass(frozen=True, slots=True)
class Example:
    task: str
    input: str
    target: str
    doc_id: str
    split: str | None = None
    family: str = ""


# Whole documents, kept beside the examples for retrieval (the passage index of `find`).
DOCUMENT_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("title", pa.string()), ("text", pa.string()), ("split", pa.string())]
)


@dataclass(frozen=True, slots=True)
class Document:
    doc_id: str
    title: str
    text: str


@dataclass
class Collected:
    """What one source produced: its examples, whole documents (if any) and the files it read."""

    name: str
    files: list[Path]
    examples: list[Example]
    documents: list[Document] = field(default_factory=list)


def read_examples(path: str | Path) -> list[Example]:
    """Read and check a user's Parquet or JSONL file of examples."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        rows = _read_parquet(path)
    elif suffix in (".jsonl", ".ndjson"):
        rows = _read_jsonl(path)
    else:
        raise SchemaError(f"{path}: unsupported file type {suffix!r}; use .parquet or .jsonl")
    if not rows:
        raise SchemaError(f"{path}: the file holds no examples")
    _check_split_per_document(path, rows)
    return [example for _, example in rows]


def _read_jsonl(path: Path) -> list[tuple[int, Example]]:
    examples = []
    with open(path, "rb") as f:
        for row, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SchemaError(
                    f"{path}: row {row}: not valid UTF-8 (byte {e.start} of the line)"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SchemaError(
                    f"{path}: row {row}: not valid JSON ({e.msg} at column {e.colno})"
                ) from None
            if not isinstance(record, dict):
                raise SchemaError(f"{path}: row {row}: expected a JSON object, got {type(record).__name__}")
            _check_columns(path, list(record), row)
            examples.append((row, _check_row(path, row, record)))
    return examples


def _read_parquet(path: Path) -> list[tuple[int, Example]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise SchemaError(f"{path}: not a readable Parquet file ({e})") from None
    _check_columns(path, table.column_names, None)
    for name in table.column_names:
        if not (
            pa.types.is_string(table.schema.field(name).type)
            or pa.types.is_large_string(table.schema.field(name).type)
        ):
            raise SchemaError(
                f"{path}: column '{name}' has type {table.schema.field(name).type}; expected string"
            )
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    return [
        (i + 1, _check_row(path, i + 1, {name: values[i] for name, values in columns.items()}))
        for i in range(table.num_rows)
    ]


def _check_columns(path: Path, names: list[str], row: int | None) -> None:
    where = f"{path}: row {row}" if row is not None else f"{path}"
    for name in names:
        if name not in COLUMNS:
            close = difflib.get_close_matches(name, COLUMNS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise SchemaError(
                f"{where}, column '{name}': unknown column{hint} (columns: {', '.join(COLUMNS)})"
            )
    for name in REQUIRED:
        if name not in names:
            raise SchemaError(f"{where}, column '{name}': missing (required: {', '.join(REQUIRED)})")


def _check_row(path: Path, row: int, record: dict) -> Example:
    def fail(column: str, message: str) -> SchemaError:
        return SchemaError(f"{path}: row {row}, column '{column}': {message}")

    for name in COLUMNS:
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            raise fail(name, f"expected a string, got {type(value).__name__} {value!r:.40}")
    task = record["task"]
    if task not in TASKS:
        close = difflib.get_close_matches(str(task), TASKS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise fail("task", f"{task!r} is not a task{hint} (tasks: {', '.join(TASKS)})")
    if record["input"] is None or (task != "lm" and not record["input"].strip()):
        raise fail("input", "empty; every task but lm needs an input")
    if not (record["target"] or "").strip():
        raise fail("target", "empty")
    if not (record["doc_id"] or "").strip():
        raise fail(
            "doc_id", "empty; name the document the example comes from (splits are drawn per document)"
        )
    split = record.get("split") or None
    if split is not None and split not in SPLITS:
        raise fail("split", f"{split!r} is not a split (splits: {', '.join(SPLITS)}, or leave it empty)")
    return Example(
        task, record["input"] or "", record["target"], record["doc_id"], split, record.get("family") or ""
    )


def _check_split_per_document(path: Path, rows: list[tuple[int, Example]]) -> None:
    seen: dict[str, tuple[str, int]] = {}
    for row, ex in rows:
        if ex.split is None:
            continue
        first = seen.setdefault(ex.doc_id, (ex.split, row))
        if first[0] != ex.split:
            raise SchemaError(
                f"{path}: row {row}, column 'split': document {ex.doc_id!r} is in '{ex.split}' here but in "
                f"'{first[0]}' at row {first[1]}; a document must stay in one split or its text leaks across them"
            )
