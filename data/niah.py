"""Single needle in a haystack (RULER's S-NIAH), byte-level: generators and a training data module.

Three needles, as in RULER / Titans Table 2:

* ``passkey``: ``The pass key is 71432. Remember it. 71432 is the pass key.`` hidden in repeated filler
  sentences; asked back with ``What is the pass key? The pass key is``.
* ``number``: ``One of the special magic numbers for calm-river is: 5203941.`` among distractor text
  (the embedded standard-library corpus); asked back by its key.
* ``word``: the same with a word from :data:`VALUE_WORDS` as the value.

Tokens are UTF-8 bytes (ids 0–255, so any model with a vocabulary of at least 256 can be probed);
a prompt has exactly the requested number of tokens and the answer is the bytes that follow it.
The needle goes at a fraction ``depth`` of the haystack (0 = first, 1 = just before the question),
moved back to the previous space or newline (at most :data:`SNAP_BYTES`) so it does not split a word.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from seqzoo.data.loading import make_eval_loader, make_train_loader
from seqzoo.data.text import stdlib_corpus_files

KINDS = ("passkey", "number", "word")
FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
SNAP_BYTES = 16
STDLIB_CORPUS_BYTES = 4 << 20
DEFAULT_DIGITS = {"passkey": 5, "number": 7, "word": 0}
DEFAULT_HAYSTACK = {"passkey": "filler", "number": "stdlib", "word": "stdlib"}

KEY_ADJECTIVES = (
    "calm", "brave", "quiet", "rapid", "golden", "silent", "frozen", "gentle", "hollow", "bright", "ancient", "humble",
    "crimson", "distant", "eager", "fragile", "grumpy", "honest", "lucky", "mellow", "nimble", "proud", "rustic", "shiny",
    "tidy", "vivid", "wild", "young", "zesty", "sturdy", "lively", "polite",
)  # fmt: skip
KEY_NOUNS = (
    "river", "falcon", "meadow", "lantern", "harbor", "canyon", "orchard", "glacier", "compass", "violin", "pepper", "marble",
    "tunnel", "beacon", "saddle", "kettle", "ladder", "cactus", "island", "thunder", "pillow", "garden", "rocket", "walnut",
    "feather", "mirror", "anchor", "basket", "candle", "dragon", "forest", "helmet",
)  # fmt: skip
VALUE_WORDS = (
    "apple", "bridge", "cotton", "desert", "engine", "fabric", "guitar", "hammer", "igloo", "jacket", "kitten", "lemon",
    "magnet", "needle", "oyster", "parrot", "quartz", "ribbon", "salmon", "tomato", "umbrella", "velvet", "window", "yogurt",
    "zipper", "barrel", "carpet", "dolphin", "eagle", "fossil", "ginger", "hazel", "insect", "jungle", "koala", "lobster",
    "muffin", "nectar", "olive", "pencil", "quiver", "rabbit", "spider", "turtle", "unicorn", "violet", "walrus", "yacht",
    "zebra", "bamboo", "cherry", "donkey", "elbow", "flute", "goblin", "hornet", "ivory", "jigsaw", "kayak", "llama",
    "mango", "noodle", "orbit", "pickle",
)  # fmt: skip


@dataclass
class NeedleExample:
    """One probe example.

    Attributes:
        prompt_ids: int64 ``[length]`` byte tokens: haystack with the needle, then the question.
        answer: the expected continuation (ASCII); its bytes are the target tokens.
        metadata: ``kind``, ``length``, ``depth`` (requested), ``needle_start`` / ``needle_end``
            (token offsets of the needle in the prompt), ``needle_depth`` (needle start over the
            haystack length, as placed), ``key``, ``haystack``.
    """

    prompt_ids: torch.Tensor
    answer: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def answer_ids(self) -> torch.Tensor:
        """int64 ``[len(answer)]`` byte tokens of the answer."""
        return _ids(self.answer.encode())


def _ids(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))


def check_kind(kind: str) -> str:
    """``kind`` if it is one of :data:`KINDS`, else a one-line ``ValueError``."""
    if kind not in KINDS:
        raise ValueError(f"niah: unknown kind {kind!r}; choose {', '.join(KINDS)}")
    return kind


def chance_accuracy(kind: str, digits: int | None = None) -> float:
    """Exact-match accuracy of guessing one fixed answer: 1/(number of possible answers).

    Numbers have ``digits`` digits with a non-zero first digit; words come from :data:`VALUE_WORDS`.
    """
    check_kind(kind)
    if kind == "word":
        return 1.0 / len(VALUE_WORDS)
    d = DEFAULT_DIGITS[kind] if digits is None else digits
    return 1.0 / (9 * 10 ** (d - 1))


@functools.lru_cache(maxsize=1)
def stdlib_corpus_bytes() -> bytes:
    """The first :data:`STDLIB_CORPUS_BYTES` bytes of the standard-library corpus (files in sorted order)."""
    pieces, size = [], 0
    for path in stdlib_corpus_files():
        data = path.read_bytes()
        pieces.append(data)
        size += len(data)
        if size >= STDLIB_CORPUS_BYTES:
            break
    return b"\n".join(pieces)[:STDLIB_CORPUS_BYTES]


def _haystack(source: str, size: int, rng: np.random.Generator) -> bytes:
    """``size`` bytes of filler (from its start) or of the corpus (from a random offset)."""
    if source == "filler":
        return (FILLER * (size // len(FILLER) + 1))[:size]
    if source == "stdlib":
        corpus = stdlib_corpus_bytes()
        if size >= len(corpus):
            return (corpus * (size // len(corpus) + 1))[:size]
        start = int(rng.integers(0, len(corpus) - size + 1))
        return corpus[start : start + size]
    raise ValueError(f"niah: unknown haystack {source!r}; choose filler or stdlib")


def _needle(kind: str, rng: np.random.Generator, digits: int) -> tuple[bytes, bytes, str, str]:
    """``(needle, question, answer, key)`` for one example."""
    if kind == "passkey":
        answer = str(int(rng.integers(10 ** (digits - 1), 10**digits)))
        return (
            f"The pass key is {answer}. Remember it. {answer} is the pass key. ".encode(),
            b"\nWhat is the pass key? The pass key is ",
            answer,
            "",
        )
    key = f"{KEY_ADJECTIVES[rng.integers(len(KEY_ADJECTIVES))]}-{KEY_NOUNS[rng.integers(len(KEY_NOUNS))]}"
    noun = "number" if kind == "number" else "word"
    answer = str(int(rng.integers(10 ** (digits - 1), 10**digits))) if kind == "number" else VALUE_WORDS[rng.integers(len(VALUE_WORDS))]
    needle = f"One of the special magic {noun}s for {key} is: {answer}. ".encode()
    question = f"\nWhat is the special magic {noun} for {key}? The special magic {noun} for {key} is: ".encode()
    return needle, question, answer, key


def min_length(kind: str, digits: int | None = None, with_answer: bool = False) -> int:
    """The shortest prompt (or prompt + answer) that holds every needle and question of ``kind``."""
    check_kind(kind)
    digits = DEFAULT_DIGITS[kind] if digits is None else digits
    answer = "9" * digits if kind != "word" else max(VALUE_WORDS, key=len)
    key = max(KEY_ADJECTIVES, key=len) + "-" + max(KEY_NOUNS, key=len)
    noun = "number" if kind == "number" else "word"
    if kind == "passkey":
        needle, question = f"The pass key is {answer}. Remember it. {answer} is the pass key. ", "\nWhat is the pass key? The pass key is "
    else:
        needle = f"One of the special magic {noun}s for {key} is: {answer}. "
        question = f"\nWhat is the special magic {noun} for {key}? The special magic {noun} for {key} is: "
    return len(needle) + len(question) + (len(answer) if with_answer else 0)


def make_needle_example(
    kind: str,
    length: int,
    depth: float,
    rng: np.random.Generator,
    haystack: str | None = None,
    digits: int | None = None,
    reserve_answer: bool = False,
) -> NeedleExample:
    """One example whose prompt is exactly ``length`` byte tokens, the needle at ``depth`` ∈ [0, 1].

    ``haystack``: ``"filler"`` or ``"stdlib"`` (default: filler for passkey, the corpus otherwise);
    ``digits``: digits of passkeys / magic numbers (default 5 / 7); ``reserve_answer``: make prompt
    plus answer ``length`` tokens instead (training sequences of one length).
    """
    check_kind(kind)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"niah: depth must lie in [0, 1], got {depth}")
    digits = DEFAULT_DIGITS[kind] if digits is None else digits
    if kind != "word" and digits < 1:
        raise ValueError(f"niah: digits must be positive, got {digits}")
    source = haystack or DEFAULT_HAYSTACK[kind]
    needle, question, answer, key = _needle(kind, rng, digits)
    size = length - len(needle) - len(question) - (len(answer) if reserve_answer else 0)
    if size < 0:
        raise ValueError(f"niah: a {kind} prompt needs at least {length - size} tokens, got length {length}")
    hay = _haystack(source, size, rng)
    at = int(round(depth * size))
    # Back up to a word boundary so the needle reads as its own sentence.
    for back in range(min(SNAP_BYTES, at) + 1):
        if at - back == 0 or hay[at - back - 1 : at - back] in (b" ", b"\n"):
            at -= back
            break
    prompt = hay[:at] + needle + hay[at:] + question
    meta = {
        "kind": kind,
        "length": len(prompt),
        "depth": depth,
        "needle_start": at,
        "needle_end": at + len(needle),
        "needle_depth": at / size if size else 0.0,
        "key": key,
        "haystack": source,
    }
    return NeedleExample(_ids(prompt), answer, meta)


def example_rng(seed: int, length: int, depth: float, index: int) -> np.random.Generator:
    """The generator of example ``index`` of a (length, depth) cell: cells and examples draw independently."""
    return np.random.default_rng([seed, length, int(round(depth * 10_000)), index])


def generate_niah(
    kind: str, num_examples: int, length: int, depth: float, seed: int = 0, haystack: str | None = None, digits: int | None = None
) -> list[NeedleExample]:
    """``num_examples`` examples of one (length, depth) cell; deterministic in ``seed``."""
    return [make_needle_example(kind, length, depth, example_rng(seed, length, depth, i), haystack, digits) for i in range(num_examples)]


def training_example(
    kind: str, seq_len: int, rng: np.random.Generator, haystack: str | None = None, digits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)``, both int64 ``[seq_len]``: a prompt + answer of ``seq_len + 1`` tokens
    shifted for next-token prediction, the needle at a uniform depth; labels are -100 except where the
    target is an answer token, so the loss covers only the answer.
    """
    example = make_needle_example(kind, seq_len + 1, float(rng.random()), rng, haystack, digits, reserve_answer=True)
    full = torch.cat([example.prompt_ids, example.answer_ids])
    labels = full[1:].clone()
    labels[: len(example.prompt_ids) - 1] = -100
    return full[:-1], labels


