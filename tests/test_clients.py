"""The OpenAI surface as real clients use it: the `openai` SDK and LangChain (`langchain-openai`) against
the app through Serve's HTTP proxy, API keys on as shipped. What the clients get is checked against the
model run in this process (the same weights): token counts, log-probabilities, embeddings, greedy text."""

from __future__ import annotations

import math

import numpy as np
import openai
import pytest

from odyssey import artifact, chat, cluster, engine, retrieval
from serve import api_keys
from serve.app import AppArgs, build_app
from serve.gateway import GatewaySettings

PROMPT = "The package provides a library for reading"


@pytest.fixture(scope="module")
def app(ray_cluster, exported_models, corpus_dir, tmp_path_factory):
    from ray import serve

    port = cluster.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    gateway = GatewaySettings(api_keys_file=str(tmp_path_factory.mktemp("keys") / "api_keys"))
    key, _ = api_keys.ensure(gateway)
    args = AppArgs(
        model_path=str(exported_models[0]),
        documents=str(corpus_dir / "documents"),
        engine={"max_num_seqs": 8},
        gateway=gateway,
    )
    try:
        serve.run(build_app(args), name="clients", route_prefix="/")
        yield {"base_url": f"http://127.0.0.1:{port}/v1", "key": key}
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(app):
    with openai.OpenAI(base_url=app["base_url"], api_key=app["key"], max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def name(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def local(exported_models):
    model, tok, _ = artifact.load(exported_models[0])
    return model, tok


def greedy(local, ids: list[int], max_tokens: int, stop=()) -> engine.Completion:
    model, tok = local
    params = engine.GenerationParams(max_tokens=max_tokens, temperature=0.0, stop=tuple(stop))
    return engine.generate(model, tok, [ids], params)[0]


# --- models and completions ---------------------------------------------------------------------------


def test_models_list_the_model_and_its_tasks(client, name):
    ids = [m.id for m in client.models.list().data]
    assert ids == [name, *(f"{name}:{task}" for task in chat.CHAT_TASKS)]


def test_completion_plain_stream_and_list(client, name, local):
    tok = local[1]
    ids = tok.prompt("lm", PROMPT)
    expected = greedy(local, ids, 12)
    plain = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0)
    assert plain.choices[0].text == expected.text
    assert plain.usage.prompt_tokens == len(ids)
    assert plain.usage.completion_tokens == expected.completion_tokens  # an end-of-text token counts

    chunks = list(
        client.completions.create(
            model=name,
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()

    both = client.completions.create(model=name, prompt=[PROMPT, "A tool that"], max_tokens=5, temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == greedy(local, ids, 5).text
    assert both.usage.prompt_tokens == len(ids) + len(tok.prompt("lm", "A tool that"))


def test_n_choices_share_a_prompt_and_count_exactly(client, name):
    out = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, n=2, seed=7, temperature=1.0)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].text != out.choices[1].text  # seeds 7 and 8
    again = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, n=2, seed=7, temperature=1.0)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    logprobs = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, n=2, seed=7, logprobs=0)
    # every generated token is counted once, the prompt once for both choices
    assert logprobs.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in logprobs.choices)


def test_logprobs_are_the_models(client, name, local):
    model, tok = local
    ids = tok.prompt("lm", PROMPT)
    out = client.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    expected = greedy(local, ids, 6)
    generated = expected.token_ids
    scored = engine.score(model, tok, ids, [generated])[0]
    assert math.isclose(sum(lp.token_logprobs), scored, abs_tol=1e-3)
    for token, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and token == max(top.values())  # greedy: the picked token is the likeliest
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_echo_with_max_tokens_0_scores_the_prompt(client, name, local):
    """What lm-evaluation-harness sends for log-likelihood tasks, as token ids."""
    model, tok = local
    ids = tok.prompt("lm", PROMPT)
    out = client.completions.create(model=name, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    choice = out.choices[0]
    assert choice.text == PROMPT and out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    per_token = engine.score(model, tok, ids[:3], [ids[3:]])[0]
    assert math.isclose(sum(lp.token_logprobs[3:]), per_token, abs_tol=1e-3)
    assert "".join(lp.tokens[1:]) == PROMPT  # byte-level tokens of ASCII text spell it exactly

    text = client.completions.create(model=name, prompt=PROMPT, max_tokens=4, echo=True, temperature=0)
    assert text.choices[0].text == PROMPT + greedy(local, ids, 4).text


# --- chat ----------------------------------------------------------------------------------------------


MESSAGES = [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "What does the package provide? <|eos|>"},
]


