"""Which samples each process sees: global batches that do not depend on how they are split.

One optimizer step consumes a global batch of `micro * world * accum` samples: the next slice of the
epoch's permutation (seeded by seed and epoch). The slice is cut into `world * accum` micro-batches;
process `rank` takes micro-batch `a * world + rank` at accumulation step `a`. So 2 processes x 1
accumulation and 1 process x 2 accumulations see the same micro-batches, and a run resumed at step s
continues with exactly the batches it would have had. Where BatchNorm is per process (depth; any task on
CPU) the two layouts therefore normalise each micro-batch by the same statistics (the running averages
differ: accumulation updates them once per micro-batch, DDP once per step from rank 0's); semseg and refer
on GPUs under torchrun use SyncBatchNorm, which normalises over all ranks' micro-batches of a step.

Evaluation: torch.utils.data.DistributedSampler pads the set with repeated samples so that every rank
gets the same count; those repeats would be counted twice. ShardedEvalSampler gives each index to
exactly one rank instead. Ranks may then hold one sample more or less, so run the eval forward on the
bare module, not through the DistributedDataParallel wrapper, and keep collective calls out of the
eval loop.
"""
import torch

from vpd import dist


class GlobalBatchSampler(torch.utils.data.Sampler):
    def __init__(self, n, micro, world, rank, accum, seed, epoch, start_step=0):
        self.n, self.micro, self.world, self.rank, self.accum = n, micro, world, rank, accum
        self.seed, self.epoch, self.start_step = seed, epoch, start_step
        self.global_batch = micro * world * accum
        self.steps = n // self.global_batch  # the last partial batch is dropped, as drop_last

    def __len__(self):
        return (self.steps - self.start_step) * self.accum

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for step in range(self.start_step, self.steps):
            base = step * self.global_batch
            for a in range(self.accum):
                start = base + (a * self.world + self.rank) * self.micro
                yield perm[start:start + self.micro]


class ShardedEvalSampler(torch.utils.data.Sampler):
    """Rank r of `world` yields r, r + world, r + 2*world, ... < dataset_len: each index exactly once
    over all ranks, in DistributedSampler's (unshuffled) order but without its padding duplicates.

    rank/world default to torch.distributed's when it is initialised, else 0 and 1.
    """

    def __init__(self, dataset_len, rank=None, world=None):
        if rank is None:
            rank = dist.rank()
        if world is None:
            world = dist.world_size()
        if dataset_len < 0:
            raise ValueError(f"dataset_len must be >= 0, got {dataset_len}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"need world >= 1 and 0 <= rank < world, got rank {rank}, world {world}")
        self.dataset_len, self.rank, self.world = dataset_len, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.dataset_len, self.world))

    def __len__(self):
        return len(range(self.rank, self.dataset_len, self.world))
