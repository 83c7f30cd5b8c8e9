"""What a data module read, dropped and skipped: one line of counts per split as its data set is built,
the images that batches skipped (recorded in the main process, logged per pass) and :meth:`data_counts`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sapd.data.coco import COCODetection

# the data module's lines, under its name (the name a log line shows and a user filters on)
log = logging.getLogger("sapd.data.datamodule")

MAX_SKIP_WARNINGS = 10  # skipped images logged one by one, per split; the others are counted
MAX_SKIPPED_LISTED = 100  # skipped image ids (with their reason) in data_counts(), per split


def format_counts(split: str, ann_file: str | Path, stats: Mapping[str, int]) -> str:
    """One line of :attr:`COCODetection.stats <sapd.data.coco.COCODetection>`: what was read and dropped."""
    s = stats
    return (
        f"{split} ({ann_file}): {s['images']} images ({s['no_annotations']} without annotations, "
        f"{s['empty_images']} without a training box, {s['dropped_empty']} of these dropped), "
        f"{s['annotations']} annotations: {s['boxes']} training boxes, {s['crowd']} crowd, "
        f"{s['degenerate_boxes']} degenerate dropped ({s['zero_size_boxes']} with w or h <= 0, also not evaluated; "
        f"{s['outside_boxes']} outside the image; {s['tiny_boxes']} under min_box_size after clipping), "
        f"{s['non_finite_boxes']} with NaN or infinite values dropped, "
        f"{s['unknown_category']} of an unknown category id skipped, "
        f"{s['unknown_image']} of an unknown image id skipped"
    )


class DataCountsMixin:
    """The counts and skipped-image bookkeeping of :class:`~sapd.data.datamodule.COCODataModule` (a
    ``LightningDataModule`` with ``train_dataset`` / ``val_dataset`` / ``test_dataset``): the images
    skipped so far (``skipped_images``: split -> {image id: reason}), recorded from the batches by
    :meth:`record_skipped`, the first few logged one by one and each pass's total at its end
    (:meth:`on_before_batch_transfer` counts the batches of the running pass; :meth:`teardown` ends a
    pass cut short)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skipped_images: dict[str, dict[int | None, str]] = {}  # split -> {image id: reason}
        self._pass_skipped: dict[str, Counter] = {}  # split -> reasons of this pass (epoch) so far
        self._pass_batches: dict[str, int] = {}  # split -> batches of this pass so far

    @staticmethod
    def _log_counts(split: str, dataset: COCODetection) -> None:
        """One line per split when its data set is built: a warning when boxes or annotations were dropped."""
        s = dataset.stats
        dropped = s["degenerate_boxes"] or s["unknown_category"] or s["non_finite_boxes"] or s["unknown_image"]
        line = format_counts(split, dataset.ann_file, s)
        if s["unknown_category"]:
            line += f" (ids {sorted(map(str, dataset.unknown_category_ids))[:10]})"
        log.log(logging.WARNING if dropped else logging.INFO, "%s", line)

    def data_counts(self) -> dict[str, dict]:
        """``{"train": {...}, "val": {...}, "test": {...}}`` for the splits built so far: the data
        set's ``stats`` (see :class:`~sapd.data.coco.COCODetection`) plus, from the batches seen in
        this process, ``skipped_images`` (distinct images), ``skipped_reasons`` ({reason: images})
        and ``skipped`` ({image id: reason}, the first 100 by id). Plain ints / strs (json-ready)."""
        out: dict[str, dict] = {}
        for split, dataset in (("train", self.train_dataset), ("val", self.val_dataset), ("test", self.test_dataset)):
            if dataset is None:
                continue
            skipped = self.skipped_images.get(split, {})
            listed = sorted(skipped.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))[:MAX_SKIPPED_LISTED]
            out[split] = {
                **{k: int(v) for k, v in dataset.stats.items()},
                "skipped_images": len(skipped),
                "skipped_reasons": dict(Counter(skipped.values())),
                "skipped": {str(image_id): reason for image_id, reason in listed},
            }
        return out

    def record_skipped(self, split: str, skipped: Sequence) -> None:
        """Records the :class:`~sapd.data.io.SkippedImage` items a batch of ``split`` dropped; logs each
        image the first time it is skipped, for the first ``MAX_SKIP_WARNINGS`` images of the split."""
        seen = self.skipped_images.setdefault(split, {})
        this_pass = self._pass_skipped.setdefault(split, Counter())
        for item in skipped:
            this_pass[item.reason] += 1
            if item.image_id in seen:
                continue  # skipped again in a later epoch: logged already
            seen[item.image_id] = item.reason
            if len(seen) <= MAX_SKIP_WARNINGS:
                log.warning("%s: skipped image id %s (%s): %s", split, item.image_id, item.reason, item.message)
                if len(seen) == MAX_SKIP_WARNINGS:
                    log.warning("%s: further skipped images are counted, not logged one by one", split)

    def end_pass(self, split: str) -> None:
        """Logs the images skipped in the pass (epoch) over ``split`` that ends, if any, and starts a new one."""
        reasons = self._pass_skipped.pop(split, Counter())
        self._pass_batches.pop(split, None)
        if reasons:
            trainer = self.trainer
            epoch = f"epoch {trainer.current_epoch}, " if trainer is not None else ""
            detail = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
            log.warning(
                "%s%s: %d image(s) skipped (%s), not trained on or evaluated (data.skip_bad_images=true); "
                "%d distinct image(s) skipped so far",
                epoch, split, sum(reasons.values()), detail, len(self.skipped_images.get(split, {})),
            )  # fmt: skip

    def _running_split(self) -> str | None:
        trainer = self.trainer
        if trainer is None:
            return None
        if trainer.training:
            return "train"
        if trainer.sanity_checking or trainer.validating:
            return "val"
        return "test" if trainer.testing else None

    def _pass_length(self, split: str, dataloader_idx: int) -> float:
        """Batches in the current pass over ``split`` (limits included); inf when unknown."""
        trainer = self.trainer
        try:
            if split == "train":
                return trainer.num_training_batches
            if trainer.sanity_checking:
                return trainer.num_sanity_val_batches[dataloader_idx]
            return (trainer.num_val_batches if split == "val" else trainer.num_test_batches)[dataloader_idx]
        except (AttributeError, IndexError, TypeError):
            return math.inf

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Counts the batches of the running pass over a split, to log its skipped images (which
        :class:`~sapd.data.loaders.RecordingDataLoader` recorded as the batch left the loader) once the
        pass ends."""
        split = self._running_split()
        if split is None:
            return batch
        self._pass_batches[split] = self._pass_batches.get(split, 0) + 1
        if self._pass_batches[split] >= self._pass_length(split, dataloader_idx):
            self.end_pass(split)
        return batch

    def teardown(self, stage: str) -> None:
        for split in list(self._pass_skipped):  # a pass cut short (max_steps, interruption)
            self.end_pass(split)
        self._pass_batches.clear()
        super().teardown(stage)
