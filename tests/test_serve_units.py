"""The serving pieces without Ray: a request's room in the context, text streaming with stop strings,
the passage index, moderation's label arithmetic, the code check, the gateway's error messages, and
config validation."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace

import pytest
import torch
from pydantic import ValidationError

from odyssey.code_checks import completion_error, syntax_error
from odyssey.data.schema import Document
from odyssey.engine import GenerationParams, TextStream, generate
from odyssey.errors import OdysseyError
from odyssey.model import Transformer, pad_vocab, tiny
from odyssey.tasks import ANSWERS, label_probabilities
from serve import api_keys
from serve.app import AppArgs
from serve.gateway import GatewaySettings, invalid_request, is_json
from serve.passages import PassageIndex, load_documents, split_documents


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return Transformer(replace(tiny(), vocab_size=pad_vocab(tokenizer.vocab_size), max_seq_len=128)).eval()


# --- generation ----------------------------------------------------------------------------------------
# (Batching, per-request settings and stop strings: tests/test_engine.py.)


def test_a_short_prompt_keeps_its_room_beside_a_long_one(model, tokenizer):
    """Each sequence may decode up to the context minus its own prompt, whatever runs beside it: a short
    request beside a long one gets the same answer as alone, up to the end of the context."""
    short = tokenizer.prompt("lm", "The")
    long = (tokenizer.prompt("lm", "Copyright (C) 2020 the authors. " * 40))[:100]
    room = model.cfg.max_seq_len
    params = [GenerationParams(max_tokens=room - len(p), temperature=0.0) for p in (short, long)]
    together = generate(model, tokenizer, [short, long], params)
    alone = generate(model, tokenizer, [short], params[:1])
    assert together[0] == alone[0]


def test_generation_params_refuse_what_makes_no_sense():
    with pytest.raises(ValueError, match="max_tokens"):
        GenerationParams(max_tokens=-1)
    with pytest.raises(ValueError, match="logprobs"):
        GenerationParams(max_tokens=1, logprobs=21)
    with pytest.raises(ValueError, match="top_p"):
        GenerationParams(max_tokens=1, top_p=0.0)


class _CharTokenizer:
    """A stand-in tokenizer whose ids are UTF-8 bytes, so that characters split across tokens."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def feed(text: str, stop=()) -> tuple[list[str], TextStream]:
    stream = TextStream(_CharTokenizer(), tuple(stop))
    pieces = []
    for b in text.encode():
        pieces.append(stream.push(b))
        if stream.stopped:
            break
    else:
        pieces.append(stream.flush())
    return pieces, stream


def test_text_stream_never_emits_half_a_character():
    pieces, _ = feed("héllo ☃ wörld")
    assert "".join(pieces) == "héllo ☃ wörld"
    assert all("\ufffd" not in p for p in pieces)


def test_text_stream_stops_before_the_stop_string_across_tokens():
    pieces, stream = feed("alpha beta\n\ngamma", stop=["\n\n", "zeta"])
    assert "".join(pieces) == "alpha beta" and stream.stopped
    pieces, stream = feed("a partial ze then more", stop=["zeta"])  # a prefix that never completes
    assert "".join(pieces) == "a partial ze then more" and not stream.stopped


# --- passages --------------------------------------------------------------------------------------------


DOCS = [
    Document(
        "d1", "Apache", "Apache License\n\n" + "You may reproduce and distribute copies of the Work. " * 3
    ),
    Document("d2", "Cats", "Cats are small domesticated carnivorous mammals that purr and sleep a lot. " * 2),
    Document("d3", "GPL", "The GNU General Public License is a free, copyleft license for software. " * 2),
]


def test_passages_carry_true_offsets():
    passages = split_documents(DOCS)
    text = {d.doc_id: d.text for d in DOCS}
    assert passages and all(text[p.doc_id][p.start : p.end] == p.text for p in passages)


