"""What a run shows on the wandb dashboard beyond its logged numbers: the selection weights per pyramid
level, and validation images with their boxes."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from sapd.models.anchor_points import level_name


class SelectionHistogram(L.Callback):
    """Logs, every training epoch, a histogram per pyramid level of the selection weights w_l^B.

    It collects the ``selection_probs`` [M, L] that ``SAPDLitModule.training_step`` returns with the loss.
    """

    def __init__(self) -> None:
        self.probs: list[torch.Tensor] = []  # this epoch's batches
        self.last_epoch: torch.Tensor | None = None  # [sum M, L] of the latest finished epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.probs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        probs = outputs.get("selection_probs") if isinstance(outputs, dict) else None
        if isinstance(probs, torch.Tensor) and probs.numel():
            self.probs.append(probs.detach().float().cpu())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.probs:
            return
        probs = self.last_epoch = torch.cat(self.probs)  # [sum M, L]
        self.probs = []
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                data = {
                    f"train/selection_weight_{level_name(i)}": wandb.Histogram(probs[:, i].numpy())
                    for i in range(probs.shape[1])
                }
                logger.experiment.log({**data, "trainer/global_step": trainer.global_step})


def _same_size(pictures: list) -> list:
    """PIL images padded (bottom / right, grey) to the largest width and height among them."""
    from PIL import Image

    if not pictures:
        return pictures
    w, h = max(p.width for p in pictures), max(p.height for p in pictures)
    out = []
    for pic in pictures:
        canvas = Image.new("RGB", (w, h), (127, 127, 127))
        canvas.paste(pic.convert("RGB"), (0, 0))
        out.append(canvas)
    return out


class DetectionImages(L.Callback):
    """Logs a few validation images with predicted (score >= ``min_score``) and true boxes to wandb."""

    def __init__(self, num_images: int = 4, min_score: float = 0.3) -> None:
        self.num_images = num_images
        self.min_score = min_score

    def on_validation_batch_end(
        self, trainer, pl_module, outputs: Any, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx != 0 or trainer.sanity_checking or outputs is None:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        from sapd.diagnostics.detections import draw_detections, unnormalize

        images, targets = batch
        pictures = []
        for image, target, det in list(zip(images, targets, outputs))[: self.num_images]:
            pil = unnormalize(image, target)
            keep = det["scores"] >= self.min_score
            pred = {k: v[keep] for k, v in det.items()}
            gt = {"boxes": target["eval_boxes"], "labels": target["eval_labels"]}
            pictures.append(draw_detections(pil, pred, pl_module.class_names, ground_truth=gt))
        pictures = _same_size(pictures)  # a wandb image list must share one size to display right
        for logger in loggers:
            logger.log_image("val/detections", pictures, step=trainer.global_step)
