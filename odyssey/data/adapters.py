"""Public datasets in their own layouts, mapped onto the corpus schema: `--source KIND:PATH_OR_NAME`.

    summarize:PATH   CNN/DailyMail (article, highlights) or XSum (document, summary)
    moderate:PATH    Jigsaw toxic comments (comment_text + toxic, severe_toxic, obscene, ... columns)
    retrieval:DIR    a BEIR dataset directory (corpus.jsonl, queries.jsonl, qrels/*.tsv)
    code:PATH        MBPP (text or prompt, code, test_list) or HumanEval (prompt, canonical_solution)
    text:PATH        plain text for `lm`: .txt files (one document each), or rows with a `text` column

PATH is a local .jsonl/.json/.csv/.tsv/.parquet file or a directory that `datasets.load_dataset` reads;
anything else is a Hugging Face hub name, NAME or NAME@CONFIG (`summarize:abisee/cnn_dailymail@3.0.0`),
which needs the network the first time. Every split of a dataset is read: the corpus draws its own
splits per document, so a dataset's own train/test boundary is not kept.

A spec without a KIND: prefix is a file already in the corpus schema (schema.read_examples).

Every example's doc_id is `{kind}:{dataset}:{id}`, the id from the dataset's id column, else a hash of
the row's main text, so it stays put when rows are added or reordered. A row with an empty field is
skipped and counted (logged); a dataset with no usable row, or without the columns an adapter needs,
is refused with a SchemaError naming the file, the adapter, the missing columns and the columns there.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import logging
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from odyssey.data import schema
from odyssey.data.schema import Collected, Document, Example
from odyssey.data.text import chunks
from odyssey.errors import SchemaError
from odyssey.moderation_rules import scan
from odyssey.tasks import format_labels

log = logging.getLogger(__name__)

LM_CHUNK_CHARS = 4000  # as the built-in sources cut their `lm` text
ID_COLUMNS = ("id", "_id", "task_id")

# Local files `datasets` reads: suffix -> (its builder, the builder's options).
FILE_BUILDERS: dict[str, tuple[str, dict]] = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".ndjson": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".parquet": ("parquet", {}),
    ".pq": ("parquet", {}),
}
TEXT_SUFFIXES = (".txt",)

# Jigsaw (Toxic Comment Classification, and the Unintended Bias competition's column names) onto our
# labels. Our `profanity` is abusive, offensive language: the rules flag words of the better-profanity
# list, which holds obscenities, insults ("moron", "jerk") and slurs. So:
#   obscene, severe_toxic(ity), insult, sexual_explicit -> profanity: offensive wording itself (nearly
#       every severe_toxic comment is also obscene).
#   toxic / toxicity / target -> nothing: Jigsaw's umbrella for "rude, disrespectful or unreasonable";
#       rudeness in polite words is not profanity.
#   threat, identity_hate / identity_attack -> nothing: harms our labels do not name.
# A comment flagged only by columns that map to nothing is skipped, never called "safe": it is not.
# Jigsaw annotated neither personal data nor spam; `personal_data` comes from the pattern rules
# (e-mail addresses, keys, card numbers), which is how serving finds it too, and `spam` never.
JIGSAW_LABELS: dict[str, str | None] = {
    "obscene": "profanity",
    "severe_toxic": "profanity",
    "severe_toxicity": "profanity",
    "insult": "profanity",
    "sexual_explicit": "profanity",
    "toxic": None,
    "toxicity": None,
    "target": None,
    "threat": None,
    "identity_hate": None,
    "identity_attack": None,
}
JIGSAW_THRESHOLD = 0.5  # label columns are 0/1, or annotator fractions in [0, 1] (Unintended Bias)


# --- the public API --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Adapter:
    description: str  # one line, for `--help`
    read: Callable[[str], Collected]  # PATH_OR_NAME -> what it holds, in the corpus schema


def collect(spec: str | Path) -> Collected:
    """`KIND:PATH_OR_NAME` -> that dataset in the corpus schema; a spec with no known KIND prefix is
    a file already in the corpus schema."""
    spec = str(spec)
    kind, colon, rest = spec.partition(":")
    if colon and kind in KINDS:
        if not rest:
            raise SchemaError(f"{spec}: name a file, directory or hub dataset after '{kind}:'")
        return KINDS[kind].read(rest)
    path = Path(spec)
    if colon and not path.exists() and re.fullmatch(r"[a-z][a-z_-]*", kind):
        close = difflib.get_close_matches(kind, KINDS, n=1)
        hint = f"did you mean '{close[0]}:{rest}'? " if close else ""
        raise SchemaError(
            f"{spec}: no such file, and '{kind}' is no dataset kind; {hint}"
            f"kinds: {', '.join(KINDS)} (or a file in the corpus schema)"
        )
    return Collected(f"user:{path}", [path], schema.read_examples(path))


# --- loading -----------------------------------------------------------------------------------------


@dataclass
class Table:
    """One dataset's rows, column by column, and where they came from."""

    where: str  # what errors name: the file, directory or hub name
    noun: str  # "file", "directory" or "dataset"
    name: str  # the dataset's short name, in doc ids
    files: list[Path]
    columns: dict[str, list]

    @property
    def num_rows(self) -> int:
        return _rows(self.columns)

    def rows(self) -> Iterator[dict]:
        names = list(self.columns)
        for values in zip(*self.columns.values()):
            yield dict(zip(names, values))


