"""The inference engine without Ray: continuous batching gives every sequence exactly what it would get
alone, whatever arrives when; per-sequence settings; cancel; the KV and token budgets; prefix sharing
for identical prompts and for scoring; the asyncio loop serving uses."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from odyssey.answers import MODERATION_OPTIONS
from odyssey.engine import AsyncEngine, Engine, EngineConfig, GenerationParams, QueueFull, generate
from odyssey.errors import ConfigError
from odyssey.model import Transformer, pad_vocab, tiny

TEXTS = ("The license", "Copyright (C) 2020 the authors of this package", "x", "Permission is hereby granted")


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return Transformer(replace(tiny(), vocab_size=pad_vocab(tokenizer.vocab_size), max_seq_len=128)).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.prompt("lm", t) for t in TEXTS]


@torch.no_grad()
def greedy_alone(model, tokenizer, prompt: list[int], max_tokens: int) -> list[int]:
    """The reference: no cache, no batch, the whole sequence through the training forward each token."""
    ids = list(prompt)
    for _ in range(max_tokens):
        token = int(model(torch.tensor([ids]))[0, -1].argmax())
        if token == tokenizer.eos_id:
            break
        ids.append(token)
    return ids[len(prompt) :]


def drain(engine: Engine, arrivals: dict[int, list] | None = None) -> dict[int, dict]:
    """Step to the end; arrivals[k] = [(prompt, params), ...] added before step k. Returns, by request
    id, the tokens, text and last chunk."""
    out: dict[int, dict] = {}
    arrivals = arrivals or {}
    for k in itertools.count():
        for prompt, params in arrivals.get(k, []):
            seq = engine.add(prompt, params)
            out[seq.id] = {"seq": seq, "text": "", "chunk": None}
        if not engine.has_work and k > max(arrivals, default=-1):
            return out
        for e in engine.step():
            entry = out.setdefault(e.request.id, {"seq": e.request, "text": "", "chunk": None})
            entry["text"] += e.chunk.text
            entry["chunk"] = e.chunk


GREEDY = [GenerationParams(max_tokens=n, temperature=0.0) for n in (12, 5, 20, 9)]


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)])
def test_continuous_batching_equals_one_at_a_time_greedy(model, tokenizer, prompts, order):
    """Sequences arrive one step apart in different orders (joining a running batch mid-way, prefilled
    in chunks of at most 8 tokens) and each gets, token for token, what it gets alone."""
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=4, max_num_batched_tokens=8))
    arrivals = {k: [(prompts[i], GREEDY[i])] for k, i in enumerate(order)}
    out = drain(engine, arrivals)
    by_prompt = {tuple(v["seq"].prompt): v for v in out.values()}
    for prompt, params in zip(prompts, GREEDY):
        got = by_prompt[tuple(prompt)]
        expected = greedy_alone(model, tokenizer, prompt, params.max_tokens)
        assert got["seq"].stream.ids == expected
        assert got["text"] == tokenizer.decode(expected)
        assert got["chunk"].completion_tokens == len(expected)
        assert got["chunk"].finish_reason == ("length" if len(expected) == params.max_tokens else "stop")


def test_a_sequence_joining_mid_batch_gets_what_it_gets_alone(model, tokenizer, prompts):
    engine = Engine(model, tokenizer)
    long = GenerationParams(max_tokens=60, temperature=0.0)
    out = drain(engine, {0: [(prompts[1], long)], 7: [(prompts[0], GREEDY[0])]})
    late = next(v for v in out.values() if v["seq"].prompt == prompts[0])
    assert late["seq"].stream.ids == greedy_alone(model, tokenizer, prompts[0], 12)
    assert engine.steps < 60 + 12  # it ran beside the long one, not after it


def test_each_sequence_keeps_its_own_settings(model, tokenizer, prompts):
    seeded = GenerationParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    beside = generate(model, tokenizer, [prompts[0], prompts[0], prompts[2]], [seeded, GREEDY[0], seeded])
    alone = generate(model, tokenizer, [prompts[0]], [seeded])[0]
    assert beside[0].text == alone.text  # the seed reproduces a sequence whatever runs beside it
    assert beside[1].token_ids == greedy_alone(model, tokenizer, prompts[0], 12)
    assert [c.completion_tokens <= n for c, n in zip(beside, (10, 12, 10))] == [True] * 3
    # a stop string ends the text just before it, whatever token it straddles
    full = generate(model, tokenizer, [prompts[1]], [GREEDY[2]])[0]
    stop = full.text[3:6]
    assert stop and full.text.find(stop) == 3
    stopped = generate(model, tokenizer, [prompts[1]], [replace(GREEDY[2], stop=(stop,))])[0]
    assert stopped.text == full.text[:3] and stopped.finish_reason == "stop"
    # max_tokens is capped to the room the prompt leaves
    capped = generate(model, tokenizer, [prompts[0]], [GenerationParams(max_tokens=10_000, temperature=0.0)])
    assert capped[0].completion_tokens <= model.cfg.max_seq_len - len(prompts[0])


def test_cancel_frees_the_row_for_the_next_in_line(model, tokenizer, prompts):
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=1, max_num_batched_tokens=64))
    first = engine.add(prompts[1], GenerationParams(max_tokens=100, temperature=0.0))
    second = engine.add(prompts[0], GREEDY[0])
    for _ in range(3):
        engine.step()
    assert engine.running == [first] and second.row is None
    engine.cancel(first)
    assert engine.running == [] and first.row is None
    engine.step()
    assert engine.running == [second]
    tokens_of_first = first.generated
    out = drain(engine)
    assert first.generated == tokens_of_first  # nothing more was decoded for it
    assert second.stream.ids == greedy_alone(model, tokenizer, prompts[0], 12)
    assert [v["seq"] for v in out.values()] == [second]


def test_budgets_are_never_exceeded_and_admission_waits(model, tokenizer, prompts, monkeypatch):
    config = EngineConfig(max_num_seqs=2, max_num_batched_tokens=6)
    engine = Engine(model, tokenizer, config)
    tokens_per_step: list[int] = []
    forward = engine._forward

    def counting(pool, rows, tokens, starts, every=False):
        tokens_per_step[-1] += sum(map(len, tokens))
        return forward(pool, rows, tokens, starts, every)

    monkeypatch.setattr(engine, "_forward", counting)
    seqs = [engine.add(p, GREEDY[i]) for i, p in enumerate(prompts)]
    while engine.has_work:
        tokens_per_step.append(0)
        engine.step()
        assert len(engine.running) <= config.max_num_seqs
        assert engine.stats()["kv_cache_used"] <= 1.0
        assert tokens_per_step[-1] <= config.max_num_batched_tokens
    assert max(tokens_per_step) == config.max_num_batched_tokens  # the budget was used, not just obeyed
    for seq, prompt, params in zip(seqs, prompts, GREEDY):
        assert seq.stream.ids == greedy_alone(model, tokenizer, prompt, params.max_tokens)


def test_a_full_queue_refuses_and_static_admits_only_into_an_empty_batch(model, tokenizer, prompts):
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=2, max_waiting=2, scheduler="static"))
    a = engine.add(prompts[0], GenerationParams(max_tokens=3, temperature=0.0))
    engine.add(prompts[1], GenerationParams(max_tokens=30, temperature=0.0))
    with pytest.raises(QueueFull, match="retry later"):
        engine.add(prompts[2], GREEDY[0])
    engine.step()
    c = engine.add(prompts[2], GREEDY[0])  # room in the queue again
    while a.row is not None:
        engine.step()
    engine.step()
    assert c.row is None and len(engine.running) == 1  # a row is free, but static waits for the batch
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        EngineConfig(max_num_seqs=8, max_num_batched_tokens=8)


def test_identical_prompts_share_one_prefill(model, tokenizer, prompts, monkeypatch):
    params = [GREEDY[2], GenerationParams(max_tokens=20, temperature=0.8, seed=1), GREEDY[2]]
    results = {}
    for sharing in (True, False):
        engine = Engine(model, tokenizer, EngineConfig(prefix_sharing=sharing))
        prefill_tokens = 0
        forward = engine._forward

        def counting(pool, rows, tokens, starts, every=False, forward=forward):
            nonlocal prefill_tokens
            prefill_tokens += sum(len(t) for t in tokens if len(t) > 1)
            return forward(pool, rows, tokens, starts, every)

        monkeypatch.setattr(engine, "_forward", counting)
        seqs = [engine.add(prompts[1], p) for p in params]
        drain(engine)
        results[sharing] = ([s.stream.ids for s in seqs], prefill_tokens)
    assert results[True][1] == len(prompts[1]) and results[False][1] == 3 * len(prompts[1])
    assert results[True][0] == results[False][0]
    assert results[True][0][0] == results[True][0][2] == greedy_alone(model, tokenizer, prompts[1], 20)


def test_a_prompt_already_running_is_copied_not_prefilled(model, tokenizer, prompts):
    """A request whose prompt a running sequence has in its cache starts from a copy, at once."""
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=4))
    first = engine.add(prompts[1], GenerationParams(max_tokens=20, temperature=0.0))
    engine.step()
    late = engine.add(prompts[1], GenerationParams(max_tokens=5, temperature=0.0))
    (event,) = [e for e in engine.step() if e.request is late]
    assert event.chunk.completion_tokens == 1  # its first token in the step it was admitted
    drain(engine)
    assert late.stream.ids == greedy_alone(model, tokenizer, prompts[1], 5)
    assert first.stream.ids == greedy_alone(model, tokenizer, prompts[1], 20)
    with pytest.raises(ValueError, match="at least one row"):
        engine.add_embed([])


@torch.no_grad()
def reference_score(model, prompt, continuation) -> float:
    ids = torch.tensor([prompt + continuation])
    logprobs = F.log_softmax(model(ids)[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return float(logprobs[len(prompt) - 1 :].gather(-1, targets[len(prompt) - 1 :, None]).sum())


def test_prefix_shared_scoring_equals_separate_scoring(tokenizer, prompts):
    # Weights large enough for sharp attention: a token at a wrong position or seeing a wrong key shows.
    torch.manual_seed(0)
    cfg = replace(tiny(), vocab_size=pad_vocab(tokenizer.vocab_size), max_seq_len=128, init_std=0.3)
    model = Transformer(cfg).eval()
    # The moderation answers begin alike ("profanity", "profanity, spam", ...): with sharing they run as
    # one token tree after the prompt. One answer comes twice.
    labels = (*MODERATION_OPTIONS, "profanity", "x")
    options = [[*tokenizer.encode(o), tokenizer.eos_id] for o in labels]
    requests = [(prompts[0], options), (prompts[1], options[:2]), (prompts[3], [[7]])]
    for sharing in (True, False):
        engine = Engine(model, tokenizer, EngineConfig(prefix_sharing=sharing))
        submitted = [engine.add_score(p, c) for p, c in requests]
        results = {e.request.id: e.result for e in engine.step()}
        assert not engine.has_work  # all three in one step
        for r, (prompt, conts) in zip(submitted, requests):
            expected = [reference_score(model, prompt, c) for c in conts]
            torch.testing.assert_close(
                torch.tensor(results[r.id]), torch.tensor(expected), atol=1e-4, rtol=1e-4
            )


def test_embeddings_run_through_the_engine(model, tokenizer, prompts):
    engine = Engine(model, tokenizer)
    engine.add_embed(prompts)
    (event,) = engine.step()
    torch.testing.assert_close(torch.from_numpy(event.result), model.embed(prompts, tokenizer.pad_id))


def test_the_async_loop_streams_and_a_caller_that_leaves_frees_its_row(model, tokenizer, prompts):
    async def main():
        seen = []
        config = EngineConfig(max_num_seqs=2, max_num_batched_tokens=64)
        engine = AsyncEngine(Engine(model, tokenizer, config), on_event=seen.append)
        chunks = []
        stream = engine.stream(
            engine.engine.add(prompts[1], GenerationParams(max_tokens=100, temperature=0.0))
        )
        async with contextlib.aclosing(stream):
            async for event in stream:
                chunks.append(event.chunk)
                if len(chunks) == 5:
                    break  # the caller goes away
        assert engine.engine.running == []
        assert seen[-1].chunk.finish_reason == "cancelled" and seen[-1].chunk.completion_tokens == 5
        short = [e.chunk async for e in engine.stream(engine.engine.add(prompts[0], GREEDY[0]))]
        whole, last, _ = await engine.complete(engine.engine.add(prompts[0], GREEDY[0]))
        scores = await engine.result(engine.engine.add_score(prompts[0], [[5], [6, 7]]))
        await engine.stop()
        return short, whole, last, scores

    short, whole, last, scores = asyncio.run(main())
    expected = tokenizer.decode(greedy_alone(model, tokenizer, prompts[0], 12))
    assert "".join(c.text for c in short) == whole == expected
    assert last.finish_reason is not None and last.completion_tokens == short[-1].completion_tokens
    assert len(scores) == 2
