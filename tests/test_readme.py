"""The README's "On one laptop" block, taken from the README as it stands and pasted line by line into a
fresh shell: a new home (no token yet, no state), a plain PATH, a clone of this checkout with its
`.venv`. It starts the local autoscaling cluster, points Ray's own CLI at it, runs `ray status`,
submits the training job with `ray job submit --working-dir .` (while a log in the checkout grows, as
when the user redirects output there), reads its log back and takes the cluster down."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest

from odyssey import cluster

REPO = Path(__file__).resolve().parent.parent


def laptop_block() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("**On one laptop**") :]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def clone_checkout(dest: Path) -> Path:
    """The checkout's files (tracked, and new ones git does not ignore) and its .venv, linked."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    )
    for name in listed.stdout.split():
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    (dest / ".venv").symlink_to(REPO / ".venv")
    return dest


def fresh_shell_env(home: Path) -> dict:
    """What a new terminal has: a home, the system PATH, a locale. The compiled-extension cache is the
    user's own (a new shell of the same user keeps it), so DeepSpeed's C++ op is not rebuilt here."""
    env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    env["XDG_CACHE_HOME"] = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    return env


@pytest.mark.slow
def test_the_laptop_block_works_pasted_into_a_fresh_shell(tmp_path):
    block = laptop_block()
    assert "local-up" in block and "ray job submit" in block and "local-down" in block
    checkout = clone_checkout(tmp_path / "odyssey")
    home = tmp_path / "home"
    home.mkdir()
    env = fresh_shell_env(home)
    log = checkout / "submit.log"  # written to while the job is submitted: Ray must not upload it
    shell = f"set -euo pipefail\n(while true; do date >> {log}; sleep 0.05; done) &\nwriter=$!\n{block}\nkill $writer\n"
    state = cluster.state_file("local", home / ".odyssey")
    try:
        done = subprocess.run(
            ["bash", "-c", shell], cwd=checkout, env=env, capture_output=True, text=True, timeout=900
        )
    finally:
        head = cluster.LocalHead.load(state)
        if head is not None:  # the block failed before its last line
            cluster.stop_head(head)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    up = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"dashboard"')))
    assert "Node status" in out and "Active:" in out  # `ray status` reached the cluster
    assert "Job 'laptop-tiny' succeeded" in out
    summaries = [line for line in done.stdout.splitlines() if line.startswith('{"run_dir"')]
    summary = json.loads(summaries[0])  # the job's last line: train's JSON summary
    assert summary["steps"] == 30 and summary["world_size"] == 2
    assert Path(summary["run_dir"]) == checkout / "runs" / "tiny-fake-gpu"
    assert (checkout / "runs" / "tiny-fake-gpu" / "events.jsonl").is_file()
    progress = [line for line in out.splitlines() if "step 30/30 |" in line]
    assert len(progress) == 1, out[-6000:]  # every line of the job once, not once per node
    # local-down stopped it all: the head, and the nodes the autoscaler added (they name its address).
    assert head is None and not state.exists()
    port = up["address"].rsplit(":", 1)[1]
    marks = (
        up["address"],
        f"--port={port}",
        f"--gcs_server_port={port}",
    )  # head, GCS, every node's processes
    commands = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
    left = [c for c in commands if any(m in c for m in marks)]
    assert not left, left