def load_table(source: str, kind: str) -> Table:
    """A local file or directory, or else a hub dataset, read with Hugging Face `datasets`."""
    path = Path(source)
    if path.is_file():
        return _load_file(path, kind)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return _read(Table(str(path), "directory", path.name, files, {}), kind, str(path))
    if source.startswith(("/", ".", "~")) or path.suffix.lower() in (*FILE_BUILDERS, *TEXT_SUFFIXES):
        raise SchemaError(f"{source}: no such file or directory (the {kind} adapter's source)")
    name, _, config = source.partition("@")
    return _read(Table(source, "dataset", name.rsplit("/", 1)[-1], [], {}), kind, name, config or None)


def _load_file(path: Path, kind: str) -> Table:
    suffix = path.suffix.lower()
    if suffix not in FILE_BUILDERS:
        raise SchemaError(
            f"{path}: the {kind} adapter reads {', '.join(FILE_BUILDERS)} files, not {suffix or 'no suffix'}"
        )
    builder, options = FILE_BUILDERS[suffix]
    return _read(
        Table(str(path), "file", path.stem, [path], {}), kind, builder, data_files=str(path), **options
    )


def _read(table: Table, kind: str, *args, **options) -> Table:
    """`table` with the columns of load_dataset(*args, **options), all its splits one after another.
    Local data is converted in a throwaway cache (it is on disk already) without progress bars (it takes
    a blink); hub datasets keep the default cache, so they download once."""
    import datasets  # slow to import: only when a dataset is read

    local = table.noun != "dataset"
    try:
        with tempfile.TemporaryDirectory(prefix="odyssey-datasets-") as cache, _progress_bars(not local):
            found = datasets.load_dataset(*args, **({"cache_dir": cache} if local else {}), **options)
            parts = [split.to_dict() for split in found.values()]
    except Exception as e:  # whatever the reader raises: a malformed file, an unreachable hub
        problem = (
            f"the {kind} adapter could not read this {table.noun}"
            if local
            else "no such file or directory, and the Hugging Face hub did not give it"
        )
        raise SchemaError(f"{table.where}: {problem} ({_root_cause(e)})") from e
    names = list(dict.fromkeys(column for part in parts for column in part))
    table.columns = {c: [v for part in parts for v in part.get(c) or [None] * _rows(part)] for c in names}
    return table


@contextmanager
def _progress_bars(on: bool) -> Iterator[None]:
    import datasets

    was_on = datasets.is_progress_bar_enabled()
    if was_on and not on:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on and not on:
            datasets.enable_progress_bars()


