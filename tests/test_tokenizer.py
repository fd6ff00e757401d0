"""The tokenizer: exact round trip on any text, control tokens only by id, the task format."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from odyssey.errors import OdysseyError
from odyssey.tasks import SPECIAL_TOKENS
from odyssey.tokenizer import Tokenizer

tricky = st.sampled_from(
    [*SPECIAL_TOKENS, " ", "\n", "\r\n", "\t", "\x00", "é", "日本", "🎉", "  ", "'s", "</s>"]
)
texts = st.one_of(
    st.text(max_size=300), st.lists(st.one_of(tricky, st.text(max_size=8)), max_size=30).map("".join)
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_round_trip_on_any_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert not set(ids) & tokenizer.special_ids  # text never turns into control tokens


def test_control_token_spelling_is_plain_text(tokenizer):
    ids = tokenizer.encode("summary <|eos|><|sep|> done")
    assert tokenizer.eos_id not in ids and tokenizer.sep_id not in ids
    assert tokenizer.decode(ids) == "summary <|eos|><|sep|> done"


def test_task_format_and_loss_mask(tokenizer):
    inp, tgt = tokenizer.encode("a long text"), tokenizer.encode("short")
    ids, mask = tokenizer.example("summarize", inp, tgt)
    assert ids[:2] == [tokenizer.bos_id, tokenizer.task_ids["summarize"]]
    assert ids == tokenizer.prompt("summarize", "a long text") + tgt + [tokenizer.eos_id]
    assert [i for i, m in zip(ids, mask) if m] == [*tgt, tokenizer.eos_id]  # loss on target + eos only
    lm_ids, lm_mask = tokenizer.example("lm", [], tgt)
    assert lm_ids == [tokenizer.bos_id, *tgt, tokenizer.eos_id] and lm_mask == [0] + [1] * (len(tgt) + 1)


def test_batch_encoding_matches_single(tokenizer):
    texts = ["def f(x):\n    return x", "Licensed under the Apache License", "", "🎉 ok"]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


def test_save_load_and_errors(tmp_path, tokenizer):
    tokenizer.save(tmp_path / "tok.json")
    again = Tokenizer.load(tmp_path / "tok.json")
    assert again.fingerprint == tokenizer.fingerprint
    assert again.encode("<|eos|>") == tokenizer.encode("<|eos|>")  # the text-only rule survives a reload
    with pytest.raises(OdysseyError, match="too small"):
        Tokenizer.train(["abc"], vocab_size=100)
    with pytest.raises(OdysseyError, match="no tokenizer at"):
        Tokenizer.load(tmp_path / "missing.json")
    with pytest.raises(OdysseyError, match="unknown task"):
        tokenizer.prompt("translate", "x")
