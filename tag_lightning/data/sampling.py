"""The samplers: training (shuffled, resumable mid-epoch) and evaluation (each image counted once).

The training sampler yields ``(epoch, index)`` pairs, so an item's augmentation can be drawn from a generator
seeded by (seed, epoch, index): the same sample in the same epoch looks the same whatever the
process, worker count or prefetching. With the order a function of (seed, epoch) too, a run
resumed from a mid-epoch checkpoint skips exactly the samples it had trained on and continues
with the very batches an uninterrupted run would have seen.

The evaluation sampler gives each rank a contiguous slice of the data in order. Ranks must run
the same number of batches (FSDP2 gathers weights in every generation step, DDP syncs buffers in
every forward), so a short slice is padded with repeats, as Lightning's own sampler does; unlike
it, ours marks them, and the module answers a repeat without counting or writing it.

Both are `DistributedSampler`s, so Lightning keeps them (instead of replacing them for DDP) and
calls `set_epoch` on them every epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import NamedTuple

from torch.utils.data import DistributedSampler


class Key(NamedTuple):
    """Which item to load: its index, the epoch its augmentation is drawn for, and whether it only
    pads an evaluation rank's slice (answered, never counted)."""

    epoch: int
    index: int
    repeat: bool = False


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

    def __iter__(self) -> Iterator[Key]:
        indices = list(super().__iter__())[self.skip:]
        epoch, self.skip = self.epoch, 0
        return iter([Key(epoch, index) for index in indices])


class EvaluationSampler(DistributedSampler):
    """Rank r gets samples [r*n, (r+1)*n) in order, n = ceil(len / ranks), a short slice padded with
    marked repeats of the first samples: gathered in rank order, the answers are in dataset order."""

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)  # sets num_samples = n

    def __iter__(self) -> Iterator[Key]:
        size = len(self.dataset)
        start = self.rank * self.num_samples
        return iter([Key(0, position % size, repeat=position >= size)
                     for position in range(start, start + self.num_samples)])