def _root_cause(error: BaseException) -> str:
    """The innermost error raised `from` another: `datasets` wraps the reader's own message (the parse
    error and its row) in a generic one."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def _rows(columns: dict[str, list]) -> int:
    return len(next(iter(columns.values()), []))


def _pick_columns(table: Table, kind: str, layouts: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The first layout whose columns are all there; else an error naming what the closest one lacks."""
    present = set(table.columns)
    for layout in layouts:
        if present.issuperset(layout):
            return layout
    closest = min(layouts, key=lambda layout: len(set(layout) - present))
    missing = [c for c in closest if c not in present]
    raise SchemaError(
        f"{table.where}: the {kind} adapter needs columns {' or '.join('+'.join(lay) for lay in layouts)}; "
        f"missing: {', '.join(missing)} ({_has(table)})"
    )


def _has(table: Table) -> str:
    return f"the {table.noun} has: {', '.join(table.columns) or 'no columns'}"


# --- rows -> examples ----------------------------------------------------------------------------


def _text(value: object) -> str:
    """A cell as text: None or NaN (an empty CSV cell) -> "", Windows line ends -> "\\n", surrounding
    blank lines dropped."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).replace("\r\n", "\n").strip("\n").rstrip()


def _hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _doc_id(kind: str, table: Table, row: dict, text: str) -> str:
    """`{kind}:{dataset}:{id}`: the row's id column, else a hash of its main text."""
    ids = [_text(row.get(c)) for c in ID_COLUMNS if _text(row.get(c))]
    return f"{kind}:{table.name}:{ids[0] if ids else _hash(text)}"


def _finish(
    kind: str,
    source: str,
    files: list[Path],
    rows: int,
    examples: list[Example],
    skipped: Counter,
    documents: Sequence[Document] = (),
) -> Collected:
    """The Collected of one adapter, after saying what was skipped; nothing usable is an error."""
    reasons = ", ".join(f"{n} {why}" for why, n in skipped.most_common())
    if not examples:
        raise SchemaError(
            f"{source}: the {kind} adapter found no usable row among {rows} ({reasons or 'it is empty'})"
        )
    if skipped:
        log.warning("%s:%s: skipped %d of %d rows (%s)", kind, source, sum(skipped.values()), rows, reasons)
    log.info("%s:%s: %d examples, %d documents", kind, source, len(examples), len(documents))
    return Collected(f"{kind}:{source}", files, examples, list(documents))


# --- the adapters --------------------------------------------------------------------------------


def _summarize(source: str) -> Collected:
    """CNN/DailyMail or XSum rows: the article is the input, its highlights or summary the target."""
    table = load_table(source, "summarize")
    text_col, summary_col = _pick_columns(
        table, "summarize", [("article", "highlights"), ("document", "summary")]
    )
    examples, skipped = [], Counter()
    for row in table.rows():
        text, summary = _text(row[text_col]), _text(row[summary_col])
        if not text.strip() or not summary.strip():
            skipped[f"empty {text_col if not text.strip() else summary_col}"] += 1
            continue
        examples.append(Example("summarize", text, summary, _doc_id("summarize", table, row, text)))
    return _finish("summarize", source, table.files, table.num_rows, examples, skipped)


def _moderate(source: str) -> Collected:
    """Jigsaw rows: the comment is the input, its labels (JIGSAW_LABELS, plus the personal-data rules)
    the target. Rows with an unlabelled column are skipped (Jigsaw marks those -1)."""
    table = load_table(source, "moderate")
    comment_col = next((c for c in ("comment_text", "text") if c in table.columns), None)
    label_cols = [c for c in JIGSAW_LABELS if c in table.columns]
    if comment_col is None or not label_cols:
        missing = ["comment_text"] * (comment_col is None) + ["every label column"] * (not label_cols)
        raise SchemaError(
            f"{table.where}: the moderate adapter needs columns comment_text (or text) and one or more of "
            f"{', '.join(JIGSAW_LABELS)}; missing: {', '.join(missing)} ({_has(table)})"
        )
    dropped = [c for c in label_cols if JIGSAW_LABELS[c] is None]
    if dropped:
        log.info("moderate:%s: columns %s map to none of our labels (dropped)", source, ", ".join(dropped))
    examples, skipped = [], Counter()
    for row in table.rows():
        text = _text(row[comment_col])
        flags = {c: _flag(row[c]) for c in label_cols}
        if not text.strip():
            skipped[f"empty {comment_col}"] += 1
        elif None in flags.values():
            skipped["unlabelled (empty or -1)"] += 1
        elif (labels := _labels(text, flags)) is None:
            skipped["flagged only by dropped columns"] += 1
        else:
            examples.append(
                Example("moderate", text, format_labels(labels), _doc_id("moderate", table, row, text))
            )
    return _finish("moderate", source, table.files, table.num_rows, examples, skipped)


