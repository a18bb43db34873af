"""Multi-query associative recall (MQAR), exactly as Zoology defines it, and its LightningDataModule.

An example is ``k1 v1 k2 v2 … kN vN`` (repeated ``num_passes`` times) followed by a query region in
which every key appears once, at an even offset ``2·gap`` with power-law distributed gaps. Keys come
from ``[1, V/2)`` and values from ``[V/2, V)``, distinct within an example; token 0 is filler
(replaced by random tokens when ``random_non_queries``). Labels are the next-token targets, -100
everywhere except at each query key, whose label is its value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import torch

from seqzoo.data.loading import make_eval_loader, make_train_loader


@dataclass(frozen=True)
class MQARSegment:
    """One (seq_len, num_kv_pairs) slice of an MQAR data set with its number of examples."""

    seq_len: int
    num_kv_pairs: int
    num_examples: int

    @property
    def name(self) -> str:
        """``seq{seq_len}_kv{num_kv_pairs}``, the key used in per-segment metrics."""
        return f"seq{self.seq_len}_kv{self.num_kv_pairs}"


def generate_mqar(
    vocab_size: int,
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    seed: int,
    power_a: float = 0.01,
    num_passes: int = 1,
    random_non_queries: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num_examples`` MQAR examples; deterministic in ``seed``.

    Returns ``(inputs, labels)``, both int64 ``[num_examples, seq_len]``.
    """
    context = 2 * num_kv_pairs * num_passes
    problem = mqar_misfit(vocab_size, seq_len, num_kv_pairs, num_passes)
    if problem:
        raise ValueError(f"MQAR: {problem}")
    rng = np.random.default_rng(seed)
    half = vocab_size // 2
    keys = _distinct_draws(rng, num_examples, half - 1, num_kv_pairs) + 1
    values = _distinct_draws(rng, num_examples, vocab_size - half, num_kv_pairs) + half
    kv = np.empty((num_examples, 2 * num_kv_pairs), dtype=np.int64)
    kv[:, 0::2], kv[:, 1::2] = keys, values
    kv = np.tile(kv, (1, num_passes))

    # Gaps without replacement with p(i) ∝ a·i^(a−1), i = 1..space: Gumbel top-k draws exactly that.
    space = (seq_len - context) // 2
    log_p = np.log(power_a) + (power_a - 1) * np.log(np.arange(1, space + 1))
    gumbel = log_p - np.log(-np.log(rng.random((num_examples, space))))
    gaps = np.argsort(-gumbel, axis=1)[:, :num_kv_pairs]

    queries = np.zeros((num_examples, seq_len - context + 1), dtype=np.int64)
    np.put_along_axis(queries, 2 * gaps, keys, axis=1)
    examples = np.concatenate([kv, queries], axis=1)
    labels = np.full((num_examples, seq_len + 1), -100, dtype=np.int64)
    np.put_along_axis(labels, 2 * gaps + context + 1, values, axis=1)
    inputs, labels = examples[:, :-1], labels[:, 1:]
    if random_non_queries:
        filler = inputs == 0
        inputs = np.where(filler, rng.integers(0, vocab_size, size=inputs.shape), inputs)
    return torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(np.ascontiguousarray(labels))


def mqar_misfit(vocab_size: int, seq_len: int, num_kv_pairs: int, num_passes: int = 1) -> str | None:
    """Why an MQAR segment cannot be drawn with this vocabulary, or ``None`` when it can.

    Zoology's rules: an even ``seq_len`` below ``vocab_size``; the pairs (``num_passes`` times) and their
    queries within ``seq_len``; distinct keys from ``[1, vocab_size/2)``.
    """
    if seq_len % 2:
        return f"seq_len must be even, got {seq_len}"
    if vocab_size <= seq_len:
        return f"vocab_size ({vocab_size}) must exceed seq_len ({seq_len}); the longest sequence it holds is {(vocab_size - 1) // 2 * 2}"
    if num_kv_pairs < 1 or 2 * num_kv_pairs * num_passes + 2 * num_kv_pairs > seq_len:
        return f"{num_kv_pairs} key-value pairs (x{num_passes} passes) do not fit in seq_len {seq_len}"
    if num_kv_pairs > vocab_size // 2 - 1:
        return f"{num_kv_pairs} distinct keys do not fit in a key vocabulary of {vocab_size // 2 - 1}"
    return None


