"""Benchmark: the serving app under load, on loopback, side by side with the same model in process.

    python bench/serve_load.py [--levels 1,4,16,32,64] [--preset small]

One freshly initialised model (weights do not change the cost) with the corpus tokenizer, then:
  1. KV cache vs recomputing the whole prefix for each new token, 128 new tokens, in process.
  2. Latency floor: p50 of a bare one-deployment no-op Serve app, and of a 1-token /v1/completions,
     against p50 of the same 1-token generation called in process (what the app adds).
  3. Sweep concurrency over /v1/completions (16 tokens) and /v1/moderate, with batching
     (max_batch_size 32) and without (1, the same app redeployed in place), and the same work in
     process as one ideal batch per level.
Every request carries an API key: the gateway checks it, as shipped (gateway.auth).
Writes bench/results/serve_load.json, .md and .png. Bounded: a fixed number of requests per level.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

os.environ["RAY_AUTH_MODE"] = "token"  # before Ray is imported
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

import torch

from bench import report
from odyssey import artifact, cluster
from odyssey.decoding import BatchDecoder, GenerationParams
from odyssey.model import PRESETS, Transformer, pad_vocab
from odyssey.tasks import ANSWERS
from odyssey.tokenizer import Tokenizer

GEN_TOKENS = 16
MOD_TEXT = "Please call me back at the number I gave you yesterday, it is about the invoice."
AUTH = {"Authorization": "Bearer sk-odyssey-bench"}  # gateway.auth is on as shipped: every request is checked
TARGETS = {"batching_speedup_at_32": 4.0, "kv_cache_speedup_128": 5.0, "added_p50_vs_noop_p50": 2.0}


def make_model(workdir: Path, preset: str) -> tuple[Path, Transformer, Tokenizer]:
    from odyssey.data.corpus import CorpusConfig, build_corpus, texts

    build_corpus(workdir / "corpus", CorpusConfig.from_preset("tiny"))
    tok = Tokenizer.train(texts(workdir / "corpus", "train"), vocab_size=4096)
    torch.manual_seed(0)
    model = Transformer(
        replace(PRESETS[preset](), vocab_size=pad_vocab(tok.vocab_size), max_seq_len=512)
    ).eval()
    return artifact.save_model(workdir / "model", model, tok), model, tok


# --- in process -------------------------------------------------------------------------------------------


def kv_vs_recompute(model: Transformer, tok: Tokenizer, new_tokens: int = 128, rounds: int = 5) -> dict:
    prompt = tok.prompt("lm", MOD_TEXT)[:32]
    kv, full = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = model.generate([prompt], new_tokens, temperature=0.0)[0]  # no stop: exactly new_tokens
        kv.append(len(out) / (time.perf_counter() - t0))
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(new_tokens):  # no cache: the whole prefix again for every token
                ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        full.append(new_tokens / (time.perf_counter() - t0))
    return {"kv_tokens_per_s": statistics.median(kv), "recompute_tokens_per_s": statistics.median(full)}


def in_process_p50_one_token(model, tok, n: int = 100) -> float:
    prompt = tok.prompt("lm", "The license")
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        decoder = BatchDecoder(model, tok, [prompt], [GenerationParams(max_tokens=1, temperature=0.0)])
        decoder.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def in_process_rate(model, tok, kind: str, c: int) -> dict:
    """The level's work as one ideal batch, in process: req/s and tokens/s."""
    t0 = time.perf_counter()
    if kind == "completions":
        prompts = [tok.prompt("lm", f"Request {i} asks") for i in range(c)]
        decoder = BatchDecoder(model, tok, prompts, [GenerationParams(GEN_TOKENS, temperature=0.0)] * c)
        while not decoder.done:
            decoder.step()
        tokens = sum(decoder.generated)
    else:
        from odyssey.tasks import format_labels

        prompt = tok.prompt("moderate", MOD_TEXT)
        answers = [[*tok.encode(format_labels(a)), tok.eos_id] for a in ANSWERS]
        model.score([prompt] * (c * len(answers)), answers * c, tok.pad_id)
        tokens = 0
    seconds = time.perf_counter() - t0
    return {"req_per_s": c / seconds, "tokens_per_s": tokens / seconds}


# --- over HTTP --------------------------------------------------------------------------------------------


