"""The one-way layers of pyproject.toml's import-linter contracts (README: "How the code is laid out"):
kept by the code as it is, and broken by an arrow the wrong way or a cycle, on a copy of the code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("odyssey", "train", "serve", "tune", "workflows")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` of the packages under `root` (first on the path: a copy is linted, not this one)."""
    command = [str(Path(sys.executable).parent / "lint-imports"), "--no-cache", "--no-logo"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def copy_of_the_code(dest: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_code_keeps_its_layers_and_has_no_cycles():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    "module, line, broken",
    [
        ("odyssey/model.py", "import train.config", "layers: workflows -> stages"),  # the core imports up
        ("serve/app.py", "import train.export", "layers: workflows -> stages"),  # one stage, another
        ("train/loop.py", "import workflows.cli", "layers: workflows -> stages"),  # a stage, a workflow
        ("tune/sweep.py", "import serve.launch", "tune drives training, never serving"),
        ("odyssey/ort_model.py", "from odyssey import artifact", "no import cycles"),  # artifact -> ort_model
    ],
)
def test_an_arrow_the_wrong_way_breaks_a_contract(tmp_path, module, line, broken):
    root = copy_of_the_code(tmp_path)
    path = root / module
    path.write_text(path.read_text(encoding="utf-8") + f"\n{line}  # noqa\n", encoding="utf-8")
    done = lint_imports(root)
    assert done.returncode == 1, done.stdout[-4000:] + done.stderr[-2000:]
    verdicts = [line for line in done.stdout.splitlines() if line.endswith((" KEPT", " BROKEN"))]
    assert [line for line in verdicts if line.startswith(broken) and line.endswith(" BROKEN")], verdicts


def test_no_function_is_longer_than_a_screen():
    """A function you read in one screen: at most 80 lines in the packages (tests and bench aside)."""
    import ast

    long = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > 80:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, long
