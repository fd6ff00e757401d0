"""The README's results table, rebuilt from bench/results/*.json (`make bench` runs this last).

    python bench/readme_table.py [--check]

One row per headline figure: what, ours, baseline, ratio (ours over baseline, oriented so that > 1 is
better), machine and date. The table sits between the two `bench:table` markers in README.md; the rest
of the README is left as it is. --check exits 1 when the README's table is not what the results say.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- bench:table:begin -->", "<!-- bench:table:end -->"


def _k(x: float) -> str:
    return f"{x / 1e6:.2f} M" if x >= 1e6 else f"{x / 1e3:.1f} k" if x >= 1e4 else f"{x:,.0f}"


def data(f: dict) -> list[tuple]:
    enc, ray, mem = f["encode_tokens_per_s"], f["ray_data"], f["packing_memory"]
    many = max(ray["workers"], key=int)
    return [
        ("tokenize + pack the full corpus (tokens/s)", _k(f["pack_tokens_per_s"]["median"]), "target 1.00 M", f["pack_tokens_per_s"]["median"] / 1e6),
        ("tokenizer encode: ours (ignore_merges) vs plain BPE (tokens/s)", _k(enc["shipped_ignore_merges"]), _k(enc["plain_bpe"]), enc["ratio"]),
        (f"tokenize + pack on Ray Data, {many} workers vs 1 (tokens/s)", _k(ray["workers"][many]["pack_tokens_per_s"]), _k(ray["workers"]["1"]["pack_tokens_per_s"]), ray["pack_ratio"]),
        ("peak memory packing a corpus 4x the full one vs 1x (MiB, driver + Ray workers)", f"{mem['4x']['peak_rss_mib']:,}", f"{mem['1x']['peak_rss_mib']:,}", mem["1x"]["peak_rss_mib"] / mem["4x"]["peak_rss_mib"]),
    ]  # fmt: skip


def data_scale(f: dict) -> list[tuple]:
    b, t = f["bytes_per_rank"], f["throughput"]
    most = max(b["index"], key=int)
    index, stream = (max(r["rows_bytes"] for r in b[load][most]) for load in ("index", "stream"))
    rates = t["tokens_per_s"]
    return [
        (f"training data read per rank at {most} workers, data.load index vs stream ({f['loader_steps']} steps)", f"{index / 2**20:.2f} MiB", f"{stream / 2**20:.2f} MiB", stream / index),
        ("training tokens/s, data.load index vs stream (`tiny-cpu`, 2 workers)", f"{rates['index']:,.0f}", f"{rates['stream']:,.0f}", t["index_vs_stream"]),
    ]  # fmt: skip


def train_throughput(f: dict) -> list[tuple]:
    s = f["settings"]
    best = s[f["best"]]
    return [
        ("training `small`: Ray Train + DeepSpeed ZeRO-0, 1 worker vs plain PyTorch loop (tokens/s)", f"{s['zero0-w1']['tokens_per_s']:.0f}", f"{s['plain']['tokens_per_s']:.0f}", f["deepspeed_1_worker_vs_plain"]),
        (f"training MFU, best setting ({f['best']})", f"{best['mfu']:.0%}", "target 60%", best["mfu"] / 0.6),
    ]  # fmt: skip


def train_overhead(f: dict) -> list[tuple]:
    t = f["tokens_per_s"]
    return [
        (
            "whole Ray Train stack vs plain loop, same steps (tokens/s)",
            f"{t['ray-train']:.0f}",
            f"{t['plain']:.0f}",
            f["vs_plain"]["ray-train"],
        )
    ]


def serve_load(f: dict) -> list[tuple]:
    kv, lat, r = f["kv_cache"], f["latency_ms"], f["ratios"]
    at = f["workload"]["ratio_at"]

    def row(kind: str, mode: str) -> dict:
        return next(x for x in f["sweep"][kind][mode] if x["concurrency"] == at)

    cont, stat = row("completions", "continuous"), row("completions", "static")
    mod, unb = row("moderate", "batched"), row("moderate", "unbatched")
    b32, b1 = f["batching"]["max_num_seqs_32"], f["batching"]["max_num_seqs_1"]
    return [
        (f"serving: continuous vs static batching, output tokens/s at {at} clients", f"{cont['output_tokens_per_s']}", f"{stat['output_tokens_per_s']}", r["output_tokens_per_s"]),
        (f"serving: time to first token p99, static vs continuous at {at} clients (ms)", f"{stat['ttft_p99_ms']}", f"{cont['ttft_p99_ms']}", stat["ttft_p99_ms"] / cont["ttft_p99_ms"]),
        (f"serving: /v1/moderate batched + prefix sharing vs unbatched at {at} clients (req/s)", f"{mod['req_per_s']}", f"{unb['req_per_s']}", r["moderate_batched_vs_unbatched"]),
        (f"serving: /v1/completions (16 tokens) max_num_seqs 32 vs 1 at {at} clients (req/s)", f"{b32['req_per_s']}", f"{b1['req_per_s']}", r["completions_batching"]),
        ("decoding with the KV cache vs recomputing (tokens/s, 128 tokens)", f"{kv['kv_tokens_per_s']}", f"{kv['recompute_tokens_per_s']}", kv["speedup"]),
        ("latency Serve adds to a 1-token completion vs a no-op Serve app's whole latency (p50 ms)", f"{lat['added_p50']}", f"{lat['noop_app_p50']}", lat["noop_app_p50"] / lat["added_p50"]),
    ]  # fmt: skip


def tune_efficiency(f: dict) -> list[tuple]:
    sweeps, v = f["sweeps"], f["mup"]["verdict"]
    halving = [r for name, r in sweeps.items() if name.startswith("random-halving")]
    tokens = sorted(r["tokens"] for r in halving)[len(halving) // 2]
    gap = sorted(r["loss_vs_grid"] for r in halving)[len(halving) // 2]
    gain = v["mean"]["64"] - v["mean"]["512"]
    return [
        (f"sweep: random + successive halving vs full grid, tokens (median of {len(halving)} seeds; {gap:+.1%} loss)", _k(tokens), _k(sweeps["grid"]["tokens"]), sweeps["grid"]["tokens"] / tokens),
        ("µP: val loss 64 -> 512 wide at width 64's best lr (nats; mean of 2 seeds; seed spread)", f"-{gain:.3f}", f"spread {max(v['spread'].values()):.3f}", None),
        ("µP: shift of the best learning rate over 8x width (x2 grid steps)", f"{v['shift_steps']['mup']}", f"SP {2 * v['shift_steps']['sp']}", None),
    ]  # fmt: skip


def elastic(f: dict) -> list[tuple]:
    scenarios = {k: v for k, v in f.items() if isinstance(v, dict) and "back_to_training_s" in v}
    worst = max(scenarios, key=lambda k: scenarios[k]["back_to_training_s"])
    s = scenarios[worst]["back_to_training_s"]
    return [
        (
            f"elastic training: back to training after a failure or resize (worst: {worst}, s)",
            f"{s}",
            "target 60",
            60 / s,
        )
    ]


def onnx(f: dict) -> list[tuple]:
    rows = []
    for key, label in (("speedup", "float32"), ("speedup_int8", "int8 weights")):
        for kind, what in (("forward", "forward pass"), ("generate", "generation, 64 tokens")):
            n = sum(r["kind"] == kind for shapes in f["presets"].values() for r in shapes.values())
            rows.append((
                f"ONNX Runtime ({label}) vs torch eager, {what}: median over {n} shapes x presets (range)",
                f"{f[f'median_{key}'][kind]:.2f}x ({f[f'min_{key}'][kind]:.2f}x-{_max(f, key, kind):.2f}x)",
                "torch eager, 1x", f[f"median_{key}"][kind],
            ))  # fmt: skip
    return rows


def _max(f: dict, key: str, kind: str) -> float:
    return max(r[key] for shapes in f["presets"].values() for r in shapes.values() if r["kind"] == kind)


def soak(f: dict) -> list[tuple]:
    what = f"soak, {f['minutes']:.0f} min at half load, {len(f['kills'])} replica kills"
    return [
        (f"{what}: memory growth", f"{f['memory_growth']:+.1%}", "target < 10%", None),
        (f"{what}: p99 drift", f"{f['p99_drift']:+.1%}", "target < 20%", None),
        (f"{what}: errors", f"{f['error_rate']:.3%} of {f['requests']}", "target < 0.1%", None),
    ]


def demo(f: dict) -> list[tuple]:
    d, q = f["demo"], f["quality"]
    ppl = {b: q[b]["lm.perplexity"] for b in ("torch", "onnxruntime", "onnxruntime_int8")}
    return [
        (f"`odyssey demo`, end to end without set-up (s; {f['matmul_gflops']} GFLOP/s matmul that day)", f"{d['wall_s']:.0f}", "", None),
        ("the demo's model, whole test split: perplexity under ONNX Runtime float32 / int8 vs torch", f"{ppl['onnxruntime']:.2f} / {ppl['onnxruntime_int8']:.2f}", f"{ppl['torch']:.2f}", None),
    ]  # fmt: skip


def autoscaler(f: dict) -> list[tuple]:
    added, gone = f["last_gpu_node_added_s_median"], f["gone_after_job_s_median"]
    return [
        ("local autoscaler: both fake-GPU nodes alive after a job's submit (median, s)", f"{added}", "target 60", 60 / added),
        (f"local autoscaler: GPU nodes gone after the job (median, s; idle timeout {f['idle_timeout_s']} s)", f"{gone}", "target 60", 60 / gone),
    ]  # fmt: skip


def tasks(f: dict) -> list[tuple]:
    tr, find, mod = f["training"], f["find"]["all"], f["moderate"].get("rules_hidden")
    budget = f"`{tr['recipe']}`, {tr['steps']} steps ({tr['wall_s'] / 60:.0f} min)"
    rows = [
        (
            f"find MRR, {budget}: dense embedding vs BM25",
            f"{find['dense']['mrr']:.3f}",
            f"{find['bm25']['mrr']:.3f}",
            _ratio(find["dense"]["mrr"], find["bm25"]["mrr"]),
        ),
        (
            "find MRR: dense embedding vs the mean-pooled one of the same model (target 2x)",
            f"{find['dense']['mrr']:.3f}",
            f"{find['mean_pooled']['mrr']:.3f}",
            _ratio(find["dense"]["mrr"], find["mean_pooled"]["mrr"]),
        ),
    ]
    if mod:
        model, rules = mod["model"]["unsafe_macro_f1"], mod["rules"]["unsafe_macro_f1"]
        rows.append(
            (
                "moderation, unsafe content no rule sees: macro F1 of the model vs the rules",
                _f(model),
                _f(rules),
                _ratio(model, rules),
            )
        )
    code, summ = f["code"], f["summarize"]
    rows += [
        (
            f"code: pass rate of executable checks ({code['checks'] or 0} checks)",
            _f(code["pass_rate"]),
            "goal > 0",
            None,
        ),
        (
            "summaries: ROUGE-L of the model vs the lead sentence",
            _f(summ["rouge_l"]),
            _f(summ["lead_sentence_rouge_l"]),
            _ratio(summ["rouge_l"], summ["lead_sentence_rouge_l"]),
        ),
    ]
    return rows


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _ratio(ours: float | None, baseline: float | None) -> float | None:
    return None if ours is None or not baseline else ours / baseline


HEADLINES = {
    "data": data,
    "data_scale": data_scale,
    "train_throughput": train_throughput,
    "train_overhead": train_overhead,
    "serve_load": serve_load,
    "tune_efficiency": tune_efficiency,
    "elastic": elastic,
    "onnx": onnx,
    "soak": soak,
    "demo": demo,
    "autoscaler": autoscaler,
    "tasks": tasks,
}


def table() -> str:
    lines = [
        "| bench | what | ours | baseline | ratio | machine, date |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows_of in HEADLINES.items():
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            lines.append(f"| `{name}` | not run yet: `python bench/{name}.py` | | | | |")
            continue
        record = json.loads(path.read_text())
        m = record["machine"]
        machine = f"{m['cpu'].split(' ')[0]} {m['cores']} cores{', ' + m['gpu'] if m.get('gpu') else ''}, {record['date']}"
        for what, ours, baseline, ratio in rows_of(record["figures"]):
            ratio_text = "" if ratio is None else f"{ratio:.2f}x"
            lines.append(
                f"| [`{name}`](bench/results/{name}.md) | {what} | {ours} | {baseline} | {ratio_text} | {machine} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail when README.md's table is stale")
    args = parser.parse_args()
    text = README.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        print(f"README.md lacks the {BEGIN} ... {END} markers", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{table()}\n{END}{tail}"
    if args.check:
        if new != text:
            print("README.md's results table is stale: run `python bench/readme_table.py`", file=sys.stderr)
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
