"""The Lightning wrapper around the plain-PyTorch SAPD detector.

``SAPDLitModule`` owns what is training-loop specific — optimiser and schedule (paper §4.1, docs/design.md §3), logging,
COCO evaluation — and nothing of the model: ``net`` is a :class:`sapd.models.SAPD`.

One forward gives both the validation loss and the detections (the detector's ``forward`` does not
depend on train/eval mode), so validation logs ``val/loss`` and the COCO table from the same pass.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics import MaxMetric
from torchmetrics.detection import MeanAveragePrecision

from sapd.run_report import ClassMetrics, class_metrics_from_coco

log = logging.getLogger(__name__)

# The COCO numbers logged after each evaluation (torchmetrics' names), as ``<stage>/<key>``.
COCO_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")

# The states of torchmetrics' MeanAveragePrecision (iou_type="bbox") that hold one entry per image, in update order.
BOX_STATES = (
    "detection_box",
    "detection_scores",
    "detection_labels",
    "groundtruth_box",
    "groundtruth_labels",
    "groundtruth_crowds",
    "groundtruth_area",
)


class NonFiniteLossError(FloatingPointError):
    """Raised when the loss stays NaN/inf for several consecutive steps."""


def lr_factor(
    step: int,
    *,
    steps_per_epoch: int,
    total_steps: int,
    name: str = "multistep",
    milestones: Sequence[int] = (8, 10),
    gamma: float = 0.1,
    warmup_iters: int = 500,
    warmup_ratio: float = 0.001,
    min_ratio: float = 0.0,
) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based); paper §4.1.

    Linear warm-up from ``warmup_ratio`` to 1 over ``warmup_iters`` steps (MMDetection's
    ``warmup='linear'``), multiplied by the decay: ``multistep`` divides by ``1/gamma`` at the start
    of each epoch index in ``milestones`` (``[8, 10]``: the 9th and the 11th epoch, as the paper
    says); ``cosine`` anneals to ``min_ratio`` over ``total_steps``; ``constant`` keeps 1.
    """
    if warmup_iters > 0 and step < warmup_iters:
        warm = warmup_ratio + (1.0 - warmup_ratio) * step / warmup_iters
    else:
        warm = 1.0
    if name == "multistep":
        epoch = step // max(steps_per_epoch, 1)
        decay = gamma ** sum(epoch >= m for m in milestones)
    elif name == "cosine":
        t = min(step / max(total_steps, 1), 1.0)
        decay = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    elif name == "constant":
        decay = 1.0
    else:
        raise ValueError(f"unknown scheduler name {name!r}: use 'multistep', 'cosine' or 'constant'")
    return warm * decay


