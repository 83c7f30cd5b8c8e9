"""The SAPD network: backbone, FPN / BFP, head, detector contract, post-processing, and overfitting."""

import dataclasses
import functools
import math

import pytest
import timm
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d, box_iou

from sapd.models import FPN, SAPD, FeatureSelectionNet, PostProcess, SAPDCriterion, SAPDHead, TimmBackbone
from sapd.models.backbone import DeformConv3x3, WeightsError
from sapd.models.head import group_norm
from sapd.models.neck import NonLocal2d
from sapd.models.postprocess import postprocess_detections


class TinyBackbone(nn.Module):
    """Five stride-2 convs: C3, C4, C5 at strides 8, 16, 32, cheap enough to overfit in seconds."""

    def __init__(self):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, 2, 1), nn.GroupNorm(8, o), nn.ReLU())

        self.c3 = nn.Sequential(block(3, 16), block(16, 32), block(32, 32))
        self.c4, self.c5 = block(32, 64), block(64, 64)
        self.out_channels, self.strides = [32, 64, 64], [8, 16, 32]

    def forward(self, x):
        c3 = self.c3(x)
        c4 = self.c4(c3)
        return [c3, c4, self.c5(c4)]


def small_sapd(backbone=None, num_classes=3, **kwargs):
    return SAPD(
        num_classes=num_classes,
        backbone=backbone or TimmBackbone(name="resnet10t", frozen_stages=-1, norm_eval=False),
        neck=functools.partial(FPN, out_channels=32),
        head=functools.partial(SAPDHead, feat_channels=32, num_convs=2, norm="gn"),
        selection=functools.partial(FeatureSelectionNet, channels=32),
        **kwargs,
    )


TARGETS = [
    {"boxes": torch.tensor([[10.0, 10.0, 60.0, 80.0], [0.0, 0.0, 200.0, 96.0]]), "labels": torch.tensor([0, 2])},
    {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
]


# --- backbone -------------------------------------------------------------------------------------------


def test_backbone_frozen_defaults():
    bb = TimmBackbone(name="resnet10t")  # frozen_stages=1, norm_eval=True (paper §4.1)
    assert bb.out_channels == [128, 256, 512] and bb.strides == [8, 16, 32]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bb.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in bb.modules())
    assert not any(p.requires_grad for p in bb.body.conv1.parameters())
    assert not any(p.requires_grad for p in bb.body.layer1.parameters())
    assert all(p.requires_grad for p in bb.body.layer2.parameters())
    feats = bb(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(128, 8, 12), (256, 4, 6), (512, 2, 3)]


def test_frozen_batch_norm_computes_what_the_batch_norm_did_in_eval_mode():
    torch.manual_seed(0)
    bb = TimmBackbone(name="resnet10t", frozen_stages=-1, norm_eval=False)
    for m in bb.modules():  # statistics and affine parameters other than the initial ones
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5), nn.init.uniform_(m.bias, -0.5, 0.5)
    frozen = TimmBackbone(name="resnet10t", frozen_stages=-1, norm_eval=True)
    frozen.load_state_dict(bb.state_dict())
    x = torch.randn(2, 3, 64, 96)
    for a, b in zip(bb.eval()(x), frozen.train()(x)):  # frozen: the same in train mode
        assert torch.allclose(a, b, atol=1e-5)


def test_backbone_trainable_batchnorm_from_scratch():
    bb = TimmBackbone(name="resnet10t", frozen_stages=-1, norm_eval=False)
    assert all(p.requires_grad for p in bb.parameters())
    bn = bb.body.layer3[0].bn1
    assert isinstance(bn, nn.BatchNorm2d)
    before = bn.running_mean.clone()
    bb.train()(torch.randn(2, 3, 64, 64))
    assert not torch.equal(before, bn.running_mean)  # statistics are updated
    # frozen_stages with plain BatchNorm: the frozen stem stays in eval mode even under train().
    bb = TimmBackbone(name="resnet10t", frozen_stages=0, norm_eval=False).train()
    assert not bb.body.bn1.training and bb.body.layer1.training


