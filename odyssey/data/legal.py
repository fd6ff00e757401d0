"""Legal documents: query -> relevant passage (`find`), whole documents for the retrieval index, and
their text (`lm`).

Documents: the license texts in /usr/share/common-licenses and every package's
/usr/share/doc/*/copyright file. A passage is a paragraph (a stanza, in machine-readable copyright
files), long ones cut at line boundaries, and always an exact substring of its document, so a search
hit can be reported with character offsets. The same license text is pasted into hundreds of copyright
files: a passage is kept only the first time its text appears, so no passage can sit in two splits.

Queries, without a language model to paraphrase:
- a clause's own heading ("2. Grant of Copyright License." -> "grant of copyright license, Apache-2.0");
- for copyright stanzas, the question they answer ("copyright and license of src/* in bash");
- otherwise the passage's most distinctive words (highest inverse document frequency), a keyword query.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

from odyssey.data.sampling import sample
from odyssey.data.schema import Collected, Document, Example
from odyssey.data.text import chunks

COMMON_LICENSES = Path("/usr/share/common-licenses")
DOC_ROOT = Path("/usr/share/doc")
MAX_PASSAGE_CHARS = 1500
MIN_PASSAGE_CHARS = 80
KEYWORDS_PER_QUERY = 6
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


def documents(
    common_licenses: Path = COMMON_LICENSES, doc_root: Path = DOC_ROOT
) -> list[tuple[str, str, Path]]:
    """(doc_id, title, path) of every legal document, license texts first; links to the same file once."""
    docs, seen = [], set()
    if common_licenses.is_dir():
        for path in sorted(common_licenses.iterdir()):
            real = path.resolve()
            if real.is_file() and real not in seen:
                seen.add(real)
                docs.append((f"legal:common-licenses/{path.name}", path.name, path))
    if doc_root.is_dir():
        for path in sorted(doc_root.glob("*/copyright")):
            real = path.resolve()
            if real.is_file() and real not in seen:
                seen.add(real)
                docs.append((f"legal:copyright/{path.parent.name}", path.parent.name, path))
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


def _normalized(passage: str) -> str:
    return " ".join(passage.lower().split())


def collect(
    limit: int | None, seed: int, common_licenses: Path = COMMON_LICENSES, doc_root: Path = DOC_ROOT
) -> Collected:
    """Examples from every license text and up to `limit` copyright files (all when None)."""
    listed = documents(common_licenses, doc_root)
    licenses = [d for d in listed if d[0].startswith("legal:common-licenses/")]
    chosen = licenses + sample([d for d in listed if d not in licenses], limit, seed, key=lambda d: d[0])

    docs: list[Document] = []
    kept: list[tuple[str, str, list[str]]] = []  # doc_id, title, passages seen here first
    seen: set[str] = set()
    for doc_id, title, path in chosen:
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        docs.append(Document(doc_id, title, text))
        fresh = []
        for passage in split_passages(text):
            key = _normalized(passage)
            if key not in seen:
                seen.add(key)
                fresh.append(passage)
        kept.append((doc_id, title, fresh))

    # Inverse document frequency over passages, for keyword queries.
    df = Counter(w for _, _, ps in kept for p in ps for w in {w.lower() for w in _WORD.findall(p)})
    n = max(1, sum(len(ps) for _, _, ps in kept))
    idf = {w: math.log(n / c) for w, c in df.items()}

    examples: list[Example] = []
    for doc_id, title, passages in kept:
        for passage in passages:
            query = structured_query(passage, title) or keyword_query(passage, title, idf)
            examples.append(Example("find", query, passage, doc_id))
        text = "\n\n".join(passages)
        examples.extend(Example("lm", "", chunk, doc_id) for chunk in chunks(text, LM_CHUNK_CHARS))
    return Collected("legal", [path for _, _, path in chosen], examples, docs)
