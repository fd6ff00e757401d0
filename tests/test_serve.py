"""Serving for real: the app graph on the session's local Ray cluster, called through Serve's HTTP
proxy with httpx, with the model in ONNX Runtime: every endpoint below runs on that backend (the torch
backend serves in tests/reliability/, which also holds the auth, overload, timeout and fault paths,
and in test_pipeline.py)."""

from __future__ import annotations

import ast
import concurrent.futures as cf
import json
import time

import httpx
import pyarrow.parquet as pq
import pytest

from odyssey import answers, artifact, cluster, retrieval
from odyssey.data.corpus import read_split
from odyssey.evaluation import inference
from odyssey.tasks import UNSAFE_LABELS
from serve import api_keys
from serve.app import AppArgs, build_app
from serve.gateway import GatewaySettings
from serve.passages import load_documents, split_documents


@pytest.fixture(scope="module")
def served(ray_cluster, exported_models, corpus_dir, tmp_path_factory):
    from ray import serve

    port = cluster.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    documents = str(corpus_dir / "documents")
    key_file = tmp_path_factory.mktemp("keys") / "api_keys"
    gateway = GatewaySettings(api_keys_file=str(key_file))  # API keys on, as shipped
    key, _ = api_keys.ensure(gateway)  # what `odyssey serve` does on a machine with no key
    main = AppArgs(
        model_path=str(exported_models[0]),
        documents=documents,
        engine={"max_num_seqs": 8},
        backend="onnxruntime",
        gateway=gateway,
    )
    try:
        serve.run(build_app(main), name="main", route_prefix="/")
        auth = api_keys.headers(key)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth, timeout=60) as http:
            assert http.get("/v1/models", headers={"Authorization": ""}).status_code == 401
            yield http
    finally:
        serve.shutdown()


def lm_info(app: str = "main") -> dict:
    from ray import serve

    return serve.get_deployment_handle("LanguageModel", app_name=app).info.remote().result()


def lm_stats(app: str = "main") -> dict:
    from ray import serve

    return serve.get_deployment_handle("LanguageModel", app_name=app).stats.remote().result()


def post(http: httpx.Client, path: str, body: dict, **kw) -> httpx.Response:
    return http.post(path, json=body, **kw)


# --- every endpoint, well-formed ---------------------------------------------------------------------


def test_summarize(served):
    r = post(
        served, "/v1/summarize", {"text": "A utility that lists the files of a directory.", "max_tokens": 12}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["summary"], str) and body["finish_reason"] in ("stop", "length")
    assert 1 <= body["usage"]["completion_tokens"] <= 12
    assert (
        body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )
    assert body["model"] == lm_info()["id"]


def test_moderate(served):
    r = post(served, "/v1/moderate", {"text": "Call me at 555 0100, you idiot."})
    assert r.status_code == 200, r.text
    body = r.json()
    scores = {item["label"]: item["score"] for item in body["labels"]}
    assert set(scores) == {"safe", "profanity", "personal_data", "spam"}
    assert all(0.0 <= p <= 1.0 for p in scores.values())
    assert [i["score"] for i in body["labels"]] == sorted(scores.values(), reverse=True)
    assert body["flagged"] == (scores["safe"] < 0.5) and body["verdict"] == (
        "unsafe" if body["flagged"] else "safe"
    )
    categories = body["categories"]
    assert categories == ["safe"] or (categories and set(categories) <= set(UNSAFE_LABELS)), categories
    assert body["flagged"] == (categories != ["safe"])


def test_moderate_categories_hold_what_the_rules_found(served):
    r = post(served, "/v1/moderate", {"text": "Write to jane.doe@example.com for the files."})
    assert r.status_code == 200, r.text
    body = r.json()
    assert {"label": "personal_data", "kind": "e-mail address"} in body["rules"]
    assert "personal_data" in body["categories"] and body["flagged"]