@pytest.mark.slow
def test_dcn_equals_plain_at_init():
    torch.manual_seed(0)
    plain = TimmBackbone(name="resnet10t", frozen_stages=-1, norm_eval=False)
    dcn = TimmBackbone(name="resnet10t", frozen_stages=-1, norm_eval=False, dcn=True)
    dcns = [n for n, m in dcn.named_modules() if isinstance(m, DeformConv3x3)]
    assert len(dcns) == 6 and all(n.startswith(("body.layer2", "body.layer3", "body.layer4")) for n in dcns)
    missing, unexpected = dcn.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("conv_offset" in k for k in missing)
    x = torch.randn(2, 3, 64, 80)
    plain.eval(), dcn.eval()
    for a, b in zip(plain(x), dcn(x)):
        assert torch.allclose(a, b, atol=1e-4)
    # And the whole detector: DCN SAPD equals its plain twin.
    m_plain, m_dcn = small_sapd(plain).eval(), small_sapd(dcn).eval()
    m_dcn.load_state_dict(m_plain.state_dict(), strict=False)
    assert torch.allclose(m_plain(x)["cls_logits"], m_dcn(x)["cls_logits"], atol=1e-4)


def test_pretrained_unreachable_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hf_constants

        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    except (ImportError, AttributeError):
        pass
    with pytest.raises(WeightsError, match=r"model\.backbone\.checkpoint_path=/path/to/weights .*pretrained=false"):
        TimmBackbone(name="resnet10t", pretrained=True)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_checkpoint(tmp_path, suffix):
    torch.manual_seed(1)
    ref = timm.create_model("resnet10t")  # timm's own keys, classifier included
    path = tmp_path / f"resnet10t{suffix}"
    if suffix == ".pth":
        torch.save(ref.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    bb = TimmBackbone(name="resnet10t", checkpoint_path=path, frozen_stages=-1, norm_eval=False)
    assert torch.equal(bb.body.layer3[0].conv2.weight, ref.layer3[0].conv2.weight)
    assert torch.equal(bb.body.layer4[0].bn1.running_var, ref.layer4[0].bn1.running_var)
    with pytest.raises(WeightsError, match="missing.pth is not a file"):
        TimmBackbone(name="resnet10t", checkpoint_path=tmp_path / "missing.pth")


# --- neck and head ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bfp", [False, True])
def test_fpn_shapes_odd_sizes(bfp):
    feats = [torch.randn(2, 8, 13, 26), torch.randn(2, 16, 7, 13), torch.randn(2, 24, 4, 7)]
    fpn = FPN(in_channels=[8, 16, 24], out_channels=16, bfp=bfp)
    outs = fpn(feats)
    assert [tuple(o.shape) for o in outs] == [
        (2, 16, 13, 26),
        (2, 16, 7, 13),
        (2, 16, 4, 7),
        (2, 16, 2, 4),
        (2, 16, 1, 2),
    ]


def test_bfp_adds_refined_average_as_residual():
    torch.manual_seed(0)
    feats = [torch.randn(1, 8, 16, 16), torch.randn(1, 16, 8, 8), torch.randn(1, 24, 4, 4)]
    plain, bfp = FPN(in_channels=[8, 16, 24], out_channels=8), FPN(in_channels=[8, 16, 24], out_channels=8, bfp=True)
    bfp.load_state_dict(plain.state_dict(), strict=False)
    p, b = plain(feats), bfp(feats)
    # Non-local output conv is zero at init, so the refined feature is the plain average at P4 size.
    gathered = [
        nn.functional.adaptive_max_pool2d(p[0], 8),
        p[1],
        *[nn.functional.interpolate(x, size=(8, 8), mode="nearest") for x in p[2:]],
    ]
    avg = torch.stack(gathered).mean(0)
    assert torch.allclose(b[1], p[1] + avg, atol=1e-5)
    assert torch.allclose(b[0], p[0] + nn.functional.interpolate(avg, size=(16, 16), mode="nearest"), atol=1e-5)
    assert torch.allclose(b[4], p[4] + nn.functional.adaptive_max_pool2d(avg, p[4].shape[-2:]), atol=1e-5)
    block = NonLocal2d(8)
    x = torch.randn(1, 8, 5, 5)
    assert torch.equal(block(x), x)


def test_head_shapes_init_and_relu():
    head = SAPDHead(in_channels=16, num_classes=5, feat_channels=24, num_convs=2, norm="gn")
    assert head.cls_out.bias.detach().tolist() == pytest.approx([-math.log(99)] * 5)
    assert head.loc_out.bias.detach().tolist() == pytest.approx([0.1] * 4)
    assert abs(float(head.cls_tower[0].weight.detach().std()) - 0.01) < 0.002
    assert sum(isinstance(m, nn.GroupNorm) for m in head.modules()) == 4
    assert [group_norm(c).num_groups for c in (256, 64, 48, 32, 24, 3)] == [32, 32, 24, 16, 12, 1]
    feats = [torch.randn(2, 16, h, w) for h, w in [(13, 26), (7, 13), (4, 7), (2, 4), (1, 2)]]
    cls, reg = head(feats)
    p = 13 * 26 + 7 * 13 + 4 * 7 + 2 * 4 + 2
    assert cls.shape == (2, p, 5) and reg.shape == (2, p, 4) and (reg >= 0).all()
    # Levels concatenated P3 first, row-major: the first P4 entry is position (0, 0) of level 1.
    c4 = head.cls_out(head.cls_tower(feats[1]))
    assert torch.allclose(cls[:, 13 * 26], c4[:, :, 0, 0], atol=1e-6)
    with pytest.raises(ValueError):
        SAPDHead(in_channels=16, num_classes=5, norm="bn")


# --- detector contract -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("size", [(97, 203), (128, 256)])
def test_sapd_forward_loss_shapes(size):
    torch.manual_seed(0)
    model = small_sapd()
    x = torch.randn(2, 3, *size)
    out = model(x)
    sizes = out["level_sizes"]
    assert len(sizes) == 5 and [tuple(f.shape[-2:]) for f in out["features"]] == sizes
    p = sum(h * w for h, w in sizes)
    assert out["cls_logits"].shape == (2, p, 3) and out["box_reg"].shape == (2, p, 4)
    loss = model.loss(out, TARGETS)
    for key in ("cls", "loc", "select", "total", "num_pos", "pos_weight_sum", "num_unassigned"):
        assert loss[key].dim() == 0 and torch.isfinite(loss[key]), key
    assert {f"sel_w/P{i}" for i in range(3, 8)} <= loss.keys()
    assert model.criterion.last_assignment.selection_probs.shape == (2, 5)
    loss["total"].backward()
    assert model.head.cls_out.weight.grad is not None and model.selection.fc.weight.grad is not None
    model.eval()
    out_eval = model(x)
    assert out_eval.keys() == out.keys()  # the same in train and eval mode
    dets = model.postprocess(out_eval, [size, (size[0] - 10, size[1] - 20)], [(1.0, 1.0), (0.5, 0.5)])
    assert len(dets) == 2 and all(d["boxes"].shape[1] == 4 for d in dets)


def test_selection_net_not_run_at_inference():
    model = small_sapd(TinyBackbone()).eval()
    calls = []
    model.selection.register_forward_hook(lambda *a: calls.append(1))
    out = model(torch.randn(1, 3, 64, 64))
    model.postprocess(out, [(64, 64)])
    assert calls == []
    model.loss(out, [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}])
    assert calls == [1]