def _distinct_draws(rng: np.random.Generator, rows: int, population: int, k: int) -> np.ndarray:
    """``[rows, k]`` draws from ``range(population)``, distinct within each row, in random order."""
    out = np.empty((rows, k), dtype=np.int64)
    block = max(1, 2**22 // population)  # bound the random matrix at ~32 MB
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        out[start:stop] = np.argsort(rng.random((stop - start, population)), axis=1)[:, :k]
    return out


class SegmentBatches(torch.utils.data.Dataset):
    """A data set whose items are whole batches, each drawn from a single segment.

    Items: ``{"input_ids": [batch, seq], "labels": [batch, seq], "segment": int}``. Segments of
    different lengths are never mixed inside a batch.
    """

    def __init__(self, segments: Sequence[tuple[torch.Tensor, torch.Tensor]], batch_size: int, seed: int, drop_last: bool) -> None:
        self.segments = list(segments)
        rng = np.random.default_rng(seed)
        self.index: list[tuple[int, np.ndarray]] = []
        for seg_id, (inputs, _) in enumerate(self.segments):
            order = rng.permutation(len(inputs))
            stop = len(order) - len(order) % batch_size if drop_last else len(order)
            for start in range(0, stop, batch_size):
                self.index.append((seg_id, order[start : start + batch_size]))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor | int]:
        seg_id, rows = self.index[idx]
        inputs, labels = self.segments[seg_id]
        rows_t = torch.from_numpy(rows)
        return {"input_ids": inputs[rows_t], "labels": labels[rows_t], "segment": seg_id}


class MQARDataModule(pl.LightningDataModule):
    """MQAR train and test sets from lists of segments; train and test use different seeds.

    Args:
        vocab_size: token vocabulary (keys ``[1, V/2)``, values ``[V/2, V)``).
        train_segments / test_segments: ``{seq_len, num_kv_pairs, num_examples}`` mappings.
        batch_size / eval_batch_size: examples per batch (one segment per batch).
        seed: train data seed; the test data uses ``seed + 1``.
        power_a, num_passes, random_non_queries: Zoology's generator options.
        num_workers: loader workers.
    Validation and test both run on the test segments, reported per segment.
    """

    def __init__(
        self,
        vocab_size: int,
        train_segments: Sequence[dict],
        test_segments: Sequence[dict],
        batch_size: int = 64,
        eval_batch_size: int = 256,
        seed: int = 0,
        power_a: float = 0.01,
        num_passes: int = 1,
        random_non_queries: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"MQAR: batch sizes must be positive, got {batch_size}, {eval_batch_size}")
        self.vocab_size = vocab_size
        self.train_segments = [MQARSegment(**dict(s)) for s in train_segments]
        self.test_segments = [MQARSegment(**dict(s)) for s in test_segments]
        if not self.train_segments or not self.test_segments:
            raise ValueError("MQAR: need at least one train and one test segment")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed, self.num_workers = seed, num_workers
        self.options = dict(power_a=power_a, num_passes=num_passes, random_non_queries=random_non_queries)
        self.train_set: SegmentBatches | None = None
        self.test_set: SegmentBatches | None = None

    @property
    def segment_names(self) -> list[str]:
        """Names of the test segments, in the order of the ``segment`` ids in test batches."""
        return [s.name for s in self.test_segments]

    def _draw(self, segments: list[MQARSegment], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Each segment gets its own seed so adding a segment does not change the others.
        return [
            generate_mqar(self.vocab_size, s.num_examples, s.seq_len, s.num_kv_pairs, seed=seed * 1000 + i, **self.options)
            for i, s in enumerate(segments)
        ]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = SegmentBatches(self._draw(self.train_segments, 2 * self.seed), self.batch_size, self.seed, drop_last=True)
            if len(self.train_set) == 0:
                raise ValueError(f"MQAR: no full train batch of {self.batch_size}; add examples or lower batch_size")
        if self.test_set is None:
            self.test_set = SegmentBatches(
                self._draw(self.test_segments, 2 * self.seed + 1), self.eval_batch_size, self.seed, drop_last=False
            )

    def train_dataloader(self):
        return make_train_loader(self.train_set, self.trainer, self.seed, self.num_workers)

    def val_dataloader(self):
        return make_eval_loader(self.test_set, self.trainer, self.num_workers)

    def test_dataloader(self):
        return make_eval_loader(self.test_set, self.trainer, self.num_workers)
