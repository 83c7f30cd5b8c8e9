"""Aspect-ratio grouped batches: every image once per epoch, one group per batch, a fixed length."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler

from sapd.data.samplers import AspectRatioBatchSampler, aspect_ratio_groups


def test_groups_two_is_landscape_portrait_and_k_bins_are_balanced():
    ratios = [0.5, 0.9, 1.0, 1.5, 2.0, 0.75]
    assert aspect_ratio_groups(ratios, 2).tolist() == [0, 0, 1, 1, 1, 0]
    assert aspect_ratio_groups(ratios, 1).tolist() == [0] * 6
    rng = np.random.default_rng(0)
    many = np.exp(rng.normal(0, 0.3, 1000))
    groups = aspect_ratio_groups(many, 4)
    counts = np.bincount(groups, minlength=4)
    assert counts.sum() == 1000 and counts.min() >= 240  # quantile bins: ~250 each
    # a group holds a contiguous range of ratios: bins are ordered
    maxima = [many[groups == g].max() for g in range(4)]
    minima = [many[groups == g].min() for g in range(4)]
    assert all(maxima[g] <= minima[g + 1] for g in range(3))
    with pytest.raises(ValueError, match="positive"):
        aspect_ratio_groups([1.0, 0.0], 2)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("n, batch_size, num_groups", [(103, 8, 2), (50, 4, 4), (7, 8, 3)])
def test_batches_cover_every_index_once_and_keep_the_plain_length(n, batch_size, num_groups, drop_last):
    ratios = np.exp(np.random.default_rng(n).normal(0, 0.4, n))
    groups = aspect_ratio_groups(ratios, num_groups)
    gen = torch.Generator().manual_seed(3)
    sampler = AspectRatioBatchSampler(RandomSampler(range(n), generator=gen), batch_size, drop_last, groups)
    batches = list(sampler)
    expected = n // batch_size if drop_last else math.ceil(n / batch_size)
    assert len(batches) == len(sampler) == expected
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    if not drop_last:
        assert sorted(flat) == list(range(n))
    assert all(len(b) == batch_size for b in batches[:-1])
    # every full batch drawn while the epoch runs is of one group; only the leftovers may mix
    mixed = [b for b in batches if len(set(groups[b].tolist())) > 1]
    assert len(mixed) <= num_groups - 1


def test_order_follows_the_sampler_and_is_reproducible():
    groups = aspect_ratio_groups(np.linspace(0.5, 2.0, 40), 2)
    seq = list(AspectRatioBatchSampler(SequentialSampler(range(40)), 5, False, groups))
    # portrait 0-12, landscape 13-39: full batches as they fill, then the leftovers by group
    assert seq[0] == [0, 1, 2, 3, 4] and seq[2] == [13, 14, 15, 16, 17] and seq[-1] == [10, 11, 12, 38, 39]

    def epoch(seed):
        gen = torch.Generator().manual_seed(seed)
        return list(AspectRatioBatchSampler(RandomSampler(range(40), generator=gen), 5, False, groups))

    assert epoch(1) == epoch(1) and epoch(1) != epoch(2)