def test_phase_buffer_in_state_dict():
    model = small_sapd(TinyBackbone())
    assert int(model.phase) == 1
    model.set_phase(2)
    other = small_sapd(TinyBackbone())
    other.load_state_dict(model.state_dict())
    assert int(other.phase) == 2 and "phase" in model.state_dict()
    with pytest.raises(ValueError):
        model.set_phase(3)


def test_modules_instead_of_partials():
    bb = TinyBackbone()
    neck = FPN(in_channels=bb.out_channels, out_channels=16)
    head = SAPDHead(in_channels=16, num_classes=2, feat_channels=16, num_convs=1)
    model = SAPD(
        num_classes=2, backbone=bb, neck=neck, head=head, selection=None, criterion=SAPDCriterion(soft_select=False)
    )
    assert model.neck is neck and model.head is head and model.strides == [8, 16, 32, 64, 128]
    out = model(torch.randn(1, 3, 64, 64))
    loss = model.loss(out, [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}])
    assert loss["select"] == 0 and torch.isfinite(loss["total"])
    # soft selection (the criterion's default) without a selection net is refused when the model is built
    with pytest.raises(ValueError, match="selection"):
        SAPD(num_classes=2, backbone=bb, neck=neck, head=head, selection=None)


# --- post-processing (paper §3.4) ----------------------------------------------------------------------------


