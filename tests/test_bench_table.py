"""The README's results table is what bench/results/*.json say (rebuilt by `make bench`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_results_table_matches_the_bench_results():
    sys.path.insert(0, str(ROOT))
    from bench import readme_table

    table = readme_table.table()
    for name in readme_table.HEADLINES:  # every benchmark has a row or says it was not run
        assert f"`{name}`" in table
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "readme_table.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_a_bench_result_records_the_commit_it_ran_on(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    import json

    from bench import report

    monkeypatch.setattr(report, "RESULTS", tmp_path)
    report.write("probe", {"x": 1.0}, {}, [("x", "1.0", "")])
    record = json.loads((tmp_path / "probe.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert record["commit"]["sha"] == head.stdout.strip() and isinstance(record["commit"]["dirty"], bool)
    assert f"Commit: {record['commit']['sha']}" in (tmp_path / "probe.md").read_text()
