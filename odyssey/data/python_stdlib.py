"""The Python standard library's source: docstrings -> their first line (`summarize`), signature +
docstring -> function body (`code`), and the source itself (`lm`); plus the language reference
topics of `pydoc_data` as text (`lm`) and as documents to search (`find`: a paragraph from its words,
legal.find_examples), which every Python installation has.

Modules are parsed with `ast`, never imported (importing some stdlib modules opens windows or
browsers). The document is the module file, so a module's docstrings, functions and source all
fall in one split.
"""

from __future__ import annotations

import ast
import sysconfig
import textwrap
from pathlib import Path

from odyssey.data import legal
from odyssey.data.sampling import sample
from odyssey.data.schema import Collected, Document, Example
from odyssey.data.text import chunks

# Directories that hold tests, vendored third-party code, or data tables rather than library code.
SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "__pycache__",
    "encodings",
    "pydoc_data",
}
LM_CHUNK_CHARS = 4000
MAX_BODY_LINES = 40
MIN_DOC_BODY_CHARS = 60


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_files(root: Path) -> list[Path]:
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not SKIP_DIRS.intersection(rel.parts[:-1]):
            files.append(path)
    return sorted(files)


def _docstring_summary(doc: str) -> tuple[str, str] | None:
    """(body, first line) of a docstring that has both."""
    lines = doc.strip().splitlines()
    if len(lines) < 3:
        return None
    first = lines[0].strip()
    body = textwrap.dedent("\n".join(lines[1:])).strip()
    if len(first) < 10 or len(body) < MIN_DOC_BODY_CHARS:
        return None
    return body, first


def _function_example(
    node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]
) -> tuple[str, str] | None:
    """(signature + docstring, body) as source text, both dedented by the def's indentation."""
    first = node.body[0]
    if len(node.body) < 2 or not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)):
        return None
    body_start, body_end = first.end_lineno, node.end_lineno  # lines after the docstring
    if body_end - body_start > MAX_BODY_LINES or body_end <= body_start:
        return None
    head = textwrap.dedent("\n".join(lines[node.lineno - 1 : body_start]))
    indent = len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())
    body = "\n".join(line[indent:] for line in lines[body_start:body_end]).strip("\n").rstrip()
    if not body.strip():
        return None
    return head, body


def examples_of_module(source: str, doc_id: str) -> list[Example]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    examples: list[Example] = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if doc and (pair := _docstring_summary(doc)):
            examples.append(Example("summarize", pair[0], pair[1], doc_id))
        if (
            doc
            and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and (pair := _function_example(node, lines))
        ):
            examples.append(Example("code", pair[0], pair[1], doc_id))
    examples.extend(Example("lm", "", chunk, doc_id) for chunk in chunks(source, LM_CHUNK_CHARS))
    return examples


def _pydoc_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return {}
    return dict(topics)


def collect(limit: int | None, seed: int, root: Path | None = None) -> Collected:
    """Examples from up to `limit` module files and `limit` reference topics (all when None)."""
    root = stdlib_root() if root is None else root
    files = sample(module_files(root), limit, seed, key=lambda p: p.relative_to(root).as_posix())
    examples: list[Example] = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        source = path.read_text(encoding="utf-8", errors="replace")
        examples.extend(examples_of_module(source, f"python:{rel}"))
    topics = _pydoc_topics()
    docs = [
        Document(f"pydoc:{name}", name, topics[name]) for name in sample(sorted(topics), limit, seed, key=str)
    ]
    for doc in docs:
        examples.extend(Example("lm", "", chunk, doc.doc_id) for chunk in chunks(doc.text, LM_CHUNK_CHARS))
    examples.extend(legal.find_examples(docs))  # the reference's paragraphs, found by their words
    return Collected("python_stdlib", files, examples, docs)
