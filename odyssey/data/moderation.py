"""Moderation examples: text -> labels among safe, profanity, personal_data, spam.

SYNTHETIC, and said so in the README. Real sentences of the corpus (package descriptions, docstrings,
legal text) get insertions: words of the public profanity list shipped in `better-profanity`, plain or
obfuscated; e-mail addresses, phone numbers, street addresses, API keys, card, bank and ID numbers;
spam; and benign look-alikes (links, version numbers, "click here to expand"). A base sentence that
already holds such content is not used, so labels stay true. To train on real labelled data, bring it
as `--source` rows with task `moderate` (target: labels as `format_labels` writes them).

What the model must earn. Each example has a `family`:
- "safe": no label (benign look-alikes allowed); `moderation_rules.scan` finds nothing in it;
- "rules_visible": every insertion is of a kind the rules detect (a listed word spelt plainly, an
  e-mail address, a phone number with its country code, a cloud key, a Luhn-valid card, an SSN), and
  scan finds every label, no more: here the model only has to match the rules;
- "rules_hidden": no insertion is visible to the rules, and scan finds nothing: spam (the rules have no
  spam detector), street and postal addresses, e-mail addresses spelt out ("name at domain dot com"),
  national phone numbers, bank and ID numbers, obfuscated profanity (`f*ck`, `sh1t`, `a s s h o l e`).
  Rules alone score ~0 here; this is the family that measures the model.
The two unsafe families never mix in one example. Every draw is checked with `scan` at generation
time; a draw that breaks its family's promise is drawn again (or the sentence is skipped).

Held-out generalization. Every kind of insertion has a TRAIN set and a disjoint HELD_OUT set of
templates, words, formats and fillers: training examples use the first, validation and test examples
only the second (`template_set`). So the held-out score measures whether the model learnt *spam*,
*personal data* and *profanity*, not the templates and words it saw. The profanity list is split by
root (words that contain one another, "fuck" / "motherfucker", stay on one side), about 70/30 by hash.

Split-aware: `synthesize` runs after the corpus's split assignment (corpus.build_corpus). Each example
keeps the doc_id of its base sentence and that document's split, and the split chooses the set.
"""

from __future__ import annotations

import functools
import random
import re
import string
from collections.abc import Callable, Mapping

from odyssey.data.sampling import unit_hash
from odyssey.data.schema import Example
from odyssey.data.text import sentences
from odyssey.moderation_rules import luhn_check_digit, profanity_words, scan
from odyssey.tasks import SPLITS, format_labels

MIN_CHARS, MAX_CHARS = 30, 240
SETS = ("train", "held_out")
SAFE, VISIBLE, HIDDEN = "safe", "rules_visible", "rules_hidden"
FAMILIES = (SAFE, VISIBLE, HIDDEN)
FAMILY_SHARE = {SAFE: 0.4, VISIBLE: 0.3, HIDDEN: 0.3}
HELD_OUT_MIN = 10  # examples per held-out split, whenever it has that many base sentences
ATTEMPTS = 8  # draws per base sentence before it is skipped
HELD_OUT_PROFANITY = 0.3  # share of the profanity list kept for validation and test


def template_set(split: str) -> str:
    """Which set of templates/words/formats a split's examples use: "train" or "held_out"."""
    return "train" if split == "train" else "held_out"


