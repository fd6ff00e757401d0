"""The `code` task's two families (python_stdlib.py) and their executable checks (code_checks.py):
plain-language requests with whole functions as targets, docstring `find` examples, doctest and
generated input/output checks. Fast: no Ray, a few child processes."""

import ast

from odyssey.code_checks import (
    DoctestCheck,
    PlainCheck,
    checks_for,
    completion_error,
    is_pure,
    plain_check,
    run_check,
)
from odyssey.data.python_stdlib import PLAIN_TEMPLATES, examples_of_module, first_sentence

FAKE = '''"""A fake module for the tests."""

import os


def add_all(numbers):
    """Return the sum of the numbers in a list, doubled.

    >>> add_all([1, 2])
    6
    """
    total = sum(numbers)
    return 2 * total


def last_word(text, sep=" "):
    """Return the last word of the text, or the empty string when there is none."""
    words = text.split(sep) if text else []
    return words[-1] if words else ""


def shout(text):
    """Print the text in capitals and return nothing useful."""
    print(text.upper())
    return None


def save(path, text):
    """Write the text to the file at the given path."""
    with open(path, "w") as f:
        f.write(text)


def _private(x):
    """Return x unchanged, but privately so."""
    return x


class Box:
    def size(self):
        """Return how many things the box holds right now."""
        return 0
'''
DOC_ID = "python:fake.py"
NO_MODULE = "user:fake"  # checks run in an empty namespace: there is no module `fake` to import


def _examples(task, family):
    return {e.input: e for e in examples_of_module(FAKE, DOC_ID) if e.task == task and e.family == family}


def _plain(name):
    return next(e for e in _examples("code", "plain").values() if e.target.startswith(f"def {name}("))


def _function(source):
    return ast.parse(source).body[0]


def test_plain_requests_have_no_signature_and_a_whole_function_as_target():
    plain = _examples("code", "plain")
    names = sorted(e.target.split("(")[0].removeprefix("def ") for e in plain.values())
    assert names == ["add_all", "last_word", "save", "shout"]  # not private, not methods
    for request, e in plain.items():
        name = e.target.split("(")[0].removeprefix("def ")
        assert (
            name in request and f"{name}(" not in request and "def " not in request and ":\n" not in request
        )
        assert e.doc_id == DOC_ID and completion_error(request, e.target) is None
        fn = _function(e.target)  # the whole function: def line, docstring, body
        assert fn.name == name and ast.get_docstring(fn) and len(fn.body) >= 2
    e = _plain("last_word")
    assert "text" in e.input and "optional sep" in e.input and "return the last word of the text" in e.input
    # The signature family is still there, unchanged: signature + docstring -> body.
    signature = _examples("code", "signature")
    assert any(p.startswith("def add_all(numbers):") for p in signature)
    assert all(not e.target.startswith("def ") for e in signature.values())


def test_plain_phrasings_differ_and_are_deterministic():
    requests = [examples_of_module(FAKE, f"python:fake{i}.py") for i in range(12)]
    openings = {e.input.split(" ")[0] for exs in requests for e in exs if e.family == "plain"}
    assert len(openings) > 1 and len(PLAIN_TEMPLATES) > 1
    assert examples_of_module(FAKE, DOC_ID) == examples_of_module(FAKE, DOC_ID)


def test_docstring_find_examples_of_functions_and_methods():
    found = _examples("find", "docstring")
    assert found["Return how many things the box holds right now."].target.startswith("def size(self):")
    assert found["Return x unchanged, but privately so."].doc_id == DOC_ID
    add = found["Return the sum of the numbers in a list, doubled."].target
    assert add.startswith("def add_all(numbers):") and add.endswith("return 2 * total")
    assert first_sentence("f(x) -> y\n\nMore.") is None and first_sentence("Too short.") is None
    assert first_sentence("Do this right now. Then that.") == "Do this right now."


def test_a_pure_function_gets_generated_checks_that_its_reference_passes():
    reference = _plain("last_word").target
    assert is_pure(_function(reference))
    check = checks_for(_plain("last_word").input, reference, NO_MODULE, "plain")
    assert isinstance(check, PlainCheck) and check.doctests is None and len(check.cases) >= 2
    assert check == checks_for("", reference, NO_MODULE, "plain")  # seeded: the same cases every time
    assert run_check(check, reference).passed
    rewritten = 'def last_word(text, sep=" "):\n    return text.split(sep)[-1] if text else ""'
    assert run_check(check, rewritten).passed
    wrong = run_check(check, "    def last_word(text, sep=' '):\n        return text\n")  # indented: fine
    assert wrong.parses and not wrong.passed and "expected" in wrong.error
    assert "no function last_word" in run_check(check, "def other(text):\n    return text").error
    assert not run_check(check, "def last_word(text:\n    return text").parses


def test_the_reference_doctests_run_against_the_candidate():
    e = _plain("add_all")
    check = checks_for(e.input, e.target, NO_MODULE, "plain")
    assert ">>> add_all([1, 2])" in check.doctests and check.cases
    result = run_check(check, e.target)
    assert result.passed and result.attempted == 1 + len(check.cases)
    wrong = run_check(check, "def add_all(numbers):\n    return sum(numbers)")
    assert not wrong.passed and "Got:\n    3" in wrong.error


def test_impure_functions_get_no_generated_checks():
    for name in ("shout", "save"):  # print, open
        assert not is_pure(_function(_plain(name).target))
        assert plain_check(_plain(name).target, NO_MODULE) is None
    impure = [
        "def f(x):\n    return os.getcwd() + x",
        "def f(x):\n    return _time.time() + x",
        "def f(x):\n    global seen\n    return x",
        "def f(x):\n    yield x",
        "def f(x):\n    x[0] = 1\n    return x",
        "def f(x):\n    x.y = 1\n    return x",
        "def f(*xs):\n    return xs",
        "def f(x, *, y=1):\n    return x",
        "def f(x):\n    return eval(x)",
        "def f(x):\n    import random\n    return x",
    ]
    assert not any(is_pure(_function(source)) for source in impure)
    assert is_pure(_function("def f(x, y=2):\n    z = [x]\n    z[0] = y\n    return z"))
    # Pure, but the same result for every input: a constant answer would pass, so no cases.
    assert plain_check("def f(x):\n    return None", "") is None


def test_the_signature_family_keeps_its_doctest_check():
    prompt = 'def add(a, b):\n    """Sum.\n\n    >>> add(2, 3)\n    5\n    """'
    for family in ("signature", ""):  # "": a corpus older than families, told by the prompt
        check = checks_for(prompt, "    return a + b", "", family)
        assert isinstance(check, DoctestCheck) and check.function == "add"
    assert run_check(check, "    return a + b").passed
    wrong = run_check(check, "    return a - b")
    assert wrong.parses and not wrong.passed and "Got:\n    -1" in wrong.error
    assert not run_check(check, "    return (a").parses
    assert checks_for('def f(x):\n    """Nothing to run."""', "    return x", "", "signature") is None
    assert completion_error(prompt, "    return a + b") is None