def _number(value: object) -> float | None:
    """A numeric cell, or None when it is empty or not a number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if number != number else number  # NaN: pandas' empty CSV cell


def _flag(value: object) -> bool | None:
    """A Jigsaw label cell: set, not set, or None when unlabelled (empty, or -1 in test_labels.csv)."""
    number = _number(value)
    return None if number is None or number < 0 else number >= JIGSAW_THRESHOLD


def _labels(text: str, flags: dict[str, bool]) -> set[str] | None:
    """Our labels of one comment, or None when only columns that map to nothing flag it."""
    labels = {JIGSAW_LABELS[c] for c, on in flags.items() if on} - {None}
    if any(flags.values()) and not labels:
        return None
    return labels | {hit.label for hit in scan(text) if hit.label == "personal_data"}


def _code(source: str) -> Collected:
    """MBPP or HumanEval rows: the request is the input, runnable code the target; code that does not
    parse (MBPP holds a little Python 2) is skipped."""
    table = load_table(source, "code")
    layout = _pick_columns(
        table,
        "code",
        [("text", "code", "test_list"), ("prompt", "code", "test_list"), ("prompt", "canonical_solution")],
    )
    examples, skipped = [], Counter()
    for row in table.rows():
        pair = _humaneval(row) if layout[-1] == "canonical_solution" else _mbpp(row, layout[0])
        if isinstance(pair, str):
            skipped[pair] += 1
            continue
        request, code = pair
        examples.append(Example("code", request, code, _doc_id("code", table, row, request)))
    return _finish("code", source, table.files, table.num_rows, examples, skipped)


def _mbpp(row: dict, text_col: str) -> tuple[str, str] | str:
    """(the request with its tests, the whole function), or why the row is skipped. The tests show
    the function's name and signature, which the text alone does not."""
    text, code = _text(row[text_col]), _text(row["code"])
    tests = row["test_list"]
    tests = [_text(t) for t in tests] if isinstance(tests, list) else [_text(tests)]
    tests = [t for t in tests if t.strip()]
    if not text.strip() or not code.strip() or not tests:
        return f"empty {text_col if not text.strip() else 'code' if not code.strip() else 'test_list'}"
    if not _parses(code):
        return "code that does not parse"
    return f"{text.strip()}\n\n# tests:\n" + "\n".join(tests), code


def _humaneval(row: dict) -> tuple[str, str] | str:
    """(signature + docstring, the body that follows it): the shape of the built-in `code` examples."""
    prompt, body = _text(row["prompt"]), _text(row["canonical_solution"])
    if not prompt.strip() or not body.strip():
        return f"empty {'prompt' if not prompt.strip() else 'canonical_solution'}"
    if not _parses(f"{prompt}\n{body}\n"):
        return "code that does not parse"
    return prompt, body


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def _text_lm(source: str) -> Collected:
    """A .txt file or a directory of them (each file one document), else rows with a `text` column
    (each row one document): `lm` chunks of LM_CHUNK_CHARS."""
    path = Path(source)
    if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
        return _text_files(source, path.stem, [path], path.parent)
    if path.is_dir() and (files := sorted(path.rglob("*.txt"))):
        return _text_files(source, path.name, files, path)
    table = load_table(source, "text")
    (text_col,) = _pick_columns(table, "text", [("text",)])
    examples, skipped = [], Counter()
    for row in table.rows():
        text = _text(row[text_col])
        if not text.strip():
            skipped["empty text"] += 1
            continue
        doc_id = _doc_id("text", table, row, text)
        examples.extend(Example("lm", "", chunk, doc_id) for chunk in chunks(text, LM_CHUNK_CHARS))
    return _finish("text", source, table.files, table.num_rows, examples, skipped)


