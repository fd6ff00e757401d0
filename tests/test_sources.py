"""The built-in sources travel: with no Debian files (ODYSSEY_DEBIAN_ROOT at an empty directory, as on
macOS, Fedora or Alpine) the installed Python distributions still give summarize, lm and find
examples and the finder's default documents; with a Debian tree under the root, it is read from there.
Fast: no Ray, no model."""

from __future__ import annotations

import importlib.metadata
from collections import Counter

import pytest

from odyssey.data import debian, legal, pydist
from odyssey.data.schema import Document
from odyssey.errors import OdysseyError
from serve.passages import PassageIndex, load_documents, split_documents

PARAGRAPH = (  # one package in dpkg's status file; the long description is indented, " ." a break
    "Package: {name}\n"
    "Status: install ok installed\n"
    "Description: {name} sorts numbers fast\n"
    " The {name} tool sorts long lists of numbers very quickly, in memory or on disk, and writes them\n"
    " back in the same format they were read in.\n"
    " .\n"
    " This package holds the {name} command line program.\n"
    "\n"
)


@pytest.fixture
def no_debian(tmp_path, monkeypatch):
    """A machine without Debian's files."""
    empty = tmp_path / "empty-root"
    empty.mkdir()
    monkeypatch.setenv(debian.ROOT_ENV, str(empty))
    return empty


@pytest.fixture
def fake_debian(tmp_path, monkeypatch):
    """A Debian root with two packages in dpkg's status file and one license text."""
    root = tmp_path / "debian-root"
    status = root / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True)
    status.write_text(PARAGRAPH.format(name="alphasort") + PARAGRAPH.format(name="betasort"))
    licenses = root / "usr/share/common-licenses"
    licenses.mkdir(parents=True)
    (licenses / "MIT-ish").write_text(
        "Permission is hereby granted, free of charge, to any person obtaining a copy of this\n"
        "software, to deal in the software without restriction, subject to the conditions below.\n\n"
        "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING\n"
        "BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE.\n"
    )
    monkeypatch.setenv(debian.ROOT_ENV, str(root))
    return root


def test_without_debian_the_debian_source_is_empty(no_debian):
    got = debian.collect(None, seed=0)
    assert got.files == [] and got.examples == []


def test_without_debian_legal_documents_are_python_license_files(no_debian):
    listed = legal.documents()
    assert listed, "the installed Python distributions bundle license files"
    assert all(doc_id.startswith("legal:python/") for doc_id, _, _ in listed)
    assert len({doc_id for doc_id, _, _ in listed}) == len(listed)
    digests = {path.read_bytes() for _, _, path in listed}
    assert len(digests) == len(listed), "the same license text is listed once"


def test_without_debian_legal_gives_find_examples_inside_their_documents(no_debian):
    got = legal.collect(20, seed=0)
    text = {d.doc_id: d.text for d in got.documents}
    finds = [ex for ex in got.examples if ex.task == "find"]
    assert finds and got.documents
    assert all(ex.input.strip() and ex.target in text[ex.doc_id] for ex in finds)


def test_python_packages_give_summaries_and_text(no_debian):
    got = pydist.collect(limit=50, seed=0)
    by_task = {task: [ex for ex in got.examples if ex.task == task] for task in ("summarize", "lm")}
    assert by_task["summarize"] and by_task["lm"]
    assert all(ex.input.strip() and ex.target.strip() for ex in by_task["summarize"])
    assert all(ex.target.strip() for ex in by_task["lm"])
    assert all(ex.doc_id.startswith("pypi:") for ex in got.examples)
    assert len(got.files) <= 50 and all(path.is_file() for path in got.files)
    assert pydist.collect(limit=50, seed=0).examples == got.examples  # deterministic


def test_finder_default_documents_build_an_index_without_debian(no_debian):
    docs = load_documents(max_documents=20)
    assert docs and all(d.doc_id.startswith("legal:python/") for d in docs)
    index = PassageIndex(split_documents(docs))
    assert index.search("permission to use copy modify distribute", k=3)


def test_finder_error_says_what_to_do_when_there_is_nothing(no_debian, monkeypatch):
    monkeypatch.setattr(pydist, "license_files", lambda: [])
    with pytest.raises(OdysseyError, match="set the app's `documents`"):
        load_documents()


