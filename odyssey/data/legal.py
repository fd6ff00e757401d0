"""Legal documents: query -> relevant passage (`find`), whole documents for the retrieval index, and
their text (`lm`).

Documents, wherever they are found:
- Debian's license texts (usr/share/common-licenses) and every package's usr/share/doc/*/copyright
  file, below the Debian root ($ODYSSEY_DEBIAN_ROOT, else /), when the machine has them;
- the license files that installed Python distributions bundle (pydist.py): on every machine.
The same file reached twice (a link, or one vendored license in many wheels) is listed once.

A passage is a paragraph (a stanza, in machine-readable copyright
files), long ones cut at line boundaries, and always an exact substring of its document, so a search
hit can be reported with character offsets. The same license text is pasted into hundreds of copyright
files: a passage is kept only the first time its text appears, so no passage can sit in two splits.

Queries, without a language model to paraphrase (the example's `family` says which):
- "heading": a clause's own heading ("2. Grant of Copyright License." -> "grant of copyright license,
  Apache-2.0"), or for copyright stanzas the question they answer ("copyright and license of src/* in
  bash");
- "keyword": otherwise the passage's most distinctive words (highest inverse document frequency). Such
  a query gives its passage away to word matching (BM25 wins by construction), so keyword examples are
  kept a minority: only for a hash-drawn one in KEYWORD_SHARE of the passages without a heading, and
  never more than half as many as the heading examples of the same documents (at most a third of the
  two together; none where no passage has a heading). The passages left without a query are still in
  the documents and in the `lm` text.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from pathlib import Path

from odyssey.data import pydist
from odyssey.data.debian import debian_root
from odyssey.data.sampling import sample
from odyssey.data.schema import Collected, Document, Example
from odyssey.data.text import chunks

LICENSE_PREFIX = "legal:common-licenses/"  # Debian's license texts: always all of them
MAX_PASSAGE_CHARS = 1500
MIN_PASSAGE_CHARS = 80
KEYWORDS_PER_QUERY = 6
KEYWORD_SHARE = 3  # one in this many passages without a heading gets a keyword query
LM_CHUNK_CHARS = 4000

_HEADING = re.compile(r"^\s*(?:section\s+)?\(?\d+[a-z]?[.)]\s*(?P<title>[A-Z][^.\n]{3,70})\.(?:\s|$)", re.I)
_CAPS_HEADING = re.compile(r"^\s*(?P<title>[A-Z][A-Z ,'-]{6,60})\s*$", re.M)
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{3,}")
_STOPWORDS = frozenset(
    [
        "this",
        "that",
        "with",
        "from",
        "have",
        "will",
        "shall",
        "such",
        "been",
        "other",
        "which",
        "their",
        "there",
        "these",
        "those",
        "them",
        "they",
        "into",
        "than",
        "then",
        "also",
        "only",
        "under",
        "were",
        "when",
        "where",
        "what",
        "your",
        "more",
        "must",
        "upon",
        "each",
        "does",
        "doesn't",
        "however",
        "without",
        "within",
        "whether",
        "both",
        "either",
        "about",
        "after",
        "before",
        "being",
        "through",
        "same",
        "work",
        "works",
    ]
)


def documents(root: Path | None = None) -> list[tuple[str, str, Path]]:
    """(doc_id, title, path) of every legal document: Debian's license texts, then its copyright
    files (both under root, the Debian root when None, if there), then the Python distributions'
    license files. A file reached by two paths, or with the same bytes as one listed, is listed once."""
    listed, seen_paths, seen_digests = [], set(), set()
    for doc_id, title, path in [*debian_documents(root), *pydist.license_files()]:
        real = path.resolve()
        if real in seen_paths or not real.is_file():
            continue
        seen_paths.add(real)
        digest = hashlib.sha256(real.read_bytes()).digest()
        if digest not in seen_digests:
            seen_digests.add(digest)
            listed.append((doc_id, title, path))
    return listed


def debian_documents(root: Path | None = None) -> list[tuple[str, str, Path]]:
    """Debian's license texts and packages' copyright files under root; none off Debian."""
    root = debian_root() if root is None else root
    common_licenses, doc_root = root / "usr/share/common-licenses", root / "usr/share/doc"
    docs = []
    if common_licenses.is_dir():
        docs += [(f"{LICENSE_PREFIX}{p.name}", p.name, p) for p in sorted(common_licenses.iterdir())]
    if doc_root.is_dir():
        docs += [
            (f"legal:copyright/{p.parent.name}", p.parent.name, p)
            for p in sorted(doc_root.glob("*/copyright"))
        ]
    return docs


def _paragraph_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each blank-line separated block of text."""
    return [(m.start(), m.end()) for m in re.finditer(r"\S(?:.|\n(?![ \t]*\n))*", text)]