def _text_files(source: str, name: str, files: list[Path], root: Path) -> Collected:
    """Plain text files, each one document cut into `lm` chunks."""
    examples, skipped = [], Counter()
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            skipped["empty files"] += 1
            continue
        doc_id = f"text:{name}:{path.relative_to(root).as_posix()}"
        examples.extend(Example("lm", "", chunk, doc_id) for chunk in chunks(text, LM_CHUNK_CHARS))
    return _finish("text", source, files, len(files), examples, skipped)


def _retrieval(source: str) -> Collected:
    """BEIR: every relevant (score > 0) query-passage pair of qrels/*.tsv is a `find` example, and every
    passage of corpus.jsonl a document of the retrieval index. All qrels files are read (train, dev and
    test alike): splits are drawn per passage, so a passage's queries all land in its split."""
    root = Path(source)
    qrel_files = sorted((root / "qrels").glob("*.tsv"))
    missing = [n for n in ("corpus.jsonl", "queries.jsonl") if not (root / n).is_file()]
    if not root.is_dir() or missing or not qrel_files:
        lacks = ", ".join(missing + ([] if qrel_files else ["qrels/*.tsv"]))
        raise SchemaError(
            f"{source}: the retrieval adapter reads a BEIR directory (corpus.jsonl, queries.jsonl, "
            f"qrels/*.tsv); {'no such directory' if not root.is_dir() else 'missing: ' + lacks}"
        )
    passages = _id_texts(load_table(str(root / "corpus.jsonl"), "retrieval"), ("_id", "title", "text"))
    queries = _id_texts(load_table(str(root / "queries.jsonl"), "retrieval"), ("_id", "text"))
    documents = [Document(f"beir:{root.name}:{pid}", title, text) for pid, (title, text) in passages.items()]
    examples, skipped, rows = [], Counter(), 0
    for path in qrel_files:
        table = _load_qrels(path)
        rows += table.num_rows
        for row in table.rows():
            qid, pid, score = _text(row["query-id"]), _text(row["corpus-id"]), _number(row["score"])
            if score is None or score <= 0:
                skipped["not relevant (score <= 0 or none)"] += 1
            elif qid not in queries or pid not in passages:
                skipped["with a query or passage id not in queries.jsonl or corpus.jsonl"] += 1
            else:
                doc_id = f"beir:{root.name}:{pid}"
                examples.append(Example("find", queries[qid][1], passages[pid][1], doc_id))
    files = [root / "corpus.jsonl", root / "queries.jsonl", *qrel_files]
    return _finish("retrieval", source, files, rows, examples, skipped, documents)


def _id_texts(table: Table, layout: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """BEIR corpus or queries: _id -> (title, text), rows with an empty text left out."""
    _pick_columns(table, "retrieval", [layout])
    out = {}
    for row in table.rows():
        text = _text(row["text"])
        if text.strip():
            out[_text(row["_id"])] = (_text(row.get("title")), text)
    return out


def _load_qrels(path: Path) -> Table:
    # Ids stay text: read as numbers, "0012" would become 12 and match no passage.
    as_text = {"query-id": str, "corpus-id": str}
    table = Table(str(path), "file", path.stem, [path], {})
    _read(table, "retrieval", "csv", data_files=str(path), delimiter="\t", converters=as_text)
    _pick_columns(table, "retrieval", [("query-id", "corpus-id", "score")])
    return table


KINDS: dict[str, Adapter] = {
    "summarize": Adapter(
        "CNN/DailyMail (article, highlights) or XSum (document, summary) -> summarize", _summarize
    ),
    "moderate": Adapter(
        "Jigsaw toxic comments (comment_text + toxic, obscene, insult, ... 0/1) -> moderate", _moderate
    ),
    "retrieval": Adapter(
        "a BEIR directory (corpus.jsonl, queries.jsonl, qrels/*.tsv) -> find + retrieval documents",
        _retrieval,
    ),
    "code": Adapter("MBPP (text, code, test_list) or HumanEval (prompt, canonical_solution) -> code", _code),
    "text": Adapter("plain text: .txt files, or rows with a `text` column -> lm", _text_lm),
}
