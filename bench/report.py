"""What every benchmark writes: bench/results/NAME.json (figures, targets, machine, the commit it ran
on) and NAME.md."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    with contextlib.suppress(ValueError, OSError):
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    versions = {}
    for name in ("torch", "tokenizers", "pyarrow", "ray", "deepspeed"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # not installed here: the bench does not need it
            versions[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **versions,
    }


def commit() -> dict:
    """The commit of the code that ran, and whether tracked files differed from it (a dirty run is
    not the commit's figure)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        except OSError:  # no git here
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    changed = git(
        "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results", ":!README.md"
    )
    return {"sha": sha, "dirty": bool(changed) if sha else None}


STARTED = commit()  # the code that runs is the code of the bench's start, whatever changes meanwhile


def write(
    name: str, figures: dict, targets: dict, table: list[tuple[str, str, str]], notes: str = ""
) -> Path:
    """table rows: (what, measured, target or '')."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "bench": name,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "commit": STARTED,
        "figures": figures,
        "targets": targets,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    m = record["machine"]
    lines = [
        f"# bench/{name}.py — {record['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}. "
        f"Commit: {record['commit']['sha'] or 'unknown'}{' (with local changes)' if record['commit']['dirty'] else ''}.",
        "",
        "| what | measured | target |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in table],
    ]
    if notes:
        lines += ["", notes]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path
