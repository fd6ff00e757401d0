"""The Python standard library's source: docstrings -> their first line (`summarize`), functions ->
`code` in two families, the first sentence of a function's docstring -> its source (`find`, family
"docstring"), and the source itself (`lm`); plus the language reference topics of `pydoc_data` as
text (`lm`) and as documents to search (`find`: a paragraph from its words, legal.find_examples),
which every Python installation has.

The `code` families:
    signature  input: a function's signature + docstring; target: its body (every documented
               function or method whose body is at most MAX_BODY_LINES lines)
    plain      input: a request in plain words from the first sentence of its docstring, naming the
               function and its parameters but never showing the signature (a few phrasings, picked
               by hash); target: the whole function (def line, docstring, body), dedented. Only public
               module-level functions of at most MAX_FUNCTION_LINES lines, not decorated, not
               methods (a first parameter self or cls).
odyssey/code_checks.py turns either into executable checks at evaluation time.

Modules are parsed with `ast`, never imported (importing some stdlib modules opens windows or
browsers). The document is the module file, so a module's docstrings, functions and source all
fall in one split.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
import textwrap
from collections import Counter
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
MAX_FUNCTION_LINES = 40  # plain-language `code` targets: the whole function
MAX_PASSAGE_LINES = 30  # `find` passages: a function's source, cut after this many lines
MIN_DOC_BODY_CHARS = 60
MIN_SENTENCE_WORDS = 3

# Plain-language requests: {name}, {params} (in words), {sentence} (the docstring's first sentence).
PLAIN_TEMPLATES = (
    "Write a function named {name} that takes {params} and does this: {sentence}",
    "I need a Python function called {name}. It takes {params}. What it should do: {sentence}",
    "Define {name} in Python, a function of {params}, for this job: {sentence}",
    "Please implement a function {name} which receives {params}. Its purpose: {sentence}",
    "Create a Python function, {name}, taking {params}. Behaviour: {sentence}",
)

_Function = ast.FunctionDef | ast.AsyncFunctionDef


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


def first_sentence(doc: str | None) -> str | None:
    """The first sentence of a docstring's first paragraph (ending in a full stop), or None when it
    is too short to say anything or is itself an example or a signature (`>>>`, `f(x) -> y`)."""
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    sentence = re.split(r"(?<=[.!?])\s+(?=[A-Z(`'\"])", paragraph, maxsplit=1)[0].strip()
    if len(sentence.split()) < MIN_SENTENCE_WORDS or sentence.startswith(">>>") or "->" in sentence:
        return None
    return sentence if sentence[-1] in ".!?" else sentence + "."


def _function_example(node: _Function, lines: list[str]) -> tuple[str, str] | None:
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


def _source(node: _Function, lines: list[str], max_lines: int | None = None, dedent: bool = True) -> str:
    """The function from its def line to its end (or its first max_lines lines), dedented; or as it
    stands in the module (dedent=False: a substring of the module's text, as a find passage must be)."""
    end = node.end_lineno if max_lines is None else min(node.end_lineno, node.lineno - 1 + max_lines)
    text = "\n".join(lines[node.lineno - 1 : end])
    return textwrap.dedent(text).rstrip() if dedent else text.strip()


def _params_in_words(args: ast.arguments) -> str:
    """`s, safe='/'` -> "s, plus optional safe"; no parameters -> "no arguments"."""
    positional = [a.arg for a in (*args.posonlyargs, *args.args)]
    n_required = len(positional) - len(args.defaults)
    required, optional = positional[:n_required], positional[n_required:]
    optional += [a.arg for a in args.kwonlyargs]
    parts = [_and(required)] if required else []
    if optional:
        parts.append("optional " + _and(optional))
    if args.vararg:
        parts.append(f"any number of further arguments ({args.vararg.arg})")
    if args.kwarg:
        parts.append(f"keyword arguments ({args.kwarg.arg})")
    return ", plus ".join(parts) if parts else "no arguments"


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def plain_request(node: ast.FunctionDef, sentence: str, doc_id: str) -> str:
    """A request in plain words for the function: its name, its parameters in words, what it does.
    The phrasing is one of PLAIN_TEMPLATES, picked by a hash of the document and the name."""
    pick = int(hashlib.sha256(f"{doc_id}:{node.name}".encode()).hexdigest(), 16) % len(PLAIN_TEMPLATES)
    if not sentence[1:2].isupper():  # "Return the ..." -> "return the ...", but "URL ..." stays
        sentence = sentence[0].lower() + sentence[1:]
    return PLAIN_TEMPLATES[pick].format(name=node.name, params=_params_in_words(node.args), sentence=sentence)


def _plain_example(node: ast.stmt, lines: list[str], doc_id: str) -> Example | None:
    """The `plain` code example of a module-level statement, when it is a function that qualifies."""
    if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.decorator_list:
        return None
    if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES or len(node.body) < 2:
        return None
    if node.args.args and node.args.args[0].arg in ("self", "cls"):  # a method defined outside its class
        return None
    sentence = first_sentence(ast.get_docstring(node))
    if sentence is None or f"{node.name}(" in sentence:  # a call with its arguments shows the signature
        return None
    return Example(
        "code", plain_request(node, sentence, doc_id), _source(node, lines), doc_id, family="plain"
    )


def _functions_outside_functions(tree: ast.Module) -> list[_Function]:
    """Module-level functions and methods (of classes at any depth), not functions inside functions."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, _Function):
            found.append(node)
        elif isinstance(node, ast.ClassDef):
            todo.extend(node.body)
    return found


def docstring_find_examples(tree: ast.Module, lines: list[str], doc_id: str) -> list[Example]:
    """`find` examples: a function's first docstring sentence -> its source (cut to MAX_PASSAGE_LINES)."""
    examples = []
    for node in _functions_outside_functions(tree):
        if query := first_sentence(ast.get_docstring(node)):
            passage = _source(node, lines, MAX_PASSAGE_LINES, dedent=False)
            examples.append(Example("find", query, passage, doc_id, family="docstring"))
    return drop_repeated_queries(examples)


def drop_repeated_queries(examples: list[Example]) -> list[Example]:
    """Without the `find` docstring examples whose query is asked more than once ("Return self."):
    such a query has no one right passage."""
    counts = Counter(e.input for e in examples if e.task == "find" and e.family == "docstring")
    return [e for e in examples if not (e.task == "find" and e.family == "docstring" and counts[e.input] > 1)]


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
            examples.append(Example("code", pair[0], pair[1], doc_id, family="signature"))
    examples.extend(e for node in tree.body if (e := _plain_example(node, lines, doc_id)))
    examples.extend(docstring_find_examples(tree, lines, doc_id))
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
    modules: list[Document] = []  # the modules whose functions are find passages: what they are found in
    for path in files:
        rel = path.relative_to(root).as_posix()
        source = path.read_text(encoding="utf-8", errors="replace")
        examples.extend(examples_of_module(source, f"python:{rel}"))
        modules.append(Document(f"python:{rel}", rel, source))
    examples = drop_repeated_queries(examples)  # a query asked in two modules has no one answer either
    found_in = {e.doc_id for e in examples if e.task == "find"}
    topics = _pydoc_topics()
    docs = [
        Document(f"pydoc:{name}", name, topics[name]) for name in sample(sorted(topics), limit, seed, key=str)
    ]
    for doc in docs:
        examples.extend(Example("lm", "", chunk, doc.doc_id) for chunk in chunks(doc.text, LM_CHUNK_CHARS))
    examples.extend(legal.find_examples(docs))  # the reference's paragraphs, found by their words
    return Collected("python_stdlib", files, examples, docs + [m for m in modules if m.doc_id in found_in])
