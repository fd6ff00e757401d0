"""Benchmark: the serving app under load, on loopback: continuous vs static scheduling in one engine,
batched vs unbatched scoring, and what HTTP adds over the same engine in process.

    python bench/serve_load.py [--levels 1,8,32,64] [--seconds 20] [--preset small]
    python bench/serve_load.py --quick        # smoke: tiny preset, levels 1,8, 3 s a level -> serve_load_quick
    python bench/serve_load.py --preset gpt-350m --device cuda --dtype bfloat16 --name gpu_serve  (gpu_serve.sh)

One freshly initialised model (random weights: they do not change the cost; max_seq_len 512) with the
corpus tokenizer, then:
  1. In process: the engine's KV cache vs recomputing the whole prefix for each token (128 new tokens
     after a 32-token prompt), and the p50 of a 1-token generation through a running engine.
  2. Latency floor: p50 of a bare no-op Serve app, a FastAPI no-op, /healthz and a 1-token
     /v1/completions, one request at a time; the app's added p50 = 1-token completion - in process.
  3. Sweep closed-loop clients (--levels) over streamed /v1/completions of a mixed workload: prompts of
     8-200 tokens, max_tokens drawn from (4, 16, 64, 128), temperature 0, the same seeded request
     sequence for each mode. Per mode (engine.scheduler continuous / static, the same app redeployed in
     place): output tokens/s, TTFT (to the first streamed chunk: the first token), TPOT ((e2e - ttft) / (tokens - 1)),
     e2e, and e2e of the short requests (max_tokens <= 16).
  4. /v1/moderate at each level: batched (the engine's defaults) vs unbatched (max_num_seqs 1,
     max_num_batched_tokens 2, no prefix sharing: one scoring request a step, each option prefilling its
     own copy of the prompt, as serving did before the engine); at the ratio level also unbatched with
     sharing (what sharing alone gives).
  5. 16-token non-streamed /v1/completions at the ratio level: max_num_seqs 32 vs 1.
Continuous and static alternate level by level (each switch a redeploy of the same app: fresh
replicas), so each ratio compares runs a minute or so apart on a shared, noisy machine. Each level runs --seconds
(moderate and the batching row: half that) of closed-loop clients, then waits for the requests in
flight; rates are over the whole time, the drain included. Tokens are counted from `usage` when the
stream carries it, else from the chunks (one per engine step), never from max_tokens.
Every request carries an API key: the gateway checks it, as shipped (gateway.auth).
Writes bench/results/NAME.json, .md and .png (NAME: --name, default serve_load; serve_load_quick with
--quick, so a smoke never overwrites the committed results).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
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
from odyssey.engine import Engine, EngineConfig, GenerationParams, generate
from odyssey.model import PRESETS, Transformer, pad_vocab
from odyssey.tokenizer import Tokenizer

MAX_SEQ_LEN = 512
PROMPT_TOKENS = (8, 200)  # the workload's prompt lengths (tokens the engine prefills, BOS included)
MAX_TOKENS = (4, 16, 64, 128)  # the workload's max_tokens, drawn per request
PROMPTS = 4096  # distinct workload prompts: no level of the sweep sends one twice
SHORT = 16  # "short" requests: max_tokens <= SHORT
GEN_TOKENS = 16  # the batching row's non-streamed completions
MOD_TEXTS = (
    "Please call me back at the number I gave you yesterday, it is about the invoice.",
    "You are an idiot and everyone on this thread knows it.",
    "The meeting moved to Thursday at ten; bring the signed contract.",
    "Send me your password and card number and I will fix your account today.",
    "I will find where you live and make you regret this.",
    "Great write-up, thanks for taking the time to explain the licensing terms.",
)
CLIENT_TIMEOUT_S = 180  # a request not answered by then counts as failed (a stuck one cannot stall a level)
AUTH = {"Authorization": "Bearer sk-odyssey-bench"}  # gateway.auth is on as shipped: every request is checked
TARGETS = {
    "ttft_p99_continuous_vs_static_at_32_max": 0.5,
    "short_e2e_p50_continuous_vs_static_at_32_max": 0.5,
    "output_tokens_per_s_continuous_vs_static_at_32_min": 1.2,
    "moderate_batched_vs_unbatched_at_32_min": 4.0,
    "completions_batching_speedup_at_32": 4.0,
    "kv_cache_speedup_128": 5.0,
    "added_p50_vs_noop_p50": 2.0,
}
GPU_TARGETS = {"output_tokens_per_s_continuous_vs_static_at_64_min": 2.0}  # bench/gpu_serve.sh

# The app's engine in each mode (serve/app.py AppArgs.engine; the rest are the engine's defaults).
BATCHED: dict = {}  # continuous, max_num_seqs 32, prefix sharing
ENGINES = {
    "continuous": BATCHED,
    "static": {"scheduler": "static"},
    "unbatched": {"max_num_seqs": 1, "max_num_batched_tokens": 2, "prefix_sharing": False},
    "unbatched_shared": {"max_num_seqs": 1, "max_num_batched_tokens": 2, "prefix_sharing": True},
    "one_row": {"max_num_seqs": 1},  # the batching row's baseline: one sequence at a time
}


def make_model(workdir: Path, preset: str, device: str, dtype: str) -> tuple[Path, Transformer, Tokenizer]:
    """The exported model the app serves (float32 on disk; the app loads it in `dtype`) and the same
    model in process, on `device` in `dtype`."""
    from odyssey.data.corpus import CorpusConfig, build_corpus, texts

    build_corpus(workdir / "corpus", CorpusConfig.from_preset("tiny"))
    tok = Tokenizer.train(texts(workdir / "corpus", "train"), vocab_size=4096)
    torch.manual_seed(0)
    model = Transformer(
        replace(PRESETS[preset](), vocab_size=pad_vocab(tok.vocab_size), max_seq_len=MAX_SEQ_LEN)
    ).eval()
    path = artifact.save_model(workdir / "model", model, tok)
    model = model.to(device=device, dtype=getattr(torch, dtype))
    return path, model, tok


# --- the workload ------------------------------------------------------------------------------------


def build_prompts(tok: Tokenizer, corpus: Path, n: int, seed: int) -> list[tuple[str, int]]:
    """n distinct texts whose prompt (tok.prompt("lm", text): what the engine prefills) is 8-200
    tokens, lengths uniform: (text, prompt tokens). Slices of the corpus's token stream."""
    from odyssey.data.corpus import texts

    stream: list[int] = []
    for t in texts(corpus, "train"):
        stream += tok.encode(t + "\n")
        if len(stream) > 200_000:
            break
    rng, lo, hi = random.Random(seed), *PROMPT_TOKENS
    out: list[tuple[str, int]] = []
    seen: set[str] = set()
    while len(out) < n:
        want = rng.randint(lo, hi)
        start = rng.randrange(0, len(stream) - 2 * hi)
        ids = stream[start : start + want - 1]  # the prompt adds BOS
        for _ in range(8):  # decode/encode may not round-trip exactly: trim or grow to land in range
            text = tok.decode(ids).strip()
            got = len(tok.prompt("lm", text)) if text else 0
            if lo <= got <= hi:
                if text not in seen:
                    seen.add(text)
                    out.append((text, got))
                break
            ids = ids[: len(ids) - (got - hi)] if got > hi else stream[start : start + len(ids) + lo - got]
    return out


