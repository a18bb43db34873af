"""Data loaders that resume exactly: a seeded distributed sampler under a stateful loader.

Lightning restores the loop before calling ``train_dataloader()``, so building the sampler there with
``set_epoch(current_epoch)`` replays the right epoch order, and the loader's saved position skips the
batches already seen. Runs must use ``Trainer(use_distributed_sampler=False)``.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset, DistributedSampler
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


def make_train_loader(dataset: Dataset, trainer: Any, seed: int, num_workers: int = 0, batch_size: int | None = None) -> ResumableLoader:
    """Shuffled, rank-sharded, resumable loader; ``batch_size=None`` when items are whole batches."""
    world, rank, epoch = (trainer.world_size, trainer.global_rank, trainer.current_epoch) if trainer is not None else (1, 0, 0)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return ResumableLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=_unbatched if batch_size is None else None,
        drop_last=batch_size is not None,
    )


def make_eval_loader(dataset: Dataset, trainer: Any, num_workers: int = 0, batch_size: int | None = None) -> ResumableLoader:
    """Ordered, rank-sharded evaluation loader (no shuffling, nothing dropped)."""
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    return ResumableLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=_unbatched if batch_size is None else None
    )