async def load(base: str, kind: str, c: int, n: int) -> dict:
    import httpx

    path, body = (
        ("/v1/completions", {"prompt": "Request asks", "max_tokens": GEN_TOKENS, "temperature": 0})
        if kind == "completions"
        else ("/v1/moderate", {"text": MOD_TEXT})
    )
    latencies, tokens, failures = [], 0, 0
    queue = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def client(http):
        nonlocal tokens, failures
        while not queue.empty():
            queue.get_nowait()
            t0 = time.perf_counter()
            r = await http.post(path, json=body)
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                failures += 1
            elif kind == "completions":
                tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=300, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(c)))
        seconds = time.perf_counter() - t0
    latencies.sort()
    return {
        "req_per_s": n / seconds,
        "tokens_per_s": tokens / seconds,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "failures": failures,
    }


def sequential_p50(url: str, body: dict | None, n: int) -> float:
    import httpx

    times = []
    with httpx.Client(headers=AUTH, timeout=60) as http:  # every target gets the header; the no-ops ignore it
        for i in range(n + 10):
            t0 = time.perf_counter()
            r = http.post(url, json=body) if body is not None else http.get(url)
            r.raise_for_status()
            if i >= 10:  # warm-up
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind in zip(axes, ("completions", "moderate")):
        for mode, style in (("batched", "o-"), ("unbatched", "s--"), ("in_process", "^:")):
            rows = figures["sweep"][kind][mode]
            ax.plot([r["concurrency"] for r in rows], [r["req_per_s"] for r in rows], style, label=mode)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("requests/s")
        ax.set_title(f"/v1/{kind}" + (f" ({GEN_TOKENS} tokens)" if kind == "completions" else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,4,16,32,64")
    parser.add_argument("--preset", default="small", help="model shape (random weights)")
    parser.add_argument(
        "--requests", type=int, default=4, help="requests per client per level (min 24 a level)"
    )
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    torch.set_num_threads(1)  # as the LanguageModel replica (num_cpus 1)

    import ray
    from ray import serve

    from serve.app import AppArgs, build_app

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, model, tok = make_model(Path(tmp), args.preset)
        kv = kv_vs_recompute(model, tok)
        print(
            f"KV cache {kv['kv_tokens_per_s']:.0f} vs recompute {kv['recompute_tokens_per_s']:.0f} tokens/s"
        )
        inproc_p50 = in_process_p50_one_token(model, tok)

        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
        port = cluster.free_port()
        base = f"http://127.0.0.1:{port}"
        serve.start(http_options={"host": "127.0.0.1", "port": port})

        @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512)
        class Noop:
            async def __call__(self, request) -> str:
                return "ok"

        from fastapi import FastAPI

        api = FastAPI()

        @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512)
        @serve.ingress(api)
        class FastAPINoop:  # what a FastAPI ingress alone costs over the bare no-op
            @api.post("/")
            async def nothing(self, body: dict) -> dict:
                return {}

        try:
            serve.run(Noop.bind(), name="noop", route_prefix="/noop")
            serve.run(FastAPINoop.bind(), name="fastapi-noop", route_prefix="/fastapi-noop")
            (Path(tmp) / "api_keys").write_text(AUTH["Authorization"].removeprefix("Bearer ") + "\n")
            app_args = {
                "gateway": {"api_keys_file": str(Path(tmp) / "api_keys")},  # API keys on, as shipped
                "model_path": str(model_dir),
                "max_batch_size": 32,
                "documents": str(Path(tmp) / "corpus" / "documents"),
                "max_documents": 3,  # /v1/find is not measured here: index little, start fast
            }
            serve.run(build_app(AppArgs(**app_args)), name="odyssey", route_prefix="/")
            one_token = {"prompt": "The license", "max_tokens": 1}
            noop_p50 = sequential_p50(f"{base}/noop", one_token, 200)  # the same request, answered by nothing
            app_p50 = sequential_p50(f"{base}/v1/completions", one_token, 200)
            fastapi_p50 = sequential_p50(f"{base}/fastapi-noop/", one_token, 200)
            health_p50 = sequential_p50(f"{base}/healthz", None, 200)  # gateway + one trivial model call
            print(
                f"p50: no-op app {noop_p50 * 1e3:.1f} ms, 1-token completion {app_p50 * 1e3:.1f} ms, "
                f"in process {inproc_p50 * 1e3:.1f} ms"
            )

            sweep = {
                kind: {"batched": [], "unbatched": [], "in_process": []}
                for kind in ("completions", "moderate")
            }
            for mode, batch in (("batched", 32), ("unbatched", 1)):
                serve.run(
                    build_app(AppArgs(**{**app_args, "max_batch_size": batch})),
                    name="odyssey",
                    route_prefix="/",
                )
                for kind in sweep:
                    for c in levels:
                        row = asyncio.run(load(base, kind, c, max(24, args.requests * c)))
                        sweep[kind][mode].append(
                            {"concurrency": c, **{k: round(v, 2) for k, v in row.items()}}
                        )
                        print(
                            f"{mode:>9} {kind:>11} c={c:<3} {row['req_per_s']:8.1f} req/s  p50 {row['p50_ms']:7.1f} ms"
                            f"  p99 {row['p99_ms']:7.1f} ms  failures {row['failures']}",
                            flush=True,
                        )
            for kind in sweep:
                for c in levels:
                    row = in_process_rate(model, tok, kind, c)
                    sweep[kind]["in_process"].append(
                        {"concurrency": c, **{k: round(v, 2) for k, v in row.items()}}
                    )
        finally:
            serve.shutdown()
            ray.shutdown()

    def at(kind, mode, c):
        return next(r for r in sweep[kind][mode] if r["concurrency"] == c)

    c32 = 32 if 32 in levels else levels[-1]
    speedup = {k: at(k, "batched", c32)["req_per_s"] / at(k, "unbatched", c32)["req_per_s"] for k in sweep}
    added = app_p50 - inproc_p50
    figures = {
        "model": f"{args.preset} preset, random weights, {model.num_params() / 1e6:.1f}M parameters, 1 thread",
        "kv_cache": {
            **{k: round(v, 1) for k, v in kv.items()},
            "speedup": round(kv["kv_tokens_per_s"] / kv["recompute_tokens_per_s"], 2),
        },
        "latency_ms": {
            "noop_app_p50": round(noop_p50 * 1e3, 2),
            "completion_1_token_p50": round(app_p50 * 1e3, 2),
            "in_process_1_token_p50": round(inproc_p50 * 1e3, 2),
            "added_p50": round(added * 1e3, 2),
            "added_vs_noop": round(added / noop_p50, 2),
            "fastapi_noop_app_p50": round(fastapi_p50 * 1e3, 2),
            "healthz_p50": round(health_p50 * 1e3, 2),
        },
        "batching_speedup": {k: round(v, 2) for k, v in speedup.items()},
        "batching_speedup_at": c32,
        "sweep": sweep,
    }
    table = [
        (
            f"batching speedup at concurrency {c32}, /v1/completions",
            f"{speedup['completions']:.1f}x",
            ">= 4x",
        ),
        (f"batching speedup at concurrency {c32}, /v1/moderate", f"{speedup['moderate']:.1f}x", ">= 4x"),
        (
            "KV cache vs recompute, 128 new tokens",
            f"{figures['kv_cache']['speedup']:.1f}x "
            f"({kv['kv_tokens_per_s']:.0f} vs {kv['recompute_tokens_per_s']:.0f} tokens/s)",
            ">= 5x",
        ),
        (
            "added p50 over in process, 1-token completion",
            f"{added * 1e3:.1f} ms = {added / noop_p50:.2f}x the no-op app's p50 ({noop_p50 * 1e3:.1f} ms)",
            "<= 2x",
        ),
    ]
    table.append((
        "where the p50 goes: no-op / FastAPI no-op / gateway + trivial model call / 1-token completion",
        f"{noop_p50 * 1e3:.1f} / {fastapi_p50 * 1e3:.1f} / {health_p50 * 1e3:.1f} / {app_p50 * 1e3:.1f} ms",
        "",
    ))  # fmt: skip
    for kind in sweep:
        for c in levels:
            b, u, p = (at(kind, m, c) for m in ("batched", "unbatched", "in_process"))
            table.append(
                (
                    f"/v1/{kind} c={c}: req/s batched / unbatched / in process",
                    f"{b['req_per_s']:.1f} / {u['req_per_s']:.1f} / {p['req_per_s']:.1f}; "
                    f"p50 {b['p50_ms']:.0f} / {u['p50_ms']:.0f} ms; p99 {b['p99_ms']:.0f} / {u['p99_ms']:.0f} ms"
                    + (
                        f"; {b['tokens_per_s']:.0f} / {u['tokens_per_s']:.0f} tokens/s"
                        if kind == "completions"
                        else ""
                    ),
                    "",
                )
            )
    notes = (
        "Load generator, proxy, gateway and the model replica (1 CPU, 1 thread) share this machine's cores. "
        "In process = the level's requests as one batch, no HTTP: an upper bound. Plot: serve_load.png."
    )
    path = report.write("serve_load", figures, TARGETS, table, notes)
    plot(figures, report.RESULTS / "serve_load.png")
    print(path.read_text())


if __name__ == "__main__":
    main()