def split_passages(text: str) -> list[str]:
    """Paragraphs (short headings joined to what follows), long ones cut; each a substring of text."""
    out: list[str] = []
    heading_start = None
    for start, end in _paragraph_spans(text):
        para = text[start:end]
        if (
            heading_start is None
            and len(para) < MIN_PASSAGE_CHARS
            and (_HEADING.match(para) or _CAPS_HEADING.fullmatch(para))
        ):
            heading_start = start  # keep it with the clause it heads
            continue
        if heading_start is not None:
            para, heading_start = text[heading_start:end], None
        out.extend(chunks(para, MAX_PASSAGE_CHARS) if len(para) > MAX_PASSAGE_CHARS else [para])
    return [p.rstrip() for p in out if len(p) >= MIN_PASSAGE_CHARS]


def _field(stanza: str, name: str) -> str:
    m = re.search(rf"^{name}:[ \t]*(.*(?:\n[ \t]+.*)*)", stanza, re.M)
    return " ".join(m.group(1).split()) if m else ""


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1].rsplit(" ", 1)[0] + "…"


def structured_query(passage: str, title: str) -> str | None:
    """The question a machine-readable copyright stanza answers, or None for running text."""
    if passage.startswith("Files:"):
        return f"copyright and license of {_shorten(_field(passage, 'Files'))} in {title}"
    if passage.startswith("License:"):
        name = _field(passage, "License").split(" ")[0]
        return f"terms of the {name} license in {title}"
    if passage.startswith(("Format:", "Upstream-Name:", "Upstream-Contact:", "Source:")):
        return f"upstream name, source and contact of {title}"
    m = _HEADING.match(passage) or _CAPS_HEADING.match(passage)
    if m:
        return f"{' '.join(m.group('title').split()).lower()}, {title}"
    return None


def keyword_query(passage: str, title: str, idf: dict[str, float]) -> str:
    words = [w.lower() for w in _WORD.findall(passage)]
    candidates = [w for w in dict.fromkeys(words) if w not in _STOPWORDS]
    best = set(sorted(candidates, key=lambda w: (-idf.get(w, 0.0), w))[:KEYWORDS_PER_QUERY])
    return " ".join(w for w in candidates if w in best) + f" ({title})"


def keyword_passages(candidates: list[tuple[str, str]], headings: int) -> set[str]:
    """Which of the (doc_id, passage) without a heading get a keyword query: one in KEYWORD_SHARE,
    drawn by a hash of both, and no more than half as many as there are `headings` queries (lowest
    hashes first), so keyword examples are at most a third of the heading and keyword ones."""
    draws = sorted((_draw(doc_id, passage), passage) for doc_id, passage in candidates)
    drawn = [passage for draw, passage in draws if draw % KEYWORD_SHARE == 0]
    return set(drawn[: headings // 2])


def _draw(doc_id: str, passage: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{doc_id}\0{passage}".encode()).digest()[:8], "big")


def _normalized(passage: str) -> str:
    return " ".join(passage.lower().split())


def collect(limit: int | None, seed: int, root: Path | None = None) -> Collected:
    """Examples from every Debian license text and up to `limit` other documents (copyright files,
    Python distributions' license files; all when None). root: the Debian root (see documents)."""
    listed = documents(root)
    licenses = [d for d in listed if d[0].startswith(LICENSE_PREFIX)]
    chosen = licenses + sample([d for d in listed if d not in licenses], limit, seed, key=lambda d: d[0])

    docs = []
    for doc_id, title, path in chosen:
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(Document(doc_id, title, text))
    examples = find_examples(docs, with_text=True)
    return Collected("legal", [path for _, _, path in chosen], examples, docs)


def find_examples(docs: list[Document], with_text: bool = False) -> list[Example]:
    """`find` examples of documents: each passage seen for the first time with its heading or copyright
    stanza's question (family "heading"), else a few of them (keyword_passages) with their rarest
    words (family "keyword"); with_text: also all the passages as `lm` text. Used for license texts
    here and for the language reference (python_stdlib.py). Passages are unique across documents."""
    kept: list[tuple[str, str, list[str]]] = []  # doc_id, title, passages seen here first
    seen: set[str] = set()
    for doc in docs:
        fresh = []
        for passage in split_passages(doc.text):
            key = _normalized(passage)
            if key not in seen:
                seen.add(key)
                fresh.append(passage)
        kept.append((doc.doc_id, doc.title, fresh))

    # Inverse document frequency over passages, for keyword queries.
    df = Counter(w for _, _, ps in kept for p in ps for w in {w.lower() for w in _WORD.findall(p)})
    n = max(1, sum(len(ps) for _, _, ps in kept))
    idf = {w: math.log(n / c) for w, c in df.items()}

    queries = {p: structured_query(p, title) for _, title, ps in kept for p in ps}
    plain = [(doc_id, p) for doc_id, _, ps in kept for p in ps if not queries[p]]
    keyword = keyword_passages(plain, headings=len(queries) - len(plain))

    examples: list[Example] = []
    for doc_id, title, passages in kept:
        for passage in passages:
            if queries[passage]:
                examples.append(Example("find", queries[passage], passage, doc_id, family="heading"))
            elif passage in keyword:
                query = keyword_query(passage, title, idf)
                examples.append(Example("find", query, passage, doc_id, family="keyword"))
        if with_text:
            text = "\n\n".join(passages)
            examples.extend(Example("lm", "", chunk, doc_id) for chunk in chunks(text, LM_CHUNK_CHARS))
    return examples
