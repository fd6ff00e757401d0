"""The built-in sources travel: with no Debian files (ODYSSEY_DEBIAN_ROOT at an empty directory, as on
macOS, Fedora or Alpine) the installed Python distributions still give summarize, lm and find
examples and the finder's default documents; with a Debian tree under the root, it is read from there.
Fast: no Ray, no model."""

from __future__ import annotations

import pytest

from odyssey.data import debian, legal, pydist
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
    finds = [ex for ex in legal.collect(0, seed=0).examples if ex.task == "find"]
    assert {ex.doc_id for ex in finds} == {"legal:common-licenses/MIT-ish"}  # license texts: always all


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