def test_chat_plain(client, name, local):
    tok = local[1]
    ids = chat.chat_ids(tok, MESSAGES)
    assert tok.eos_id not in ids  # "<|eos|>" in a message is text
    out = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=10, temperature=0)
    expected = greedy(local, ids, 10, stop=chat.TURN_STOPS)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected.text
    assert out.usage.prompt_tokens == len(ids)

    code = client.chat.completions.create(
        model=f"{name}:code",
        messages=[{"role": "user", "content": "sort a list"}],
        max_tokens=8,
        temperature=0,
    )
    assert code.model == f"{name}:code"
    code_ids = chat.chat_ids(tok, [{"role": "user", "content": "sort a list"}], "code")
    assert code_ids == tok.prompt("code", "sort a list")  # the task's own format
    assert code.choices[0].message.content == greedy(local, code_ids, 8).text


def test_chat_stream_with_usage(client, name):
    whole = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=name,
            messages=MESSAGES,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in with_choices[:-1]] == [None] * (len(with_choices) - 1)
    assert with_choices[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_chat_logprobs(client, name):
    out = client.chat.completions.create(
        model=name, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob == t.top_logprobs[0].logprob for t in content)


# --- embeddings ----------------------------------------------------------------------------------------


def test_embeddings_are_the_models(client, name, local):
    model, tok = local
    texts = ["a library for reading files", "the GNU General Public License"]
    out = client.embeddings.create(model=name, input=texts)  # the SDK asks for base64 and decodes it
    vectors = np.array([d.embedding for d in out.data])
    expected = retrieval.embed_texts(model, tok, texts)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    floats = client.embeddings.create(model=name, input=texts[0], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, expected[0], atol=1e-5)
    assert out.usage.prompt_tokens == sum(
        len(retrieval.embed_ids(tok, t, model.cfg.max_seq_len)) for t in texts
    )


# --- errors as typed SDK exceptions --------------------------------------------------------------------


def test_errors_are_typed(client, name):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi")
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.completions.create(model=name, prompt="hi", best_of=2)
    assert e.value.body["param"] == "best_of"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model=name, messages=MESSAGES, presence_penalty=0.5)
    assert e.value.body["param"] == "presence_penalty"
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=name, prompt="word " * 5000, max_tokens=1)
    assert e.value.status_code == 413
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0).models.list()


# --- LangChain -----------------------------------------------------------------------------------------


def test_langchain(app, name):
    from langchain_openai import ChatOpenAI, OpenAI, OpenAIEmbeddings

    common = {"base_url": app["base_url"], "api_key": app["key"], "max_retries": 0}
    llm = OpenAI(model=name, max_tokens=8, temperature=0, **common)
    assert isinstance(llm.invoke(PROMPT), str)

    chat_model = ChatOpenAI(model=name, max_tokens=8, temperature=0, **common)
    reply = chat_model.invoke("What does the package provide?")
    streamed = "".join(part.content for part in chat_model.stream("What does the package provide?"))
    assert reply.content == streamed
    assert reply.usage_metadata["output_tokens"] >= 1

    embeddings = OpenAIEmbeddings(model=name, check_embedding_ctx_length=False, **common)
    vectors = embeddings.embed_documents(["a library", "a license"])
    assert len(vectors) == 2 and all(abs(np.linalg.norm(v) - 1) < 1e-4 for v in vectors)
