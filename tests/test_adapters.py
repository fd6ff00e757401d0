"""Public dataset layouts -> the corpus schema (odyssey.data.adapters): each adapter reads a small sample
in its dataset's exact layout, the corpus built from it tokenizes, packs and trains a step; a file with
the wrong columns is refused, naming the adapter, the missing columns and the columns there."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from odyssey.data import adapters, packing
from odyssey.data.corpus import CorpusConfig, build_corpus, texts
from odyssey.data.schema import Example
from odyssey.errors import SchemaError
from odyssey.model import ModelConfig, Transformer, pad_vocab
from odyssey.tasks import parse_labels
from odyssey.tokenizer import Tokenizer

SEQ_LEN = 64
VOCABULARY = (
    "the council said river bridge would open next spring after months of delay residents welcomed "
    "news while engineers warned costs could rise again mayor promised weekly updates on progress"
)
WORDS = VOCABULARY.split()


def prose(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return " ".join(words).capitalize() + "."


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- samples in each dataset's own layout -------------------------------------------------------------


def cnn_dailymail(d: Path) -> str:
    rng = random.Random(1)
    rows = [
        {"id": f"{i:040x}", "article": prose(rng, 80), "highlights": prose(rng, 12) + "\n" + prose(rng, 8)}
        for i in range(20)
    ]
    rows[3]["highlights"] = ""  # skipped, counted
    return f"summarize:{write_jsonl(d / 'cnn_dm.jsonl', rows)}"


def xsum(d: Path) -> str:
    rng = random.Random(2)
    n = 15
    table = {
        "document": [prose(rng, 60) for _ in range(n)],
        "summary": [prose(rng, 15) for _ in range(n)],
        "id": [str(30_000_000 + i) for i in range(n)],
    }
    pq.write_table(pa.table(table), d / "xsum.parquet")
    return f"summarize:{d / 'xsum.parquet'}"


JIGSAW_COLUMNS = [
    "id",
    "comment_text",
    "toxic",
    "severe_toxic",
    "obscene",
    "threat",
    "insult",
    "identity_hate",
]


def jigsaw(d: Path) -> str:
    rng = random.Random(3)
    rows = [[f"{i:016x}", prose(rng, 20), 0, 0, 0, 0, 0, 0] for i in range(20)]
    rows[0][2:] = [1, 0, 1, 0, 1, 0]  # toxic, obscene, insult -> profanity
    rows[1][2:] = [1, 0, 0, 1, 0, 0]  # toxic + threat only: no label of ours says it, so skipped
    rows[2][1] += " Mail me at jane.doe@example.com"  # personal_data, by the pattern rules
    rows[3][2:] = [1, 1, 1, 0, 0, 1]  # severe -> profanity
    rows.append(["ffff", "", 0, 0, 0, 0, 0, 0])  # an empty comment: skipped
    with open(d / "train.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([JIGSAW_COLUMNS, *rows])
    return f"moderate:{d / 'train.csv'}"


def beir(d: Path) -> str:
    rng = random.Random(4)
    root = d / "scifact"
    (root / "qrels").mkdir(parents=True)
    write_jsonl(
        root / "corpus.jsonl",
        [
            {"_id": f"{100 + i:05d}", "title": prose(rng, 4), "text": prose(rng, 50), "metadata": {}}
            for i in range(15)
        ],
    )
    write_jsonl(
        root / "queries.jsonl", [{"_id": str(i), "text": prose(rng, 8), "metadata": {}} for i in range(12)]
    )
    # Zero-padded ids, as some BEIR sets have: read as numbers they would match no passage.
    qrels = ["query-id\tcorpus-id\tscore", *(f"{i}\t{100 + i:05d}\t1" for i in range(12)), "0\t00101\t0"]
    (root / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")
    return f"retrieval:{root}"


MBPP_CODE = "def add_{i}(a, b):\r\n    total = a + b + {i}\r\n    return total"


def mbpp(d: Path) -> str:
    rows = [
        {
            "task_id": 11 + i,
            "text": f"Write a function to add two numbers and {i}.",
            "code": MBPP_CODE.format(i=i),
            "test_list": [f"assert add_{i}(1, 2) == {3 + i}", f"assert add_{i}(0, 0) == {i}"],
            "test_setup_code": "",
            "challenge_test_list": [],
        }
        for i in range(15)
    ]
    rows[4]["code"] = "print 'python 2'"  # not runnable Python: skipped
    return f"code:{write_jsonl(d / 'mbpp.jsonl', rows)}"


def humaneval(d: Path) -> str:
    rows = [
        {
            "task_id": f"HumanEval/{i}",
            "prompt": f'\ndef scale_{i}(xs: list) -> list:\n    """Multiply every number by {i}.\n    >>> scale_{i}([1])\n    [{i}]\n    """\n',
            "canonical_solution": f"    return [x * {i} for x in xs]\n",
            "test": f"\n\ndef check(candidate):\n    assert candidate([1]) == [{i}]\n",
            "entry_point": f"scale_{i}",
        }
        for i in range(12)
    ]
    return f"code:{write_jsonl(d / 'humaneval.jsonl', rows)}"


def plain_text(d: Path) -> str:
    rng = random.Random(5)
    path = d / "book.txt"
    path.write_text("\n\n".join(prose(rng, 120) for _ in range(60)), encoding="utf-8")
    return f"text:{path}"


SAMPLES = {
    "cnn_dailymail": (cnn_dailymail, "summarize", 19),
    "xsum": (xsum, "summarize", 15),
    "jigsaw": (jigsaw, "moderate", 19),
    "beir": (beir, "find", 12),
    "mbpp": (mbpp, "code", 14),
    "humaneval": (humaneval, "code", 12),
    "text": (plain_text, "lm", None),
}


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict[str, str]:
    """Every sample written once, in a folder of its own: name -> its --source spec."""
    root = tmp_path_factory.mktemp("samples")
    out = {}
    for name, (write, _, _) in SAMPLES.items():
        (root / name).mkdir()
        out[name] = write(root / name)
    return out


def path_of(spec: str) -> Path:
    return Path(spec.partition(":")[2])


# --- each layout, mapped ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLES)
def test_each_layout_builds_packs_and_trains(name, specs, tmp_path):
    _, task, n_examples = SAMPLES[name]
    spec = specs[name]
    corpus = tmp_path / "corpus"
    manifest = build_corpus(corpus, CorpusConfig.from_preset("none"), [spec])
    assert [s["name"] for s in manifest["sources"]] == [spec]
    counts = manifest["counts"][task]
    if n_examples is not None:
        assert sum(counts.values()) == n_examples
    assert manifest["total_examples"] == sum(counts.values())  # every example is of the adapter's task
    ids, mask = pack_and_read(corpus, task)
    loss_before, loss_after = one_training_step(ids, mask)
    assert np.isfinite(loss_before) and np.isfinite(loss_after) and loss_after != loss_before


def pack_and_read(corpus: Path, task: str) -> tuple[np.ndarray, np.ndarray]:
    tok = Tokenizer.train(texts(corpus, "train"), vocab_size=320)
    packing.pack_corpus(corpus, tok, SEQ_LEN, corpus / "blocks")
    ids, mask = packing.read_blocks(corpus / "blocks", task, "train")
    assert ids.shape[0] > 0 and ids.shape[1] == SEQ_LEN + 1 and mask.sum() > 0
    assert ids.max() < tok.vocab_size
    return ids, mask


def one_training_step(ids: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Loss before and after one AdamW step of a tiny model on (at most 8 of) the blocks."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=pad_vocab(320), d_model=32, n_layer=1, n_head=2, max_seq_len=SEQ_LEN)
    model = Transformer(cfg)
    batch = torch.from_numpy(ids[:8].astype(np.int64))
    weights = torch.from_numpy(mask[:8].astype(np.float32))
    x, y, m = batch[:, :-1], batch[:, 1:], weights[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(x, y, m)
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = model(x, y, m)
    return loss.item(), after.item()


def test_summarize_keeps_article_summary_and_ids(specs):
    got = adapters.collect(specs["cnn_dailymail"])
    first, source = got.examples[0], json.loads(path_of(specs["cnn_dailymail"]).read_text().splitlines()[0])
    assert first == Example(
        "summarize", source["article"], source["highlights"], f"summarize:cnn_dm:{0:040x}"
    )
    assert len(got.examples) == 19 and got.files == [path_of(specs["cnn_dailymail"])]
    assert got.name == specs["cnn_dailymail"]
    xsum_ids = {ex.doc_id for ex in adapters.collect(specs["xsum"]).examples}
    assert xsum_ids == {f"summarize:xsum:{30_000_000 + i}" for i in range(15)}


def test_jigsaw_labels_map_honestly(specs):
    got = adapters.collect(specs["jigsaw"])
    by_id = {ex.doc_id.rsplit(":", 1)[1]: parse_labels(ex.target) for ex in got.examples}
    assert by_id[f"{0:016x}"] == {"profanity"}
    assert f"{1:016x}" not in by_id  # flagged only for a threat: neither "safe" nor a label of ours
    assert by_id[f"{2:016x}"] == {"personal_data"}
    assert by_id[f"{3:016x}"] == {"profanity"}
    assert by_id[f"{4:016x}"] == {"safe"}
    assert set(adapters.JIGSAW_LABELS.values()) <= {None, "profanity", "personal_data", "spam"}


def test_beir_gives_find_examples_and_the_passages_as_documents(specs):
    got = adapters.collect(specs["beir"])
    assert len(got.documents) == 15 and all(d.doc_id.startswith("beir:scifact:") for d in got.documents)
    passages = {d.doc_id: d.text for d in got.documents}
    assert all(ex.task == "find" and passages[ex.doc_id] == ex.target for ex in got.examples)
    assert len(got.examples) == 12  # the score-0 pair is not a relevant passage
    assert got.examples[0].doc_id == "beir:scifact:00100"


def test_code_targets_are_runnable(specs):
    mbpp_got = adapters.collect(specs["mbpp"])
    ex = mbpp_got.examples[0]
    assert (
        ex.input
        == "Write a function to add two numbers and 0.\n\n# tests:\nassert add_0(1, 2) == 3\nassert add_0(0, 0) == 0"
    )
    scope: dict = {}
    exec(ex.target, scope)  # our own sample
    exec(ex.input.split("# tests:\n")[1], scope)  # the tests pass on the target
    assert len(mbpp_got.examples) == 14 and ex.doc_id == "code:mbpp:11"

    he = adapters.collect(specs["humaneval"]).examples[3]
    assert he.input.startswith("def scale_3(") and he.target == "    return [x * 3 for x in xs]"
    exec(f"{he.input}\n{he.target}\nassert scale_3([1, 2]) == [3, 6]", {})


def test_text_is_chunked_into_one_document(specs):
    got = adapters.collect(specs["text"])
    assert len(got.examples) > 1 and {ex.doc_id for ex in got.examples} == {"text:book:book.txt"}
    assert all(ex.task == "lm" and ex.input == "" and len(ex.target) <= 4000 for ex in got.examples)


def test_text_rows_of_a_jsonl_are_documents(tmp_path):
    path = write_jsonl(
        tmp_path / "web.jsonl", [{"text": f"page {i} " * 30, "url": f"u{i}"} for i in range(5)]
    )
    got = adapters.collect(f"text:{path}")
    assert len({ex.doc_id for ex in got.examples}) == 5


# --- refusals ---------------------------------------------------------------------------------------------


WRONG_COLUMNS = {
    "summarize": ({"article": "a", "title": "t"}, r"summarize adapter needs .*missing: highlights \(the file has: article, title\)"),
    "moderate": ({"comment_text": "c", "score": 1}, r"moderate adapter needs columns comment_text \(or text\) and one or more of obscene, .*; missing: every label column \(the file has: comment_text, score\)"),
    "code": ({"text": "t", "tests": "x"}, r"code adapter needs .*missing: code, test_list \(the file has: text, tests\)"),
    "text": ({"body": "b"}, r"text adapter needs columns text; missing: text \(the file has: body\)"),
}  # fmt: skip


@pytest.mark.parametrize("kind", WRONG_COLUMNS)
def test_wrong_columns_name_the_adapter_and_the_missing_columns(kind, tmp_path):
    row, message = WRONG_COLUMNS[kind]
    path = write_jsonl(tmp_path / "x.jsonl", [row])
    with pytest.raises(SchemaError, match=rf"x\.jsonl: the {message}"):
        adapters.collect(f"{kind}:{path}")


def test_beir_with_wrong_columns_or_files_is_refused(tmp_path):
    root = tmp_path / "nfcorpus"
    (root / "qrels").mkdir(parents=True)
    with pytest.raises(
        SchemaError, match=r"retrieval adapter reads a BEIR directory.*missing: corpus\.jsonl"
    ):
        adapters.collect(f"retrieval:{root}")
    write_jsonl(root / "corpus.jsonl", [{"_id": "1", "body": "x"}])
    write_jsonl(root / "queries.jsonl", [{"_id": "1", "text": "q"}])
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\t1\t1\n")
    with pytest.raises(
        SchemaError, match=r"corpus\.jsonl: the retrieval adapter needs .*missing: title, text"
    ):
        adapters.collect(f"retrieval:{root}")


def test_a_malformed_file_names_the_reader_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"article": "a", "highlights": "h"}\n{not json\n')
    with pytest.raises(
        SchemaError, match=r"x\.jsonl: the summarize adapter could not read this file \(.*JSON parse"
    ):
        adapters.collect(f"summarize:{path}")


def test_a_directory_of_splits_is_read_whole(tmp_path):
    """A dataset's own splits are all read: the corpus draws its splits per document."""
    d = tmp_path / "xsum"
    d.mkdir()
    for split, n in (("train", 6), ("validation", 2), ("test", 3)):
        rows = [{"document": f"{split} text {i}", "summary": f"s {i}", "id": f"{split}{i}"} for i in range(n)]
        write_jsonl(d / f"{split}.jsonl", rows)
    got = adapters.collect(f"summarize:{d}")
    assert (
        len(got.examples) == 11
        and len(got.files) == 3
        and got.examples[0].doc_id.startswith("summarize:xsum:")
    )


