"""lm-evaluation-harness against Odyssey, both ways users run it, on the same weights: `lm_eval --model
local-completions` against the served app's /v1/completions (real Serve HTTP, API key on, torch backend),
and `lm_eval --model hf` on the Hugging Face export of those weights (odyssey.hf.save_pretrained, loaded
by transformers). Each is the real `lm_eval` CLI in a subprocess, offline, on two tasks of its own that
this module writes (YAML + a local JSON lines file, found through `--include_path`): a log-likelihood
multiple choice and a `generate_until`, on the corpus' `summarize` examples.

The model is the session's random-init tiny model after a few seconds of training on exactly these
examples, so that it has something to say (it picks the right summary, and writes summaries up to the
newline that ends them). Both runs feed the same token ids (<|bos|>, then the text): the HF tokenizer
on both sides, token-id prompts to the server. So the accuracies must agree exactly, every choice's
log-likelihood within 1e-3 (and within 1e-3 of odyssey's own model), and greedy generations must be
the same text.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from odyssey import artifact, cluster
from odyssey.data.corpus import read_split
from serve import api_keys
from serve.app import AppArgs, build_app
from serve.gateway import GatewaySettings

pytestmark = pytest.mark.slow

CHOICE, GEN = "odyssey_summary_choice", "odyssey_summary_gen"
MODEL_NAME = "odyssey-tiny"  # the served model's name (its directory's), `model=` for local-completions
N_CHOICE, N_GEN = 20, 4
TRAIN_STEPS = 50  # at lr 3e-3: every right summary ahead by > 4 nats, every short one written out

# A task is YAML beside its data; lm_eval finds it through --include_path. `dataset_path: json` with
# `data_files` is Hugging Face datasets' local JSON loader: nothing is downloaded.
CHOICE_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{text}}}}\\nSummary:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
GEN_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{text}}}}\\nSummary:"
doc_to_target: " {{{{summary}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def summaries(corpus_dir, tokenizer) -> tuple[list[dict], list[dict]]:
    """The multiple-choice items (each summary with 1-3 others' as distractors, the right one at a
    varying place) and the generation items (summaries of at most 6 tokens, so that the newline after
    them falls within max_gen_toks): short training examples with distinct one-line summaries."""
    rows = read_split(corpus_dir, "summarize", "train", ["input", "target"]).to_pylist()
    seen, pool = set(), []
    for r in rows:
        target, n_in = r["target"].strip(), len(tokenizer.encode(r["input"]))
        if target and "\n" not in target and target not in seen and n_in <= 48:
            seen.add(target)
            pool.append({"text": r["input"], "summary": target, "n": len(tokenizer.encode(target))})
    short = [p for p in pool if p["n"] <= 24][:N_CHOICE]
    gen = [p for p in pool if p["n"] <= 6 and p not in short][:N_GEN]
    assert len(short) == N_CHOICE and len(gen) == N_GEN, "the tiny corpus has fewer short summaries"
    choice = []
    for i, item in enumerate(short):
        n = 2 + i % 3
        others = [short[(i + k) % N_CHOICE]["summary"] for k in range(1, n)]
        label = i % n
        choices = [*others[:label], item["summary"], *others[label:]]
        choice.append({"text": item["text"], "choices": choices, "label": label})
    return choice, [{"text": g["text"], "summary": g["summary"]} for g in gen]


@pytest.fixture(scope="module")
def items(corpus_dir, tokenizer):
    return summaries(corpus_dir, tokenizer)


@pytest.fixture(scope="module")
def tasks_dir(items, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    for task, template, rows in ((CHOICE, CHOICE_YAML, items[0]), (GEN, GEN_YAML, items[1])):
        data = out / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (out / f"{task}.yaml").write_text(template.format(task=task, data=json.dumps(str(data))))
    return out


@pytest.fixture(scope="module")
def trained(exported_models, items, tmp_path_factory) -> tuple[Path, Path]:
    """The session's first random-init model, trained briefly on the tasks' own texts in the format the
    tasks ask in, saved as Odyssey serves it and as Hugging Face loads it: (model dir, HF dir)."""
    from odyssey import hf

    model, tokenizer, _ = artifact.load(exported_models[0])
    choice, gen = items
    texts = [f"{c['text']}\nSummary: {c['choices'][c['label']]}\n" for c in choice]
    texts += [f"{g['text']}\nSummary: {g['summary']}\n" for g in gen]
    rows = [[*tokenizer.prompt("lm", t), tokenizer.eos_id] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_id)
    mask = torch.zeros(len(rows), width - 1)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row) - 1] = 1
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(TRAIN_STEPS):
        loss = model(ids[:, :-1], ids[:, 1:], mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    out = tmp_path_factory.mktemp("lm_eval_models")
    path = artifact.save_model(out / MODEL_NAME, model, tokenizer)
    return path, hf.save_pretrained(model, tokenizer, out / f"{MODEL_NAME}-hf")


@pytest.fixture(scope="module")
def served(ray_cluster, trained, corpus_dir, tmp_path_factory):
    """The app serving the trained model (torch backend, API keys on as shipped): (base URL, key)."""
    from ray import serve

    port = cluster.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    gateway = GatewaySettings(api_keys_file=str(tmp_path_factory.mktemp("keys") / "api_keys"))
    key, _ = api_keys.ensure(gateway)
    args = AppArgs(
        model_path=str(trained[0]),
        documents=str(corpus_dir / "documents"),
        engine={"max_num_seqs": 8},
        gateway=gateway,
    )
    try:
        serve.run(build_app(args), name="main", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        models = httpx.get(f"{base}/v1/models", headers=api_keys.headers(key), timeout=60).json()
        assert models["data"][0]["id"] == MODEL_NAME, models
        yield base, key
    finally:
        serve.shutdown()


def lm_eval(model: str, model_args: dict, flags: list[str], tasks_dir: Path, out: Path, env: dict):
    """`lm_eval run` as a user types it, offline, logging every sample under `out`: the process."""
    command = [
        f"{Path(sys.executable).parent}/lm_eval", "run", "--model", model,
        "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()),
        "--include_path", str(tasks_dir), "--tasks", CHOICE, GEN,
        "--output_path", str(out), "--log_samples", *flags,
    ]  # fmt: skip
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(out / "hf-home"),  # the datasets cache too: nothing outside the test's tmp dir
        **env,
    }
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(run: subprocess.Popen, out: Path) -> dict:
    """A run's results and its samples by task and doc_id; its output in the message if it failed."""
    try:
        output, _ = run.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        run.kill()
        output, _ = run.communicate()
        pytest.fail(f"lm_eval ran over 300 s:\n{output[-6000:]}")
    assert run.returncode == 0, output[-6000:]
    (results_file,) = out.glob("*/results_*.json")
    results = json.loads(results_file.read_text())
    samples = {}
    for task in (CHOICE, GEN):
        (file,) = out.glob(f"*/samples_{task}_*.jsonl")
        records = [json.loads(line) for line in file.read_text().splitlines()]
        samples[task] = {r["doc_id"]: r for r in records}
    return {"results": results["results"], "samples": samples}


