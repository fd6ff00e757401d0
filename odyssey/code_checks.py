"""Checks of generated Python: does it parse, and does it pass the doctests of its own prompt.

A `code` example's input is a function's signature and docstring; when the docstring holds doctest
examples (`>>> ...`), they are executable checks of any body written for it:

    check = DoctestCheck(prompt=example.input, module="pickletools")   # None when there is no doctest
    run_check(check, body)  -> CheckResult(parses, passed, attempted, error)

The candidate runs in a child process (`python -I`, a scratch directory as its working directory,
limits on CPU seconds, memory and wall time), in a copy of its module's namespace when the example
comes from a known module (so names the module defines resolve). This keeps a bad or endless answer
from harming the evaluation; it is not a sandbox against hostile code.
"""

from __future__ import annotations

import ast
import functools
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
# Modules whose import does something visible (a browser, a window): never imported for a check.
NEVER_IMPORT = ("antigravity", "this", "turtle", "turtledemo", "tkinter", "idlelib", "webbrowser")


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
    """syntax_error of generated code. After a prompt that is a signature + docstring (the `code` task's
    format), the code is that function's body: the whole function must parse. After a plain-language
    prompt, the code stands alone (the model writes it indented, as a body: dedented first)."""
    if not body.strip():
        return syntax_error(body)
    if syntax_error(prompt + "\n    pass") is None:
        return syntax_error(prompt + "\n" + body)
    return syntax_error(textwrap.dedent(body))


@dataclass(frozen=True)
class DoctestCheck:
    prompt: str  # signature + docstring, as the model saw it
    function: str  # the function's name
    module: str | None  # the module whose namespace the function runs in; None: an empty one


@dataclass(frozen=True)
class CheckResult:
    parses: bool
    passed: bool
    attempted: int  # doctest examples run
    error: str | None


def module_of(doc_id: str) -> str | None:
    """`python:asyncio/sslproto.py` (the stdlib corpus's document ids) -> `asyncio.sslproto`."""
    if not doc_id.startswith("python:") or not doc_id.endswith(".py"):
        return None
    name = doc_id[len("python:") : -len(".py")].replace("/", ".").removesuffix(".__init__")
    return None if name.split(".")[0] in NEVER_IMPORT else name


def doctest_check(prompt: str, doc_id: str = "") -> DoctestCheck | None:
    """The executable check of a `code` prompt, or None when it has no doctest or is not a plain
    function (a method needs an instance that a docstring cannot build)."""
    if ">>>" not in prompt:
        return None
    try:
        tree = ast.parse(prompt + "\n    pass")
    except SyntaxError:
        return None
    fn = tree.body[0] if len(tree.body) == 1 else None
    if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) or ast.get_docstring(fn) is None:
        return None
    if fn.args.args and fn.args.args[0].arg in ("self", "cls"):
        return None
    return DoctestCheck(prompt, fn.name, module_of(doc_id))


def _limits(cpu_seconds: int) -> None:  # in the child, before it runs anything
    import resource

    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))


# The child: define the function in (a copy of) its module's namespace, run its docstring's examples.
_CHILD = r"""
import doctest, importlib, io, json, sys
job = json.loads(sys.stdin.read())
ns = {"__name__": "__check__"}
if job["module"]:
    try:
        ns = dict(vars(importlib.import_module(job["module"])))
    except Exception as e:
        print(json.dumps({"error": f"cannot import {job['module']}: {e!r}"})); sys.exit()
try:
    exec(compile(job["source"], "<candidate>", "exec"), ns)
    fn = ns[job["function"]]
except BaseException as e:
    print(json.dumps({"attempted": 0, "failed": 1, "error": f"{type(e).__name__}: {e}"})); sys.exit()
out = io.StringIO()
runner = doctest.DocTestRunner(verbose=False, optionflags=doctest.ELLIPSIS)
for test in doctest.DocTestFinder(recurse=False).find(fn, job["function"], globs=ns):
    runner.run(test, out=out.write)
r = runner.summarize(verbose=False)
print(json.dumps({"attempted": r.attempted, "failed": r.failed, "error": out.getvalue()[-500:] or None}))
"""


def run_check(check: DoctestCheck, body: str, cpu_seconds: int = CPU_SECONDS) -> CheckResult:
    """Run `check` against a generated function body (the text after the docstring)."""
    source = check.prompt + "\n" + body
    error = completion_error(check.prompt, body)
    if error is not None:
        return CheckResult(False, False, 0, error)
    job = json.dumps({"source": source, "function": check.function, "module": check.module})
    with tempfile.TemporaryDirectory(prefix="odyssey-check-") as scratch:
        env = {"PATH": os.environ.get("PATH", ""), "HOME": scratch, "PYTHONHASHSEED": "0", "DISPLAY": ""}
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-c", _CHILD],
                input=job,
                capture_output=True,
                text=True,
                cwd=scratch,
                env=env,
                timeout=WALL_SECONDS,
                preexec_fn=functools.partial(_limits, cpu_seconds) if os.name == "posix" else None,
            )
        except subprocess.TimeoutExpired:
            return CheckResult(True, False, 0, f"timed out after {WALL_SECONDS} s")
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        why = (
            f"killed by signal {-done.returncode}: over {cpu_seconds} CPU seconds or {MEMORY_BYTES >> 20} MiB"
            if done.returncode < 0
            else f"the check process ended with status {done.returncode}: {done.stderr[-300:]}"
        )
        return CheckResult(True, False, 0, why)
    attempted = int(result.get("attempted", 0))
    passed = attempted > 0 and result.get("failed", 1) == 0
    return CheckResult(True, passed, attempted, None if passed else result.get("error"))
