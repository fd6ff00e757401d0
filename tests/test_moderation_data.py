"""The synthetic moderation examples: held-out examples use templates, words, formats and obfuscation
styles that training never sees; each example's family says truly what the rules can see; examples
keep their base document's split. Fast: a small made-up base, no corpus build, no Ray."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from odyssey import moderation_rules
from odyssey.data import corpus, moderation
from odyssey.data.moderation import HIDDEN, SAFE, SETS, VISIBLE
from odyssey.data.schema import Collected, Example
from odyssey.moderation_rules import WordList
from odyssey.tasks import MODERATION_LABELS, SPLITS, format_labels, parse_labels

SUBJECTS = [
    "The parser",
    "This module",
    "The library",
    "Each worker",
    "The command line tool",
    "The scheduler",
]
VERBS = ["reads", "writes", "validates", "converts", "stores", "renders", "compresses", "indexes"]
OBJECTS = ["structured records", "plain text files", "log messages", "unicode strings", "database rows"]
ENDS = ["in a single pass.", "without extra dependencies.", "for every release.", "on demand."]


def fake_split(n_docs: int = 200, seed: int = 0) -> dict[str, list[Example]]:
    """split -> `summarize` examples of made-up documents (80% train, 10% val, 10% test)."""
    rng = random.Random(seed)
    by_split: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for d in range(n_docs):
        split = "train" if d % 10 < 8 else "val" if d % 10 == 8 else "test"
        text = " ".join(
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDS)}"
            for _ in range(5)
        )
        by_split[split].append(Example("summarize", text, "A summary.", f"doc{d}", split))
    return by_split


@pytest.fixture(scope="module")
def base() -> dict[str, list[Example]]:
    return fake_split()


@pytest.fixture(scope="module")
def made(base) -> list[Example]:
    return moderation.synthesize(base, 400, seed=0)


def labels_found(text: str) -> set[str]:
    return {hit.label for hit in moderation_rules.scan(text)}


def template_regex(template: str) -> re.Pattern:
    """A spam template as a regex: its fixed text, any text in its {fields}."""
    parts = re.split(r"\{\w+\}", template)
    return re.compile(".+?".join(re.escape(p) for p in parts))


# --- the declared sets are disjoint ------------------------------------------------------------------
def test_every_declared_set_has_a_disjoint_held_out_twin():
    pairs = {
        "spam templates": moderation.SPAM_TEMPLATES,
        "obfuscation styles": moderation.OBFUSCATION_STYLES,
        "benign look-alikes": moderation.BENIGN,
        "visible personal formats": moderation.PERSONAL_FORMATS[VISIBLE],
        "hidden personal formats": moderation.PERSONAL_FORMATS[HIDDEN],
        **{
            name: getattr(moderation, name)
            for name in (
                "FIRST",
                "LAST",
                "DOMAINS",
                "CITIES",
                "STREET_TYPES",
                "SPAM_HOSTS",
                "PRIZES",
                "PRODUCTS",
            )
        },
    }
    for name, sets in pairs.items():
        assert set(sets) == set(SETS), name
        assert sets["train"] and sets["held_out"], name
        assert not set(sets["train"]) & set(sets["held_out"]), name
    assert len(moderation.SPAM_TEMPLATES["train"]) >= 12 and len(moderation.SPAM_TEMPLATES["held_out"]) >= 8
    # No spam template's fixed text matches one of the other set's.
    for s, other in (("train", "held_out"), ("held_out", "train")):
        for template in moderation.SPAM_TEMPLATES[s]:
            sample = template.format(prize="P", product="Q", url="http://x.example/1", amount=5, small=9)
            assert not any(template_regex(t).search(sample) for t in moderation.SPAM_TEMPLATES[other])
    # Visible and hidden personal formats are different formats too.
    all_visible = {f for s in SETS for f in moderation.PERSONAL_FORMATS[VISIBLE][s]}
    assert not all_visible & {f for s in SETS for f in moderation.PERSONAL_FORMATS[HIDDEN][s]}


def test_the_profanity_list_is_split_by_root_about_70_30():
    sets = moderation.profanity_sets()
    train, held = sets["train"], sets["held_out"]
    assert sorted(train + held) == moderation_rules.profanity_words()
    assert not set(train) & set(held)
    assert 0.25 <= len(held) / (len(train) + len(held)) <= 0.35
    # No held-out word holds a training word (or the reverse): "fuck" and "motherfucker" sit together.
    for words, others in ((held, train), (train, held)):
        lookup = WordList(list(others))
        assert not [w for w in words if lookup.found_in(w)]
    flat_train = {w.replace(" ", "") for w in train if len(w.replace(" ", "")) >= 3}
    for w in held:
        w = w.replace(" ", "")
        assert len(w) < 3 or not any(t in w or w in t for t in flat_train), w
    assert moderation.profanity_sets() == sets  # deterministic


def test_obfuscation_styles_hide_words_from_the_rules():
    rng = random.Random(0)
    for s in SETS:
        for style, obfuscate in moderation.OBFUSCATIONS[s].items():
            words = moderation.profanity_sets()[s][:60]
            hidden = [w for w in words if not moderation_rules.scan(obfuscate(w, rng))]
            assert len(hidden) >= 0.8 * len(words), style  # the rest are drawn again at generation
            assert all(obfuscate(w, rng) != w for w in words), style


def test_personal_formats_are_what_their_family_says():
    for s in SETS:
        for family in (VISIBLE, HIDDEN):
            for name, fmt in moderation.PERSONAL[family][s].items():
                texts = [fmt(random.Random(i), s) for i in range(40)]
                if family == VISIBLE:
                    assert all(labels_found(t) == {"personal_data"} for t in texts), name
                else:  # the few that happen to look like a card are drawn again at generation
                    assert sum(not moderation_rules.scan(t) for t in texts) >= 30, name
                assert all(re.search(r"\d", t) for t in texts), name  # tests/test_corpus.py's check


# --- the generator uses only its split's set ---------------------------------------------------------
@pytest.fixture
def record_styles(monkeypatch) -> Counter:
    """Which set each obfuscation style and personal format drawn came from."""
    used: Counter = Counter()

    def recording(fn, s, name):
        def wrapped(*args):
            used[s, name] += 1
            return fn(*args)

        return wrapped

    for s in SETS:
        monkeypatch.setitem(
            moderation.OBFUSCATIONS,
            s,
            {name: recording(fn, s, name) for name, fn in moderation.OBFUSCATIONS[s].items()},
        )
        for family in (VISIBLE, HIDDEN):
            monkeypatch.setitem(
                moderation.PERSONAL[family],
                s,
                {name: recording(fn, s, name) for name, fn in moderation.PERSONAL[family][s].items()},
            )
    return used


@pytest.mark.parametrize("split", SPLITS)
def test_each_split_draws_only_from_its_own_set(base, split, record_styles):
    s, other = ("train", "held_out") if split == "train" else ("held_out", "train")
    only = {sp: (base[sp] if sp == split else []) for sp in SPLITS}
    made = moderation.synthesize(only, 150, seed=3)
    assert made and {ex.split for ex in made} == {split}
    assert record_styles and {set_name for set_name, _ in record_styles} == {s}
    other_words = WordList(list(moderation.profanity_sets()[other]))
    for ex in made:
        assert not other_words.found_in(ex.input), ex.input
        for template in moderation.SPAM_TEMPLATES[other]:
            assert not template_regex(template).search(ex.input), ex.input
        assert not [b for b in moderation.BENIGN[other] if b in ex.input], ex.input
        labels = parse_labels(ex.target)
        if "spam" in labels:
            assert any(template_regex(t).search(ex.input) for t in moderation.SPAM_TEMPLATES[s]), ex.input
        if "profanity" in labels and ex.family == VISIBLE:
            assert WordList(list(moderation.profanity_sets()[s])).found_in(ex.input), ex.input


# --- families, labels, splits ------------------------------------------------------------------------
def test_families_say_truly_what_the_rules_see(made):
    for ex in made:
        labels = parse_labels(ex.target)
        assert labels and labels <= set(MODERATION_LABELS) and format_labels(labels) == ex.target
        if ex.family == SAFE:
            assert labels == {"safe"} and not moderation_rules.scan(ex.input), ex.input
        elif ex.family == VISIBLE:
            assert "safe" not in labels and "spam" not in labels
            assert labels_found(ex.input) == labels, ex.input
        else:
            assert ex.family == HIDDEN and "safe" not in labels
            assert not moderation_rules.scan(ex.input), ex.input
        if labels & {"personal_data", "spam"}:  # tests/test_corpus.py checks this on the built corpus
            assert re.search(r"\d|http|!|@", ex.input), ex.input
    share = Counter(ex.family for ex in made)
    assert abs(share[SAFE] / len(made) - 0.4) < 0.07
    assert abs(share[VISIBLE] / len(made) - 0.3) < 0.07 and abs(share[HIDDEN] / len(made) - 0.3) < 0.07
    hidden_labels = {label for ex in made if ex.family == HIDDEN for label in parse_labels(ex.target)}
    assert hidden_labels == {"profanity", "personal_data", "spam"}


def test_rules_alone_score_nothing_on_hidden_and_everything_on_visible(made):
    from odyssey.evaluation.metrics import label_scores

    for family, expected in ((HIDDEN, 0.0), (VISIBLE, 1.0)):
        rows = [ex for ex in made if ex.family == family and ex.split != "train"]
        predicted = [labels_found(ex.input) or {"safe"} for ex in rows]
        scores = label_scores(
            predicted, [parse_labels(ex.target) for ex in rows], ("profanity", "personal_data")
        )
        assert rows and scores["macro_f1"] == expected, family


def test_examples_keep_their_base_documents_split(base, made):
    split_of = {ex.doc_id: split for split, examples in base.items() for ex in examples}
    assert all(ex.task == "moderate" and ex.split == split_of[ex.doc_id] for ex in made)
    counts = Counter(ex.split for ex in made)
    assert len(made) == 400 and len({ex.input for ex in made}) == len(made)
    assert counts["val"] >= moderation.HELD_OUT_MIN and counts["test"] >= moderation.HELD_OUT_MIN
    assert 0.7 < counts["train"] / len(made) < 0.9  # in proportion to the base sentences (80% train)


def test_quotas_spread_the_count_and_keep_a_few_held_out():
    assert moderation.quotas({"train": 800, "val": 100, "test": 100}, 100) == {
        "train": 80,
        "val": 10,
        "test": 10,
    }
    assert moderation.quotas({"train": 1000, "val": 3, "test": 0}, 50) == {"train": 47, "val": 3, "test": 0}
    assert moderation.quotas({"train": 5, "val": 5, "test": 5}, 100) == {"train": 5, "val": 5, "test": 5}
    assert moderation.quotas({"train": 0, "val": 0, "test": 0}, 100) == dict.fromkeys(SPLITS, 0)


def test_base_sentences_are_clean_and_in_one_split_only():
    shared = "This sentence appears in a training and a test document alike."
    by_split = {
        "train": [
            Example("summarize", f"{shared} Write to joe at example dot org for copies.", "s", "a", "train"),
            Example("find", "q", "The office is at 51 Franklin Street, Boston, in the city.", "b", "train"),
            Example("summarize", "The parser reads structured records in a single pass.", "s", "c", "train"),
        ],
        "val": [],
        "test": [Example("summarize", shared, "s", "d", "test")],
    }
    pool = moderation.base_sentences(by_split)
    assert pool == {
        "train": {"The parser reads structured records in a single pass.": "c"},
        "val": {},
        "test": {},
    }


def test_synthesis_is_deterministic_for_a_seed(base, made):
    assert moderation.synthesize(base, 400, seed=0) == made
    assert moderation.synthesize(base, 400, seed=1) != made


# --- the corpus adds them after the split ------------------------------------------------------------
def test_the_corpus_adds_moderation_after_the_split_under_the_task_cap(base):
    cfg = corpus.CorpusConfig(moderation_examples=300, max_examples_per_task=250, min_examples={})
    mine = Example("moderate", "A comment of my own.", "safe", "user:1", "val")
    by_split = {split: list(examples) for split, examples in base.items()}
    by_split["val"].append(mine)
    docs = {ex.doc_id for examples in base.values() for ex in examples}
    made = corpus.add_moderation(cfg, by_split, docs)
    assert isinstance(made, Collected) and made.name == "moderation" and len(made.examples) == 300
    moderate = [ex for split, examples in by_split.items() for ex in examples if ex.task == "moderate"]
    assert len(moderate) == 250  # the cap counts the user's moderate examples and these together
    assert all(ex in by_split[ex.split] for ex in moderate)
    assert {ex.split for ex in moderate} == set(SPLITS)
    assert sum(ex.task == "summarize" for examples in by_split.values() for ex in examples) == 200
    # Only the preset's documents are bases; without any, nothing is made.
    assert corpus.add_moderation(cfg, {s: list(e) for s, e in base.items()}, set()) is None
    none = corpus.CorpusConfig(moderation_examples=0)
    assert corpus.add_moderation(none, {s: list(e) for s, e in base.items()}, docs) is None
