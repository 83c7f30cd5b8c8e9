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
from torch.utils.data import BatchSampler, Sampler


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
            ``DistributedSampler`` otherwise; Lightning swaps in the distributed one under DDP).
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