def two_level_sapd(**kwargs) -> SAPD:
    """A 2-class SAPD on P3-P4 with a head of no convs, for the hand-made outputs below."""
    return SAPD(
        num_classes=2,
        backbone=TinyBackbone(),
        neck=functools.partial(FPN, out_channels=16, num_levels=2),
        head=functools.partial(SAPDHead, num_convs=0),
        selection=None,
        **kwargs,
    )


def hand_outputs():
    """Two levels: P3 2x2 (points (4,4), (12,4), (4,12), (12,12)), P4 1x1 (point (8,8)); K = 2."""
    logits = torch.full((1, 5, 2), -10.0)
    reg = torch.ones(1, 5, 4)
    logits[0, 0, 1] = 3.0  # 0.953: box [-28, -28, 36, 36] -> clipped [0, 0, 36, 30]
    logits[0, 1, 1] = 2.0  # 0.881: [-20, -28, 44, 36] -> [0, 0, 40, 30], IoU 0.9 with the first: suppressed
    logits[0, 1, 0] = 1.0  # 0.731: the same box in class 0: kept (class-aware NMS)
    logits[0, 2, 0] = -3.5  # 0.029 < 0.05: dropped
    logits[0, 4, 0] = 0.0  # 0.5 at (8, 8), stride 16, d = 0.1: [1.6, 1.6, 14.4, 14.4]
    reg[0, 4] = 0.1
    return logits, reg, [(2, 2), (1, 1)], [8, 16]


def test_postprocess_threshold_decode_clip_nms():
    logits, reg, sizes, strides = hand_outputs()
    det = postprocess_detections(logits, reg, sizes, strides, [(30, 40)])[0]
    assert det["labels"].tolist() == [1, 0, 0]
    assert det["scores"].tolist() == pytest.approx([torch.sigmoid(torch.tensor(v)).item() for v in (3.0, 1.0, 0.0)])
    expected = [[0, 0, 36, 30], [0, 0, 40, 30], [1.6, 1.6, 14.4, 14.4]]
    assert torch.allclose(det["boxes"], torch.tensor(expected), atol=1e-5)


def test_postprocess_maps_to_original_pixels_and_limits():
    logits, reg, sizes, strides = hand_outputs()
    det = postprocess_detections(logits, reg, sizes, strides, [(30, 40)], [(2.0, 0.5)])[0]
    assert torch.allclose(det["boxes"][0], torch.tensor([0.0, 0.0, 18.0, 60.0]))
    assert len(postprocess_detections(logits, reg, sizes, strides, [(30, 40)], max_detections=2)[0]["boxes"]) == 2
    top1 = postprocess_detections(logits, reg, sizes, strides, [(30, 40)], pre_nms_topk=1)[0]
    assert top1["labels"].tolist() == [1, 0] and top1["scores"][1].item() == pytest.approx(0.5)
    hi = postprocess_detections(logits, reg, sizes, strides, [(30, 40)], score_thresh=0.6)[0]
    assert hi["scores"].numel() == 2
    nms_off = postprocess_detections(logits, reg, sizes, strides, [(30, 40)], nms_thresh=0.95)[0]
    assert nms_off["scores"].numel() == 4
    # Through the detector: the same numbers with its defaults.
    model = two_level_sapd(criterion=SAPDCriterion(topk=2, soft_select=False))
    outputs = {"cls_logits": logits, "box_reg": reg, "level_sizes": sizes, "features": []}
    det2 = model.postprocess(outputs, [(30, 40)], [(2.0, 0.5)])[0]
    assert torch.equal(det2["boxes"], det["boxes"])


# --- end to end ------------------------------------------------------------------------------------------


def synthetic_image(h=128, w=160):
    """Noise background with two coloured rectangles and a coloured circle; boxes and labels."""
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, 3, h, w, generator=g) * 0.3
    boxes = torch.tensor([[10.0, 12.0, 58.0, 60.0], [70.0, 30.0, 150.0, 90.0], [30.0, 80.0, 70.0, 120.0]])
    colours = torch.tensor([[2.0, -1, -1], [-1, 2.0, -1], [-1, -1, 2.0]])
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    for i, (b, c) in enumerate(zip(boxes, colours)):
        if i == 2:
            cx, cy, r = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, (b[2] - b[0]) / 2
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
        else:
            mask = (xx >= b[0]) & (xx < b[2]) & (yy >= b[1]) & (yy < b[3])
        img[0, :, mask] = c[:, None]
    return img, boxes, torch.tensor([0, 1, 2])


