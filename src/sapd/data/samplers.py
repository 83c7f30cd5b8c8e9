"""Batches of images with similar aspect ratios, so that a padded batch wastes few pixels.

Images of a batch are padded to the largest height and the largest width among them; a landscape
and a portrait image together pad both to a square. detectron2 (``AspectRatioGroupedDataset``) and
MMDetection (``GroupSampler`` / ``AspectRatioBatchSampler``) split images into landscape and
portrait for this reason; torchvision's references bin aspect ratios more finely. Here the number
of groups is a parameter: 2 is landscape / portrait, k > 2 bins the aspect ratios of the data set
into k groups of about equal size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, RandomSampler, Sampler


def aspect_ratio_groups(aspect_ratios: Sequence[float], num_groups: int) -> np.ndarray:
    """Group id (0..num_groups-1) of every image from its aspect ratio ``width / height``.

    ``num_groups`` <= 1: one group; 2: portrait (w < h) / landscape (w >= h); k > 2: k bins of the
    log aspect ratio at the data set's quantiles (about equally many images per group).
    """
    ratios = np.asarray(aspect_ratios, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(ratios)) or np.any(ratios <= 0):
        raise ValueError("aspect ratios must be positive and finite (width / height of every image)")
    if num_groups <= 1 or ratios.size == 0:
        return np.zeros(ratios.size, dtype=np.int64)
    if num_groups == 2:
        return (ratios >= 1.0).astype(np.int64)
    log_r = np.log(ratios)
    edges = np.quantile(log_r, np.linspace(0, 1, num_groups + 1)[1:-1])
    return np.searchsorted(edges, log_r, side="right").astype(np.int64)


class AspectRatioBatchSampler(BatchSampler):
    """Yields batches whose images all fall in one aspect-ratio group.

    Indices are taken in the order of ``sampler`` (shuffled or not) and collected per group; a
    group's batch is yielded as soon as it is full. What remains at the end of an epoch is
    yielded ordered by group, so an epoch has exactly ``ceil(n / batch_size)`` batches
    (``floor`` with ``drop_last``), the same as a plain ``BatchSampler``: schedules that count
    steps per epoch do not change.

    Args:
        sampler: the index sampler (``RandomSampler`` for training, ``SequentialSampler`` or a
            ``DistributedSampler`` otherwise; Lightning swaps in the distributed one for training
            under DDP; validation and test shard with :class:`InferenceSampler` instead).
        batch_size, drop_last: as for ``BatchSampler``.
        group_ids: the group of every index of the data set (:func:`aspect_ratio_groups`).
    """

    def __init__(
        self, sampler: Sampler[int] | Sequence[int], batch_size: int, drop_last: bool, group_ids: Sequence[int]
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.group_ids = np.asarray(group_ids, dtype=np.int64).reshape(-1)

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = {}
        for idx in self.sampler:
            group = int(self.group_ids[idx])
            buf = buffers.setdefault(group, [])
            buf.append(int(idx))
            if len(buf) == self.batch_size:
                yield buf
                buffers[group] = []
        rest = [i for g in sorted(buffers) for i in buffers[g]]
        for start in range(0, len(rest), self.batch_size):
            batch = rest[start : start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch


def mix_seed(*values: int) -> int:
    """One 63-bit seed from integers (numpy ``SeedSequence``): nearby inputs give unrelated seeds."""
    state = np.random.SeedSequence([int(v) % 2**64 for v in values]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class EpochRandomSampler(RandomSampler):
    """A shuffled order of the data set that depends on ``seed`` and the epoch alone.

    ``RandomSampler`` draws its order from its generator's state, so after a restart it depends on
    everything drawn before; here epoch ``e``'s order is ``randperm`` under the seed
    ``mix_seed(seed, e)``, like ``DistributedSampler``'s, and Lightning sets the epoch
    (``set_epoch``) before each one. Being a ``RandomSampler``, Lightning knows it shuffles and, under
    DDP, replaces it by a shuffling ``DistributedSampler`` (whose order is also a function of the epoch).
    """

    def __init__(self, data_source, seed: int, epoch: int = 0) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = int(seed), int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class TrainBatchSampler(AspectRatioBatchSampler):
    """Training batches that a resumed run continues exactly: :class:`AspectRatioBatchSampler` batches
    of ``(index, sample_seed)`` pairs, and the first ``start_batch`` batches of epoch ``start_epoch``
    left out once.

    ``sample_seed = mix_seed(seed, epoch, index)`` seeds the random transforms of that image
    (:meth:`sapd.data.coco.COCODetection.__getitem__`), so what a batch holds depends on the seed, the
    epoch (the sampler's ``epoch``, which Lightning sets) and the position in the epoch alone: not on
    the worker process, nor on the random draws made before. A run restarted from a mid-epoch
    checkpoint builds this sampler with the checkpoint's epoch and batch count (``len`` stays the
    epoch's full length: Lightning counts the batches already done)
    (:meth:`sapd.data.datamodule.COCODataModule.load_state_dict`) and sees the batches an
    uninterrupted run would have seen next.

    Args:
        sampler, batch_size, drop_last, group_ids: as :class:`AspectRatioBatchSampler` (one group: plain batches).
        seed: the data seed.
        start_epoch, start_batch: where a resumed run continues (None: from the start of every epoch).
    """

    def __init__(
        self,
        sampler: Sampler[int] | Sequence[int],
        batch_size: int,
        drop_last: bool,
        group_ids: Sequence[int],
        seed: int,
        start_epoch: int | None = None,
        start_batch: int = 0,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last, group_ids)
        self.seed = int(seed)
        self.start_epoch, self.start_batch = start_epoch, int(start_batch)
        if start_epoch is not None and callable(getattr(self.sampler, "set_epoch", None)):
            # the resumed epoch's order, also where the loader's workers draw indices before Lightning
            # sets the epoch (and for the DistributedSampler Lightning puts in under DDP)
            self.sampler.set_epoch(start_epoch)

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        skip = self.start_batch if self.start_epoch == epoch else 0
        self.start_epoch, self.start_batch = None, 0  # once: the epochs after it start at their first batch
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield [(idx, mix_seed(self.seed, epoch, idx)) for idx in batch]


def shard_range(size: int, num_replicas: int, rank: int) -> range:
    """The contiguous share of ``range(size)`` that process ``rank`` of ``num_replicas`` evaluates.

    Shares cover every index exactly once, in order, and their sizes differ by at most one (the
    first ``size % num_replicas`` ranks take one more), as detectron2's ``InferenceSampler``.
    """
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}) and num_replicas >= 1; got rank {rank}")
    base, extra = divmod(size, num_replicas)
    begin = rank * base + min(rank, extra)
    return range(begin, begin + base + (rank < extra))


class InferenceSampler(DistributedSampler):
    """Validation / test indices of one process of a distributed run, without padding.

    ``DistributedSampler`` pads the data set to a multiple of the number of processes by repeating
    images, so a metric over every process's share scores some images twice. Here process ``rank``
    takes a contiguous share (:func:`shard_range`; shares differ by at most one image) and nothing is
    repeated: the shares together are the data set, each image once. Being a ``DistributedSampler``,
    Lightning keeps it (it only swaps in its own sampler when the loader's is not distributed-aware).
    Only with fewer images than processes does a process whose share is empty take one image again
    (a process without a batch would skip the evaluation loop, and the others would wait for it at
    the gather of the results); ``SAPDLitModule`` scores such a repeated image once.

    With ``group_ids`` and ``batch_size``, the share is ordered so that consecutive runs of
    ``batch_size`` indices (a ``DataLoader``'s plain batching) are exactly the batches of
    :class:`AspectRatioBatchSampler` over the share: every batch it yields is full except possibly
    the last, so cutting the concatenation again gives the same batches.

    Args:
        dataset: the data set (its length is read).
        num_replicas, rank: the process count and this process's rank (data-parallel ones).
        group_ids: the aspect-ratio group of every index of the data set (None: keep the order).
        batch_size: the loader's batch size; needed with ``group_ids``.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        group_ids: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        if group_ids is not None and (batch_size is None or batch_size < 1):
            raise ValueError("InferenceSampler: group_ids need a batch_size >= 1")
        size = len(dataset)  # type: ignore[arg-type]
        self.share = shard_range(size, num_replicas, rank)
        if not self.share and size > 0:  # fewer images than processes (see above)
            self.share = range(rank % size, rank % size + 1)
        self.group_ids = None if group_ids is None else np.asarray(group_ids, dtype=np.int64).reshape(-1)
        self.batch_size = batch_size
        self.num_samples = len(self.share)
        self.total_size = size

    def __iter__(self) -> Iterator[int]:
        if self.group_ids is None:
            yield from self.share
            return
        for batch in AspectRatioBatchSampler(list(self.share), int(self.batch_size), False, self.group_ids):
            yield from batch

    def __len__(self) -> int:
        return self.num_samples
