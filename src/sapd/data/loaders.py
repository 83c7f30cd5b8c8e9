"""The data loaders of a data module: batching (seeded training order, aspect-ratio groups, shards of a
distributed evaluation), workers seeded from the loader's generator, and skipped images recorded as
each batch leaves the loader.
"""

from __future__ import annotations

import gc
import logging
import random
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, SequentialSampler

from sapd.data import DataError
from sapd.data.samplers import (
    AspectRatioBatchSampler,
    EpochRandomSampler,
    InferenceSampler,
    TrainBatchSampler,
    aspect_ratio_groups,
)
from sapd.data.transforms import collate

if TYPE_CHECKING:
    from sapd.data.coco import COCODetection

# the data module's lines, under its name (the name a log line shows and a user filters on)
log = logging.getLogger("sapd.data.datamodule")


class RecordingDataLoader(DataLoader):
    """A ``DataLoader`` that passes each batch's skipped-image records (``targets.skipped``, see
    :func:`~sapd.data.transforms.collate`) to ``on_skipped(split, records)`` in the main process, as
    the batch leaves the loader.

    Reading them there, and not in a Lightning hook, keeps them under every precision: for ``16-true``,
    ``bf16-true`` and ``64-true`` Lightning converts the batch (``convert_input``) before any hook sees
    it, and the conversion rebuilds the target list without them. The batch itself passes unchanged.
    """

    def __init__(self, *args, split: str = "train", on_skipped=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.split, self.on_skipped = split, on_skipped

    def __iter__(self):
        for batch in super().__iter__():
            targets = batch[1] if isinstance(batch, tuple | list) and len(batch) == 2 else None
            skipped = getattr(targets, "skipped", None)
            if skipped and self.on_skipped is not None:
                self.on_skipped(self.split, skipped)
            yield batch


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed
    (which the DataLoader derives from its generator), as PyTorch's reproducibility notes advise."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # noqa: NPY002 -- the legacy global RNG is what third-party code uses
    random.seed(seed)


class LoadersMixin:
    """``train_dataloader`` / ``val_dataloader`` / ``test_dataloader`` of
    :class:`~sapd.data.datamodule.COCODataModule`, from its settings (``batch_size``, ``val_batch_size``,
    ``num_workers``, ``persistent_workers``, ``pin_memory``, ``size_divisor``, ``aspect_ratio_groups``),
    its ``train_seed`` and resume position (``_resume``), and its ``record_skipped``."""

    def _eval_shards(self) -> tuple[int, int] | None:
        """(number of processes, rank) that split validation / test, None outside a distributed run.

        Read from the trainer's strategy (the data-parallel processes Lightning would shard for).
        """
        trainer = getattr(self, "trainer", None)
        kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
        if not kwargs or int(kwargs.get("num_replicas", 1)) <= 1:
            return None
        return int(kwargs["num_replicas"]), int(kwargs["rank"])

    def _train_batching(self, dataset: COCODetection, batch_size: int) -> dict:
        """``batch_sampler`` of the training loader: :class:`TrainBatchSampler` over an
        :class:`EpochRandomSampler` (order and augmentation a function of the seed, epoch and index)."""
        resume, self._resume = self._resume or {}, None  # a resumed run's first loader only
        if resume.get("batches"):
            log.info("training data resumes at epoch %d after its first %d batches", resume["epoch"], resume["batches"])
        groups = np.zeros(len(dataset), dtype=np.int64)
        if self.aspect_ratio_groups > 1:
            groups = aspect_ratio_groups(dataset.aspect_ratios, self.aspect_ratio_groups)
        sampler = EpochRandomSampler(dataset, self.train_seed, epoch=resume.get("epoch", 0))
        batches = TrainBatchSampler(
            sampler, batch_size, False, groups, self.train_seed, resume.get("epoch"), resume.get("batches", 0)
        )
        return {"batch_sampler": batches}

    def _loader(self, dataset: COCODetection | None, *, train: bool, name: str) -> DataLoader:
        if dataset is None:
            raise DataError(f"{name}_dataloader() called before setup() built the {name} set")
        generator = None
        if train:  # the workers' base seed too (numpy / random in third-party code, seed_worker)
            generator = torch.Generator().manual_seed(self.train_seed)
        batch_size = self.batch_size if train else self.val_batch_size
        shards = None if train else self._eval_shards()
        if train:
            batching = self._train_batching(dataset, batch_size)
        elif shards is not None:
            # validation / test of a distributed run: every process a share of the images, none repeated
            # (Lightning's padding DistributedSampler would score some twice); batches as below, per share
            groups = None
            if self.aspect_ratio_groups > 1:
                groups = aspect_ratio_groups(dataset.aspect_ratios, self.aspect_ratio_groups)
            sampler = InferenceSampler(dataset, *shards, group_ids=groups, batch_size=batch_size)
            batching = {"sampler": sampler, "batch_size": batch_size, "drop_last": False}
        elif self.aspect_ratio_groups > 1:
            groups = aspect_ratio_groups(dataset.aspect_ratios, self.aspect_ratio_groups)
            batching = {"batch_sampler": AspectRatioBatchSampler(SequentialSampler(dataset), batch_size, False, groups)}
        else:
            batching = {"batch_size": batch_size, "shuffle": False, "drop_last": False}
        if self.num_workers > 0:
            # the workers are forked and share this process's pages until they write to them; a garbage
            # collection in a worker writes into the header of every object it tracks, and so copies each
            # page holding one: objects frozen here are out of its reach (Python's gc.freeze docs)
            gc.collect()
            gc.freeze()
        return RecordingDataLoader(
            dataset,
            split=name,
            on_skipped=self.record_skipped,
            **batching,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory,
            collate_fn=partial(collate, size_divisor=self.size_divisor),
            worker_init_fn=seed_worker,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, train=True, name="train")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, train=False, name="val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, train=False, name="test")