def workload(prompts: list[tuple[str, int]], seed: int):
    """Request i of a level (text, prompt tokens, max_tokens), the same sequence for every mode: the
    prompts in a seeded order, without repeats until all are used (identical prompts in flight would
    share a prefill: the sweep measures scheduling, not sharing), max_tokens a seeded draw each."""
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)

    def request(i: int) -> tuple[str, int, int]:
        text, n = prompts[order[i % len(order)]]
        return text, n, random.Random(seed * 1_000_003 + i).choice(MAX_TOKENS)

    return request


# --- in process ----------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def kv_vs_recompute(
    model, tok, prompt: list[int], device: str, new_tokens: int = 128, rounds: int = 3
) -> dict:
    config = EngineConfig(max_num_seqs=1)
    params = GenerationParams(max_tokens=new_tokens, temperature=0.0)
    generate(model, tok, [prompt], params, config)  # warm-up
    kv, full = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = generate(model, tok, [prompt], params, config)[0]
        sync(device)
        kv.append(max(out.completion_tokens, 1) / (time.perf_counter() - t0))
        ids = torch.tensor([prompt], device=device)
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(new_tokens):  # no cache: the whole prefix again for every token
                ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        sync(device)
        full.append(new_tokens / (time.perf_counter() - t0))
    return {"kv_tokens_per_s": statistics.median(kv), "recompute_tokens_per_s": statistics.median(full)}