def test_nothing_usable_is_refused(tmp_path):
    path = write_jsonl(
        tmp_path / "x.jsonl", [{"document": "", "summary": "s"}, {"document": "d", "summary": " "}]
    )
    with pytest.raises(
        SchemaError,
        match=r"summarize adapter found no usable row among 2 \(1 empty document, 1 empty summary\)",
    ):
        adapters.collect(f"summarize:{path}")


def test_unknown_kind_and_missing_paths(tmp_path):
    with pytest.raises(
        SchemaError, match=r"'summarise' is no dataset kind; did you mean 'summarize:x.jsonl'\?"
    ):
        adapters.collect("summarise:x.jsonl")
    with pytest.raises(SchemaError, match=r"no such file or directory \(the code adapter's source\)"):
        adapters.collect(f"code:{tmp_path / 'nope.jsonl'}")
    with pytest.raises(SchemaError, match="no such file"):
        adapters.collect(tmp_path / "plain.jsonl")


def test_a_spec_without_a_kind_is_a_file_in_the_corpus_schema(tmp_path):
    row = {"task": "summarize", "input": "a text", "target": "a summary", "doc_id": "d1"}
    path = write_jsonl(tmp_path / "mine.jsonl", [row])
    got = adapters.collect(str(path))
    assert (got.name, got.files, len(got.examples)) == (f"user:{path}", [path], 1)
    assert {kind: a.description for kind, a in adapters.KINDS.items()}.keys() == {
        "summarize",
        "moderate",
        "retrieval",
        "code",
        "text",
    }
