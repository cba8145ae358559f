"""Which latents each rank trains and validates on at each step of stage 2.

The latents live on the training device for the whole run (DiTTrainingModule's buffers), so a "dataloader" is a
list of indices. A training batch is a pure function of (seed, global step, rank): epoch-wise permutations seeded
by (seed, epoch), cut into world x batch_size slices. That makes a resume exact even mid-epoch (Lightning's own
sampler could not know) and keeps the step free of host-to-device copies. tests/test_resume.py's kill -9
tests check that a resumed run ends with an uninterrupted run's weights.
"""
import math

import torch


def steps_per_epoch(num_train: int, batch_size: int, world: int) -> int:
    """Optimizer steps per pass over num_train latents with batch_size per rank on `world` ranks (at least 1; the
    remainder of each permutation is left out)."""
    return max(1, num_train // (batch_size * world))


class Batches:
    """A sized iterable of batch descriptors (a list would read as several dataloaders to Lightning)."""
    def __init__(self, items: list):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def validation_batches(num_val: int, batch_size: int, rank: int, world: int) -> Batches:
    """This rank's (start, end) slices of the num_val validation latents: the rank's contiguous shard, in batches
    of at most batch_size."""
    shard = math.ceil(num_val / world)
    starts = range(rank * shard, min(num_val, (rank + 1) * shard), batch_size)
    return Batches([(s, min(s + batch_size, (rank + 1) * shard, num_val)) for s in starts])


class TrainBatches:
    """The training batches of a run (see the module docstring): `indices(step, rank, world, device)`."""
    def __init__(self, num_train: int, batch_size: int, seed: int):
        self.num_train, self.batch_size, self.seed = num_train, batch_size, seed
        self.perm: torch.Tensor | None = None   # this epoch's permutation, on the device
        self.perm_epoch = -1

    def indices(self, step: int, rank: int, world: int, device: torch.device) -> torch.Tensor:
        """(batch_size,) int64 indices, on `device`, of this rank's batch at a global step.

        The permutation is drawn on the CPU (identical on every device) once per epoch and cached on the
        device: copying fresh indices to the GPU every step would block the host on the GPU every step.
        """
        n = self.num_train
        epoch, pos = divmod(step, steps_per_epoch(n, self.batch_size, world))
        if self.perm_epoch != epoch or self.perm is None or self.perm.device != device:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            self.perm, self.perm_epoch = perm.to(device, non_blocking=True), epoch
        start = (pos * world + rank) * self.batch_size
        return self.perm[torch.arange(start, start + self.batch_size, device=device) % n]