def in_process_p50_one_token(model, tok, prompt: list[int], n: int) -> float:
    """A 1-token generation through a running engine (the app's defaults): what the replica's engine
    does for a max_tokens 1 request, without Serve or HTTP. (`generate` would allocate a fresh KV cache
    per call, which a serving engine does once.)"""
    engine = Engine(model, tok, EngineConfig())
    params = GenerationParams(max_tokens=1, temperature=0.0)
    times = []
    for i in range(n + 10):
        t0 = time.perf_counter()
        engine.add(prompt, params)
        while engine.has_work:
            engine.step()
        if i >= 10:  # warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- over HTTP -------------------------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


async def closed_loop(c: int, seconds: float, one) -> tuple[list[dict], float]:
    """c clients, each sending its next request as soon as the last one ended, for `seconds`; then the
    requests in flight finish. one(http, i) -> a record for request i (i counts up across clients)."""
    import aiohttp

    counter = itertools.count()
    records: list[dict] = []
    connector = aiohttp.TCPConnector(limit=c, force_close=False)
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    async with aiohttp.ClientSession(headers=AUTH, connector=connector, timeout=timeout) as http:
        t0 = time.perf_counter()
        deadline = t0 + seconds

        async def client():
            while time.perf_counter() < deadline:
                records.append(await one(http, next(counter)))

        await asyncio.gather(*(client() for _ in range(c)))
        elapsed = time.perf_counter() - t0
    return records, elapsed


