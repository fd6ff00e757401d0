"""Benchmark: the README's laptop workflow, timed: how soon the autoscaler adds GPU nodes for a job, and
how soon they leave after it.

    python bench/autoscaler.py [--rounds 2]

`odyssey cluster local-up` (cluster/fake-gpu.yaml: a head on loopback with token auth whose autoscaler
starts fake-GPU nodes as processes), then per round `ray job submit --working-dir . -- python -m train
--config tiny-fake-gpu` (2 workers, a GPU each: 2 GPU nodes), exactly as the README's block, while the
dashboard's node list and the job's status are polled every 0.5 s. Per round: seconds from submit to
each GPU node alive, to the job's end, and from the job's end to the last GPU node gone (the file's
idle timeout is 15 s). Then `odyssey cluster local-down`. Targets: both GPU nodes within 60 s of the
submit, gone within 60 s of the job's end. Writes bench/results/autoscaler.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from bench import report

ROOT = Path(__file__).resolve().parent.parent

BIN = Path(sys.executable).parent
TARGET_ADD_S, TARGET_LEAVE_S = 60.0, 60.0
POLL_S, DEADLINE_S = 0.5, 900.0


def odyssey(env: dict, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "workflows", *args], env=env, capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        raise RuntimeError(f"odyssey {' '.join(args)} failed: {done.stderr[-3000:]}")
    return done.stdout


def shell_env(home: Path) -> dict:
    """This shell after `eval "$(odyssey cluster env)"`: Ray's CLI points at the local cluster."""
    env = {**os.environ, "ODYSSEY_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}"}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS"):
        env.pop(name, None)
    odyssey(env, "cluster", "local-up")
    for line in odyssey(env, "cluster", "env").splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = value
    return env


def token() -> str:
    return os.environ.get("RAY_AUTH_TOKEN") or Path("~/.ray/auth_token").expanduser().read_text().strip()


def gpu_nodes(http: httpx.Client) -> set[str]:
    nodes = http.get("/api/v0/nodes?limit=100&detail=true").json()["data"]["result"]["result"]
    return {
        n["node_id"]
        for n in nodes
        if n["state"] == "ALIVE" and not n["is_head_node"] and n["resources_total"].get("GPU", 0) > 0
    }


def one_round(env: dict, storage: Path, name: str) -> dict:
    """Submit the README's job; watch GPU nodes come, the job end, and the nodes go."""
    dashboard = env["RAY_API_SERVER_ADDRESS"]
    submit = [BIN / "ray", "job", "submit", "--no-wait", "--working-dir", ".", "--submission-id", name, "--"]
    train = [
        "python",
        "-m",
        "train",
        "--config",
        "tiny-fake-gpu",
        "--set",
        f"storage={storage}",
        "--set",
        f"name={name}",
    ]
    with httpx.Client(base_url=dashboard, headers={"Authorization": f"Bearer {token()}"}, timeout=30) as http:
        assert not gpu_nodes(http), "GPU nodes from before the round are still up"
        t0 = time.monotonic()
        subprocess.run([*submit, *train], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
        added: dict[str, float] = {}
        ended = gone = None
        while gone is None:
            now = time.monotonic() - t0
            if now > DEADLINE_S:
                raise RuntimeError(
                    f"{name}: not done after {DEADLINE_S} s (nodes {sorted(added)}, job ended {ended})"
                )
            alive = gpu_nodes(http)
            added.update({n: now for n in alive if n not in added})
            if ended is None:
                status = http.get(f"/api/jobs/{name}").json()["status"]
                if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                    if status != "SUCCEEDED":
                        raise RuntimeError(
                            f"{name}: the job {status}: {http.get(f'/api/jobs/{name}/logs').json()['logs'][-3000:]}"
                        )
                    ended = now
            elif not alive:
                gone = now
            time.sleep(POLL_S)
    return {
        "gpu_nodes_added_s": sorted(round(t, 1) for t in added.values()),
        "job_s": round(ended, 1),
        "gone_after_job_s": round(gone - ended, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = shell_env(Path(tmp) / "home")
        try:
            rounds = []
            for r in range(args.rounds):
                rounds.append(one_round(env, Path(tmp) / "runs", f"bench-autoscaler-{r}-{int(time.time())}"))
                print(f"round {r + 1}: {json.dumps(rounds[-1])}", flush=True)
        finally:
            odyssey(env, "cluster", "local-down")
    last_added = [max(r["gpu_nodes_added_s"]) for r in rounds]
    gone = [r["gone_after_job_s"] for r in rounds]
    figures = {
        "rounds": rounds,
        "last_gpu_node_added_s_median": statistics.median(last_added),
        "gone_after_job_s_median": statistics.median(gone),
        "idle_timeout_s": 15,
    }
    targets = {"gpu_nodes_added_within_s": TARGET_ADD_S, "gone_after_job_within_s": TARGET_LEAVE_S}
    table = [
        (
            f"round {i + 1}: GPU nodes alive after submit",
            " and ".join(f"{t} s" for t in r["gpu_nodes_added_s"]),
            f"both <= {TARGET_ADD_S:.0f} s: {'met' if len(r['gpu_nodes_added_s']) == 2 and max(r['gpu_nodes_added_s']) <= TARGET_ADD_S else '**not met**'}",
        )
        for i, r in enumerate(rounds)
    ] + [
        (
            f"round {i + 1}: the job (start-up, data, 30 steps), then the last GPU node gone",
            f"job {r['job_s']} s; gone {r['gone_after_job_s']} s after it",
            f"gone <= {TARGET_LEAVE_S:.0f} s: {'met' if r['gone_after_job_s'] <= TARGET_LEAVE_S else '**not met**'}",
        )
        for i, r in enumerate(rounds)
    ]
    notes = (
        "The README's laptop block: `odyssey cluster local-up`, `ray job submit --working-dir . -- python -m "
        "train --config tiny-fake-gpu` (2 workers, each with a fake GPU), polled every 0.5 s through the "
        "dashboard's API. Node start-up is a Ray node process starting on this machine; on a cloud the "
        "autoscaler waits for a VM instead (minutes). The idle timeout of cluster/fake-gpu.yaml is 15 s."
    )
    path = report.write("autoscaler", figures, targets, table, notes)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
