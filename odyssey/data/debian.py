"""Debian package descriptions: long description -> one-line synopsis (`summarize`), synopsis -> the
long description's opening (`find`, family "synopsis"), and the descriptions as plain text (`lm`) and
as documents.

Read from the package index under var/lib/apt/lists (Packages and Translation files, plain or
lz4/gz/xz compressed) and from var/lib/dpkg/status, below the Debian root: $ODYSSEY_DEBIAN_ROOT, or /
when unset. These are extras: a machine without them (macOS, Fedora, Alpine, or a root pointed at an
empty directory) gives no examples here, and the Python sources carry the corpus.

Binary packages built from one source package often share their description, so the document is the
source package: all its binaries fall in one split. Packages indexes without long descriptions
(their text is in Translation files) still give synopses for `lm`. A long description shared by
binaries of one source gives one `find` passage, cut to MAX_FIND_CHARS as pydist.opening() cuts.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
from pathlib import Path

from debian import deb822

from odyssey.data.pydist import MAX_FIND_CHARS, opening
from odyssey.data.sampling import sample
from odyssey.data.schema import Collected, Document, Example

ROOT_ENV = "ODYSSEY_DEBIAN_ROOT"
MIN_LONG_CHARS = 80  # a long description shorter than this is not worth summarising


def debian_root() -> Path:
    """Where Debian's files are looked for: $ODYSSEY_DEBIAN_ROOT, else /. Read at each call, so a test
    (or a user with a copied tree) can point it elsewhere after import."""
    return Path(os.environ.get(ROOT_ENV) or "/")


def index_files(root: Path | None = None) -> list[Path]:
    """dpkg's status file and apt's package indexes under root (the Debian root when None), those
    that exist."""
    root = debian_root() if root is None else root
    status, apt_lists = root / "var/lib/dpkg/status", root / "var/lib/apt/lists"
    files = [status] if status.is_file() else []
    if apt_lists.is_dir():
        files += sorted(
            p
            for p in apt_lists.iterdir()
            if p.is_file() and ("_Packages" in p.name or "_Translation-" in p.name)
        )
    return files


def _open_text(path: Path) -> io.TextIOBase:
    openers = {".lz4": _lz4_open, ".gz": gzip.open, ".xz": lzma.open, ".lzma": lzma.open, ".bz2": bz2.open}
    opener = openers.get(path.suffix)
    if opener is None:
        return open(path, encoding="utf-8", errors="replace")
    return io.TextIOWrapper(opener(path, "rb"), encoding="utf-8", errors="replace")


def _lz4_open(path, mode):
    import lz4.frame

    return lz4.frame.open(path, mode)


def _unfold(lines: list[str]) -> str:
    """Debian's long-description markup to text: ' .' is a paragraph break; lines starting with two
    spaces are verbatim (lists, code); the other lines of a paragraph are joined."""
    text, prev = "", None
    for raw in lines:
        line = raw[1:] if raw.startswith(" ") else raw
        if line.strip() == ".":
            kind, line = "break", ""
        elif line.startswith(" "):
            kind, line = "verbatim", line.rstrip()
        else:
            kind, line = "text", line.strip()
        if kind == "break":
            text = text.rstrip("\n") + "\n\n"
        elif kind == "text" and prev == "text":
            text += " " + line
        else:
            text += ("\n" if text and not text.endswith("\n") else "") + line
        prev = kind
    return text.strip()


def read_packages(files: list[Path]) -> dict[str, dict[str, str]]:
    """package -> {source, synopsis, long}; a long description from any file wins over none."""
    packages: dict[str, dict[str, str]] = {}
    for path in files:
        with _open_text(path) as f:
            fields = ["Package", "Source", "Description", "Description-en"]
            for para in deb822.Deb822.iter_paragraphs(f, use_apt_pkg=False, fields=fields):
                name = para.get("Package")
                desc = para.get("Description") or para.get("Description-en")
                if not name or not desc:
                    continue
                synopsis, *rest = desc.split("\n")
                entry = packages.setdefault(name, {"source": name, "synopsis": synopsis.strip(), "long": ""})
                if para.get("Source"):
                    entry["source"] = para["Source"].split(" ")[0]  # "foo (1.2-3)" -> "foo"
                long = _unfold(rest)
                if len(long) > len(entry["long"]):
                    entry["long"] = long
    return packages


def collect(limit: int | None, seed: int, files: list[Path] | None = None) -> Collected:
    """Examples from up to `limit` source packages with long descriptions and as many without
    (all when None), chosen by hash. None found (not a Debian machine): no files, no examples."""
    files = index_files() if files is None else files
    packages = read_packages(files)
    by_source: dict[str, list[str]] = {}
    for name in sorted(packages):
        by_source.setdefault(packages[name]["source"], []).append(name)
    # Few packages carry long descriptions: sample those and the synopsis-only ones separately, so
    # a small preset still gets summaries.
    rich = sorted(s for s, names in by_source.items() if any(packages[n]["long"] for n in names))
    plain = sorted(set(by_source) - set(rich))
    chosen = sorted(sample(rich, limit, seed, key=str) + sample(plain, limit, seed, key=str))

    examples: list[Example] = []
    documents: list[Document] = []
    for source in chosen:
        found, document = examples_of(source, [(name, packages[name]) for name in by_source[source]])
        examples += found
        documents += [document] if document else []
    return Collected("debian", files, examples, documents)


def examples_of(
    source: str, binaries: list[tuple[str, dict[str, str]]]
) -> tuple[list[Example], Document | None]:
    """One source package's examples: summarize and find (synopsis -> opening of the long description,
    each long description once) per binary, the source's text as one `lm` example, and that text as a
    document when a find passage is in it."""
    doc_id = f"debian:{source}"
    examples, lines, seen_long = [], [], set()
    for name, pkg in binaries:
        if len(pkg["long"]) >= MIN_LONG_CHARS and pkg["synopsis"]:
            examples.append(Example("summarize", pkg["long"], pkg["synopsis"], doc_id))
        long = pkg["long"] if pkg["long"] not in seen_long else ""
        seen_long.add(pkg["long"])
        passage = opening(long, MAX_FIND_CHARS)
        if len(passage) >= MIN_LONG_CHARS and pkg["synopsis"]:
            examples.append(Example("find", pkg["synopsis"], passage, doc_id, family="synopsis"))
        lines.append(f"{name}: {pkg['synopsis']}" + (f"\n{long}" if long else ""))
    text = "\n\n".join(lines)
    examples.append(Example("lm", "", text, doc_id))
    found = any(ex.task == "find" for ex in examples)
    return examples, Document(doc_id, source, text) if found else None