def test_hybrid_search_fuses_words_and_vectors():
    index = PassageIndex(split_documents(DOCS))
    hits = index.search("copyleft license", k=2)
    assert hits[0].passage.doc_id == "d3" and hits[0].dense is None  # BM25 alone without vectors
    vectors = torch.eye(len(index))[:, :8] if len(index) <= 8 else torch.eye(len(index))
    index.set_vectors(vectors, "m@1")
    cats = next(i for i, p in enumerate(index.passages) if p.doc_id == "d2")
    # A query with no word in common, whose vector points at the cats passage: found by the dense side.
    hybrid = index.search("feline pets", k=1, query_vector=vectors[cats], model_id="m@1")
    assert hybrid[0].passage.doc_id == "d2" and hybrid[0].dense == pytest.approx(1.0)
    # A vector from another model is not compared with this index's vectors.
    assert index.search("feline pets", k=1, query_vector=vectors[cats], model_id="other@2") == []


SHARED = (
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software "
    "and its documentation."
)
SHARING = [  # three packages' files quote one license paragraph, one of them wrapped differently
    Document(
        "a",
        "alpha",
        "The alpha tool sorts long lists of numbers very quickly; the alpha authors wrote it.\n\n" + SHARED,
    ),
    Document(
        "b",
        "beta",
        "The beta tool parses configuration files of many kinds; the beta people wrote it.\n\n"
        + SHARED.replace(" of this", "\n  of this"),
    ),
    Document(
        "c",
        "gamma",
        SHARED
        + "\n\nThe gamma tool draws pictures of cats and dogs and has no other words in common at all.",
    ),
]


def test_a_passage_that_documents_share_is_indexed_once_with_every_place():
    passages = split_documents(SHARING)
    text = {d.doc_id: d.text for d in SHARING}
    shared = [p for p in passages if p.text.startswith("Permission")]
    assert len(shared) == 1 and len(passages) == 4  # 3 documents' own passages + the shared one
    (passage,) = shared
    assert passage.doc_id == "a" and text["a"][passage.start : passage.end] == passage.text
    assert [place.doc_id for place in passage.also_in] == ["b", "c"]
    for place in passage.also_in:  # true offsets: the same words, whatever the line breaks
        assert text[place.doc_id][place.start : place.end].split() == passage.text.split()
    index = PassageIndex(passages)
    hits = index.search("permission granted for the alpha beta gamma tool", k=10)
    assert len(hits) == 4 and len({h.passage.text for h in hits}) == len(hits)
    assert next(h for h in hits if h.passage is passage).passage.also_in == passage.also_in


