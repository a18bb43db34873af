"""Data loaders that resume exactly: a seeded distributed sampler under a stateful loader.

Lightning restores the loop before calling ``train_dataloader()``, so building the sampler there with
``set_epoch(current_epoch)`` replays the right epoch order, and the loader's saved position skips the
batches already seen. Runs must use ``Trainer(use_distributed_sampler=False)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader


class ResumableLoader(StatefulDataLoader):
    """A :class:`StatefulDataLoader` that drops a state saved on an epoch's last batch.

    Such a state would make the resumed epoch empty; instead the sampler moves on to the next epoch,
    which is what the uninterrupted run does.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torchdata 0.11 keeps the position in one of these two keys (pinned in pyproject).
        yielded = state_dict.get("_num_yielded", state_dict.get("_snapshot", {}).get("_snapshot_step", 0))
        if yielded >= len(self):
            self.sampler.set_epoch(self.sampler.epoch + 1)
            return
        super().load_state_dict(state_dict)


def _unbatched(item: Any) -> Any:
    # Items are already whole batches (or single examples collated by the default collate).
    return item


def make_train_loader(
    dataset: Dataset, trainer: Any, seed: int, num_workers: int = 0, batch_size: int | None = None, collate_fn: Any = None
) -> ResumableLoader:
    """Shuffled, rank-sharded, resumable loader; ``batch_size=None`` when items are whole batches; ``collate_fn``
    replaces the default stacking."""
    world, rank, epoch = (trainer.world_size, trainer.global_rank, trainer.current_epoch) if trainer is not None else (1, 0, 0)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return ResumableLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=_unbatched if batch_size is None else collate_fn,
        drop_last=batch_size is not None,
    )


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, …`` below ``length``: each index on exactly one rank, none repeated."""

    def __init__(self, length: int, world: int = 1, rank: int = 0) -> None:
        self.length, self.world, self.rank = length, world, rank
        self.epoch = 0

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world))

    def set_epoch(self, epoch: int) -> None:
        """Kept for the loader's resume rule; the order does not depend on the epoch."""
        self.epoch = epoch


class PaddedEvalSet(Dataset):
    """``dataset`` followed by blank items up to ``length``: copies of item 0 with every label ``-100``.

    Every rank must run the same evaluation hooks (they end in a collective reduce), so every rank needs as
    many items; ``DistributedSampler`` pads by repeating real items, which counts them twice (an MQAR test of
    3 batches on 2 ranks scored batch 0 twice). A blank item has no labelled token, so it counts nothing.
    """

    def __init__(self, dataset: Dataset, length: int) -> None:
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> Any:
        if idx < len(self.dataset):
            return self.dataset[idx]
        item = self.dataset[0]
        return {**item, "labels": torch.full_like(item["labels"], -100)}


def make_eval_loader(
    dataset: Dataset, trainer: Any, num_workers: int = 0, batch_size: int | None = None, collate_fn: Any = None
) -> ResumableLoader:
    """Ordered, rank-sharded evaluation loader: no shuffling, nothing dropped, no item counted twice."""
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    padded = -(-len(dataset) // world) * world
    if padded != len(dataset):
        dataset = PaddedEvalSet(dataset, padded)
    return ResumableLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(padded, world, rank),
        num_workers=num_workers,
        collate_fn=_unbatched if batch_size is None else collate_fn,
    )