def test_the_debian_root_is_honoured(fake_debian):
    got = debian.collect(None, seed=0)
    assert got.files == [fake_debian / "var/lib/dpkg/status"]
    summaries = {ex.target: ex.input for ex in got.examples if ex.task == "summarize"}
    assert set(summaries) == {"alphasort sorts numbers fast", "betasort sorts numbers fast"}
    assert summaries["alphasort sorts numbers fast"].startswith("The alphasort tool sorts long lists")

    listed = legal.documents()
    assert listed[0][:2] == ("legal:common-licenses/MIT-ish", "MIT-ish")  # Debian first, then Python
    assert all(doc_id.startswith("legal:python/") for doc_id, _, _ in listed[1:])
    got = legal.collect(0, seed=0)
    assert [d.doc_id for d in got.documents] == ["legal:common-licenses/MIT-ish"]  # license texts: always all
    assert {ex.doc_id for ex in got.examples} == {"legal:common-licenses/MIT-ish"}
    assert not [ex for ex in got.examples if ex.task == "find"]  # no heading: no (keyword) find either


def test_readme_markup_is_dropped_and_code_kept():
    readme = (
        '<p align="center"><img src="logo.png"></p>\n\n'
        "[![CI](https://ci/badge.svg)](\nhttps://ci)\n"
        "|pypi| |versions|\n\n"
        ".. image:: https://img/badge.svg\n   :target: https://pypi.org\n\n"
        "# Tool\n\nTool escapes markup.\n\n"
        '```python\nescape("<script>")\n```\n'
    )
    assert pydist.clean_description(readme) == (
        '# Tool\n\nTool escapes markup.\n\n```python\nescape("<script>")\n```'
    )


def test_legal_find_queries_are_mostly_headings_and_say_their_family():
    words = ["grant", "licensee", "notice", "warranty", "source", "binary"]
    words += ["patent", "trademark", "copy", "modify", "merge", "publish"]
    plain = [  # running text: no heading, so at most a keyword query
        Document(
            f"plain:{i}",
            f"plain {i}",
            "\n\n".join(
                f"Paragraph {j} of document {i}: the {words[(i + j) % 12]} and the {words[(i * j) % 12]} "
                f"clauses apply to every {words[j % 12]} made under this text, number {i * 100 + j}."
                for j in range(10)
            ),
        )
        for i in range(12)
    ]
    headed = [
        Document(
            f"headed:{i}",
            f"headed {i}",
            "\n\n".join(
                f"{j}. Clause {words[j % 12].title()} {i}.\n\nThis clause {j} of document {i} says what "
                f"the {words[j % 12]} terms allow, and what they never allow anyone to do."
                for j in range(1, 9)
            ),
        )
        for i in range(12)
    ]
    docs = plain + headed
    examples = legal.find_examples(docs, with_text=True)
    finds = [ex for ex in examples if ex.task == "find"]
    families = Counter(ex.family for ex in finds)
    assert set(families) == {"heading", "keyword"}
    assert 0 < families["keyword"] <= len(finds) / 3  # a minority: never more than half the headings
    assert all(ex.input.startswith("clause ") for ex in finds if ex.family == "heading")
    # A passage left without a query is still in the lm text; the draw is the same every time.
    lm = "\n\n".join(ex.target for ex in examples if ex.task == "lm")
    assert all(p in lm for d in plain for p in legal.split_passages(d.text))
    assert legal.find_examples(docs, with_text=True) == examples
    assert not [ex for ex in legal.find_examples(plain) if ex.family == "keyword"]  # no heading to pair with


def fake_distribution(tmp_path, name: str, summary: str, description: str) -> pydist.Installed:
    info = tmp_path / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\nSummary: {summary}\n"
        "Description-Content-Type: text/markdown\n\n" + description
    )
    return pydist.Installed(pydist.normalize(name), name, importlib.metadata.PathDistribution(info))


SORTER_README = (
    "[![CI](https://ci/badge.svg)](https://ci)\n\n"
    "# Fastsort\n\n"
    "Fastsort orders long lists of numbers in memory or on disk, and writes them back in the format "
    "they came in. It picks a radix or merge strategy from the data it sees.\n\n"
    "It needs no compiler and runs on every platform Python runs on. "
    * 6
    + "\n\n## Installation\n\n    pip install fastsort\n"
)


