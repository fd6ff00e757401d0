"""The installed Python distributions: long description -> one-line summary (`summarize`), summary ->
the description's opening (`find`, family "synopsis"), the descriptions as plain text (`lm`) and as
documents, and the license files they bundle (read by legal.py for `find`).

Found through importlib.metadata, so they are there wherever Python runs (a virtual environment, a
conda env, macOS, Fedora, Alpine), unlike Debian's package index. A distribution is listed once by
its normalized name (the first found on sys.path, as `import` would pick it) and the list is sorted,
so the same environment always gives the same examples. The document is the distribution: its
description, summary and license files fall in one split.

Descriptions are project READMEs: badges, logos, HTML and reST image directives are dropped first,
and the summarize input is cut to the first few paragraphs (what a summary describes is at the top).
The `find` passage is shorter, the first paragraphs up to MAX_FIND_CHARS (opening(): cut at a
paragraph, else a sentence, else a word boundary), after any first paragraphs that only repeat the
name or the summary: a query whose words are not the passage's, unlike legal.py's keyword queries.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

from odyssey.data.sampling import sample
from odyssey.data.schema import Collected, Document, Example
from odyssey.data.text import chunks

MIN_DESCRIPTION_CHARS = 80  # shorter, there is nothing to summarise
MAX_SUMMARIZE_CHARS = 3000  # the summarize input: the description's first paragraphs up to this
MAX_FIND_CHARS = 700  # the find passage: the description's first paragraphs up to this
MIN_FIND_CHARS = 80
MAX_LM_CHARS = 20_000  # some descriptions carry a whole changelog; the first part is enough
LM_CHUNK_CHARS = 4000
MIN_SUMMARY_CHARS = 10
MIN_LICENSE_BYTES = 100  # "see LICENSE.txt" stubs are not documents
LICENSE_WORDS = ("LICENSE", "LICENCE", "COPYING", "NOTICE")

_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>")
_MD_BADGE = re.compile(r"\[!\[[^\]]*\]\([^)]*\)\]\([^)]*\)")  # [![alt](image)](link)
_MD_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_RST_SUBSTITUTIONS = re.compile(r"^[\s|]*(?:\|[^|\n]+\|_?[\s|]*)+$")  # a line of |badge| |refs|
_TABLE_RULE = re.compile(r"^[\s|:-]*\|[\s|:-]*$")  # "| --- | --- |" left of a table
_RULE = re.compile(r"^\s*([-=*_~])\1{2,}\s*$")
_RST_DIRECTIVE = re.compile(r"^\.\.\s")  # ".. image::", ".. |x| image::", ".. raw:: html", comments
_PARAGRAPH = re.compile(r"\S(?:.|\n(?![ \t]*\n))*")  # a blank-line separated block
_SENTENCE_END = re.compile(r"[.!?](?=\s)")
_WORD_END = re.compile(r"\S(?=\s)")
_WORDS = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Installed:
    name: str  # normalized: lower case, runs of -_. as one "-"
    title: str  # as the project spells it
    dist: importlib.metadata.Distribution


def normalize(name: str) -> str:
    """The PEP 503 form of a project name: "Jinja2" -> "jinja2", "typing_extensions" -> "typing-extensions"."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> list[Installed]:
    """Every distribution importlib.metadata finds, once per normalized name, sorted by it."""
    found: dict[str, Installed] = {}
    for dist in importlib.metadata.distributions():
        title = dist.metadata["Name"]
        if title:
            found.setdefault(normalize(title), Installed(normalize(title), title, dist))
    return [found[name] for name in sorted(found)]


def metadata_file(dist: importlib.metadata.Distribution) -> Path | None:
    """The METADATA (or PKG-INFO) file a distribution's metadata was read from, when it lists it."""
    for entry in dist.files or []:
        if entry.name in ("METADATA", "PKG-INFO") and _in_metadata_dir(entry):
            return Path(dist.locate_file(entry))
    return None


def _in_metadata_dir(entry: importlib.metadata.PackagePath) -> bool:
    return len(entry.parts) > 1 and entry.parts[0].endswith((".dist-info", ".egg-info"))


def clean_description(text: str) -> str:
    """A README as readable text: without HTML, badges, images and reST directives, blank runs
    collapsed. Fenced code is kept as it is ("<script>" in an example is text, not markup)."""
    # Markup that may span lines ("[![badge](image)](\nlink)"); a line left empty becomes a break.
    text = _MD_IMAGE.sub("", _MD_BADGE.sub("", _HTML_COMMENT.sub("", text)))
    kept: list[str] = []
    in_directive = in_fence = False
    for line in text.splitlines():
        fence = line.lstrip().startswith(("```", "~~~"))
        in_fence ^= fence
        if in_fence or fence:
            kept.append(line)
            continue
        # A directive and its indented options (":target: ..."), up to the next blank line.
        in_directive = bool(_RST_DIRECTIVE.match(line)) or (
            in_directive and line.startswith((" ", "\t")) and bool(line.strip())
        )
        plain = None if in_directive else _plain_line(line, after_text=bool(kept and kept[-1].strip()))
        if plain is not None:
            kept.append(plain)
    return re.sub(r"\n(?:[ \t]*\n)+", "\n\n", "\n".join(kept)).strip("\n")