def _first_visits(results: Sequence[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """COCO results entries by image id, of each image's first visit (its first run of consecutive entries)."""
    runs: dict[int, list[dict[str, Any]]] = {}
    done: set[int] = set()
    previous = None
    for entry in results:
        image_id = int(entry["image_id"])
        if image_id != previous:
            if previous is not None:
                done.add(previous)
            previous = image_id
        if image_id not in done:
            runs.setdefault(image_id, []).append(entry)
    return runs


def merge_evaluations(
    shares: Sequence[dict[str, Any]],
) -> tuple[dict[str, list[Tensor]], list[dict[str, Any]], int]:
    """Every image once, from the evaluations of the processes (``SAPDLitModule._evaluation_share``).

    Each share holds ``image_ids`` (the images in the order the metric saw them, or None when
    unknown), ``states`` (the metric's per-image lists, :data:`BOX_STATES`) and ``results`` (COCO
    results entries). An image seen more than once (a padding sampler repeats images to even the
    shares) is kept from the first share and visit that has it; a share without ``image_ids`` is
    kept whole.

    Returns:
        (the merged metric states, the merged results entries, the number of repeats dropped).
    """
    states: dict[str, list[Tensor]] = {}
    results: list[dict[str, Any]] = []
    seen: set[int] = set()
    repeated = 0
    for share in shares:
        ids, per_image = share["image_ids"], share["states"]
        for name in per_image:
            states.setdefault(name, [])
        if ids is None:
            for name, values in per_image.items():
                states[name].extend(values)
            results.extend(share["results"])
            seen.update(int(r["image_id"]) for r in share["results"])
            continue
        visits = _first_visits(share["results"])
        for i, image_id in enumerate(ids):
            if image_id in seen:
                repeated += 1
                continue
            seen.add(image_id)
            for name, values in per_image.items():
                states[name].append(values[i])
            results.extend(visits.pop(image_id, []))
        for image_id, entries in visits.items():  # results of images the share does not list (none expected)
            if image_id not in seen:
                seen.add(image_id)
                results.extend(entries)
    return states, results, repeated


class SAPDLitModule(L.LightningModule):
    """Trains, validates, tests and predicts with a :class:`sapd.models.SAPD`.

    Args:
        net: the detector (plain PyTorch).
        optimizer: a partial optimiser (Hydra ``_partial_: true``); its ``lr`` is the learning rate
            at ``base_batch_size`` and is scaled linearly to the real total batch size. Needed to
            train only (None: evaluation and prediction).
        scheduler: keyword arguments of :func:`lr_factor` (``name``, ``milestones``, ``gamma``,
            ``warmup_iters``, ``warmup_ratio``, ``min_ratio``); stepped every optimiser step.
        batch_size: images per device per step (the data module's).
        base_batch_size: the batch size the optimiser's ``lr`` is quoted for (16 in the paper).
        no_decay_norm_bias: exclude norm layers and biases from weight decay.
        label_to_cat_id: contiguous label -> COCO category id, for results json files.
        class_names: names of the contiguous labels, for drawings.
        max_bad_steps: consecutive non-finite losses tolerated (skipped) before training stops.
        results_file: where validation/test write detections as a COCO results json (optional).
        channels_last: run the network in channels-last memory format (faster convolutions on CPU).
    """

    def __init__(
        self,
        *,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: dict[str, Any] | None = None,
        batch_size: int = 16,
        base_batch_size: int = 16,
        no_decay_norm_bias: bool = False,
        label_to_cat_id: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
        max_bad_steps: int = 20,
        results_file: str | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer"], logger=False)
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_cfg = dict(scheduler or {})
        self.label_to_cat_id = list(label_to_cat_id) if label_to_cat_id is not None else None
        self.class_names = list(class_names) if class_names is not None else None
        self.results_file = results_file
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.run_config: dict[str, Any] | None = None  # the Hydra config, stored in checkpoints
        self.val_map = self._new_metric()
        self.test_map = self._new_metric()
        self.val_map_best = MaxMetric()
        self.last_coco_table: dict[str, float] = {}  # COCO numbers of the latest evaluation (val or test)
        self.last_coco_step: int | None = None  # global step of the latest validation with a table
        self.last_eval_states: dict[str, list[Tensor]] | None = None  # its per-image boxes (torchmetrics' states)
        self.last_class_metrics: ClassMetrics | None = None  # per-class AP and PR curves of that evaluation
        self.wandb_run_id: str | None = None  # stored in checkpoints, so a resumed run continues its dashboard
        # training instances seen in this process, and those that own no anchor point on any level
        # (so nothing trains on them: tiny boxes under valid_region=centre); in summary.json
        self._num_instances = 0
        self._num_unassigned: Tensor | None = None  # summed on the device, read once (instance_counts)
        # training steps skipped in this process (a batch without images, or a non-finite loss on any
        # process); sapd.callbacks.LearningCheck stops a run that skips too many
        self.skipped_steps = 0
        self._bad_steps = 0
        self._results: list[dict[str, Any]] = []
        self._eval_image_ids: list[int] = []  # image ids of this process's evaluation, in the metric's order

    @staticmethod
    def _new_metric() -> MeanAveragePrecision:
        # extended_summary: COCOeval's precision array, from which the per-class APs and PR curves come
        # (sapd.run_report.class_metrics_from_coco) without evaluating each class again
        # sync_on_compute=False: under DDP the processes' images are gathered and scored once on rank 0
        # (SAPDLitModule._finish_evaluation); torchmetrics' own sync needs equally many images per process
        return MeanAveragePrecision(
            box_format="xyxy",
            iou_type="bbox",
            backend="faster_coco_eval",
            extended_summary=True,
            sync_on_compute=False,
        )

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor) -> dict[str, Any]:
        return self.net(self._layout(images))

    def _layout(self, images: Tensor) -> Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    @staticmethod
    def image_meta(
        targets: Sequence[dict[str, Any]],
    ) -> tuple[list[tuple[int, int]], list[tuple[float, float]]]:
        sizes = [tuple(int(v) for v in t["img_size"]) for t in targets]
        scales = [tuple(float(v) for v in t["scale_factor"]) for t in targets]
        return sizes, scales  # type: ignore[return-value]

    def detect(self, images: Tensor, targets: Sequence[dict[str, Any]], outputs=None) -> list[dict[str, Tensor]]:
        """Detections in the original images' pixels."""
        if outputs is None:
            outputs = self(images)
        sizes, scales = self.image_meta(targets)
        return self.net.postprocess(outputs, sizes, scales)

    @property
    def instance_counts(self) -> dict[str, int]:
        """Training instances seen in this process, and those that owned no anchor point on any level (so
        nothing trained on them: tiny boxes under valid_region=centre); in summary.json."""
        unassigned = int(self._num_unassigned) if self._num_unassigned is not None else 0
        return {"instances": self._num_instances, "without_anchor_point": unassigned}

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx: int):
        images, targets = batch
        empty = images.shape[0] == 0  # every image of the batch was skipped (data.skip_bad_images)
        losses = None if empty else self.net.loss(self(images), targets)
        # the one read of a device value in the step: whether the loss is finite (and, under DDP, whether
        # any process's is), which decides on the host whether the step is taken
        nonfinite = torch.tensor(False) if losses is None else ~torch.isfinite(losses["total"].detach())
        empty, nonfinite_any = self._on_any_process(empty, nonfinite)
        if nonfinite_any:
            self._bad_steps += 1
            where = f"images {[int(t['image_id']) for t in targets]}" if bool(nonfinite) else "on another process"
            log.warning("non-finite loss at step %d (%s); step skipped", self.global_step, where)
            if self._bad_steps >= self.hparams.max_bad_steps:
                raise NonFiniteLossError(
                    f"loss was non-finite for {self._bad_steps} consecutive steps; lower optim.optimizer.lr "
                    "or raise scheduler.warmup_iters, and check the data for broken boxes"
                )
        if empty or nonfinite_any:
            return self._skipped_step()
        self._bad_steps = 0
        self._num_instances += sum(len(t["labels"]) for t in targets)
        if "num_unassigned" in losses:
            unassigned = losses["num_unassigned"].detach()
            self._num_unassigned = unassigned if self._num_unassigned is None else self._num_unassigned + unassigned
        bs = images.shape[0]
        self._log_losses("train", losses, bs, on_step=True)
        # the selection net's level probabilities (the criterion's assignment of this batch) reach callbacks
        # (SelectionHistogram) as step outputs
        assignment = getattr(getattr(self.net, "criterion", None), "last_assignment", None)
        return {"loss": losses["total"], "selection_probs": getattr(assignment, "selection_probs", None)}

    def _world_size(self) -> int:
        trainer = self._trainer
        return int(trainer.world_size) if trainer is not None else 1

    def _on_any_process(self, *flags: bool | Tensor) -> tuple[bool, ...]:
        """Each flag (a bool, or a one-element tensor on any device), true when it is true on any process of
        a distributed run (one all-reduce of the flags, one read of the result); the flags themselves in a
        single process. Every process then takes the same branch."""
        if self._world_size() == 1:
            return tuple(bool(f) for f in flags)
        local = torch.stack([torch.as_tensor(f, device=self.device).reshape(()).float() for f in flags])
        total = self.trainer.strategy.reduce(local, reduce_op="sum")
        return tuple(bool(v > 0) for v in total.tolist())

    def _skipped_step(self):
        """What a skipped training step returns. One process: None (Lightning runs no backward and no
        optimiser step). Distributed: a zero loss through every trainable parameter, on every process,
        so that each one runs its backward and DDP's gradient all-reduce completes (a process that
        returned None would leave the others waiting in it); the optimiser then steps with zero
        gradients, so momentum and weight decay still move the weights by one step."""
        self.skipped_steps += 1
        if self._world_size() == 1:
            return None
        zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        return {"loss": zero, "selection_probs": None}

    def _log_losses(self, stage: str, losses: dict[str, Any], batch_size: int, on_step: bool) -> None:
        for key, value in losses.items():
            self.log(
                f"{stage}/{key}",
                value.detach().float(),
                on_step=on_step,
                on_epoch=not on_step or key == "total",
                prog_bar=key in ("total",),
                batch_size=batch_size,
                sync_dist=not on_step,
            )

    # ------------------------------------------------------------------ evaluation
    @staticmethod
    def eval_targets(targets: Sequence[dict[str, Any]]) -> list[dict[str, Tensor]]:
        """Ground truth as COCOeval sees it (original pixels, crowd flags, annotation areas)."""
        out = []
        for t in targets:
            out.append(
                {
                    "boxes": t["eval_boxes"].float(),
                    "labels": t["eval_labels"].long(),
                    "iscrowd": t["eval_iscrowd"].long(),
                    "area": t["eval_area"].float(),
                }
            )
        return out

    def _eval_step(self, batch, metric: MeanAveragePrecision, stage: str) -> list[dict[str, Tensor]]:
        images, targets = batch
        outputs = self(images)
        dets = self.detect(images, targets, outputs)
        self._eval_image_ids.extend(int(t["image_id"]) for t in targets)
        if "eval_boxes" in targets[0]:
            losses = self.net.loss(outputs, targets)
            self._log_losses(stage, {"loss": losses["total"], **losses}, images.shape[0], on_step=False)
            metric.update(
                [{k: d[k].detach() for k in ("boxes", "scores", "labels")} for d in dets],
                self.eval_targets(targets),
            )
        if self.results_file:
            self._results.extend(self.to_coco_results(dets, targets))
        return dets

    def to_coco_results(self, dets: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Any]]) -> list[dict]:
        """Detections as COCO results entries (xywh, original category ids, the annotation file's frame)."""
        from sapd.data.coco import to_annotation_frame

        cat_ids = self.label_to_cat_id
        results = []
        for det, tgt in zip(dets, targets):
            boxes = to_annotation_frame(det["boxes"].detach().cpu(), tgt)  # unturned where annotated unturned
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
            scores = det["scores"].detach().cpu().tolist()
            labels = det["labels"].detach().cpu().tolist()
            image_id = int(tgt["image_id"])
            for box, score, label in zip(xywh, scores, labels):
                cat = cat_ids[label] if cat_ids is not None else int(label)
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": int(cat),
                        "bbox": [round(v, 2) for v in box],
                        "score": round(float(score), 5),
                    }
                )
        return results

    def _write_results(self, results: list[dict[str, Any]]) -> None:
        """Writes ``results`` (every process's, gathered) as the COCO results json; called on rank 0 only."""
        if self.results_file:
            path = Path(self.results_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results))
            log.info("wrote %d detections to %s", len(results), path)
            if not results:  # a valid results file, but pycocotools' COCO.loadRes fails on an empty list
                thresh = getattr(getattr(self.net, "postprocessor", None), "score_thresh", None)
                log.warning(
                    "no detections: %s holds an empty list, which pycocotools' COCO.loadRes cannot load; "
                    "a model trained longer, or a lower score_thresh (now %s), gives some",
                    path,
                    thresh,
                )

    def _evaluation_share(self, metric: MeanAveragePrecision) -> dict[str, Any]:
        """This process's evaluation: image ids, the metric's per-image states (on the CPU) and results entries."""
        states = {name: [v.detach().cpu() for v in getattr(metric, name)] for name in BOX_STATES}
        states = {name: values for name, values in states.items() if values}
        ids: list[int] | None = list(self._eval_image_ids)
        if any(len(values) != len(ids) for values in states.values()):
            ids = None  # the metric was updated outside _eval_step: nothing to match its entries with
        return {"image_ids": ids, "states": states, "results": list(self._results)}

    def _gather_shares(self, share: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Every process's share on rank 0 (in rank order), None on the other ranks; [share] in one process."""
        if not self._distributed():
            return [share]
        shares: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(share, shares, dst=0)
        return shares

    def _distributed(self) -> bool:
        trainer = self._trainer
        return (
            trainer is not None
            and trainer.world_size > 1
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        )

    def _finish_evaluation(
        self, metric: MeanAveragePrecision, stage: str
    ) -> tuple[dict[str, float], ClassMetrics | None]:
        """The end of a validation or test epoch, in one process or under DDP.

        Every process's detections, ground truth and image ids go to rank 0, which keeps each image
        once (:func:`merge_evaluations`), computes the COCO numbers once and writes the one results
        json; the numbers are then broadcast, so every rank logs and keeps the same table.
        """
        share = self._evaluation_share(metric)
        self._results, self._eval_image_ids = [], []
        shares = self._gather_shares(share)
        outcome: tuple[dict[str, float], ClassMetrics | None] = ({}, None)
        if shares is not None:  # rank 0, or the only process
            states, results, repeated = merge_evaluations(shares)
            if repeated:
                log.warning("%d repeated evaluations of an image were dropped: each image is scored once", repeated)
            for name, values in states.items():
                setattr(metric, name, values)
            outcome = self._coco_table(metric)  # resets the metric
            self._write_results(results)
        else:
            metric.reset()
        if self._distributed():
            box = [outcome]
            dist.broadcast_object_list(box, src=0)
            outcome = box[0]
        table, per_class = outcome
        for key, value in table.items():
            # the same numbers on every rank (rank 0's, broadcast): nothing to reduce
            self.log(f"{stage}/{key}", value, sync_dist=False)
        return table, per_class

    def _log_coco(self, metric: MeanAveragePrecision, stage: str) -> tuple[dict[str, float], ClassMetrics | None]:
        """Computes the COCO numbers of ``metric`` as it stands (this process's states), logs and resets it."""
        table, per_class = self._coco_table(metric)
        for key, value in table.items():
            self.log(f"{stage}/{key}", value, sync_dist=False)
        return table, per_class

    def _coco_table(self, metric: MeanAveragePrecision) -> tuple[dict[str, float], ClassMetrics | None]:
        """The COCO numbers (:data:`COCO_KEYS`) and per-class metrics of ``metric``'s states; resets it."""
        if not metric.groundtruth_labels and not metric.detection_labels:
            metric.reset()
            return {}, None
        num_gt = self._count_ground_truth(metric)
        # the evaluated ground truth and detections, for the report's error analysis (sapd.run_report)
        self.last_eval_states = {name: list(getattr(metric, name)) for name in BOX_STATES}
        values = metric.compute()
        metric.reset()
        table = {key: float(values[key]) for key in COCO_KEYS}
        per_class = None
        if "precision" in values:  # absent when there was nothing to evaluate
            per_class = class_metrics_from_coco(
                values["precision"],
                values["recall"],
                values["classes"],
                iou_thresholds=metric.iou_thresholds,
                rec_thresholds=metric.rec_thresholds,
                num_gt=num_gt,
            )
        return table, per_class

    def _count_ground_truth(self, metric: MeanAveragePrecision) -> Tensor:
        """LongTensor[K]: non-crowd ground-truth boxes per label in ``metric``'s states (under DDP, rank 0 holds
        every process's share by then: :meth:`_finish_evaluation`)."""
        num_classes = len(self.label_to_cat_id) if self.label_to_cat_id is not None else 0
        labels = torch.cat(metric.groundtruth_labels).long().cpu() if metric.groundtruth_labels else None
        crowd = torch.cat(metric.groundtruth_crowds).bool().cpu() if metric.groundtruth_crowds else None
        if labels is None or labels.numel() == 0:
            return torch.zeros(num_classes, dtype=torch.long)
        return torch.bincount(labels[~crowd], minlength=max(num_classes, int(labels.max()) + 1))

    def on_validation_epoch_start(self) -> None:
        self._results, self._eval_image_ids = [], []

    def validation_step(self, batch, batch_idx: int):
        if batch[0].shape[0] == 0:  # every image was skipped (data.skip_bad_images): nothing to evaluate
            return None
        return self._eval_step(batch, self.val_map, "val")

    def on_validation_epoch_end(self) -> None:
        table, per_class = self._finish_evaluation(self.val_map, "val")
        if table:
            self.val_map_best(torch.tensor(table["map"]))
            self.log("val/map_best", self.val_map_best.compute(), prog_bar=True)
            self.last_coco_table = table
            self.last_class_metrics = per_class
            self.last_coco_step = self.global_step

    def on_test_epoch_start(self) -> None:
        self._results, self._eval_image_ids = [], []

    def test_step(self, batch, batch_idx: int):
        if batch[0].shape[0] == 0:  # every image was skipped (data.skip_bad_images): nothing to evaluate
            return None
        return self._eval_step(batch, self.test_map, "test")

    def on_test_epoch_end(self) -> None:
        table, per_class = self._finish_evaluation(self.test_map, "test")
        if table:
            self.last_coco_table = table
            self.last_class_metrics = per_class

    # ------------------------------------------------------------------ optimisation
    def scaled_lr(self, base_lr: float) -> float:
        """Linear scaling rule: lr grows with the total batch (devices x batch x accumulation)."""
        trainer = self._trainer
        world = trainer.world_size if trainer is not None else 1
        accum = trainer.accumulate_grad_batches if trainer is not None else 1
        total_batch = self.hparams.batch_size * world * accum
        return base_lr * total_batch / self.hparams.base_batch_size

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        params = [p for p in self.net.parameters() if p.requires_grad]
        if not self.hparams.no_decay_norm_bias:
            return [{"params": params}]
        decay, no_decay = [], []
        for module in self.net.modules():
            is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                (no_decay if is_norm or name.endswith("bias") else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("this module was built without an optimiser (optim.optimizer): it can evaluate, not train")
        probe = self.optimizer_factory(params=[nn.Parameter(torch.zeros(1))])
        base_lr = probe.defaults["lr"]
        weight_decay = probe.defaults.get("weight_decay", 0.0)
        lr = self.scaled_lr(base_lr)
        optimizer = self.optimizer_factory(params=self.param_groups(weight_decay), lr=lr)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        steps_per_epoch = max(total // epochs, 1)
        cfg = dict(self.scheduler_cfg)

        def factor(step: int) -> float:
            return lr_factor(step, steps_per_epoch=steps_per_epoch, total_steps=total, **cfg)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clips as Lightning does, and also for fused optimizers when no loss scaler is used.

        Lightning refuses to clip for a ``fused`` optimizer under mixed precision because such an
        optimizer unscales fp16 gradients itself. With bf16 or fp32 there is no scaler, the
        gradients are already true and clipping them here is exact.
        """
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        fused = any(group.get("fused") for group in optimizer.param_groups)
        if not gradient_clip_val or scaler is not None or not fused:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sapd_config"] = self.run_config
        checkpoint["sapd_classes"] = {
            "label_to_cat_id": self.label_to_cat_id,
            "class_names": self.class_names,
        }
        if self.wandb_run_id:
            checkpoint["sapd_wandb_id"] = self.wandb_run_id