# --- fillers: names, places, domains (disjoint sets) -------------------------------------------------
FIRST = {
    "train": ("james", "mary", "wei", "fatima", "olga", "raj", "lucia", "kofi", "hana", "ivan"),
    "held_out": ("amara", "diego", "yuki", "sofia", "omar", "nina", "lars", "priya"),
}
LAST = {
    "train": ("smith", "garcia", "chen", "okafor", "novak", "patel", "rossi", "kim", "silva"),
    "held_out": ("haddad", "jensen", "murphy", "tanaka", "costa", "nguyen", "schmidt", "mensah"),
}
DOMAINS = {
    "train": ("gmail.com", "outlook.com", "yahoo.com", "proton.me"),
    "held_out": ("fastmail.com", "web.de", "mail.ru", "icloud.com"),
}
CITIES = {
    "train": ("Springfield", "Riverton", "Lakewood", "Fairview", "Georgetown"),
    "held_out": ("Millbrook", "Ashford", "Kingsbridge", "Westfield", "Oakhaven"),
}
STREET_TYPES = {
    "train": ("Street", "Avenue", "Road", "Lane"),
    "held_out": ("Boulevard", "Drive", "Court", "Way", "Close", "Terrace"),
}
SPAM_HOSTS = {
    "train": ("bit.ly", "win-now.biz", "cheap-deals.ru", "free-gifts.top"),
    "held_out": ("tinyurl.com", "claim-prize.xyz", "pharma-direct.su", "crypto-boost.cc"),
}
PRIZES = {
    "train": ("iPhone", "gift card", "cruise", "laptop"),
    "held_out": ("PlayStation", "new car", "vacation package", "smart TV"),
}
PRODUCTS = {
    "train": ("diet pills", "replica watches", "crypto tokens", "weight loss tea"),
    "held_out": ("sleeping pills", "designer handbags", "muscle supplements", "antibiotics"),
}

# --- spam: no rule detects it, so every spam insertion is "rules_hidden" -----------------------------
SPAM_TEMPLATES = {
    "train": (
        "CLICK HERE to claim your FREE {prize} now!!! {url}",
        "Congratulations! You have been selected to win ${amount}. Reply with your bank details to claim it.",
        "Earn ${amount} a week working from home, no experience needed: {url}",
        "100% free {product}, no prescription needed!!! Order at {url}",
        "URGENT: your account will be suspended in 24 hours, verify your password at {url}",
        "Double your bitcoin in 7 days, guaranteed returns!!! {url}",
        "Get 10,000 real followers for only ${small}, boost your profile today: {url}",
        "Cheap {product} at 80% off, limited stock, buy now at {url}",
        "You are our 1,000,000th visitor today! Spin the wheel for a free {prize}: {url}",
        "Lose 15 kg in 3 weeks with this one weird trick, doctors hate it! {url}",
        "Your parcel could not be delivered. Pay the ${small} customs fee at {url} to reschedule.",
        "Buy 5,000 backlinks and rank #1 on Google in 48 hours: {url}",
    ),
    "held_out": (
        "Dear winner, your address was drawn in the 2024 online lottery! Send {small} USD to release your prize.",
        "Invest {small} dollars today in our AI crypto fund and retire next year, returns of 300% guaranteed: {url}",
        "Pharmacy outlet: {product} without a doctor, shipped discreetly worldwide, 70% off at {url}",
        "Boost your site to page one overnight: 20,000 SEO backlinks for just {small} dollars at {url}",
        "Work from your couch and make {amount} dollars monthly, only 3 spots left, apply at {url}",
        "Security alert from your bank: unusual sign-in detected, confirm your card details within 12 hours at {url}",
        "WINNER!! Your phone number was chosen for a brand new {prize}, reply YES to claim it today",
        "Hello friend, I am a prince with {amount} million dollars to transfer and I need your help, 30% is yours!",
    ),
}

# --- benign look-alikes: links, numbers, "free", "click here": safe, and scan finds nothing ----------
BENIGN = {
    "train": (
        "See https://docs.python.org/3/ for details.",
        "Version 2.4.1 was released on 2021-06-14.",
        "Report bugs through the project's issue tracker.",
        "The free software is distributed without any warranty.",
        "Set the API key in the configuration file.",
        "Click here to expand the section.",
        "The assessment covers 3 classes of input.",
        "Call the function with timeout=30 and retries=2.",
    ),
    "held_out": (
        "Read more at https://www.gnu.org/licenses/ for the full text.",
        "The office moved to the main building in 2019.",
        "Offer the patch upstream before release 1.0.",
        "The cocktail party problem is a classic example.",
        "Passwords are never stored in plain text.",
        "Order the results by date, newest first.",
        "Contact the maintainers at the address given in the README.",
        "Win32 builds need Visual Studio 2019 or newer.",
    ),
}