@pytest.mark.slow
def test_tiny_model_overfits_one_image():
    torch.manual_seed(0)
    img, boxes, labels = synthetic_image()
    model = small_sapd(TinyBackbone())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    targets = [{"boxes": boxes, "labels": labels}]
    losses = []
    for _ in range(80):
        loss = model.loss(model(img), targets)
        opt.zero_grad()
        loss["total"].backward()
        opt.step()
        losses.append(loss["total"].item())
    assert min(losses[-5:]) < losses[0] / 10
    model.eval()
    det = model.postprocess(model(img), [tuple(img.shape[-2:])])[0]
    for box, label in zip(boxes, labels):
        mine = det["boxes"][det["labels"] == label]
        assert len(mine) > 0
        assert box_iou(box[None], mine[:1]).item() >= 0.5  # best-scoring detection of the class


# --- configuration objects -------------------------------------------------------------------------------


def test_criterion_and_postprocess_are_objects_the_detector_uses():
    crit, post = SAPDCriterion(eta=2.0, topk=2, soft_select=False), PostProcess(score_thresh=0.6, nms_thresh=0.95)
    model = two_level_sapd(criterion=crit, postprocess=post, z=4.0)
    assert model.criterion is crit and model.postprocessor is post
    logits, reg, sizes, strides = hand_outputs()
    outputs = {"cls_logits": logits, "box_reg": reg, "level_sizes": sizes, "features": []}
    det = model.postprocess(outputs, [(30, 40)])[0]
    # hand_outputs: scores 0.953, 0.881, 0.731, 0.5; 0.6 keeps three, NMS at 0.95 suppresses none of them
    assert det["scores"].numel() == 3
    # a threshold for one call; the shared settings stay as they are (frozen: no caller changes them for another)
    assert model.postprocess(outputs, [(30, 40)], score_thresh=0.9)[0]["scores"].numel() == 1
    assert model.postprocessor is post and post.score_thresh == 0.6
    assert model.postprocess(outputs, [(30, 40)])[0]["scores"].numel() == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        post.score_thresh = 0.9
    assert post.replace(score_thresh=0.9) == PostProcess(score_thresh=0.9, nms_thresh=0.95)
    for bad in (
        lambda: post.replace(score_thresh=1.5),
        lambda: model.postprocess(outputs, [(30, 40)], score_thresh=-0.1),
    ):
        with pytest.raises(ValueError, match=r"model.postprocess.score_thresh must be a finite number in \[0, 1\)"):
            bad()
    # z is the detector's: the decoded box of the P4 point scales with it
    model.z = 8.0
    box = model.postprocess(outputs, [(30, 40)])[0]["boxes"][0]
    assert box.tolist() == pytest.approx([0.0, 0.0, 40.0, 30.0])  # (4, 4) -+ 1 * z * 8 = 64 px, clipped


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"topk": 0}, "topk"),
        ({"topk": 2.5}, "topk"),
        ({"eta": -1.0}, "eta"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": 1.5}, "epsilon"),
        ({"lambda_select": -0.1}, "lambda_select"),
        ({"loc_loss": "l1"}, "loc_loss"),
        ({"ignore_epsilon": 0.1}, "ignore_epsilon"),  # must lie outside B_v (epsilon 0.2)
    ],
)
def test_criterion_refuses_values_outside_their_range(kwargs, match):
    with pytest.raises(ValueError, match=f"model.criterion.{match}"):
        SAPDCriterion(**kwargs)


def test_topk_beyond_the_levels_and_bad_postprocess_are_refused():
    with pytest.raises(ValueError, match="topk=6 exceeds the 5 pyramid levels"):
        SAPD(
            num_classes=2,
            backbone=TinyBackbone(),
            neck=functools.partial(FPN, out_channels=16),
            head=functools.partial(SAPDHead, num_convs=0),
            selection=None,
            criterion=SAPDCriterion(topk=6),
        )
    for kwargs in ({"score_thresh": 1.0}, {"nms_thresh": 0.0}, {"max_detections": 0}, {"pre_nms_topk": 0}):
        with pytest.raises(ValueError, match="model.postprocess"):
            PostProcess(**kwargs)
