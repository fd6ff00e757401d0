"""ONNX Runtime vs torch eager on CPU: the same model, the same inputs, side by side.

    python bench/onnx.py [--threads 1] [--rounds 5]

Both backends are the serving code's own (odyssey/model.py; odyssey/ort_model.py runs the blocks in
ONNX Runtime and everything else in the same torch code; odyssey/engine.py drives either), with the
thread count a serving replica gets (num_cpus: 1). Measured, for the `tiny` and `small` presets
(random weights: speed does not depend on them):

- forward: one pass over a left-padded batch, as passage embedding runs it
- generation: prefill + 64 greedy tokens over the engine's KV cache, as /v1/completions runs it

torch and ONNX Runtime alternate within each round (ABAB), and each figure is the median over rounds,
so the machine's drift hits both alike. Writes bench/results/onnx.{json,md,png}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

# `python bench/onnx.py` puts bench/ first on the path, where this file would shadow the onnx package.
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

import torch  # noqa: E402 - after the path fix above

from bench import report  # noqa: E402
from odyssey import artifact  # noqa: E402
from odyssey.engine import EngineConfig, GenerationParams, generate  # noqa: E402
from odyssey.model import ModelConfig, Transformer  # noqa: E402

TARGET = 1.5
GENERATE_TOKENS = 64
FORWARD_SHAPES = [(1, 32), (1, 128), (8, 32), (8, 128)]  # (batch, tokens)
GENERATE_SHAPES = [(1, 32), (8, 32)]  # (batch, prompt tokens)


def prompts(batch: int, tokens: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Different lengths in a batch, as real requests have: left padding and masks take part.
    lengths = [tokens - (i * tokens) // (2 * batch) for i in range(batch)]
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in lengths]


class NoText:
    """The engine's tokenizer for random weights: no end-of-text token (each row decodes all its tokens,
    as the figures assume) and no text to build (the bench times the model, as before the engine)."""

    eos_id, pad_id = -1, 0

    def decode(self, ids: list[int]) -> str:
        return ""


def greedy(model: Transformer, rows: list[list[int]], tokens: int) -> list[list[int]]:
    """`tokens` greedy tokens after each row, the rows decoded together (a cache row each)."""
    config = EngineConfig(max_num_seqs=len(rows), max_waiting=len(rows))
    params = GenerationParams(max_tokens=tokens, temperature=0.0)
    return [c.token_ids for c in generate(model, NoText(), rows, params, config)]


def timed(fn, repeats: int) -> float:
    """Median seconds of one call over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8")
SPEEDUPS = (("onnxruntime", "speedup", "float32"), ("onnxruntime-int8", "speedup_int8", "int8"))


def measure(models: dict, rounds: int) -> dict:
    cfg = models["torch"].cfg
    rows = {}
    for kind, shapes in (("forward", FORWARD_SHAPES), ("generate", GENERATE_SHAPES)):
        for batch, tokens in shapes:
            rows_in = prompts(batch, tokens, cfg.vocab_size, seed=batch * 1000 + tokens)
            per_round = {b: [] for b in models}
            for _ in range(rounds):
                for backend, model in models.items():
                    if kind == "forward":
                        call = lambda m=model, r=rows_in: m.embed(r)  # noqa: E731 - one left-padded forward pass
                        repeats = 20 if tokens <= 32 else 8
                    else:
                        call = lambda m=model, r=rows_in: greedy(m, r, GENERATE_TOKENS)  # noqa: E731
                        repeats = 3
                    per_round[backend].append(timed(call, repeats))
            t = {b: statistics.median(v) for b, v in per_round.items()}
            work = batch * (GENERATE_TOKENS if kind == "generate" else tokens)
            row = {"kind": kind, "batch": batch, "tokens": tokens}
            for b in models:
                row[f"{b}_ms"] = round(t[b] * 1e3, 3)
                row[f"{b}_tokens_per_s"] = round(work / t[b])
            for b, key, _ in SPEEDUPS:
                row[key] = round(t["torch"] / t[b], 2)
                row[f"{key}_per_round"] = [round(a / c, 2) for a, c in zip(per_round["torch"], per_round[b])]
            rows[f"{kind} B={batch} T={tokens}"] = row
            print(
                f"  {kind:8} B={batch} T={tokens}: torch {row['torch_ms']:8.2f} ms  ORT {row['onnxruntime_ms']:8.2f} ms "
                f"({row['speedup']}x)  ORT int8 {row['onnxruntime-int8_ms']:8.2f} ms ({row['speedup_int8']}x)"
            )
    return rows