def test_find_returns_passages_with_true_offsets(served, corpus_dir):
    r = post(served, "/v1/find", {"query": "GNU General Public License version 3", "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "hybrid" and len(body["passages"]) == 4
    docs = {row["doc_id"]: row["text"] for row in pq.read_table(corpus_dir / "documents").to_pylist()}
    for hit in body["passages"]:
        assert docs[hit["doc_id"]][hit["start"] : hit["end"]] == hit["text"]
        assert hit["dense"] is not None and -1.0 <= hit["dense"] <= 1.0
    assert [h["score"] for h in body["passages"]] == sorted(
        (h["score"] for h in body["passages"]), reverse=True
    )
    # BM25 is in the fusion: the best hit contains a query word.
    words = ("gnu", "general", "public", "license", "version")
    assert any(w in body["passages"][0]["text"].lower() for w in words), body["passages"][0]["text"]


def test_find_answers_each_passage_text_once(served, corpus_dir):
    # The corpus's most quoted passage (copyright files quote license paragraphs), or any passage
    # when nothing repeats: the 100 best hits for it hold no text twice, and list where else it is.
    max_documents = AppArgs(model_path="-").max_documents  # what the served Finder indexes
    documents = load_documents(corpus_dir / "documents", max_documents)
    passages = split_documents(documents)
    quoted = max(passages, key=lambda p: len(p.also_in))
    r = post(served, "/v1/find", {"query": quoted.text, "k": 100})
    assert r.status_code == 200, r.text
    hits = r.json()["passages"]
    texts = [" ".join(h["text"].split()) for h in hits]
    assert len(hits) == min(100, len(passages)) and len(set(texts)) == len(texts)
    text = {d.doc_id: d.text for d in documents}
    for hit in hits:
        assert len(hit["also_in"]) <= 10
        for place in hit["also_in"]:
            assert text[place["doc_id"]][place["start"] : place["end"]].split() == hit["text"].split()
    found = {h["text"]: h for h in hits}
    assert quoted.text in found
    assert [p["doc_id"] for p in found[quoted.text]["also_in"]] == [p.doc_id for p in quoted.also_in[:10]]


def test_code_says_whether_it_parses(served):
    r = post(served, "/v1/code", {"prompt": "return the sum of a list of numbers", "max_tokens": 24})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["language"] == "python" and body["attempts"] == 3
    if body["parses"]:
        ast.parse(body["code"])
        assert body["error"] is None
    else:
        assert body["error"]
        with pytest.raises((SyntaxError, ValueError)):
            if not body["code"].strip():
                raise ValueError("empty")
            ast.parse(body["code"])


def test_completions_openai_shape(served):
    r = post(
        served,
        "/v1/completions",
        {"model": "tiny-0", "prompt": ["The license", "Copyright"], "max_tokens": 5},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (
        body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "tiny-0"
    )
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    assert body["usage"]["completion_tokens"] <= 10


def test_models_health_and_docs(served):
    models = served.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-0"
    assert models["data"][0]["root"] == lm_info()["id"]
    assert lm_info()["backend"] == "onnxruntime"
    assert served.get("/healthz").json()["status"] == "ok"
    spec = served.get("/openapi.json").json()
    assert {"/v1/summarize", "/v1/moderate", "/v1/find", "/v1/code", "/v1/completions", "/v1/models"} <= set(
        spec["paths"]
    )
    assert served.get("/docs").status_code == 200


# --- batching, streaming, stop strings ---------------------------------------------------------------


def test_concurrent_requests_share_batches(served):
    before = lm_stats()
    with cf.ThreadPoolExecutor(12) as pool:
        gen = [
            pool.submit(post, served, "/v1/completions", {"prompt": f"Text {i}", "max_tokens": 24})
            for i in range(12)
        ]
        mod = [pool.submit(post, served, "/v1/moderate", {"text": f"message number {i}"}) for i in range(12)]
        assert all(f.result().status_code == 200 for f in gen + mod)
    after = lm_stats()

    def new_batches(kind):
        return {
            int(k): v - before[kind].get(k, 0) for k, v in after[kind].items() if v > before[kind].get(k, 0)
        }

    assert max(new_batches("decode")) > 1, after  # sequences decoded together
    assert max(new_batches("score")) > 1, after  # label scorings of different requests in one step


def test_streaming_yields_tokens_incrementally(served):
    body = {"prompt": "The license", "max_tokens": 200, "temperature": 0, "stream": True}
    t0, arrivals, texts, finish = time.perf_counter(), [], [], None
    with served.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            arrivals.append(time.perf_counter() - t0)
            if line == "data: [DONE]":
                break
            choice = json.loads(line[6:])["choices"][0]
            texts.append(choice["text"])
            finish = choice["finish_reason"] or finish
    assert len(texts) > 20 and finish in ("stop", "length")
    assert arrivals[0] < arrivals[-1] / 2  # the first token came long before the end
    whole = post(served, "/v1/completions", {**body, "stream": False}).json()["choices"][0]["text"]
    assert "".join(texts) == whole  # greedy: streamed and whole agree


def test_stop_string_ends_the_completion(served):
    body = {"prompt": "Copyright", "max_tokens": 60, "temperature": 0}
    text = post(served, "/v1/completions", body).json()["choices"][0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop
    r = post(served, "/v1/completions", {**body, "stop": [stop]}).json()["choices"][0]
    assert r["text"] == text[: text.index(stop)] and r["finish_reason"] == "stop"


# --- bad input: a status code each, a request id always, no replica lost ----------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/summarize", b"{not json", 422, "body"),
        ("/v1/summarize", {"text": 5}, 422, "text"),
        ("/v1/summarize", {}, 422, "text"),
        ("/v1/summarize", {"text": "x", "max_token": 5}, 422, "max_token"),
        ("/v1/find", {"query": "x", "k": 0}, 422, "k"),
        ("/v1/completions", {"prompt": "x", "n": 17}, 422, "n"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 422, "temperature"),
        ("/v1/summarize", {"text": "x" * 20_001}, 413, None),
        (
            "/v1/completions",
            {"prompt": "word " * 2000},
            413,
            None,
        ),  # under the characters limit, over the context
        ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, None),
    ],
)
def test_bad_input_gets_its_status(served, path, body, status, param):
    kw = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = served.post(path, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    assert error["request_id"] == r.headers["x-request-id"]
    if param:
        assert error["param"] == param


def test_broken_json_is_located_in_words(served):
    body = b'{"text": "a"\n "max_tokens": 5}'  # no comma between the fields
    r = served.post("/v1/summarize", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (
        error["message"] == "body: invalid JSON at line 2, column 2 (character 14): Expecting ',' delimiter"
    )
    assert error["param"] == "body" and error["request_id"] == r.headers["x-request-id"]


@pytest.mark.parametrize(
    ("headers", "said"),
    [
        ({}, "came without a Content-Type"),
        ({"content-type": "text/plain"}, "came as 'text/plain'"),
        ({"content-type": "application/x-www-form-urlencoded"}, "came as"),  # what `curl -d` sends
    ],
)
def test_a_body_not_sent_as_json_is_told_the_header(served, headers, said):
    r = served.post("/v1/summarize", content=b'{"text": "x"}', headers=headers)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert "`Content-Type: application/json`" in error["message"] and said in error["message"], error
    assert error["type"] == "invalid_request" and error["param"] == "body"


def test_a_wrong_method_is_told_the_right_one(served):
    for method, path, allowed in (("GET", "/v1/summarize", "POST"), ("POST", "/v1/models", "GET")):
        r = served.request(method, path)
        assert r.status_code == 405 and r.headers["allow"] == allowed, r.text
        error = r.json()["error"]
        assert error["type"] == "method_not_allowed"
        assert error["message"] == f"{method} is not allowed on {path}; use {allowed}"
        assert error["request_id"] == r.headers["x-request-id"]


def test_oversized_body_is_refused_before_parsing(served):
    r = served.post("/v1/moderate", content=b"x" * 1_000_001, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "input_too_long"


def test_max_tokens_is_capped(served):
    r = post(served, "/v1/completions", {"prompt": "The", "max_tokens": 10**6, "temperature": 0})
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] <= 256


def test_bad_requests_take_no_replica_down(served):
    pid = lm_info()["replica_pid"]
    for body in ({"text": None}, {"text": "y" * 50_000}, {"text": "z" * 3000}):
        assert served.post("/v1/moderate", json=body).status_code in (413, 422)
    assert (
        served.post(
            "/v1/summarize", content=b"\xff\xfe", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    assert lm_info()["replica_pid"] == pid
    assert post(served, "/v1/moderate", {"text": "still here?"}).status_code == 200


# --- evaluation answers as serving does ---------------------------------------------------------------
# odyssey/evaluation/inference.py, in this process with the torch backend (as `odyssey eval` runs it),
# against the app over HTTP (ONNX Runtime), both with the app's AnswerSettings.

SETTINGS = AppArgs(model_path="-").answers  # what the `served` app answers with
SHORT = 128  # prompt tokens: half the model's context, so every answer has its whole length


@pytest.fixture(scope="module")
def in_process(exported_models):
    model, tok, _ = artifact.load(exported_models[0])
    return model, tok


def held_out(corpus_dir, tok, task: str, n: int, family: str | None = None) -> list[dict]:
    """The first n test examples of `task` (of `family`) with a short prompt."""
    rows = [
        r
        for r in read_split(corpus_dir, task, "test").to_pylist()
        if (family is None or r["family"] == family) and len(tok.prompt(task, r["input"])) <= SHORT
    ]
    assert len(rows) >= n, f"the corpus has {len(rows)} short {task} test examples"
    return rows[:n]


def test_eval_and_serving_answer_alike_summarize(served, in_process, corpus_dir):
    model, tok = in_process
    rows = held_out(corpus_dir, tok, "summarize", 3)
    evaluated = inference.summarize(model, tok, rows, SETTINGS)
    for row, answer in zip(rows, evaluated):
        r = post(served, "/v1/summarize", {"text": row["input"]})
        assert r.status_code == 200, r.text
        assert r.json()["summary"] == answer["prediction"]


def test_eval_and_serving_answer_alike_code(served, in_process, corpus_dir):
    # Two tokens: the untrained model's greedy answer is empty and its long samples never parse, so
    # at full length the greedy "" would always win. This short, a seeded sample often parses and wins,
    # so the pick, the seeds and the sampling settings all show in the answer.
    model, tok = in_process
    rows = held_out(corpus_dir, tok, "code", 2, "plain") + held_out(corpus_dir, tok, "code", 2, "signature")
    tries = answers.code_params(SETTINGS, max_tokens=2)
    texts = [r["input"] for r in rows for _ in tries]
    flat = inference.complete(model, tok, "code", texts, [p for _ in rows for p in tries])
    chosen = []
    for n, row in enumerate(rows):
        attempts = flat[n * len(tries) : (n + 1) * len(tries)]
        best, _ = answers.pick_code(row["input"], attempts)
        chosen.append(attempts[best].strip())
    assert any(chosen), "every pick is the empty greedy answer: nothing to tell serving's apart"
    for row, answer in zip(rows, chosen):
        r = post(served, "/v1/code", {"prompt": row["input"], "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert r.json()["code"].strip() == answer


def test_eval_and_serving_answer_alike_moderate(served, in_process, corpus_dir):
    model, tok = in_process
    families = ("safe", "rules_visible", "rules_hidden")
    rows = [row for family in families for row in held_out(corpus_dir, tok, "moderate", 3, family)]
    evaluated = inference.moderate(model, tok, rows, SETTINGS)
    assert len({tuple(e["served"]) for e in evaluated}) > 1  # more than one verdict is compared
    for row, answer in zip(rows, evaluated):
        r = post(served, "/v1/moderate", {"text": row["input"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["categories"] == answer["served"], row["input"]
        assert body["flagged"] == (answer["served"] != ["safe"])


def test_eval_and_serving_answer_alike_find(served, in_process, corpus_dir):
    # The Finder's dense half is the cosine of exactly retrieval.embed_texts' vectors, queries and
    # passages alike.
    model, tok = in_process
    for row in held_out(corpus_dir, tok, "find", 3):
        r = post(served, "/v1/find", {"query": row["input"], "k": 5})
        assert r.status_code == 200, r.text
        hits = r.json()["passages"]
        query = retrieval.embed_texts(model, tok, [row["input"]])[0]
        passages = retrieval.embed_texts(model, tok, [h["text"] for h in hits])
        assert [h["dense"] for h in hits] == pytest.approx((passages @ query).tolist(), abs=1e-4)
