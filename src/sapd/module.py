"""The Lightning wrapper around the plain-PyTorch SAPD detector.

``SAPDLitModule`` owns what is training-loop specific — the steps, logging, and finishing the partial optimiser
and schedule (:mod:`sapd.optim`, paper §4.1) — and nothing of the model: ``net`` is a :class:`sapd.models.SAPD`.
Validation and test passes are collected, gathered across processes and scored by its
:class:`sapd.evaluation.COCOEvaluator` (``evaluator``), whose ``result`` is the latest pass's outcome.

One forward gives both the validation loss and the detections (the detector's ``forward`` does not
depend on train/eval mode), so validation logs ``val/loss`` and the COCO table from the same pass.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MaxMetric

from sapd.evaluation import COCOEvaluator, Evaluation
from sapd.optim import lr_schedule, optimizer_defaults, param_groups

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Raised when the loss stays NaN/inf for several consecutive steps."""


class SAPDLitModule(L.LightningModule):
    """Trains, validates, tests and predicts with a :class:`sapd.models.SAPD`.

    Args:
        net: the detector (plain PyTorch).
        optimizer: a partial optimiser (Hydra ``_partial_: true``); its ``lr`` is the learning rate
            at ``base_batch_size`` and is scaled linearly to the real total batch size. Needed to
            train only (None: evaluation and prediction).
        scheduler: a partial :func:`lr_schedule` (Hydra ``_partial_: true``) with the keyword arguments
            of :func:`sapd.optim.lr_factor` (``name``, ``milestones``, ...), or those keyword arguments as a dict;
            stepped every optimiser step.
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
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | dict[str, Any] | None = None,
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
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.net = net
        self.optimizer_factory = optimizer
        if not callable(scheduler):
            scheduler = functools.partial(lr_schedule, **dict(scheduler or {}))
        self.scheduler_factory = scheduler
        self.label_to_cat_id = list(label_to_cat_id) if label_to_cat_id is not None else None
        self.class_names = list(class_names) if class_names is not None else None
        self.results_file = results_file
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.run_config: dict[str, Any] | None = None  # the Hydra config, stored in checkpoints
        # collects, gathers and scores validation and test passes; its ``result`` is the latest pass's outcome
        self.evaluator = COCOEvaluator(self.label_to_cat_id)
        self.val_map_best = MaxMetric()
        self.wandb_run_id: str | None = None  # stored in checkpoints, so a resumed run continues its dashboard
        # training instances seen in this process, and those that own no anchor point on any level
        # (so nothing trains on them: tiny boxes under valid_region=centre); in summary.json
        self._num_instances = 0
        self._num_unassigned: Tensor | None = None  # summed on the device, read once (instance_counts)
        # training steps skipped in this process (a batch without images, or a non-finite loss on any
        # process); sapd.callbacks.LearningCheck stops a run that skips too many
        self.skipped_steps = 0
        self._bad_steps = 0

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
    def _eval_step(self, batch, stage: str) -> list[dict[str, Tensor]] | None:
        images, targets = batch
        if images.shape[0] == 0:  # every image was skipped (data.skip_bad_images): nothing to evaluate
            return None
        outputs = self(images)
        dets = self.detect(images, targets, outputs)
        annotated = "eval_boxes" in targets[0]
        if annotated:
            losses = self.net.loss(outputs, targets)
            self._log_losses(stage, {"loss": losses["total"], **losses}, images.shape[0], on_step=False)
        self.evaluator.update(dets, targets, score=annotated, collect_results=bool(self.results_file))
        return dets

    def _finish_evaluation(self, stage: str) -> Evaluation:
        """Gathers, scores and logs the pass (:meth:`sapd.evaluation.COCOEvaluator.finish`); the same numbers
        on every rank (rank 0's, broadcast): nothing to reduce."""
        evaluation, results = self.evaluator.finish(stage, self.global_step, self.results_file)
        if self.results_file and not results and self.trainer.is_global_zero:
            # a valid results file, but pycocotools' COCO.loadRes fails on an empty list
            log.warning(
                "no detections: %s holds an empty list, which pycocotools' COCO.loadRes cannot load; "
                "a model trained longer, or a lower score_thresh (now %s), gives some",
                self.results_file,
                getattr(getattr(self.net, "postprocessor", None), "score_thresh", None),
            )
        for key, value in evaluation.table.items():
            self.log(f"{stage}/{key}", value, sync_dist=False)
        return evaluation

    def on_validation_epoch_start(self) -> None:
        self.evaluator.reset()

    def validation_step(self, batch, batch_idx: int):
        return self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        evaluation = self._finish_evaluation("val")
        if evaluation.table:
            self.val_map_best(torch.tensor(evaluation.table["map"]))
            self.log("val/map_best", self.val_map_best.compute(), prog_bar=True)

    def on_test_epoch_start(self) -> None:
        self.evaluator.reset()

    def test_step(self, batch, batch_idx: int):
        return self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        """Finishes the partial optimiser and schedule: the optimiser's ``lr`` and ``weight_decay`` are its
        keywords (or its defaults), the ``lr`` scaled linearly to the total batch (devices x batch x
        accumulation) from ``base_batch_size``."""
        if self.optimizer_factory is None:
            raise ValueError("this module was built without an optimiser (optim.optimizer): it can evaluate, not train")
        defaults = optimizer_defaults(self.optimizer_factory)
        trainer = self.trainer
        total_batch = self.hparams.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        lr = float(defaults["lr"]) * total_batch / self.hparams.base_batch_size
        weight_decay = float(defaults.get("weight_decay", 0.0))
        groups = param_groups(self.net, weight_decay, no_decay_norm_bias=self.hparams.no_decay_norm_bias)
        optimizer = self.optimizer_factory(params=groups, lr=lr)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        scheduler = self.scheduler_factory(optimizer, steps_per_epoch=max(total // epochs, 1), total_steps=total)
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