@pytest.fixture(scope="module")
def evaluations(served, trained, tasks_dir, tmp_path_factory) -> dict:
    """Both lm_eval runs, side by side: {"api": ..., "hf": ...}."""
    base, key = served
    hf_dir = trained[1]
    args = {
        # The server's own completions endpoint, fed token ids from the export's tokenizer: the ids the
        # hf run feeds, <|bos|> first (the server adds nothing to token-id prompts).
        "api": {
            "model": MODEL_NAME,
            "base_url": f"{base}/v1/completions",
            "tokenizer_backend": "huggingface",
            "tokenizer": hf_dir,
            "tokenized_requests": True,
            "add_bos_token": True,
            "max_length": 256,
        },
        "hf": {"pretrained": hf_dir, "dtype": "float32", "add_bos_token": True},
    }
    # Up to 16 prompts per request (the server's limit); hf one at a time, without padding.
    flags = {"api": ["--batch_size", "16"], "hf": ["--batch_size", "1", "--device", "cpu"]}
    env = {"api": {"OPENAI_API_KEY": key}, "hf": {}}  # local-completions sends it as the Bearer token
    kinds = {"api": "local-completions", "hf": "hf"}
    outs = {name: tmp_path_factory.mktemp(f"lm_eval_{name}") for name in args}
    runs = {
        name: lm_eval(kinds[name], args[name], flags[name], tasks_dir, outs[name], env[name]) for name in args
    }
    try:
        return {name: finished(runs[name], outs[name]) for name in args}
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
                run.wait()