def test_python_packages_give_synopsis_find_examples(tmp_path, monkeypatch):
    summary = "Sort numbers quickly"
    item = fake_distribution(tmp_path, "Fastsort", summary, SORTER_README)
    monkeypatch.setattr(pydist, "installed", lambda: [item])
    got = pydist.collect(None, seed=0)
    [find] = [ex for ex in got.examples if ex.task == "find"]
    assert (find.family, find.input, find.doc_id) == ("synopsis", summary, "pypi:fastsort")
    assert find.target.startswith("Fastsort orders long lists")  # the "# Fastsort" title is skipped
    assert summary.lower() not in find.target.lower() and "badge" not in find.target
    assert pydist.MIN_FIND_CHARS <= len(find.target) <= pydist.MAX_FIND_CHARS
    assert [d.doc_id for d in got.documents] == ["pypi:fastsort"] and find.target in got.documents[0].text
    assert {ex.doc_id for ex in got.examples} == {"pypi:fastsort"}


def test_a_distribution_without_summary_or_description_gives_no_find(tmp_path):
    short = fake_distribution(tmp_path, "tiny", "A tiny thing", "# tiny\n\nA tiny thing.")
    none = fake_distribution(tmp_path, "bare", "", SORTER_README)
    for item in (short, none):
        examples, document = pydist.examples_of(item)
        assert not [ex for ex in examples if ex.task == "find"] and document is None


def test_opening_cuts_at_paragraphs_then_sentences_never_mid_word():
    para = "One sentence here. " * 10  # 190 characters
    text = f"{para.strip()}\n\n{para.strip()}\n\n{para.strip()}"
    assert pydist.opening(text, 400) == f"{para.strip()}\n\n{para.strip()}"
    assert pydist.opening("short text", 400) == "short text"
    long = "word " * 300 + "end. " + "word " * 300
    cut = pydist.opening(long, 700)
    assert len(cut) <= 700 and long.startswith(cut) and cut.endswith("word")
    sentences = "A sentence of some words. " * 40
    cut = pydist.opening(sentences, 700)
    assert cut.endswith("words.") and len(cut) <= 700 and cut in sentences


PACKAGES_INDEX = (  # two binaries of one source share a long description; a third has its own
    "Package: libfoo1\nSource: foo (1.2-3)\nDescription: foo library for parsing widgets\n"
    " Foo reads widget files of every version and hands them to programs as trees, checking\n"
    " them on the way.\n .\n This package holds the shared library.\n\n"
    "Package: libfoo-dev\nSource: foo\nDescription: foo library for parsing widgets - headers\n"
    " Foo reads widget files of every version and hands them to programs as trees, checking\n"
    " them on the way.\n .\n This package holds the shared library.\n\n"
    "Package: foo-tools\nSource: foo\nDescription: command line tools for widgets\n"
    " Programs that convert, validate and pretty-print widget files from the shell, built on the\n"
    " foo library.\n\n"
    "Package: bar\nDescription: bar\n short\n\n"
)


def test_debian_gives_synopsis_find_examples_once_per_long_description(tmp_path):
    index = tmp_path / "example.org_debian_dists_stable_main_binary-amd64_Packages"
    index.write_text(PACKAGES_INDEX)
    got = debian.collect(None, seed=0, files=[index])
    finds = {ex.input: ex for ex in got.examples if ex.task == "find"}
    # Binaries in name order: libfoo-dev uses the shared long description before libfoo1 could.
    assert set(finds) == {"foo library for parsing widgets - headers", "command line tools for widgets"}
    assert all(ex.family == "synopsis" and ex.doc_id == "debian:foo" for ex in finds.values())
    assert finds["foo library for parsing widgets - headers"].target.startswith("Foo reads widget files")
    assert [d.doc_id for d in got.documents] == ["debian:foo"]
    assert all(ex.target in got.documents[0].text for ex in finds.values())


def test_the_fake_debian_root_gives_synopsis_find_examples(fake_debian):
    finds = [ex for ex in debian.collect(None, seed=0).examples if ex.task == "find"]
    assert {ex.input for ex in finds} == {"alphasort sorts numbers fast", "betasort sorts numbers fast"}
    assert all(ex.family == "synopsis" and ex.input not in ex.target for ex in finds)
