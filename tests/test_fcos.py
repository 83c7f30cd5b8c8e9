"""model=fcos: torchvision's FCOS over sapd's backbone and FPN, with the detector contract of SAPD."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, compose_config
from sapd.models import FPN, FCOSDetector, TimmBackbone
from sapd.train import train

# The tiny run of conftest without the SAPD-only model keys (head, selection).
FCOS_TINY = [o for o in TINY if not o.startswith(("model.head.", "model.selection.", "model.neck."))]


def small_fcos(num_classes=3, **kwargs):
    backbone = TimmBackbone(name="resnet10t", pretrained=False, frozen_stages=-1, norm_eval=False)
    neck = FPN(
        in_channels=list(backbone.out_channels), out_channels=64
    )  # torchvision GroupNorm(32): >= 2 channels per group
    return FCOSDetector(num_classes=num_classes, backbone=backbone, neck=neck, num_convs=1, **kwargs)


def test_forward_loss_and_postprocess_contract():
    torch.manual_seed(0)
    net = small_fcos()
    images = torch.randn(2, 3, 96, 128)
    out = net(images)
    p = sum(h * w for h, w in out["level_sizes"])
    assert p == 12 * 16 + 6 * 8 + 3 * 4 + 2 * 2 + 1 * 1
    assert out["cls_logits"].shape == (2, p, 3) and out["box_reg"].shape == (2, p, 4)
    assert out["ctrness"].shape == (2, p, 1)
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 80.0], [70.0, 5.0, 120.0, 40.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},  # an empty image
    ]
    losses = net.loss(out, targets)
    assert set(losses) == {"cls", "loc", "ctrness", "total"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loc"] > 0 and losses["ctrness"] > 0  # the boxes matched foreground points
    losses["total"].backward()
    assert net.fcos.head.classification_head.cls_logits.weight.grad.abs().sum() > 0
    assert any(p.grad is not None for p in net.backbone.parameters())  # the loss reaches the shared backbone
    dets = net.postprocess(out, [(96, 128), (96, 100)], [(1.0, 1.0), (2.0, 2.0)], score_thresh=0.0)
    assert len(dets) == 2 and dets[0]["boxes"].shape[0] > 0
    # the threshold was this call's: neither the settings nor torchvision's FCOS object were changed
    assert net.postprocessor.score_thresh == 0.05 and net.fcos.score_thresh == 0.2
    assert all(len(d["boxes"]) == 0 for d in net.postprocess(out, [(96, 128), (96, 100)], score_thresh=0.999))
    assert (dets[0]["boxes"][:, 2] <= 128).all() and (dets[0]["boxes"][:, 3] <= 96).all()
    assert (dets[1]["boxes"][:, 2] <= 50).all() and (dets[1]["boxes"][:, 3] <= 48).all()  # halved back


def test_no_foreground_gives_a_finite_loss():
    net = small_fcos()
    out = net(torch.randn(1, 3, 64, 64))
    loss = net.loss(out, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}])
    assert loss["loc"] == 0 and torch.isfinite(loss["total"]) and loss["cls"] > 0


def test_bf16_head_outputs_give_float32_losses():
    net = small_fcos()
    out = net(torch.randn(1, 3, 64, 64))
    for key in ("cls_logits", "box_reg", "ctrness"):
        out[key] = out[key].to(torch.bfloat16)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 50.0]]), "labels": torch.tensor([1])}]
    assert all(v.dtype == torch.float32 for v in net.loss(out, targets).values())


@pytest.mark.slow
def test_model_fcos_trains_and_evaluates_in_the_app(tmp_path):
    cfg = compose_config("train", [*FCOS_TINY, "model=fcos", "trainer.max_epochs=2"], tmp_path)
    metrics, objects = train(cfg)
    net = objects["module"].net
    assert isinstance(net, FCOSDetector) and net.num_classes == objects["datamodule"].num_classes
    assert "val/map" in metrics and "train/ctrness" in metrics
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"]["_target_"] == "sapd.models.FCOSDetector" and summary["global_step"] == 8


def test_fpn_width_must_suit_torchvisions_group_norm():
    backbone = TimmBackbone(name="resnet10t", pretrained=False)
    with pytest.raises(ValueError, match="multiple of 32"):
        FCOSDetector(
            num_classes=2, backbone=backbone, neck=FPN(in_channels=list(backbone.out_channels), out_channels=48)
        )


def test_postprocess_never_returns_a_box_without_area():
    """An image much smaller than its padded batch: boxes of points over the padding are clipped to
    nothing and dropped (torchvision's post-processing keeps them)."""
    from sapd.models.postprocess import PostProcess

    torch.manual_seed(0)
    net = small_fcos(postprocess=PostProcess(score_thresh=0.0, pre_nms_topk=1000, max_detections=1000)).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 256, 256))
    (det,) = net.postprocess(out, [(24, 24)])
    boxes = det["boxes"]
    assert len(boxes) > 0 and ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