@torch.no_grad()
def int8_error(model: Transformer, int8) -> dict:
    """How far int8 moves the outputs: logits relative to their range, embeddings' cosine, greedy text."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(10, model.cfg.vocab_size, (4, 64), generator=g)
    ref = model(ids)
    rows = prompts(4, 64, model.cfg.vocab_size, seed=7)
    return {
        "logits_max_abs_diff_over_max_abs": round(float((int8(ids) - ref).abs().max() / ref.abs().max()), 4),
        "embedding_min_cosine": round(float((int8.embed(rows) * model.embed(rows)).sum(-1).min()), 5),
        "greedy_64_tokens_equal": greedy(int8, rows, 64) == greedy(model, rows, 64),
    }


def plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [(preset, shape) for preset, rows in figures["presets"].items() for shape in rows]
    y = list(range(len(names)))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for offset, (_, key, label) in zip((-0.2, 0.2), SPEEDUPS):
        values = [figures["presets"][p][s][key] for p, s in names]
        ax.barh([i + offset for i in y], values, height=0.4, label=f"ORT {label}")
    ax.set_yticks(y, [f"{p}: {s}" for p, s in names])
    ax.axvline(1.0, color="grey", lw=1)
    ax.axvline(TARGET, color="red", ls="--", lw=1, label=f"target {TARGET}x")
    ax.set(xlabel="speed-up over torch eager (same thread count)", title="bench/onnx.py")
    ax.invert_yaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--presets", default="tiny,small")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    figures: dict = {
        "threads": args.threads,
        "rounds": args.rounds,
        "generate_tokens": GENERATE_TOKENS,
        "presets": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            torch.manual_seed(0)
            model = Transformer(replace(ModelConfig.from_preset(preset), max_seq_len=256)).eval()
            t = time.perf_counter()
            path = artifact.save_model(Path(tmp) / preset, model, None, onnx=True)
            export_s = time.perf_counter() - t
            path8 = artifact.save_model(
                Path(tmp) / f"{preset}-int8", model, None, onnx=True, onnx_quantize="int8"
            )
            onnx, _, _ = artifact.load(path, "onnxruntime", threads=args.threads)
            int8, _, _ = artifact.load(path8, "onnxruntime", threads=args.threads)
            print(f"{preset}: {model.num_params() / 1e6:.1f} M parameters; ONNX export {export_s:.1f} s")
            models = {"torch": model, "onnxruntime": onnx, "onnxruntime-int8": int8}
            figures["presets"][preset] = measure(models, args.rounds)
            figures.setdefault("int8_error", {})[preset] = int8_error(model, int8)
            figures.setdefault("export_s", {})[preset] = round(export_s, 1)
            figures.setdefault("params_M", {})[preset] = round(model.num_params() / 1e6, 2)
    for _, key, _ in SPEEDUPS:
        values = {
            kind: [r[key] for rows in figures["presets"].values() for r in rows.values() if r["kind"] == kind]
            for kind in ("forward", "generate")
        }
        figures[f"min_{key}"] = {kind: min(v) for kind, v in values.items()}
        figures[f"median_{key}"] = {kind: round(statistics.median(v), 2) for kind, v in values.items()}
    met = {
        f"{kind} {label}": figures[f"median_{key}"][kind] >= TARGET
        for kind in ("forward", "generate")
        for _, key, label in SPEEDUPS
    }
    table = []
    for preset, rows in figures["presets"].items():
        for name, r in rows.items():
            table.append((
                f"{preset} ({figures['params_M'][preset]} M), {name}",
                f"torch {r['torch_ms']} ms; ORT {r['onnxruntime_ms']} ms: **{r['speedup']}x**; "
                f"ORT int8 {r['onnxruntime-int8_ms']} ms: **{r['speedup_int8']}x**",
                "",
            ))  # fmt: skip
    for kind in ("forward", "generate"):
        for _, key, label in SPEEDUPS:
            table.append((
                f"**{kind}, ORT {label}: median over shapes and presets** (min)",
                f"**{figures[f'median_{key}'][kind]}x** ({figures[f'min_{key}'][kind]}x)",
                f">= {TARGET}x: {'met' if met[f'{kind} {label}'] else 'NOT met'}",
            ))  # fmt: skip
    for preset, e in figures["int8_error"].items():
        table.append((
            f"{preset}: what int8 changes (random weights)",
            f"max logit error {e['logits_max_abs_diff_over_max_abs']:.1%} of the largest logit; embedding cosine >= "
            f"{e['embedding_min_cosine']}; 64 greedy tokens identical: {e['greedy_64_tokens_equal']}",
            "",
        ))  # fmt: skip
    notes = (
        f"{args.threads} thread(s) each (a serving replica's num_cpus), {args.rounds} rounds, the backends alternating; "
        f"forward = `embed` of a left-padded batch, generate = prefill + {GENERATE_TOKENS} greedy tokens over the KV "
        "cache. ORT float32 is `odyssey export --format onnx` (agrees with torch to float error); ORT int8 adds "
        "`--quantize int8` (dynamic quantization: int8 weights, activations quantized per call). Plot: onnx.png."
    )
    report.write("onnx", figures, {"speedup": TARGET, "met": met}, table, notes)
    plot(figures, report.RESULTS / "onnx.png")
    print((report.RESULTS / "onnx.md").read_text())


if __name__ == "__main__":
    main()