def test_documents_from_parquet_and_errors(tmp_path, corpus_dir):
    docs = load_documents(corpus_dir / "documents", max_documents=3)
    assert len(docs) == 3 and all(d.text for d in docs)
    with pytest.raises(OdysseyError, match="does not exist"):
        load_documents(tmp_path / "missing.parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(OdysseyError, match="doc_id"):
        load_documents(tmp_path / "bad.parquet")


# --- moderation arithmetic, code check --------------------------------------------------------------------


def test_label_probabilities_are_marginals():
    assert ANSWERS[0] == () and len(ANSWERS) == 8  # "safe" and every combination of the 3 unsafe labels
    logprobs = [math.log(p) for p in (0.5, 0.2, 0.1, 0.1, 0.05, 0.02, 0.02, 0.01)]
    probs = label_probabilities(logprobs)
    assert probs["safe"] == pytest.approx(0.5)
    expected = {
        label: sum(p for a, p in zip(ANSWERS, (0.5, 0.2, 0.1, 0.1, 0.05, 0.02, 0.02, 0.01)) if label in a)
        for label in ("profanity", "personal_data", "spam")
    }
    for label, p in expected.items():
        assert probs[label] == pytest.approx(p)


def test_syntax_error():
    assert syntax_error("def f(x):\n    return x + 1\n") is None
    assert "line 1" in syntax_error("def f(:")
    assert syntax_error("   ") is not None  # no code is no answer
    # The model writes a body: after a signature + docstring the whole function must parse, after
    # plain language the dedented body must.
    signature = 'def add(a, b):\n    """Sum."""'
    assert completion_error(signature, "    return a + b") is None
    assert "SyntaxError" in completion_error(signature, "    return (a")
    assert completion_error("add two numbers", "    x = 1\n    print(x)") is None
    assert completion_error("add two numbers", "    x = (") is not None


# --- error messages -----------------------------------------------------------------------------------------


def test_broken_json_is_located_by_line_and_column():
    document = '{"text": "a",\n "max_tokens": 5 "stop": 1}'
    with pytest.raises(json.JSONDecodeError) as decode:
        json.loads(document)
    e = decode.value
    error = {
        "type": "json_invalid",
        "loc": ("body", e.pos),
        "msg": "JSON decode error",
        "ctx": {"error": e.msg},
    }
    message, param = invalid_request([error], document, "application/json")
    assert message == f"body: invalid JSON at line 2, column 18 (character {e.pos}): Expecting ',' delimiter"
    assert (e.lineno, e.colno) == (2, 18) and param == "body"


@pytest.mark.parametrize(
    ("content_type", "said"),
    [
        (None, "came without a Content-Type"),
        ("text/plain", "came as 'text/plain'"),
        ("application/x-www-form-urlencoded", "came as 'application/x-www-form-urlencoded'"),  # curl -d
    ],
)
def test_a_body_not_sent_as_json_is_told_the_header(content_type, said):
    raw = b'{"text": "x"}'
    error = {"type": "model_attributes_type", "loc": ("body",), "msg": "Input should be...", "input": raw}
    message, param = invalid_request([error], raw, content_type)
    assert "`Content-Type: application/json`" in message and said in message and param == "body"


def test_json_content_types_and_what_else_the_body_can_be():
    assert is_json("application/json; charset=utf-8") and is_json("application/vnd.api+json")
    assert not is_json("text/plain") and not is_json(None) and not is_json("application/jsonx")
    missing = {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}
    assert "Content-Type: application/json" in invalid_request([missing], None, "application/json")[0]
    array = {"type": "model_attributes_type", "loc": ("body",), "msg": "Input should be...", "input": []}
    assert invalid_request([array], "[]", "application/json")[0].endswith(
        "a JSON object of the request's fields, not an array"
    )
    field = {"type": "missing", "loc": ("body", "text"), "msg": "Field required", "input": {}}
    assert invalid_request([field], "{}", "application/json") == ("text: Field required", "text")


# --- configuration -----------------------------------------------------------------------------------------


def test_app_args_validate_with_the_field_named():
    AppArgs(model_path="/m")
    with pytest.raises(ValidationError, match="max_num_seqs"):
        AppArgs(model_path="/m", engine={"max_num_seqs": 128})  # over the default max_ongoing_requests=64
    with pytest.raises(ValidationError, match="max_batch_sise"):
        AppArgs(model_path="/m", max_batch_sise=4)
    with pytest.raises(ValidationError, match="num_gpus"):
        AppArgs(model_path="/m", model={"device": "cuda"})


def test_api_keys_from_env_or_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEYS", "k1, k2")
    (tmp_path / "keys").write_text("k3\n\n")
    digests = api_keys.digests(
        GatewaySettings(auth=True, api_keys_env="MY_KEYS", api_keys_file=str(tmp_path / "keys"))
    )
    assert len(digests) == 3
    monkeypatch.delenv("MY_KEYS")
    monkeypatch.setenv("ODYSSEY_HOME", str(tmp_path / "home"))
    with pytest.raises(
        ValueError, match=f"no API keys.*MY_KEYS.*{tmp_path / 'home' / 'api_keys'}.*odyssey serve key"
    ):
        api_keys.digests(GatewaySettings(api_keys_env="MY_KEYS"))  # auth is on by default
    assert api_keys.digests(GatewaySettings(auth=False, api_keys_env="MY_KEYS")) == set()


def test_a_machine_with_no_key_gets_one_owner_only_and_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ODYSSEY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ODYSSEY_API_KEYS", raising=False)
    settings = GatewaySettings()
    key, created = api_keys.ensure(settings)
    path = tmp_path / "home" / "api_keys"
    assert created and path.read_text() == key + "\n" and len(key) > 30
    assert path.stat().st_mode & 0o777 == 0o600
    assert api_keys.ensure(settings) == (key, False)  # the next run uses it, and writes nothing
    assert api_keys.digests(settings) == {hashlib.sha256(key.encode()).digest()}
    path.write_text("")  # a key file left empty: a new key, and owner-only again
    path.chmod(0o644)
    again, created = api_keys.ensure(settings)
    assert created and again != key and path.stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("ODYSSEY_API_KEYS", "from-env")
    assert api_keys.ensure(settings) == ("from-env", False)  # the environment's key comes first
    assert api_keys.ensure(GatewaySettings(auth=False)) == (None, False)
