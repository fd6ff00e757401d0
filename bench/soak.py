"""Soak: the served app for N minutes at half load, with a LanguageModel replica SIGKILLed every few
minutes. Does memory creep, does the tail latency drift, do requests fail?

    python bench/soak.py                       # 30 minutes, a kill every 5 (the target's setting)
    python bench/soak.py --minutes 10 --kill-every 120

The app is started as an operator would (`odyssey serve`: its own head on loopback, token auth, API
keys on) with two LanguageModel replicas of a fresh `tiny` model; 3 clients send mixed requests
(moderate, summarize, find, 12-token completions) one at a time each, about half of what the app
serves at most. Every 10 s the memory (RSS) of every process of the cluster is sampled.

  memory growth   RSS of the whole cluster, last tenth of the run vs the first tenth after warm-up
                  (the first minute: pools, caches and the replicas' first batches settle)
  p99 drift       p99 latency of the last third vs the first third after warm-up, each a mix of
                  quiet minutes and kills in the same proportion
  errors          non-200 answers / requests, over the whole run

Targets (30 minutes): memory growth < 10%, p99 drift < 20%, errors < 0.1%.
Writes bench/results/soak.json, soak.md and soak.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from odyssey import artifact, cluster
from odyssey.model import Transformer, pad_vocab, tiny
from odyssey.tokenizer import Tokenizer

TARGETS = {"memory_growth": 0.10, "p99_drift": 0.20, "error_rate": 0.001}
CLIENTS = 3
WARM_UP_S = 60
SAMPLE_S = 10
REQUESTS = (
    ("/v1/moderate", lambda i: {"text": f"Is message {i} fine to post? Call me at noon."}),
    ("/v1/summarize", lambda i: {"text": f"Item {i}. The parser reads the file and builds a tree.", "max_tokens": 12}),
    ("/v1/find", lambda i: {"query": f"license terms {i}", "k": 3}),
    ("/v1/completions", lambda i: {"prompt": f"def add_{i}(a, b):", "max_tokens": 12, "temperature": 0}),
)  # fmt: skip


def make_model(workdir: Path) -> Path:
    from odyssey.data.corpus import CorpusConfig, build_corpus, texts

    build_corpus(workdir / "corpus", CorpusConfig.from_preset("tiny"))
    tok = Tokenizer.train(texts(workdir / "corpus", "train"), vocab_size=4096)
    torch.manual_seed(0)
    model = Transformer(replace(tiny(), vocab_size=pad_vocab(tok.vocab_size), max_seq_len=512))
    return artifact.save_model(workdir / "model", model, tok)


class Soak:
    def __init__(self, workdir: Path, model: Path):
        self.key = secrets.token_hex(16)
        self.env = {
            **os.environ,
            "ODYSSEY_HOME": str(workdir / "home"),
            "ODYSSEY_API_KEYS": self.key,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32),
        }
        self.model = model
        self.results: list[tuple[float, str, int, float]] = []  # (time, path, status, seconds)
        self.memory: list[tuple[float, int]] = []  # (time, bytes of every process of the cluster)
        self.kills: list[dict] = []
        self.stop = threading.Event()

    def start(self) -> None:
        port = cluster.free_port()
        overrides = [
            "model.min_replicas=2",
            "model.max_replicas=2",
            "model.num_cpus=0.5",
        ]
        command = [
            sys.executable,
            "-m",
            "workflows",
            "serve",
            "--model",
            str(self.model),
            "--port",
            str(port),
        ]
        done = subprocess.run(
            command + [a for o in overrides for a in ("--set", o)],
            env=self.env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"odyssey serve failed:\n{done.stderr[-3000:]}")
        info = json.loads(done.stdout.strip().splitlines()[-1])
        self.url, self.dashboard = info["url"], info["dashboard"]
        self.head = cluster.LocalHead.load(cluster.state_file("serve", Path(self.env["ODYSSEY_HOME"])))

    def stop_app(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "workflows", "serve", "stop"],
            env=self.env,
            capture_output=True,
            timeout=300,
        )
        cluster.stop_head(self.head)

    def replica_pids(self) -> list[int]:
        token = {"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}
        details = httpx.get(f"{self.dashboard}/api/serve/applications/", headers=token, timeout=30).json()
        replicas = details["applications"]["odyssey"]["deployments"]["LanguageModel"]["replicas"]
        return sorted(r["pid"] for r in replicas if r["state"] == "RUNNING")

    def client(self, c: int, until: float) -> None:
        with httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60
        ) as http:
            i = c
            while not self.stop.is_set() and time.monotonic() < until:
                path, body = REQUESTS[i % len(REQUESTS)]
                start = time.monotonic()
                try:
                    status = http.post(path, json=body(i)).status_code
                except httpx.HTTPError:
                    status = 0
                self.results.append((start, path, status, time.monotonic() - start))
                i += CLIENTS

    def sample_memory(self, until: float) -> None:
        while not self.stop.is_set() and time.monotonic() < until:
            total = 0
            for pid in cluster.session_processes(self.head.pid):
                with contextlib.suppress(psutil.Error):  # gone since it was listed
                    total += psutil.Process(pid).memory_info().rss
            self.memory.append((time.monotonic(), total))
            self.stop.wait(SAMPLE_S)

    def killer(self, until: float, every: float) -> None:
        while not self.stop.wait(every) and time.monotonic() < until - 30:
            pids = self.replica_pids()
            if not pids:
                continue
            os.kill(pids[0], signal.SIGKILL)
            killed = time.monotonic()
            while time.monotonic() - killed < 120:
                now = self.replica_pids()
                if len(now) == 2 and pids[0] not in now:
                    break
                time.sleep(0.5)
            self.kills.append(
                {"at": killed, "pid": pids[0], "replaced_after_s": round(time.monotonic() - killed, 1)}
            )
            print(
                f"killed replica {pids[0]}; replaced after {self.kills[-1]['replaced_after_s']} s", flush=True
            )

    def run(self, seconds: float, kill_every: float) -> None:
        self.t0 = time.monotonic()
        until = self.t0 + seconds
        threads = [threading.Thread(target=self.client, args=(c, until)) for c in range(CLIENTS)]
        threads += [
            threading.Thread(target=self.sample_memory, args=(until,)),
            threading.Thread(target=self.killer, args=(until, kill_every)),
        ]
        for t in threads:
            t.start()
        try:
            while time.monotonic() < until:
                time.sleep(30)
                done = time.monotonic() - self.t0
                recent = [r for r in self.results if r[0] > time.monotonic() - 30]
                bad = sum(r[2] != 200 for r in self.results)
                print(
                    f"{done / 60:5.1f}/{seconds / 60:.0f} min  {len(recent) / 30:5.1f} req/s  "
                    f"{len(self.results)} requests, {bad} failed  memory "
                    f"{self.memory[-1][1] / 2**20:.0f} MiB  ETA {max(0, until - time.monotonic()) / 60:.1f} min",
                    flush=True,
                )
        finally:
            self.stop.set()
            for t in threads:
                t.join(120)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 100 else max(values)


def figures(s: Soak, seconds: float) -> dict:
    t0, warm = s.t0, s.t0 + WARM_UP_S
    steady = [r for r in s.results if r[0] >= warm]
    span = (t0 + seconds) - warm
    first = [r[3] for r in steady if r[0] < warm + span / 3 and r[2] == 200]
    last = [r[3] for r in steady if r[0] >= warm + 2 * span / 3 and r[2] == 200]
    mem = [(t, b) for t, b in s.memory if t >= warm]
    tenth = max(1, len(mem) // 10)
    mem_first = statistics.mean(b for _, b in mem[:tenth])
    mem_last = statistics.mean(b for _, b in mem[-tenth:])
    failed = [r for r in s.results if r[2] != 200]
    return {
        "minutes": round(seconds / 60, 1),
        "clients": CLIENTS,
        "requests": len(s.results),
        "req_per_s": round(len(s.results) / seconds, 2),
        "failed": len(failed),
        "failed_by_status": {str(k): sum(r[2] == k for r in failed) for k in sorted({r[2] for r in failed})},
        "error_rate": len(failed) / max(1, len(s.results)),
        "kills": [{"at_min": round((k["at"] - t0) / 60, 2), "replaced_after_s": k["replaced_after_s"]} for k in s.kills],
        "p99_first_third_ms": round(1000 * p99(first), 1),
        "p99_last_third_ms": round(1000 * p99(last), 1),
        "p99_drift": p99(last) / p99(first) - 1,
        "p50_ms": round(1000 * statistics.median(r[3] for r in steady if r[2] == 200), 1),
        "memory_first_tenth_mib": round(mem_first / 2**20, 1),
        "memory_last_tenth_mib": round(mem_last / 2**20, 1),
        "memory_growth": mem_last / mem_first - 1,
        "memory_series_mib": [(round((t - t0) / 60, 2), round(b / 2**20, 1)) for t, b in s.memory],
    }  # fmt: skip


def plot(s: Soak, f: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    minutes, mib = zip(*f["memory_series_mib"])
    top.plot(minutes, mib)
    top.set_ylabel("cluster RSS (MiB)")
    buckets: dict[int, list[float]] = {}
    for t, _, status, secs in s.results:
        if status == 200:
            buckets.setdefault(int((t - s.t0) // 30), []).append(secs * 1000)
    xs = sorted(buckets)
    bottom.plot([x / 2 for x in xs], [p99(buckets[x]) for x in xs], label="p99 per 30 s")
    bottom.plot([x / 2 for x in xs], [statistics.median(buckets[x]) for x in xs], label="p50 per 30 s")
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("minutes")
    for ax in (top, bottom):
        for k in f["kills"]:
            ax.axvline(k["at_min"], color="red", alpha=0.3)
    bottom.legend()
    top.set_title("soak: half load, a LanguageModel replica SIGKILLed at each red line")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--kill-every", type=float, default=300, help="seconds between replica kills")
    args = parser.parse_args()
    seconds = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="odyssey-soak-") as tmp:
        workdir = Path(tmp)
        soak = Soak(workdir, make_model(workdir))
        soak.start()
        try:
            soak.run(seconds, args.kill_every)
        finally:
            soak.stop_app()
    f = figures(soak, seconds)
    met = {
        "memory_growth": f["memory_growth"] < TARGETS["memory_growth"],
        "p99_drift": f["p99_drift"] < TARGETS["p99_drift"],
        "error_rate": f["error_rate"] < TARGETS["error_rate"],
    }
    f["met"] = met
    plot(soak, f, report.RESULTS / "soak.png")
    kills = ", ".join(f"{k['replaced_after_s']} s" for k in f["kills"]) or "none"
    table = [
        ("run", f"{f['minutes']} min, {f['clients']} clients, {f['requests']} requests ({f['req_per_s']}/s)", ""),
        ("replica kills (time to a healthy replacement)", f"{len(f['kills'])} ({kills})", "< 40 s each"),
        ("memory growth (cluster RSS, last vs first tenth)", f"{f['memory_growth']:+.1%} ({f['memory_first_tenth_mib']} -> {f['memory_last_tenth_mib']} MiB)", "< 10%"),
        ("p99 drift (last vs first third)", f"{f['p99_drift']:+.1%} ({f['p99_first_third_ms']} -> {f['p99_last_third_ms']} ms)", "< 20%"),
        ("errors", f"{f['error_rate']:.3%} ({f['failed']} of {f['requests']}: {f['failed_by_status'] or 'none'})", "< 0.1%"),
    ]  # fmt: skip
    report.write("soak", f, TARGETS, table, notes="![soak](soak.png)")
    print(json.dumps({k: v for k, v in f.items() if k != "memory_series_mib"}, indent=2))


if __name__ == "__main__":
    main()
