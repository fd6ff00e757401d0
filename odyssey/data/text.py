"""Plain-text shaping shared by the corpus sources: whitespace, paragraphs, sentences, chunks."""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


def paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks, stripped, empty ones dropped."""
    return [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def sentences(text: str) -> list[str]:
    """Sentences of running prose (lines joined first): good enough for descriptions and docs."""
    flat = " ".join(text.split())
    return [s.strip() for s in _SENTENCE_END.split(flat) if s.strip()]


def chunks(text: str, max_chars: int) -> list[str]:
    """Split text into pieces of at most max_chars, at paragraph boundaries where possible, else at
    line boundaries, else hard."""
    out: list[str] = []
    current = ""
    for block in re.split(r"(\n\s*\n)", text):
        if len(current) + len(block) <= max_chars:
            current += block
            continue
        if current.strip():
            out.append(current.strip("\n"))
        current = ""
        while len(block) > max_chars:
            cut = block.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            out.append(block[:cut].strip("\n"))
            block = block[cut:]
        current = block
    if current.strip():
        out.append(current.strip("\n"))
    return [c for c in out if c.strip()]
