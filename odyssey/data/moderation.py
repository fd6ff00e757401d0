"""Moderation examples: text -> labels among safe, profanity, personal_data, spam.

SYNTHETIC, and said so in the README. Real sentences of the corpus (package descriptions, docstrings,
legal text) get insertions: words from the public profanity list shipped in the `better-profanity`
package; e-mail addresses, phone numbers, API keys, card and ID numbers in their real formats; spam
phrases. A sentence that already holds such content is not used, so labels stay true. To train on real
labelled data, bring it as `--source` rows with task `moderate` (target: labels as `format_labels` writes them).

Each example keeps the doc_id of its sentence, so it lands in that document's split.
"""

from __future__ import annotations

import random
import re
import string

from odyssey.data.sampling import sample
from odyssey.data.schema import Example
from odyssey.data.text import sentences
from odyssey.moderation_rules import WordList, luhn_check_digit, profanity_words
from odyssey.tasks import format_labels

MIN_CHARS, MAX_CHARS = 30, 240

FIRST = [
    "james",
    "mary",
    "wei",
    "fatima",
    "olga",
    "raj",
    "lucia",
    "kofi",
    "hana",
    "ivan",
    "amara",
    "diego",
    "yuki",
    "sofia",
    "omar",
    "nina",
]
LAST = [
    "smith",
    "garcia",
    "chen",
    "okafor",
    "novak",
    "patel",
    "rossi",
    "kim",
    "silva",
    "haddad",
    "jensen",
    "murphy",
    "tanaka",
    "costa",
]
DOMAINS = [
    "gmail.com",
    "outlook.com",
    "yahoo.com",
    "proton.me",
    "fastmail.com",
    "web.de",
    "mail.ru",
    "company.io",
]
SPAM = (
    "CLICK HERE to claim your FREE {prize} now!!!",
    "Limited time offer: cheap {product} at {url} - buy now!",
    "Congratulations, you have been selected to win ${amount}! Reply with your bank details.",
    "Earn ${amount} a week working from home, visit {url}",
    "100% free {product}, no prescription needed!!! {url}",
    "Act now! Only 3 {product} left, order at {url} before midnight",
    "URGENT: your account will be suspended, verify at {url}",
    "Make money fast!!! Double your bitcoin at {url}",
)
PRIZES = ("iPhone", "gift card", "cruise", "laptop", "lottery prize")
PRODUCTS = ("diet pills", "replica watches", "pills", "crypto tokens", "followers", "weight loss tea")
BENIGN = (  # safe insertions that look a little like the unsafe ones
    "See https://docs.python.org/3/ for details.",
    "Version 2.4.1-3 was released on 2021-06-14.",
    "Report bugs through the project's issue tracker.",
    "The free software is distributed without any warranty.",
    "Set the API key in the configuration file.",
)


def _personal(rng: random.Random) -> str:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    digits = lambda n: "".join(rng.choice(string.digits) for _ in range(n))  # noqa: E731
    alnum = lambda n, chars=string.ascii_letters + string.digits: "".join(rng.choice(chars) for _ in range(n))  # noqa: E731
    card = "4" + digits(14)
    return rng.choice(
        (
            f"Contact me at {first}.{last}{digits(2)}@{rng.choice(DOMAINS)}.",
            f"Call {first.title()} on +1 ({digits(3)}) {digits(3)}-{digits(4)}.",
            f"My number is +44 7{digits(3)} {digits(6)}, text me.",
            f"Use the key AKIA{alnum(16, string.ascii_uppercase + string.digits)} to log in.",
            f"token: ghp_{alnum(36)}",
            f"export OPENAI_API_KEY=sk-{alnum(48)}",
            f"Pay with card {card}{luhn_check_digit(card)}, expiry 0{rng.randint(1, 9)}/2{rng.randint(6, 9)}.",
            f"My SSN is {digits(3)}-{digits(2)}-{digits(4)}.",
            f"I live at {rng.randint(1, 999)} {rng.choice(LAST).title()} Street, {first} {last}.",
        )
    )


def _spam(rng: random.Random) -> str:
    url = f"http://{rng.choice(['bit.ly', 'win-now.biz', 'cheap-deals.ru', 'free-gifts.top'])}/{rng.randint(1000, 99999)}"
    return rng.choice(SPAM).format(
        prize=rng.choice(PRIZES),
        product=rng.choice(PRODUCTS),
        url=url,
        amount=rng.choice([500, 1000, 5000, 10000]),
    )


def _insert_word(sentence: str, word: str, rng: random.Random) -> str:
    words = sentence.split(" ")
    pos = rng.randint(0, len(words))
    word = word.upper() if rng.random() < 0.15 else word
    return " ".join([*words[:pos], word, *words[pos:]])


def _clean(sentence: str, bad_words: WordList) -> bool:
    """A base sentence must carry no label of its own: no listed word, address, long number or link."""
    return (
        MIN_CHARS <= len(sentence) <= MAX_CHARS
        and not re.search(r"@|https?://|www\.|\d{5,}|\$\d", sentence)
        and not bad_words.found_in(sentence)
    )


def synthesize(base: list[Example], count: int, seed: int) -> list[Example]:
    """`count` labelled examples made from the prose sentences of `base` examples."""
    words = profanity_words()
    bad = WordList(words)
    pool: dict[str, str] = {}  # sentence -> doc_id of its first appearance
    for ex in base:
        if ex.task in ("summarize", "find"):
            for s in sentences(ex.input if ex.task == "summarize" else ex.target):
                if _clean(s, bad):
                    pool.setdefault(s, ex.doc_id)
    chosen = sample(sorted(pool), count, seed, key=str)
    examples = []
    for sentence in chosen:
        rng = random.Random(f"{seed}:moderate:{sentence}")
        r = rng.random()
        n_labels = 0 if r < 0.4 else 1 if r < 0.85 else 2 if r < 0.97 else 3
        labels = rng.sample(["profanity", "personal_data", "spam"], n_labels)
        text = sentence
        if not labels and rng.random() < 0.3:
            text = f"{text} {rng.choice(BENIGN)}"
        for label in labels:
            if label == "profanity":
                text = _insert_word(text, rng.choice(words), rng)
            elif label == "personal_data":
                text = f"{text} {_personal(rng)}" if rng.random() < 0.5 else f"{_personal(rng)} {text}"
            else:
                text = f"{_spam(rng)} {text}" if rng.random() < 0.5 else f"{text} {_spam(rng)}"
        examples.append(Example("moderate", text, format_labels(labels), pool[sentence]))
    return examples