def loglikelihoods(evaluation: dict) -> dict[int, list[float]]:
    """Each multiple-choice item's log-likelihood of each choice, in the item's choice order."""
    return {
        doc_id: [float(ll) for ll, _ in r["filtered_resps"]]
        for doc_id, r in evaluation["samples"][CHOICE].items()
    }


def generations(evaluation: dict) -> dict[int, str]:
    return {doc_id: r["filtered_resps"][0] for doc_id, r in evaluation["samples"][GEN].items()}


def test_hf_export_scores_what_odyssey_scores(evaluations, trained, items, tokenizer):
    """The hf run, item by item, against odyssey's own model on the ids lm-eval builds (<|bos|>,
    context, continuation): the export computes the same numbers, and the model learned the task."""
    hf = evaluations["hf"]
    lls = loglikelihoods(hf)
    choice, _ = items
    assert sorted(lls) == list(range(N_CHOICE))
    model, _, _ = artifact.load(trained[0])
    for doc_id, item in enumerate(choice):
        assert len(lls[doc_id]) == len(item["choices"])
        context = f"{item['text']}\nSummary:"
        n_context = len(tokenizer.prompt("lm", context))
        for option, got in zip(item["choices"], lls[doc_id]):
            ids = tokenizer.prompt("lm", f"{context} {option}")
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
            want = sum(logprobs[i - 1, ids[i]].item() for i in range(n_context, len(ids)))
            assert math.isclose(got, want, abs_tol=1e-3), (doc_id, option, got, want)
    assert hf["results"][CHOICE]["acc,none"] >= 0.9  # trained on these very summaries
    outputs = generations(hf)
    assert sorted(outputs) == list(range(N_GEN)) and all(outputs.values()), outputs


def test_gateway_loglikelihoods_match_hf(evaluations):
    api, hf = evaluations["api"], evaluations["hf"]
    assert api["results"][CHOICE]["acc,none"] == hf["results"][CHOICE]["acc,none"]
    api_lls, hf_lls = loglikelihoods(api), loglikelihoods(hf)
    assert sorted(api_lls) == sorted(hf_lls) == list(range(N_CHOICE))
    for doc_id in hf_lls:
        assert len(api_lls[doc_id]) == len(hf_lls[doc_id])
        for a, h in zip(api_lls[doc_id], hf_lls[doc_id]):
            assert math.isfinite(a) and abs(a - h) <= 1e-3, (doc_id, api_lls[doc_id], hf_lls[doc_id])
        # The same choice wins (what acc counts), item by item; and is_greedy (the server's top_logprobs
        # against its token_logprobs, hf's argmax) agrees choice by choice.
        api_doc, hf_doc = api["samples"][CHOICE][doc_id], hf["samples"][CHOICE][doc_id]
        assert api_doc["acc"] == hf_doc["acc"], doc_id
        greedy = [[g for _, g in doc["filtered_resps"]] for doc in (api_doc, hf_doc)]
        assert greedy[0] == greedy[1], (doc_id, greedy)


def test_gateway_generations_match_hf(evaluations, items):
    api, hf = generations(evaluations["api"]), generations(evaluations["hf"])
    assert sorted(api) == sorted(hf) == list(range(N_GEN))
    assert all(isinstance(t, str) and t for t in api.values()), api
    assert all("\n" not in t for t in api.values()), api  # the stop string ends it, and is not returned
    assert api == hf  # greedy decoding of the same weights on the same ids
    # The model writes at least one summary out to the newline after it, within max_gen_toks: that
    # stop string, not the length, ended the generation on both sides.
    _, gen = items
    assert any(api[i] == f" {g['summary']}" for i, g in enumerate(gen)), (api, gen)
    assert (
        evaluations["api"]["results"][GEN]["exact_match,none"]
        == evaluations["hf"]["results"][GEN]["exact_match,none"]
    )