# --- profanity: the list split by root, and obfuscation styles (disjoint sets) -----------------------
@functools.cache
def profanity_sets() -> dict[str, tuple[str, ...]]:
    """The profanity list split into "train" and "held_out" (~70/30): words that contain one another
    (three letters or more, spaces ignored) form one root and stay on one side; roots are dealt to
    held_out in hash order until it holds HELD_OUT_PROFANITY of the words."""
    words = profanity_words()
    flat = [w.replace(" ", "") for w in words]
    parent = list(range(len(words)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, a in enumerate(flat):
        for j in range(i + 1, len(flat)):
            b = flat[j]
            if len(a) >= 3 and len(b) >= 3 and (a in b or b in a):
                parent[root(i)] = root(j)
    groups: dict[int, list[str]] = {}
    for i, w in enumerate(words):
        groups.setdefault(root(i), []).append(w)
    held: list[str] = []
    train: list[str] = []
    for group in sorted(groups.values(), key=lambda g: unit_hash(0, "profanity-split", g[0])):
        side = held if len(held) + len(group) <= HELD_OUT_PROFANITY * len(words) else train
        side.extend(group)
    return {"train": tuple(sorted(train)), "held_out": tuple(sorted(held))}


def _star_vowel(w: str, rng: random.Random) -> str:  # fuck -> f*ck
    i = next((i for i, c in enumerate(w) if c in "aeiou" and i), 1)
    return w[:i] + "*" + w[i + 1 :]


def _leet(w: str, rng: random.Random) -> str:  # shit -> sh1t, cunt -> cun7
    out = w.translate(str.maketrans("aeio", "4310"))
    return out if out != w else w.translate(str.maketrans("stu", "57v"))


def _spaced(w: str, rng: random.Random) -> str:  # asshole -> a s s h o l e
    return " ".join(w.replace(" ", ""))


def _symbols(w: str, rng: random.Random) -> str:  # bitch -> b!tch, ass -> @$$
    return w.translate(str.maketrans({"i": "!", "a": "@", "s": "$", "o": "()", "c": "("}))


def _dotted(w: str, rng: random.Random) -> str:  # fuck -> f.u.c.k
    return ".".join(w.replace(" ", ""))


def _masked(w: str, rng: random.Random) -> str:  # fuck -> f**k
    w = w.replace(" ", "")
    return w[0] + "*" * (len(w) - 2) + w[-1] if len(w) > 2 else w[0] + "*"


def _hyphenated(w: str, rng: random.Random) -> str:  # fuck -> f-u-c-k
    return "-".join(w.replace(" ", ""))


def _stretched(w: str, rng: random.Random) -> str:  # shit -> shiiit
    return re.sub(r"([aeiou])", lambda m: m.group(1) * 3, w, count=1)


OBFUSCATIONS: dict[str, dict[str, Callable[[str, random.Random], str]]] = {
    "train": {"star_vowel": _star_vowel, "leet": _leet, "spaced": _spaced, "symbols": _symbols},
    "held_out": {"dotted": _dotted, "masked": _masked, "hyphenated": _hyphenated, "stretched": _stretched},
}
OBFUSCATION_STYLES = {s: tuple(styles) for s, styles in OBFUSCATIONS.items()}


# --- personal data: formats the rules see ("visible") and formats they do not ("hidden") -------------
def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _alnum(rng: random.Random, n: int, chars: str = string.ascii_letters + string.digits) -> str:
    """n random characters of `chars`, one of them a digit (keys and tokens have some)."""
    out = [rng.choice(chars) for _ in range(n)]
    out[rng.randrange(n)] = rng.choice(string.digits)
    return "".join(out)


def _card(rng: random.Random, prefix: str, length: int) -> str:
    body = prefix + _digits(rng, length - len(prefix) - 1)
    return body + luhn_check_digit(body)


def _name(rng: random.Random, s: str) -> tuple[str, str]:
    return rng.choice(FIRST[s]), rng.choice(LAST[s])


def _street(rng: random.Random, s: str) -> str:
    return f"{rng.randint(1, 999)} {rng.choice(LAST[s]).title()} {rng.choice(STREET_TYPES[s])}"


PersonalFormat = Callable[[random.Random, str], str]


def _email(rng: random.Random, s: str, sep: str) -> str:
    first, last = _name(rng, s)
    return f"{first}{sep}{last}{_digits(rng, 2)}@{rng.choice(DOMAINS[s])}"


def _email_spelt(rng: random.Random, s: str, sep: str, at: str, dot: str) -> str:
    first, last = _name(rng, s)
    host, tld = rng.choice(DOMAINS[s]).rsplit(".", 1)
    return f"{first}{sep}{last}{_digits(rng, 2)} {at} {host} {dot} {tld}"


def _grouped(digits: str, sep: str) -> str:
    return sep.join(re.findall("....", digits))


def _uk_address(rng: random.Random, s: str) -> str:
    first, last = _name(rng, s)
    postcode = f"{rng.choice(['SW', 'NE', 'KT', 'LS'])}{rng.randint(1, 19)} {rng.randint(1, 9)}"
    postcode += "".join(rng.sample(string.ascii_uppercase, 2))
    return (
        f"Ship it to {first.title()} {last.title()}, Flat {rng.randint(1, 40)}, {_street(rng, s)}, "
        f"{rng.choice(CITIES[s])} {postcode}."
    )


def _iban(rng: random.Random, s: str) -> str:
    return f"Send it to IBAN DE{_digits(rng, 2)} {' '.join(_digits(rng, 4) for _ in range(4))} {_digits(rng, 2)}."


PERSONAL: dict[str, dict[str, dict[str, PersonalFormat]]] = {
    VISIBLE: {  # formats moderation_rules.scan detects
        "train": {
            "email first.last@domain": lambda rng, s: f"Contact me at {_email(rng, s, '.')}.",
            "phone +1 (ddd) ddd-dddd": lambda rng, s: (
                f"Call {_name(rng, s)[0].title()} on +1 ({_digits(rng, 3)}) {_digits(rng, 3)}-{_digits(rng, 4)}."
            ),
            "AWS key": lambda rng, s: (
                f"Use the key AKIA{_alnum(rng, 16, string.ascii_uppercase + string.digits)} to log in."
            ),
            "GitHub token": lambda rng, s: f"token: ghp_{_alnum(rng, 36)}",
            "visa card, spaced": lambda rng, s: (
                f"Pay with card {_grouped(_card(rng, '4', 16), ' ')}, expiry 0{rng.randint(1, 9)}/2{rng.randint(6, 9)}."
            ),
            "SSN": lambda rng, s: f"My SSN is {_digits(rng, 3)}-{_digits(rng, 2)}-{_digits(rng, 4)}.",
        },
        "held_out": {
            "email first_last@domain": lambda rng, s: f"Write to {_email(rng, s, '_')} for the files.",
            "phone +49 15d dddd dddd": lambda rng, s: (
                f"Ring me at +49 15{_digits(rng, 1)} {_digits(rng, 4)} {_digits(rng, 4)} after six."
            ),
            "OpenAI key": lambda rng, s: f"export OPENAI_API_KEY=sk-{_alnum(rng, 48)}",
            "private key": lambda rng, s: f"-----BEGIN RSA PRIVATE KEY----- MIIEow{_alnum(rng, 24)}",
            "mastercard, dashed": lambda rng, s: (
                f"Charge {_grouped(_card(rng, '5' + str(rng.randint(1, 5)), 16), '-')} to my Mastercard."
            ),
            "SSN in a form": lambda rng, s: (
                f"social security no. {_digits(rng, 3)}-{_digits(rng, 2)}-{_digits(rng, 4)} (on file)"
            ),
        },
    },
    HIDDEN: {  # formats no rule matches
        "train": {
            "address: number street, city": lambda rng, s: (
                f"I live at {_street(rng, s)}, {rng.choice(CITIES[s])}, {' '.join(_name(rng, s)).title()}."
            ),
            "email spelt: first.last at host dot tld": lambda rng, s: (
                f"Mail {_email_spelt(rng, s, '.', 'at', 'dot')}."
            ),
            "phone (ddd) ddd-dddd": lambda rng, s: (
                f"My cell is ({_digits(rng, 3)}) {_digits(rng, 3)}-{_digits(rng, 4)}, call after five."
            ),
            "IBAN": _iban,
        },
        "held_out": {
            "address: name, flat, street, city, postcode": _uk_address,
            "email spelt: first_last [at] host [dot] tld": lambda rng, s: _email_spelt(
                rng, s, "_", "[at]", "[dot]"
            ),
            "phone 07dd ddd dddd": lambda rng, s: (
                f"reach me on 07{_digits(rng, 2)} {_digits(rng, 3)} {_digits(rng, 4)}"
            ),
            "passport number": lambda rng, s: (
                f"passport number {rng.choice(string.ascii_uppercase)}{_digits(rng, 8)}, "
                f"issued in {rng.choice(CITIES[s])}"
            ),
        },
    },
}

PERSONAL_FORMATS = {family: {s: tuple(f) for s, f in sets.items()} for family, sets in PERSONAL.items()}


# --- drawing one insertion ---------------------------------------------------------------------------
def _spam(rng: random.Random, s: str) -> str:
    url = f"{rng.choice(['http', 'https'])}://{rng.choice(SPAM_HOSTS[s])}/{rng.randint(1000, 99999)}"
    return rng.choice(SPAM_TEMPLATES[s]).format(
        prize=rng.choice(PRIZES[s]),
        product=rng.choice(PRODUCTS[s]),
        url=url,
        amount=rng.choice([500, 1000, 2500, 5000, 10000]),
        small=rng.choice([9, 19, 29, 49, 99]),
    )


def _profanity(rng: random.Random, s: str, family: str) -> str:
    word = rng.choice(profanity_sets()[s])
    if family == HIDDEN:
        word = OBFUSCATIONS[s][rng.choice(OBFUSCATION_STYLES[s])](word, rng)
    return word.upper() if rng.random() < 0.15 else word


def _insertion(label: str, family: str, rng: random.Random, s: str) -> str:
    if label == "spam":
        return _spam(rng, s)
    if label == "profanity":
        return _profanity(rng, s, family)
    formats = PERSONAL[family][s]
    return formats[rng.choice(sorted(formats))](rng, s)


def _place(text: str, insertion: str, label: str, rng: random.Random) -> str:
    if label == "profanity":  # a word inside the sentence
        words = text.split(" ")
        pos = rng.randint(0, len(words))
        return " ".join([*words[:pos], insertion, *words[pos:]])
    return f"{insertion} {text}" if rng.random() < 0.5 else f"{text} {insertion}"


def _draw(sentence: str, family: str, rng: random.Random, s: str) -> tuple[str, list[str]] | None:
    """One example of `family` from `sentence`, or None when the draw breaks the family's promise."""
    if family == SAFE:
        labels: list[str] = []
    elif family == VISIBLE:
        labels = rng.sample(["profanity", "personal_data"], 1 if rng.random() < 0.8 else 2)
    else:
        r = rng.random()
        labels = rng.sample(["profanity", "personal_data", "spam"], 1 if r < 0.75 else 2 if r < 0.95 else 3)
    text = sentence
    for label in sorted(labels, key=lambda label: label != "profanity"):  # the word goes into the sentence
        insertion = _insertion(label, family, rng, s)
        found = {h.label for h in scan(insertion)}
        if found != ({label} if family == VISIBLE else set()):
            return None
        text = _place(text, insertion, label, rng)
    if rng.random() < (0.3 if family == SAFE else 0.1):
        benign = rng.choice(BENIGN[s])
        text = f"{text} {benign}" if rng.random() < 0.7 else f"{benign} {text}"
    found = {h.label for h in scan(text)}
    if found != (set(labels) if family == VISIBLE else set()):
        return None
    return text, labels


# --- base sentences and the whole set ----------------------------------------------------------------
_NOT_CLEAN = re.compile(
    r"@|https?://|www\.|\d{5,}|\$\d|\d{3,}[ .-]\d{3,}|\(\d{3}\)"
    r"|(?:\bat|\[at\]|\(at\))\s+\S+\s+(?:dot\b|\[dot\]|\(dot\))"
    r"|\b\d{1,5}\s+(?:[A-Z][a-z]+\s+){1,2}(?:Street|St\.|Avenue|Ave\.?|Road|Rd\.|Lane|Boulevard|Blvd|Drive"
    r"|Court|Place|Way|Close|Terrace|Suite|Floor)\b"
)


def _clean(sentence: str) -> bool:
    """A base sentence must carry no label of its own: nothing the rules find (a listed word, an e-mail
    address...), no address (plain or spelt out), long or phone-like number, or link."""
    return MIN_CHARS <= len(sentence) <= MAX_CHARS and not _NOT_CLEAN.search(sentence) and not scan(sentence)


def base_sentences(by_split: Mapping[str, list[Example]]) -> dict[str, dict[str, str]]:
    """split -> {clean prose sentence -> doc_id} from `summarize` inputs and `find` passages. A sentence
    found in documents of two splits is left out (its text would sit on both sides)."""
    where: dict[str, dict[str, str]] = {}  # sentence -> split -> smallest doc_id
    for split, examples in by_split.items():
        for ex in examples:
            if ex.task not in ("summarize", "find"):
                continue
            for sent in sentences(ex.input if ex.task == "summarize" else ex.target):
                docs = where.setdefault(sent, {})
                if split not in docs or ex.doc_id < docs[split]:
                    docs[split] = ex.doc_id
    pool: dict[str, dict[str, str]] = {s: {} for s in SPLITS}
    for sent, docs in where.items():
        if len(docs) == 1 and _clean(sent):
            ((split, doc_id),) = docs.items()
            pool[split][sent] = doc_id
    return pool


def quotas(available: Mapping[str, int], count: int) -> dict[str, int]:
    """`count` spread over splits in proportion to the base sentences each has, with at least
    HELD_OUT_MIN (or all it has) for each held-out split."""
    total = sum(available.values())
    out = dict.fromkeys(SPLITS, 0)
    if not total or count <= 0:
        return out
    count = min(count, total)
    for split in ("val", "test"):
        n = available.get(split, 0)
        out[split] = min(n, max(round(count * n / total), HELD_OUT_MIN))
    out["train"] = min(available.get("train", 0), max(0, count - out["val"] - out["test"]))
    return out


def _family(rng: random.Random) -> str:
    r = rng.random()
    for family in FAMILIES:
        if r < FAMILY_SHARE[family]:
            return family
        r -= FAMILY_SHARE[family]
    return FAMILIES[-1]


def synthesize(by_split: Mapping[str, list[Example]], count: int, seed: int) -> list[Example]:
    """About `count` `moderate` examples (fewer only when base sentences run out) made from the prose
    sentences of `by_split`, the corpus's examples after split assignment (split -> examples). Each
    example has its base document's doc_id and split, and a family (SAFE, VISIBLE, HIDDEN); train
    examples draw from the "train" sets, val and test examples from the "held_out" sets."""
    pool = base_sentences(by_split)
    quota = quotas({s: len(p) for s, p in pool.items()}, count)
    out = []
    for split in SPLITS:
        s = template_set(split)
        order = sorted(pool[split], key=lambda sent: unit_hash(seed, "moderate", split, sent))
        made = 0
        for sentence in order:
            if made >= quota[split]:
                break
            rng = random.Random(f"{seed}:moderate:{split}:{sentence}")
            family = _family(rng)
            for _ in range(ATTEMPTS):
                drawn = _draw(sentence, family, rng, s)
                if drawn:
                    text, labels = drawn
                    out.append(
                        Example("moderate", text, format_labels(labels), pool[split][sentence], split, family)
                    )
                    made += 1
                    break
    return out
