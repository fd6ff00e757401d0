"""Packed token blocks: whole examples, loss on targets only, every token kept, readable by Ray Data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from odyssey.data import packing
from odyssey.data.corpus import read_split
from odyssey.tasks import SPLITS, TASKS

SEQ_LEN = 128  # conftest's blocks_dir


def test_examples_are_whole_and_trained_on_targets_only(tokenizer):
    inputs = [tokenizer.encode(f"input number {i} " * (i + 1)) for i in range(12)]
    targets = [tokenizer.encode(f"target {i}") for i in range(12)]
    ids, mask, stats = packing.pack_examples(tokenizer, "summarize", inputs, targets, capacity=65)
    assert stats == {"truncated_examples": 0, "cut_targets": 0} and ids.shape[1] == 65
    found = []
    for row, m in zip(ids.tolist(), mask.tolist()):
        starts = [i for i, t in enumerate(row) if t == tokenizer.bos_id]
        for s, e in zip(starts, [*starts[1:], len(row)]):
            example = row[s:e]
            assert (
                example[1] == tokenizer.task_ids["summarize"] and tokenizer.eos_id in example
            )  # never split
            sep = example.index(tokenizer.sep_id)
            assert not any(m[s : s + sep + 1])  # no loss on the prompt
            trained = [t for t, flag in zip(example, m[s:e]) if flag]
            assert trained[-1] == tokenizer.eos_id
            found.append(trained[:-1])
    assert found == targets  # every target, in order, exactly once


def test_overlong_examples_are_cut_input_first(tokenizer):
    long_in, tgt = list(range(300, 400)), list(range(500, 510))
    ids, mask, stats = packing.pack_examples(tokenizer, "code", [long_in], [tgt], capacity=33)
    assert stats == {"truncated_examples": 1, "cut_targets": 0} and ids.shape == (1, 33)
    assert ids[0][mask[0] == 1].tolist() == [*tgt, tokenizer.eos_id]  # the target survives whole


def test_stream_keeps_every_token(tokenizer):
    texts = [list(range(100 + i, 140 + i)) for i in range(7)]
    ids, mask = packing.pack_stream(tokenizer, texts, capacity=50)
    flat, flat_mask = ids.ravel(), mask.ravel()
    body = [t for t in flat.tolist() if t not in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)]
    assert body == [t for text in texts for t in text]
    assert flat_mask[flat == tokenizer.bos_id].sum() == 0 and flat_mask[flat == tokenizer.pad_id].sum() == 0


def test_pack_corpus_manifest_and_blocks(corpus_dir, tokenizer, blocks_dir):
    manifest = json.loads((blocks_dir / "manifest.json").read_text())
    assert manifest["seq_len"] == SEQ_LEN and manifest["tokenizer_sha256"] == tokenizer.fingerprint
    for task in TASKS:
        for split in SPLITS:
            ids, mask = packing.read_blocks(blocks_dir, task, split)
            counts = manifest["counts"][task][split]
            assert (
                ids.shape == (counts["blocks"], SEQ_LEN + 1) and int(mask.sum()) == counts["trained_tokens"]
            )
            assert counts["examples"] == read_split(corpus_dir, task, split).num_rows
            if task != "lm" and counts["examples"]:
                # one <|eos|> per example, but for those whose target had to be cut
                assert (ids == tokenizer.eos_id).sum() == counts["examples"] - counts["cut_targets"]
    assert manifest["tokens"] > 0 and manifest["tokens_per_s"] > 0


def test_pack_refuses_nonsense(corpus_dir, tokenizer, tmp_path):
    with pytest.raises(Exception, match="too short"):
        packing.pack_corpus(corpus_dir, tokenizer, 4, tmp_path / "b")
    with pytest.raises(Exception, match="is not a corpus"):
        packing.pack_corpus(tmp_path, tokenizer, 64, tmp_path / "b")


def test_ray_data_streams_blocks_as_tensors(ray_cluster, blocks_dir):
    import ray

    ds = ray.data.read_parquet(str(blocks_dir / "summarize"), file_extensions=["parquet"])
    batch = next(iter(ds.iter_torch_batches(batch_size=4)))
    assert tuple(batch["input_ids"].shape) == (4, SEQ_LEN + 1) and tuple(batch["loss_mask"].shape) == (
        4,
        SEQ_LEN + 1,
    )
    streamed = sum(int(b["loss_mask"].sum()) for b in ds.iter_torch_batches(batch_size=64))
    on_disk = np.concatenate([packing.read_blocks(blocks_dir, "summarize", s)[1] for s in SPLITS])
    assert streamed == int(on_disk.sum())
