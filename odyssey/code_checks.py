"""Checks of generated Python: does it parse, and does it do what its example's reference does.

The `code` task has two families (odyssey/data/python_stdlib.py), and the checks of each:

    signature  input: a function's signature + docstring; answer: the body. Checked by the doctests
               (`>>> ...`) of the docstring the model saw (DoctestCheck).
    plain      input: a request in plain words; answer: a whole function. Checked (PlainCheck) by
               (a) the doctests of the reference's docstring, run against the candidate function, and
               (b) generated input/output cases when the reference is pure (is_pure, decided with
               `ast`, conservatively): small ints, strings and lists of ints picked by a hash of the
               document and function, run through the reference; the inputs for which it returns a
               literal (one that `ast.literal_eval` reads back equal) become cases the candidate must
               answer equally. They are computed at evaluation time, not stored.

    check = checks_for(example.input, example.target, example.doc_id, example.family)  # None: nothing
    run_check(check, answer)  -> CheckResult(parses, passed, attempted, error)

Code runs in a child process (`python -I`, a scratch directory as its working directory, limits on
CPU seconds, memory, wall time and the seconds of one generated case), in a copy of its module's
namespace when the example comes from a known module (so names the module defines resolve). This
keeps a bad or endless answer from harming the evaluation; it is not a sandbox against hostile code.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass

CPU_SECONDS = 10
MEMORY_BYTES = 1 << 30
WALL_SECONDS = 20
CALL_SECONDS = 2  # one generated case, in the reference or the candidate
# Modules whose import does something visible (a browser, a window): never imported for a check.
NEVER_IMPORT = ("antigravity", "this", "turtle", "turtledemo", "tkinter", "idlelib", "webbrowser")

# Purity (is_pure): builtins that reach outside the function, and modules whose names it must not touch.
IMPURE_CALLS = {"print", "open", "input", "breakpoint", "exit", "quit", "help", "id", "setattr", "delattr"}
IMPURE_CALLS |= {"exec", "eval", "__import__", "compile", "globals", "locals", "vars"}  # code as text
IMPURE_MODULES = {"os", "sys", "time", "random", "socket", "subprocess", "threading"}
# Generated inputs: each required parameter takes one of these, picked by hash; kept cases at most.
VALUE_POOLS = (
    (0, 1, 2, 3, -1, 7, 10, 42),
    ("", "a", "abc", "Hello, World", "a b c", "x-y_z", "12", "tEsT", "dir/f.txt", "a<b & 'c'", "2\nlines"),
    ([], [1], [1, 2, 3], [3, 1, 2], [0, -4, 9], [5, 5]),
)
INPUT_TRIES = 18
MAX_CASES = 5
MAX_RESULT_CHARS = 1000


def syntax_error(code: str) -> str | None:
    """None when code parses as Python, else what is wrong and where. Nothing is no answer."""
    if not code.strip():
        return "no code: the model ended its answer before writing any"
    try:
        ast.parse(code)
    except SyntaxError as e:
        return f"SyntaxError: {e.msg} (line {e.lineno})"
    except ValueError as e:  # e.g. a null byte
        return f"ValueError: {e}"
    return None


def completion_error(prompt: str, body: str) -> str | None:
    """syntax_error of generated code. After a prompt that is a signature + docstring (the `signature`
    family), the code is that function's body: the whole function must parse. After a plain-language
    prompt (the `plain` family), the code stands alone, a whole function (dedented first: a model may
    write it indented)."""
    if not body.strip():
        return syntax_error(body)
    if syntax_error(prompt + "\n    pass") is None:
        return syntax_error(prompt + "\n" + body)
    return syntax_error(textwrap.dedent(body))


@dataclass(frozen=True)
class DoctestCheck:
    prompt: str  # signature + docstring, as the model saw it; the candidate is its body
    function: str  # the function's name
    module: str | None  # the module whose namespace the function runs in; None: an empty one


@dataclass(frozen=True)
class PlainCheck:
    function: str  # the reference's name: the candidate, a whole function, must define it
    module: str | None
    doctests: str | None  # the reference's docstring, when it holds `>>>` examples
    cases: tuple[tuple[str, str], ...]  # (repr of an argument tuple, repr of the reference's result)


Check = DoctestCheck | PlainCheck


@dataclass(frozen=True)
class CheckResult:
    parses: bool
    passed: bool
    attempted: int  # doctest examples and generated cases run
    error: str | None


def module_of(doc_id: str) -> str | None:
    """`python:asyncio/sslproto.py` (the stdlib corpus's document ids) -> `asyncio.sslproto`."""
    if not doc_id.startswith("python:") or not doc_id.endswith(".py"):
        return None
    name = doc_id[len("python:") : -len(".py")].replace("/", ".").removesuffix(".__init__")
    return None if name.split(".")[0] in NEVER_IMPORT else name


def checks_for(prompt: str, reference: str, doc_id: str = "", family: str = "") -> Check | None:
    """The executable check of a `code` example, or None when there is nothing to run. A family of ""
    (a corpus older than families) is told by the prompt: a signature parses as Python."""
    if family == "signature" or (not family and syntax_error(prompt + "\n    pass") is None):
        return doctest_check(prompt, doc_id)
    return plain_check(reference, doc_id)


def doctest_check(prompt: str, doc_id: str = "") -> DoctestCheck | None:
    """The check of a `signature` prompt, or None when it has no doctest or is not a plain function
    (a method needs an instance that a docstring cannot build)."""
    if ">>>" not in prompt:
        return None
    fn = _only_function(prompt + "\n    pass")
    if fn is None or ast.get_docstring(fn) is None:
        return None
    return DoctestCheck(prompt, fn.name, module_of(doc_id))


def plain_check(reference: str, doc_id: str = "") -> PlainCheck | None:
    """The check of a `plain` example from its reference (a whole function): its doctests, and
    generated cases when it is pure; None when it has neither or is not a plain function."""
    fn = _only_function(textwrap.dedent(reference))
    if fn is None:
        return None
    doc = ast.get_docstring(fn, clean=False)
    doctests = doc if doc and ">>>" in doc else None
    module = module_of(doc_id)
    cases = generated_cases(fn, textwrap.dedent(reference), module, doc_id) if is_pure(fn) else ()
    return PlainCheck(fn.name, module, doctests, cases) if doctests or cases else None


def _only_function(source: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    """The one function that source defines, unless it is a method (its first parameter self/cls)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    fn = tree.body[0] if len(tree.body) == 1 else None
    if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
        return None
    positional = [*fn.args.posonlyargs, *fn.args.args]
    return None if positional and positional[0].arg in ("self", "cls") else fn


def is_pure(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether fn's source promises a result that depends on its arguments only (conservatively: a
    False is often a pure function). Plain positional parameters; no I/O or code-running builtins; no
    os/sys/time/random/socket/subprocess/threading (nor `_os`-style aliases); no global/nonlocal,
    yield or await; no decorator; no assignment to or deletion of a parameter's attribute or item."""
    args = fn.args
    if (
        isinstance(fn, ast.AsyncFunctionDef)
        or fn.decorator_list
        or args.vararg
        or args.kwarg
        or args.kwonlyargs
    ):
        return False
    params = {a.arg for a in (*args.posonlyargs, *args.args)}
    for node in ast.walk(fn):
        if isinstance(node, ast.Global | ast.Nonlocal | ast.Yield | ast.YieldFrom | ast.Await):
            return False
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in IMPURE_CALLS:
            return False
        if isinstance(node, ast.Name) and node.id.lstrip("_") in IMPURE_MODULES:
            return False
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if any(name.split(".")[0] in IMPURE_MODULES for name in names):
                return False
        stored = isinstance(node, ast.Attribute | ast.Subscript) and isinstance(node.ctx, ast.Store | ast.Del)
        if stored and _root_name(node) in params:
            return False
    return True


def _root_name(node: ast.expr) -> str | None:
    """`a.b[0].c` -> "a"."""
    while isinstance(node, ast.Attribute | ast.Subscript):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def generated_inputs(fn: ast.FunctionDef | ast.AsyncFunctionDef, seed: str) -> list[str]:
    """Up to INPUT_TRIES argument tuples (as reprs) for fn's parameters without defaults, each value
    from VALUE_POOLS by a hash of seed, the try and the parameter; every other try draws all its values
    from one pool, in turn (so that three ints or three strings come up); none when fn needs none."""
    positional = [*fn.args.posonlyargs, *fn.args.args]
    required = positional[: len(positional) - len(fn.args.defaults)]
    if not required:
        return []
    tries = []
    for i in range(INPUT_TRIES):
        values = []
        for param in required:
            h = _hash(f"{seed}:{fn.name}:{i}:{param.arg}")
            pool = VALUE_POOLS[(h if i % 2 else i // 2) % len(VALUE_POOLS)]
            values.append(pool[(h // len(VALUE_POOLS)) % len(pool)])
        tries.append(repr(tuple(values)))
    return list(dict.fromkeys(tries))


def _hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16)


def generated_cases(fn, reference: str, module: str | None, seed: str) -> tuple[tuple[str, str], ...]:
    """(arguments, result) reprs of up to MAX_CASES generated inputs on which the reference returns a
    literal, the same twice, printing nothing; inputs with a result not seen yet first. None when they
    all give one result (None, False, ...): such cases would pass an answer that returns a constant."""
    inputs = generated_inputs(fn, seed)
    if not inputs:
        return ()
    answer, _ = _run_child({"source": reference, "function": fn.name, "module": module, "probe": inputs})
    results = (answer or {}).get("results") or [None] * len(inputs)
    seen, new, again = set(), [], []
    for args, result in zip(inputs, results):
        if result is not None:
            (again if result in seen else new).append((args, result))
            seen.add(result)
    return tuple((new + again)[:MAX_CASES]) if len(seen) > 1 else ()


def run_check(check: Check, candidate: str, cpu_seconds: int = CPU_SECONDS) -> CheckResult:
    """Run `check` against generated code: for a DoctestCheck the body after the prompt's docstring,
    for a PlainCheck a whole function."""
    if isinstance(check, DoctestCheck):
        error = completion_error(check.prompt, candidate)
        source, cases = check.prompt + "\n" + candidate, ()
        doctests = ast.get_docstring(_only_function(check.prompt + "\n    pass"), clean=False)
    else:
        source, doctests, cases = textwrap.dedent(candidate), check.doctests, check.cases
        error = syntax_error(source)
    if error is not None:
        return CheckResult(False, False, 0, error)
    job = {"source": source, "function": check.function, "module": check.module, "doctests": doctests}
    result, why = _run_child({**job, "cases": cases}, cpu_seconds)
    if result is None:
        return CheckResult(True, False, 0, why)
    attempted = int(result.get("attempted", 0))
    passed = attempted > 0 and result.get("failed", 1) == 0
    return CheckResult(True, passed, attempted, None if passed else result.get("error"))


def _limits(cpu_seconds: int) -> None:  # in the child, before it runs anything
    import resource

    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))


# The child: define the function in (a copy of) its module's namespace; then either "probe" (the
# reference's literal results on generated inputs) or check (the doctests, then the cases).
_CHILD = r"""
import ast, doctest, importlib, io, json, signal, sys
job = json.loads(sys.stdin.read())
def answer(**fields):
    print(json.dumps(fields)); sys.exit()
ns = {"__name__": "__check__"}
if job["module"]:
    try:
        ns = dict(vars(importlib.import_module(job["module"])))
    except Exception as e:
        answer(error=f"cannot import {job['module']}: {e!r}")
try:
    exec(compile(job["source"], "<candidate>", "exec"), ns)
    fn = ns.get(job["function"])
    if not callable(fn):
        raise NameError(f"the code defines no function {job['function']}")
except BaseException as e:
    answer(attempted=0, failed=1, error=f"{type(e).__name__}: {e}")
def too_long(*_):
    raise TimeoutError("over %s s" % job["call_seconds"])
signal.signal(signal.SIGALRM, too_long)
def call(args):
    signal.setitimer(signal.ITIMER_REAL, job["call_seconds"])
    try:
        return fn(*ast.literal_eval(args))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
def literal(args):  # repr of fn(*args) if a literal, the same twice, nothing printed; else None
    sys.stdout = sys.stderr = printed = io.StringIO()
    try:
        value, text = call(args), repr(call(args))
        ok = text == repr(value) and len(text) <= job["max_chars"] and ast.literal_eval(text) == value
    except BaseException:
        ok = False
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    return text if ok and not printed.getvalue() else None
if "probe" in job:
    answer(results=[literal(args) for args in job["probe"]])
out, failed = io.StringIO(), 0
runner = doctest.DocTestRunner(verbose=False, optionflags=doctest.ELLIPSIS)
if job["doctests"]:
    test = doctest.DocTestParser().get_doctest(job["doctests"], dict(ns), job["function"], "<doc>", 0)
    runner.run(test, out=out.write)
for args, expected in job["cases"]:
    try:
        got = call(args)
        good = got == ast.literal_eval(expected)
    except BaseException as e:
        got, good = f"{type(e).__name__}: {e}", False
    if not good:
        failed += 1
        out.write(f"{job['function']}{args} gave {got!r}, expected {expected}\n")
r = runner.summarize(verbose=False)
error = out.getvalue()[-500:] or None
answer(attempted=r.attempted + len(job["cases"]), failed=r.failed + failed, error=error)
"""


def _run_child(job: dict, cpu_seconds: int = CPU_SECONDS) -> tuple[dict | None, str | None]:
    """(the child's JSON answer, None), or (None, why it gave none)."""
    job = {**job, "call_seconds": CALL_SECONDS, "max_chars": MAX_RESULT_CHARS}
    with tempfile.TemporaryDirectory(prefix="odyssey-check-") as scratch:
        env = {"PATH": os.environ.get("PATH", ""), "HOME": scratch, "PYTHONHASHSEED": "0", "DISPLAY": ""}
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-c", _CHILD],
                input=json.dumps(job),
                capture_output=True,
                text=True,
                cwd=scratch,
                env=env,
                timeout=WALL_SECONDS,
                preexec_fn=functools.partial(_limits, cpu_seconds) if os.name == "posix" else None,
            )
        except subprocess.TimeoutExpired:
            return None, f"timed out after {WALL_SECONDS} s"
    try:
        return json.loads(done.stdout.strip().splitlines()[-1]), None
    except (IndexError, json.JSONDecodeError):
        if done.returncode < 0:
            over = f"over {cpu_seconds} CPU seconds or {MEMORY_BYTES >> 20} MiB"
            return None, f"killed by signal {-done.returncode}: {over}"
        return None, f"the check process ended with status {done.returncode}: {done.stderr[-300:]}"