def stream_request(base: str, prompts, seed: int):
    """A streamed completion of the workload: TTFT, e2e and tokens as the client sees them. TTFT is to
    the first chunk with a choice, i.e. the first token out of the engine; `ttft_text` to the first
    chunk whose text is not empty. (The server holds back a token that ends in an incomplete UTF-8
    character: a greedy random model can repeat such a token to the end, so a few requests show their
    first character only with their last token; kept apart so it does not decide the p99.)"""
    request = workload(prompts, seed)

    async def one(http, i: int) -> dict:
        text, n, max_tokens = request(i)
        body = {"prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        body["stream_options"] = {"include_usage": True}  # OpenAI's way to ask for usage; ignored otherwise
        record = {"max_tokens": max_tokens, "prompt_tokens": n, "ok": False, "ttft": None, "ttft_text": None}
        chunks, usage = 0, None
        t0 = time.perf_counter()
        try:
            async with http.post(f"{base}/v1/completions", json=body) as r:
                if r.status != 200:
                    await r.read()
                    record["status"] = r.status
                    record["e2e"] = time.perf_counter() - t0
                    return record
                async for raw in r.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        record["ok"] = True
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        record["status"] = obj["error"].get("type")
                        break
                    if obj.get("usage"):
                        usage = obj["usage"]["completion_tokens"]
                    choices = obj.get("choices") or []
                    if choices:
                        chunks += 1
                        now = time.perf_counter() - t0
                        if record["ttft"] is None:
                            record["ttft"] = now
                        if choices[0].get("text") and record["ttft_text"] is None:
                            record["ttft_text"] = now
        except (OSError, asyncio.TimeoutError) as e:
            record["status"] = type(e).__name__
        record["e2e"] = time.perf_counter() - t0
        record["tokens"] = usage if usage is not None else chunks
        record["counted_by"] = "usage" if usage is not None else "chunks"
        return record

    return one


def json_request(base: str, path: str, body_of):
    """A non-streamed request: e2e, and tokens from `usage` when the answer has it."""

    async def one(http, i: int) -> dict:
        t0 = time.perf_counter()
        record = {"ok": False, "tokens": 0}
        try:
            async with http.post(f"{base}{path}", json=body_of(i)) as r:
                answer = await r.json(content_type=None)
                record["ok"] = r.status == 200
                if not record["ok"]:
                    record["status"] = r.status
                elif "usage" in answer:
                    record["tokens"] = answer["usage"]["completion_tokens"]
        except (OSError, asyncio.TimeoutError, ValueError) as e:
            record["status"] = type(e).__name__
        record["e2e"] = time.perf_counter() - t0
        return record

    return one


def failures(records: list[dict]) -> dict:
    out: dict[str, int] = {}
    for r in records:
        if not r["ok"]:
            key = str(r.get("status", "incomplete"))
            out[key] = out.get(key, 0) + 1
    return out


def summarise_stream(records: list[dict], elapsed: float, c: int) -> dict:
    ok = [r for r in records if r["ok"]]
    tpot = [
        (r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["ttft"] is not None and r["tokens"] > 1
    ]
    return {
        "concurrency": c,
        "requests": len(ok),
        "failures": failures(records),
        "seconds": round(elapsed, 2),
        "output_tokens_per_s": round(sum(r["tokens"] for r in ok) / elapsed, 2),
        "req_per_s": round(len(ok) / elapsed, 2),
        "ttft_p50_ms": ms(pct([r["ttft"] for r in ok], 0.5)),
        "ttft_p99_ms": ms(pct([r["ttft"] for r in ok], 0.99)),
        "tpot_p50_ms": ms(pct(tpot, 0.5)),
        "e2e_p50_ms": ms(pct([r["e2e"] for r in ok], 0.5)),
        "e2e_p99_ms": ms(pct([r["e2e"] for r in ok], 0.99)),
        "short_e2e_p50_ms": ms(pct([r["e2e"] for r in ok if r["max_tokens"] <= SHORT], 0.5)),
        "short_requests": sum(r["max_tokens"] <= SHORT for r in ok),
        "ttft_text_p50_ms": ms(pct([r["ttft_text"] for r in ok], 0.5)),
        "ttft_text_p99_ms": ms(pct([r["ttft_text"] for r in ok], 0.99)),
        "first_chunk_without_text": sum(r["ttft_text"] != r["ttft"] for r in ok),
        "tokens_counted_by": sorted({r["counted_by"] for r in ok}),
    }


def summarise_json(records: list[dict], elapsed: float, c: int) -> dict:
    ok = [r for r in records if r["ok"]]
    return {
        "concurrency": c,
        "requests": len(ok),
        "failures": failures(records),
        "seconds": round(elapsed, 2),
        "req_per_s": round(len(ok) / elapsed, 2),
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / elapsed, 2),
        "p50_ms": ms(pct([r["e2e"] for r in ok], 0.5)),
        "p99_ms": ms(pct([r["e2e"] for r in ok], 0.99)),
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
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = figures["sweep"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (
        (axes[0], "completions", "output_tokens_per_s", "output tokens/s", "streamed /v1/completions, mixed"),
        (axes[1], "completions", "ttft_p99_ms", "TTFT p99 (ms)", "streamed /v1/completions: TTFT p99"),
        (axes[2], "moderate", "req_per_s", "requests/s", "/v1/moderate"),
    )
    styles = {
        "continuous": "o-",
        "static": "s--",
        "batched": "o-",
        "unbatched": "s--",
        "unbatched_shared": "^:",
    }
    for ax, kind, key, ylabel, title in panels:
        for mode, rows in sweep[kind].items():
            if rows:
                ax.plot([r["concurrency"] for r in rows], [r[key] for r in rows], styles[mode], label=mode)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- the run ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", help="concurrent clients, comma-separated (default 1,8,32,64)")
    parser.add_argument("--seconds", type=float, help="closed-loop seconds a level (default 20)")
    parser.add_argument("--preset", help="model shape, random weights (default small)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--name", help="results name (default serve_load; serve_load_quick with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny preset, levels 1,8, 3 s a level, fewer samples"
    )
    args = parser.parse_args()
    quick = args.quick
    args.levels = [int(x) for x in (args.levels or ("1,8" if quick else "1,8,32,64")).split(",")]
    args.seconds = args.seconds or (3.0 if quick else 20.0)
    args.preset = args.preset or ("tiny" if quick else "small")
    args.name = args.name or ("serve_load_quick" if quick else "serve_load")
    args.samples = 40 if quick else 200  # sequential requests per latency p50
    args.rounds = 1 if quick else 3  # KV cache vs recompute
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.preset not in PRESETS:
        parser.error(f"--preset: one of {', '.join(PRESETS)}")
    return args


def model_args(args: argparse.Namespace) -> dict:
    """AppArgs.model: room for every client of the sweep (at least engine.max_num_seqs), and the GPU."""
    model = {"max_ongoing_requests": max(256, max(args.levels))}
    if args.device == "cuda":
        model |= {"device": "cuda", "num_gpus": 1, "num_cpus": 2}
    return model


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    levels, device = args.levels, args.device
    if device == "cpu":
        torch.set_num_threads(1)  # as the LanguageModel replica (num_cpus 1)
    ratio_at = 32 if 32 in levels else max(levels)

    import ray
    from ray import serve

    from serve.app import AppArgs, build_app

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, model, tok = make_model(Path(tmp), args.preset, device, args.dtype)
        prompts = build_prompts(tok, Path(tmp) / "corpus", PROMPTS, args.seed)
        lengths = sorted(n for _, n in prompts)
        print(
            f"{len(prompts)} workload prompts, {lengths[0]}-{lengths[-1]} tokens, median {lengths[len(lengths) // 2]}"
        )
        kv_prompt = tok.prompt("lm", prompts[[n for _, n in prompts].index(lengths[-1])][0])[:32]
        kv = kv_vs_recompute(model, tok, kv_prompt, device, rounds=args.rounds)
        print(
            f"KV cache {kv['kv_tokens_per_s']:.0f} vs recompute {kv['recompute_tokens_per_s']:.0f} tokens/s"
        )
        inproc_p50 = in_process_p50_one_token(model, tok, tok.prompt("lm", "The license"), args.samples)
        params = model.num_params()
        del model  # the replica loads its own copy
        if device == "cuda":
            torch.cuda.empty_cache()

        ray.init(
            address="local",
            num_cpus=4 if device == "cpu" else min(os.cpu_count() or 4, 8),
            num_gpus=1 if device == "cuda" else 0,
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

        deploys: list[float] = []
        current: list[str | None] = [None]

        def deploy(mode: str) -> None:
            """The app with ENGINES[mode], redeployed under the same name, then warmed up. (serve.run
            from Python gives each deployment a new code version, so Serve replaces every replica
            rather than reconfiguring it: each mode starts on fresh replicas.)"""
            if current[0] == mode:
                return
            t0 = time.perf_counter()
            app_args = {
                "gateway": {"api_keys_file": str(Path(tmp) / "api_keys")},  # API keys on, as shipped
                "model_path": str(model_dir),
                "dtype": args.dtype,
                "model": model_args(args),
                "engine": ENGINES[mode],
                "documents": str(Path(tmp) / "corpus" / "documents"),
                "max_documents": 3,  # /v1/find is not measured here: index little, start fast
            }
            serve.run(build_app(AppArgs(**app_args)), name="odyssey", route_prefix="/")
            import httpx

            with httpx.Client(base_url=base, headers=AUTH, timeout=120) as http:
                for _ in range(2):
                    http.post(
                        "/v1/completions", json={"prompt": "Warm up", "max_tokens": 2}
                    ).raise_for_status()
                    http.post("/v1/moderate", json={"text": MOD_TEXTS[0]}).raise_for_status()
            deploys.append(time.perf_counter() - t0)
            current[0] = mode

        sweep = {
            "completions": {"continuous": [], "static": []},
            "moderate": {"batched": [], "unbatched": [], "unbatched_shared": []},
        }
        batching: dict[str, dict] = {}
        short_seconds = max(1.0, args.seconds / 2)

        def run_completions(mode: str, c: int) -> None:
            records, elapsed = asyncio.run(
                closed_loop(c, args.seconds, stream_request(base, prompts, args.seed + c))
            )
            row = summarise_stream(records, elapsed, c)
            sweep["completions"][mode].append(row)
            print(
                f"{mode:>10} completions c={c:<3} {row['output_tokens_per_s']:8.1f} tok/s  "
                f"TTFT p50/p99 {row['ttft_p50_ms']}/{row['ttft_p99_ms']} ms  TPOT p50 {row['tpot_p50_ms']} ms  "
                f"e2e p50/p99 {row['e2e_p50_ms']}/{row['e2e_p99_ms']} ms  short p50 {row['short_e2e_p50_ms']} ms  "
                f"n={row['requests']} failures {row['failures']}",
                flush=True,
            )

        def run_moderate(mode: str, c: int) -> None:
            rng_seed = args.seed + c

            def body(i: int) -> dict:
                return {"text": random.Random(rng_seed * 1_000_003 + i).choice(MOD_TEXTS)}

            records, elapsed = asyncio.run(
                closed_loop(c, short_seconds, json_request(base, "/v1/moderate", body))
            )
            row = summarise_json(records, elapsed, c)
            sweep["moderate"][mode].append(row)
            print(
                f"{mode:>10} moderate    c={c:<3} {row['req_per_s']:8.1f} req/s  p50 {row['p50_ms']} ms  "
                f"p99 {row['p99_ms']} ms  n={row['requests']} failures {row['failures']}",
                flush=True,
            )

        def run_batching(mode: str, c: int) -> None:
            def body(i: int) -> dict:
                return {"prompt": f"Request {i} asks", "max_tokens": GEN_TOKENS, "temperature": 0}

            records, elapsed = asyncio.run(
                closed_loop(c, short_seconds, json_request(base, "/v1/completions", body))
            )
            batching[mode] = summarise_json(records, elapsed, c)
            row = batching[mode]
            print(
                f"{mode:>10} {GEN_TOKENS}-token    c={c:<3} {row['req_per_s']:8.1f} req/s  "
                f"{row['tokens_per_s']:.1f} tok/s  p50 {row['p50_ms']} ms  failures {row['failures']}",
                flush=True,
            )

        try:
            serve.run(Noop.bind(), name="noop", route_prefix="/noop")
            serve.run(FastAPINoop.bind(), name="fastapi-noop", route_prefix="/fastapi-noop")
            (Path(tmp) / "api_keys").write_text(AUTH["Authorization"].removeprefix("Bearer ") + "\n")
            deploy("continuous")
            one_token = {"prompt": "The license", "max_tokens": 1, "temperature": 0}
            n = args.samples
            noop_p50 = sequential_p50(f"{base}/noop", one_token, n)  # the same request, answered by nothing
            app_p50 = sequential_p50(f"{base}/v1/completions", one_token, n)
            fastapi_p50 = sequential_p50(f"{base}/fastapi-noop/", one_token, n)
            health_p50 = sequential_p50(f"{base}/healthz", None, n)  # gateway + one trivial model call
            print(
                f"p50: no-op app {noop_p50 * 1e3:.1f} ms, 1-token completion {app_p50 * 1e3:.1f} ms, "
                f"in process {inproc_p50 * 1e3:.1f} ms",
                flush=True,
            )

            # Level by level, continuous and static in turn; the order flips each level so that one
            # deployment serves the end of a level and the start of the next (continuous, static,
            # static, continuous, ...). Continuous is the engine's defaults: batched /v1/moderate too.
            for k, c in enumerate(levels):
                for mode in ("continuous", "static") if k % 2 == 0 else ("static", "continuous"):
                    deploy(mode)
                    run_completions(mode, c)
                    if mode == "continuous":
                        run_moderate("batched", c)
                        if c == ratio_at:
                            run_batching("max_num_seqs_32", c)
            deploy("unbatched")
            for c in levels:
                run_moderate("unbatched", c)
            deploy("unbatched_shared")
            run_moderate("unbatched_shared", ratio_at)
            deploy("one_row")
            run_batching("max_num_seqs_1", ratio_at)
        finally:
            serve.shutdown()
            ray.shutdown()

    def at(kind: str, mode: str, c: int) -> dict:
        return next(r for r in sweep[kind][mode] if r["concurrency"] == c)

    def ratio(a, b) -> float | None:
        return None if a is None or not b else round(a / b, 2)

    cont, stat = at("completions", "continuous", ratio_at), at("completions", "static", ratio_at)
    ratios = {
        "ttft_p99": ratio(cont["ttft_p99_ms"], stat["ttft_p99_ms"]),
        "short_e2e_p50": ratio(cont["short_e2e_p50_ms"], stat["short_e2e_p50_ms"]),
        "output_tokens_per_s": ratio(cont["output_tokens_per_s"], stat["output_tokens_per_s"]),
        "moderate_batched_vs_unbatched": ratio(
            at("moderate", "batched", ratio_at)["req_per_s"],
            at("moderate", "unbatched", ratio_at)["req_per_s"],
        ),
        "moderate_unbatched_shared_vs_unbatched": ratio(
            at("moderate", "unbatched_shared", ratio_at)["req_per_s"],
            at("moderate", "unbatched", ratio_at)["req_per_s"],
        ),
        "completions_batching": ratio(
            batching["max_num_seqs_32"]["req_per_s"], batching["max_num_seqs_1"]["req_per_s"]
        ),
    }
    targets = dict(TARGETS)
    if device == "cuda" and 64 in levels:
        targets |= GPU_TARGETS
        ratios["output_tokens_per_s_at_64"] = ratio(
            at("completions", "continuous", 64)["output_tokens_per_s"],
            at("completions", "static", 64)["output_tokens_per_s"],
        )
    added = app_p50 - inproc_p50
    figures = {
        "model": f"{args.preset} preset, random weights, {params / 1e6:.1f}M parameters, max_seq_len {MAX_SEQ_LEN}, "
        f"{args.dtype} on {device}" + (", 1 thread" if device == "cpu" else ""),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "workload": {
            "prompt_tokens": list(PROMPT_TOKENS),
            "max_tokens": list(MAX_TOKENS),
            "temperature": 0,
            "distinct_prompts": len(prompts),
            "seconds_per_level": args.seconds,
            "seconds_per_level_moderate_and_batching": short_seconds,
            "levels": levels,
            "ratio_at": ratio_at,
            "seed": args.seed,
        },
        "engines": {k: {**EngineConfig().__dict__, **v} for k, v in ENGINES.items()},
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
        "ratios": ratios,
        "batching": batching,
        "sweep": sweep,
        "redeploy_s": [round(d, 2) for d in deploys],
        "wall_s": round(time.perf_counter() - started, 1),
    }

    def x(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}x"

    def f0(v) -> str:
        return "-" if v is None else f"{v:.0f}"

    at_c = f"at {ratio_at} clients"
    table = [
        (
            f"TTFT p99, continuous vs static, {at_c}",
            f"{x(ratios['ttft_p99'])} ({f0(cont['ttft_p99_ms'])} vs {f0(stat['ttft_p99_ms'])} ms; to the first "
            f"non-empty text {f0(cont['ttft_text_p99_ms'])} vs {f0(stat['ttft_text_p99_ms'])} ms)",
            "<= 0.5x",
        ),
        (
            f"e2e p50 of short requests (max_tokens <= {SHORT}), continuous vs static, {at_c}",
            f"{x(ratios['short_e2e_p50'])} ({f0(cont['short_e2e_p50_ms'])} vs {f0(stat['short_e2e_p50_ms'])} ms)",
            "<= 0.5x",
        ),
        (
            f"output tokens/s, continuous vs static, {at_c}",
            f"{x(ratios['output_tokens_per_s'])} ({f0(cont['output_tokens_per_s'])} vs {f0(stat['output_tokens_per_s'])})",
            ">= 1.2x",
        ),
    ]
    if "output_tokens_per_s_at_64" in ratios:
        c64, s64 = at("completions", "continuous", 64), at("completions", "static", 64)
        table.append((
            "output tokens/s, continuous vs static, at 64 clients (GPU goal)",
            f"{x(ratios['output_tokens_per_s_at_64'])} ({f0(c64['output_tokens_per_s'])} vs {f0(s64['output_tokens_per_s'])})",
            ">= 2x",
        ))  # fmt: skip
    mb, mu, ms_ = (at("moderate", m, ratio_at) for m in ("batched", "unbatched", "unbatched_shared"))
    b32, b1 = batching["max_num_seqs_32"], batching["max_num_seqs_1"]
    table += [
        (
            f"/v1/moderate req/s, batched vs unbatched, {at_c}",
            f"{x(ratios['moderate_batched_vs_unbatched'])} ({mb['req_per_s']:.1f} vs {mu['req_per_s']:.1f}; "
            f"unbatched with prefix sharing {ms_['req_per_s']:.1f} = {x(ratios['moderate_unbatched_shared_vs_unbatched'])})",
            ">= 4x",
        ),
        (
            f"/v1/completions ({GEN_TOKENS} tokens) req/s, max_num_seqs 32 vs 1, {at_c}",
            f"{x(ratios['completions_batching'])} ({b32['req_per_s']:.1f} vs {b1['req_per_s']:.1f}; "
            f"{b32['tokens_per_s']:.0f} vs {b1['tokens_per_s']:.0f} tokens/s)",
            ">= 4x",
        ),
        (
            "KV cache vs recompute, 128 new tokens after 32",
            f"{figures['kv_cache']['speedup']:.1f}x "
            f"({kv['kv_tokens_per_s']:.0f} vs {kv['recompute_tokens_per_s']:.0f} tokens/s)",
            ">= 5x",
        ),
        (
            "added p50 over in process, 1-token completion",
            f"{added * 1e3:.1f} ms = {added / noop_p50:.2f}x the no-op app's p50 ({noop_p50 * 1e3:.1f} ms)",
            "<= 2x",
        ),
        (
            "where the p50 goes: no-op / FastAPI no-op / gateway + trivial model call / 1-token completion / in process",
            f"{noop_p50 * 1e3:.1f} / {fastapi_p50 * 1e3:.1f} / {health_p50 * 1e3:.1f} / {app_p50 * 1e3:.1f} / "
            f"{inproc_p50 * 1e3:.1f} ms",
            "",
        ),
    ]

    for c in levels:
        cr, sr = at("completions", "continuous", c), at("completions", "static", c)
        table.append((
            f"streamed completions c={c}: continuous / static",
            f"{cr['output_tokens_per_s']:.0f} / {sr['output_tokens_per_s']:.0f} tokens/s; "
            f"TTFT p50 {f0(cr['ttft_p50_ms'])} / {f0(sr['ttft_p50_ms'])}, p99 {f0(cr['ttft_p99_ms'])} / {f0(sr['ttft_p99_ms'])} ms; "
            f"TPOT p50 {f0(cr['tpot_p50_ms'])} / {f0(sr['tpot_p50_ms'])} ms; "
            f"e2e p50 {f0(cr['e2e_p50_ms'])} / {f0(sr['e2e_p50_ms'])}, p99 {f0(cr['e2e_p99_ms'])} / {f0(sr['e2e_p99_ms'])} ms; "
            f"short e2e p50 {f0(cr['short_e2e_p50_ms'])} / {f0(sr['short_e2e_p50_ms'])} ms; "
            f"{cr['requests']} / {sr['requests']} requests",
            "",
        ))  # fmt: skip
    for c in levels:
        b, u = at("moderate", "batched", c), at("moderate", "unbatched", c)
        table.append((
            f"/v1/moderate c={c}: batched / unbatched",
            f"{b['req_per_s']:.1f} / {u['req_per_s']:.1f} req/s; p50 {f0(b['p50_ms'])} / {f0(u['p50_ms'])} ms; "
            f"p99 {f0(b['p99_ms'])} / {f0(u['p99_ms'])} ms",
            "",
        ))  # fmt: skip
    failed = {
        f"{kind}/{mode}/c={r['concurrency']}": r["failures"]
        for kind in sweep
        for mode, rows in sweep[kind].items()
        for r in rows
        if r["failures"]
    }
    failed |= {f"batching/{mode}": r["failures"] for mode, r in batching.items() if r["failures"]}
    if failed:
        table.append(("failed requests", "; ".join(f"{k}: {v}" for k, v in failed.items()), "none"))
    counted = sorted(
        {how for rows in sweep["completions"].values() for r in rows for how in r["tokens_counted_by"]}
    )
    notes = (
        f"Model: {figures['model']}. Workload: streamed, prompts {PROMPT_TOKENS[0]}-{PROMPT_TOKENS[1]} tokens "
        f"({len(prompts)} distinct), max_tokens from {MAX_TOKENS}, temperature 0, the same seeded request sequence "
        f"in both modes; closed-loop clients, {args.seconds:g} s a level then the requests in flight finish "
        f"(moderate and the batching row: {short_seconds:g} s); rates over the whole time. TTFT: to the first streamed chunk (the first token; to the first "
        f"non-empty text in the headline row and the JSON); TPOT: (e2e - TTFT) / (tokens - 1). Output tokens counted "
        f"from {' and '.join(counted) or 'nothing'}. Engines: continuous = the app's defaults (max_num_seqs 32, "
        "max_num_batched_tokens 2048, prefix sharing); static admits only into an empty batch; unbatched = "
        "max_num_seqs 1, max_num_batched_tokens 2, no prefix sharing. Continuous and static alternate level by "
        "level, each switch a redeploy of the same app (fresh replicas, warmed up before measuring). "
        + (
            "Load generator, proxy, gateway and the model replica (1 CPU, 1 thread) share this machine's cores. "
            if device == "cpu"
            else f"Model replica on {figures['device']}. "
        )
        + f"Plot: {args.name}.png. Wall time {figures['wall_s']:.0f} s."
    )
    path = report.write(args.name, figures, targets, table, notes)
    plot(figures, report.RESULTS / f"{args.name}.png")
    print(path.read_text())


if __name__ == "__main__":
    main()
