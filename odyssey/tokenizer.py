"""Byte-level BPE (HF `tokenizers`) with task control tokens, and the prompt format of every task.

Byte-level means every UTF-8 string encodes and decodes back exactly: there is no unknown token and no
normalisation. The control tokens of odyssey.tasks are never produced from text: `encode` spells
"<|eos|>" in a user's text as ordinary bytes, and only `prompt`/`example` insert control tokens, by id.

Prompt format (one sequence per example):
    task:  <|bos|> <|summarize|> input... <|sep|> target... <|eos|>     loss on target and <|eos|>
    lm:    <|bos|> text... <|eos|>                                      loss on text and <|eos|>
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from odyssey import atomic
from odyssey.errors import OdysseyError
from odyssey.tasks import BOS, EOS, PAD, SEP, SPECIAL_TOKENS, TASK_TOKENS


class Tokenizer:
    def __init__(self, hf: HFTokenizer):
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise OdysseyError(
                f"tokenizer lacks control tokens {missing}; retrain it with `odyssey tokenizer train`"
            )
        hf.encode_special_tokens = True  # text is always text: see the module docstring
        self.hf = hf
        self.pad_id, self.bos_id, self.eos_id, self.sep_id = (hf.token_to_id(t) for t in (PAD, BOS, EOS, SEP))
        self.task_ids = {task: hf.token_to_id(tok) for task, tok in TASK_TOKENS.items()}
        self.special_ids = frozenset(hf.token_to_id(t) for t in SPECIAL_TOKENS)

    # --- building and storing ----------------------------------------------------------------------

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = False
    ) -> Tokenizer:
        """Learn BPE merges from texts. The 256 byte symbols and the control tokens are always in the
        vocabulary, so vocab_size must leave room for merges beyond them."""
        floor = 256 + len(SPECIAL_TOKENS)
        if vocab_size <= floor:
            raise OdysseyError(
                f"vocab_size={vocab_size} is too small: it must exceed {floor} (bytes + control tokens)"
            )
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),  # ids 0..n-1, in this order: <|pad|> is 0
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        hf.train_from_iterator(texts, trainer)
        # A word that is already a token is taken whole instead of being rebuilt merge by merge:
        # ~25% faster encoding (bench/data.py), and on our corpus the very same ids.
        spec = json.loads(hf.to_str())
        spec["model"]["ignore_merges"] = True
        return cls(HFTokenizer.from_str(json.dumps(spec)))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise OdysseyError(f"no tokenizer at {path}; build one with `odyssey tokenizer train`")
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        atomic.write_text(path, self.to_json())

    def to_json(self) -> str:
        return self.hf.to_str()

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialised tokenizer: packed data and checkpoints record which one made them."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    # --- text <-> ids ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts on all cores (the Rust side parallelises the batch)."""
        fast = getattr(self.hf, "encode_batch_fast", None)  # skips offsets; tokenizers >= 0.21
        encodings = (fast or self.hf.encode_batch)(texts, add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; control tokens are dropped."""
        return self.hf.decode(
            [int(i) for i in ids if int(i) not in self.special_ids], skip_special_tokens=False
        )

    # --- the task format ---------------------------------------------------------------------------

    def prefix(self, task: str) -> list[int]:
        """The control tokens that open an example of `task`."""
        if task == "lm":
            return [self.bos_id]
        if task not in self.task_ids:
            raise OdysseyError(f"unknown task {task!r}; tasks: lm, {', '.join(self.task_ids)}")
        return [self.bos_id, self.task_ids[task]]

    def prompt(self, task: str, text: str) -> list[int]:
        """What the model is given for a request: everything before the target."""
        if task == "lm":
            return self.prefix(task) + self.encode(text)
        return self.prefix(task) + self.encode(text) + [self.sep_id]

    def example(self, task: str, input_ids: list[int], target_ids: list[int]) -> tuple[list[int], list[int]]:
        """A training sequence and its loss mask (1 = trained on), from encoded input and target."""
        if task == "lm":
            ids = [self.bos_id, *target_ids, self.eos_id]
            return ids, [0] + [1] * (len(ids) - 1)
        head = [*self.prefix(task), *input_ids, self.sep_id]
        tail = [*target_ids, self.eos_id]
        return head + tail, [0] * len(head) + [1] * len(tail)
