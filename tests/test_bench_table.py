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
