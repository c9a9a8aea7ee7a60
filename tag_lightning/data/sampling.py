"""The training sampler: shuffled per (seed, epoch), sharded per rank, resumable mid-epoch.

It yields ``(epoch, index)`` pairs, so an item's augmentation can be drawn from a generator
seeded by (seed, epoch, index): the same sample in the same epoch looks the same whatever the
process, worker count or prefetching. With the order a function of (seed, epoch) too, a run
resumed from a mid-epoch checkpoint skips exactly the samples it had trained on and continues
with the very batches an uninterrupted run would have seen.

It is a `DistributedSampler`, so Lightning keeps it (instead of replacing it for DDP) and calls
`set_epoch` on it every epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0  # samples of the current epoch already trained on (set when resuming)

    def resume(self, epoch: int, samples_done: int) -> None:
        """Continue `epoch` after its first `samples_done` samples of this rank."""
        self.set_epoch(epoch)
        self.skip = samples_done

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.skip:]
        epoch, self.skip = self.epoch, 0
        return iter([(epoch, index) for index in indices])