class NeedleTrainingSet(torch.utils.data.Dataset):
    """``count`` training examples of one length, example ``i`` drawn from its own seed ``(seed, i)``.

    Items: ``{"input_ids": [seq_len], "labels": [seq_len]}`` (see :func:`training_example`).
    """

    def __init__(self, kind: str, seq_len: int, count: int, seed: int, haystack: str | None = None, digits: int | None = None) -> None:
        self.kind, self.seq_len, self.count, self.seed = kind, seq_len, count, seed
        self.haystack, self.digits = haystack, digits

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        inputs, labels = training_example(self.kind, self.seq_len, np.random.default_rng([self.seed, int(idx)]), self.haystack, self.digits)
        return {"input_ids": inputs, "labels": labels}


class NIAHDataModule(pl.LightningDataModule):
    """Needle-in-a-haystack training at one length (loss on the answer tokens only), byte vocabulary.

    Args:
        kind: ``passkey``, ``number`` or ``word``.
        seq_len: tokens per training sequence (prompt + answer − 1).
        vocab_size: model vocabulary; at least 256 (bytes; 257 matches the text configs).
        num_train / num_val: examples; validation and test use the same held-out seed.
        batch_size / eval_batch_size: examples per batch.
        haystack: ``filler`` or ``stdlib`` (default: filler for passkey, the corpus otherwise).
        digits: digits of passkeys / magic numbers (default 5 / 7).
        seed: train examples use ``2·seed``, held-out ones ``2·seed + 1``.
        num_workers: loader workers.
    Test at longer lengths with ``seqzoo-eval probe niah``.
    """

    def __init__(
        self,
        kind: str = "passkey",
        seq_len: int = 256,
        vocab_size: int = 257,
        num_train: int = 20000,
        num_val: int = 256,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        haystack: str | None = None,
        digits: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_kind(kind)
        if vocab_size < 256:
            raise ValueError(f"niah: byte tokens need vocab_size >= 256, got {vocab_size}")
        if num_train < 1 or num_val < 1 or batch_size < 1 or eval_batch_size < 1:
            raise ValueError("niah: example counts and batch sizes must be positive")
        if haystack not in (None, "filler", "stdlib"):
            raise ValueError(f"niah: unknown haystack {haystack!r}; choose filler or stdlib")
        self.kind, self.seq_len, self.vocab_size = kind, seq_len, vocab_size
        self.num_train, self.num_val = num_train, num_val
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.haystack, self.digits, self.seed, self.num_workers = haystack, digits, seed, num_workers
        # Fail at construction, not mid-training, when the sequence cannot hold every needle.
        if seq_len + 1 < min_length(kind, digits, with_answer=True):
            raise ValueError(
                f"niah: a {kind} training sequence needs at least {min_length(kind, digits, with_answer=True) - 1} tokens, got seq_len {seq_len}"
            )
        self.train_set: NeedleTrainingSet | None = None
        self.test_set: NeedleTrainingSet | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = NeedleTrainingSet(self.kind, self.seq_len, self.num_train, 2 * self.seed, self.haystack, self.digits)
            self.test_set = NeedleTrainingSet(self.kind, self.seq_len, self.num_val, 2 * self.seed + 1, self.haystack, self.digits)

    def train_dataloader(self):
        return make_train_loader(self.train_set, self.trainer, self.seed, self.num_workers, batch_size=self.batch_size)

    def val_dataloader(self):
        return make_eval_loader(self.test_set, self.trainer, self.num_workers, batch_size=self.eval_batch_size)

    def test_dataloader(self):
        return make_eval_loader(self.test_set, self.trainer, self.num_workers, batch_size=self.eval_batch_size)
