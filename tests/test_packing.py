"""Packed token blocks: whole examples, loss on targets only, every token kept, readable by Ray Data, and
the same bytes whether packed in-process or by Ray Data workers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from odyssey.data import packing
from odyssey.data.corpus import read_split
from odyssey.errors import ConfigError
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
    assert manifest["units"] == len(packing.plan_units(corpus_dir))
    for shard in manifest["shards"]:  # one per unit that packed something, each where the manifest says
        assert (blocks_dir / shard["path"]).is_file() and shard["path"].split("/")[-1].count("-") == 1


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


@pytest.fixture(scope="module")
def chunked_corpus(corpus_dir, tmp_path_factory):
    """The session's corpus with every split cut into two shards of row groups of 100 examples: many
    units of work per split, as a large corpus has."""
    out = tmp_path_factory.mktemp("chunked") / "corpus"
    shutil.copytree(corpus_dir, out, ignore=shutil.ignore_patterns("blocks-*", "examples"))
    for task in TASKS:
        for split in SPLITS:
            table = read_split(corpus_dir, task, split)
            if not table.num_rows:
                continue
            half = table.num_rows // 2 + 1
            (out / "examples" / task).mkdir(parents=True, exist_ok=True)
            for i, start in enumerate((0, half)):
                part = table.slice(start, half)
                pq.write_table(part, out / "examples" / task / f"{split}-{i:05d}.parquet", row_group_size=100)
    return out


def _shard_bytes(blocks) -> dict[str, bytes]:
    """The Parquet shards, the token arrays and their index."""
    files = [*blocks.rglob("*.parquet"), *blocks.rglob("*.npy"), blocks / packing.ARRAYS]
    return {p.relative_to(blocks).as_posix(): p.read_bytes() for p in sorted(files)}


def test_units_cover_every_example_once(chunked_corpus, tokenizer, tmp_path):
    units = packing.plan_units(chunked_corpus)
    manifest = packing.pack_corpus(chunked_corpus, tokenizer, 64, tmp_path / "b", workers=0)
    assert manifest["units"] == len(units) > 2 * len(TASKS) * len(SPLITS)  # several units per split
    for task in TASKS:
        for split in SPLITS:
            assert (
                manifest["counts"][task][split]["examples"]
                == read_split(chunked_corpus, task, split).num_rows
            )
    # lm: every text's tokens trained on once, plus one <|eos|> each (<|bos|> is never a target)
    texts = read_split(chunked_corpus, "lm", "train", ["target"]).column("target").to_pylist()
    lm = manifest["counts"]["lm"]["train"]
    assert lm["trained_tokens"] == sum(map(len, tokenizer.encode_batch(texts))) + len(texts)
    ids, mask = packing.read_blocks(tmp_path / "b", "lm", "train")
    assert ids.shape[0] == lm["blocks"] and int(mask.sum()) == lm["trained_tokens"]
    arrays = packing.open_arrays(tmp_path / "b", "lm", "train")  # the shards' rows, shard after shard
    assert np.array_equal(arrays[0], ids) and np.array_equal(arrays[1], mask)


def test_same_bytes_in_process_and_on_ray_data(ray_cluster, chunked_corpus, tokenizer, tmp_path):
    manifests, shards = {}, {}
    for workers in (0, 1, 2):
        out = tmp_path / f"w{workers}"
        manifests[workers] = packing.pack_corpus(chunked_corpus, tokenizer, 64, out, seed=3, workers=workers)
        shards[workers] = _shard_bytes(out)
    assert manifests[0]["ran"] == "in this process" and manifests[2]["ran"] == "Ray Data, 2 workers"
    assert len(shards[0]) > len(TASKS) * len(SPLITS)
    assert shards[0] == shards[1] == shards[2]
    for key in ("counts", "shards", "tokens", "units"):
        assert manifests[0][key] == manifests[1][key] == manifests[2][key]
    other_seed = packing.pack_corpus(chunked_corpus, tokenizer, 64, tmp_path / "s4", seed=4, workers=0)
    assert other_seed["shards"] != manifests[0]["shards"]  # the seed orders the examples


def test_a_bad_worker_count_is_refused_before_anything_is_written(corpus_dir, tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="workers=-1"):
        packing.pack_corpus(corpus_dir, tokenizer, 64, tmp_path / "b", workers=-1)
    assert not (tmp_path / "b").exists()