def _plain_line(line: str, after_text: bool) -> str | None:
    """The line without HTML tags, or None when it was nothing but markup: tags, a row of |badges|,
    a table's "| --- |" rule, a horizontal rule (one right after text is a heading's underline)."""
    if not line.strip():
        return ""
    if _HTML_TAG.match(line.lstrip()):  # an HTML line: "<p align=center>", "<h1>Title</h1>"
        line = _HTML_TAG.sub("", line).rstrip()
    markup = (_RST_SUBSTITUTIONS, _TABLE_RULE) if after_text else (_RST_SUBSTITUTIONS, _TABLE_RULE, _RULE)
    if not line.strip() or any(pattern.match(line) for pattern in markup):
        return None
    return line


def description(dist: importlib.metadata.Distribution) -> str:
    """The long description, cleaned; empty when there is none ("UNKNOWN" counts as none)."""
    meta = dist.metadata
    raw = meta.get("Description") or meta.get_payload() or ""  # payload: metadata 2.1+
    raw = raw if isinstance(raw, str) else ""
    return "" if raw.strip() == "UNKNOWN" else clean_description(raw)


def examples_of(item: Installed) -> tuple[list[Example], Document | None]:
    """summarize (the description's opening -> the Summary), find (the Summary -> a shorter opening),
    lm (name, summary, description); and the description as a document when a find passage is in it."""
    doc_id = f"pypi:{item.name}"
    summary = " ".join((item.dist.metadata.get("Summary") or "").split())
    summary = "" if summary == "UNKNOWN" else summary
    text = description(item.dist)
    examples: list[Example] = []
    if len(text) >= MIN_DESCRIPTION_CHARS and len(summary) >= MIN_SUMMARY_CHARS:
        head = chunks(text, MAX_SUMMARIZE_CHARS)[0]
        if len(head) >= MIN_DESCRIPTION_CHARS:
            examples.append(Example("summarize", head, summary, doc_id))
        passage = find_passage(text, item.title, summary)
        if len(passage) >= MIN_FIND_CHARS:
            examples.append(Example("find", summary, passage, doc_id, family="synopsis"))
    body = "\n\n".join(part for part in (f"{item.title}: {summary}" if summary else "", text) if part)
    if len(body) >= MIN_DESCRIPTION_CHARS:
        cut = chunks(body, MAX_LM_CHARS)[0]
        examples.extend(Example("lm", "", chunk, doc_id) for chunk in chunks(cut, LM_CHUNK_CHARS))
    found = any(ex.task == "find" for ex in examples)
    return examples, Document(doc_id, item.title, text) if found else None


def find_passage(text: str, title: str, summary: str) -> str:
    """The opening of a description, for the `find` query of its summary: after the first paragraphs
    that only repeat the name or the summary (a "# Requests" title), which would give the passage away."""
    known = set(_WORDS.findall(f"{title} {summary}".lower()))
    start = 0
    for m in _PARAGRAPH.finditer(text):
        if not set(_WORDS.findall(m.group().lower())) <= known:
            break
        start = m.end()
    return opening(text[start:], MAX_FIND_CHARS)


def opening(text: str, limit: int) -> str:
    """The start of text, at most limit characters and an exact substring of it: up to the last
    paragraph that ends within limit, else the last sentence, else the last word; never mid-word.
    A boundary that would keep less than a third of limit is passed over for the next kind."""
    text = text.strip()
    if len(text) <= limit:
        return text
    for boundary in (_PARAGRAPH, _SENTENCE_END, _WORD_END):
        end = _last_end(boundary, text, limit)
        if end >= limit // 3:
            return text[:end].rstrip()
    return ""


def _last_end(pattern: re.Pattern, text: str, limit: int) -> int:
    """The end of pattern's last match in text that ends within limit (0 if none)."""
    last = 0
    for m in pattern.finditer(text):
        if m.end() > limit:
            break
        last = m.end()
    return last


def license_files(items: list[Installed] | None = None) -> list[tuple[str, str, Path]]:
    """(doc_id, title, path) of the license texts the distributions bundle in their metadata
    directory (LICENSE*, COPYING*, NOTICE*, licenses/**), in name order. A file of the same bytes may
    appear under several distributions; legal.documents() keeps it once."""
    out = []
    for item in installed() if items is None else items:
        for entry in sorted(item.dist.files or [], key=str):
            if not (_in_metadata_dir(entry) and _is_license_name(entry.name)):
                continue
            rel = "/".join(entry.parts[1:]).removeprefix("licenses/")
            path = Path(item.dist.locate_file(entry))
            if path.is_file() and path.stat().st_size >= MIN_LICENSE_BYTES:
                out.append((f"legal:python/{item.name}/{rel}", f"{item.title} {rel}", path))
    return out


def _is_license_name(name: str) -> bool:
    upper = name.upper()
    return any(word in upper for word in LICENSE_WORDS)


def collect(limit: int | None, seed: int) -> Collected:
    """Examples (and the descriptions with a find passage, as documents) from up to `limit` installed
    distributions (all when None), chosen by hash."""
    chosen = sample(installed(), limit, seed, key=lambda item: item.name)
    examples: list[Example] = []
    documents: list[Document] = []
    for item in chosen:
        found, document = examples_of(item)
        examples += found
        documents += [document] if document else []
    files = [path for item in chosen if (path := metadata_file(item.dist)) is not None]
    return Collected("python_packages", files, examples, documents)
