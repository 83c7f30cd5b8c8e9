"""Losses, level selection, Eq. 5 weights and the Eq. 6 normaliser, on hand-built head outputs (paper §3.2-§3.3)."""

import math

import pytest
import torch
import torchvision
from torch import nn

from references import inside_valid_box, selection_forward_concat
from sapd.models.anchor_points import anchor_points, encode
from sapd.models.criterion import SAPDCriterion
from sapd.models.losses import dense_focal_loss, iou_loss
from sapd.models.selection import FeatureSelectionNet, instance_level_losses, select_levels

STRIDES = [8, 16, 32, 64, 128]
SIZES_64 = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]  # a 64 x 64 input, P = 86
P3_PTS, P4_PTS, P5_PTS = [9, 10, 17, 18], [64, 65, 68, 69], [80]  # owned by B = [0, 32]^2 (test_targets)
PROBS = torch.tensor([0.1, 0.2, 0.4, 0.2, 0.1])


class FixedSelection(nn.Module):
    """Stands in for the selection net: the same level probabilities for every instance."""

    def __init__(self, probs):
        super().__init__()
        self.logits = nn.Parameter(probs.log())

    def forward(self, features, boxes, box_images, strides):
        return self.logits.expand(boxes.shape[0], -1)


def head_outputs(sizes=SIZES_64, num_images=1, num_classes=2, channels=4):
    p = sum(h * w for h, w in sizes)
    return {
        "cls_logits": torch.zeros(num_images, p, num_classes),
        "box_reg": torch.full((num_images, p, 4), 0.1),
        "features": [torch.randn(num_images, channels, h, w) for h, w in sizes],
        "level_sizes": sizes,
    }


def one_box_outputs():
    """B = [0, 32]^2, class 1. Predictions: exact on P5, 1.2x on P4, 2x on P3 -> loss P5 < P4 < P3."""
    out = head_outputs()
    box = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    pts, strs, _ = anchor_points(SIZES_64, STRIDES)
    for idx, scale in ((P3_PTS, 2.0), (P4_PTS, 1.2), (P5_PTS, 1.0)):
        out["box_reg"][0, idx] = encode(pts[idx], strs[idx], box.expand(len(idx), 4)) * scale
    targets = [{"boxes": box, "labels": torch.tensor([1])}]
    return out, targets


def expected_losses(out, pos_points, pos_weights, label=1, zero_class_weight=()):
    """Eq. 2, 5, 6 written densely: (cls, loc, normaliser) for one image of one box B = [0, 32]^2."""
    logits, reg = out["cls_logits"][0], out["box_reg"][0]
    target = torch.zeros_like(logits)
    weight = torch.ones_like(logits)
    target[pos_points, label] = 1
    weight[pos_points] = torch.tensor(pos_weights)[:, None]
    for p in zero_class_weight:
        weight[p, label] = 0
    focal = torchvision.ops.sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0, reduction="none")
    pts, strs, _ = anchor_points(SIZES_64, STRIDES)
    box = torch.tensor([[0.0, 0.0, 32.0, 32.0]]).expand(len(pos_points), 4)
    d = encode(pts[pos_points], strs[pos_points], box)
    ious = iou_loss(reg[pos_points], d)
    norm = max(sum(pos_weights), 1.0)
    return (focal * weight).sum() / norm, (ious * torch.tensor(pos_weights)).sum() / norm, norm


# --- Eq. 2 pieces -----------------------------------------------------------------------------------


def test_dense_focal_loss_equals_weighted_elementwise_sum():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(40, 5, generator=g) * 3).requires_grad_()
    w = torch.rand(40, generator=g)
    pos_p, pos_c = torch.tensor([0, 3, 7, 7]), torch.tensor([1, 4, 0, 2])
    ignore = torch.tensor([2 * 5 + 1, 9 * 5 + 4, 30 * 5 + 0])
    target = torch.zeros(40, 5)
    target[pos_p, pos_c] = 1
    keep = torch.ones(40, 5)
    keep.view(-1)[ignore] = 0
    for alpha, gamma in ((0.25, 2.0), (-1, 1.5)):
        ref = (torchvision.ops.sigmoid_focal_loss(logits, target, alpha, gamma, "none") * w[:, None] * keep).sum()
        ours = dense_focal_loss(logits, w, pos_p, pos_c, ignore, alpha, gamma)
        assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
        g_ref, g_ours = (torch.autograd.grad(v, logits)[0] for v in (ref, ours))
        assert torch.allclose(g_ours, g_ref, atol=1e-6)


def test_iou_loss_hand_cases():
    t = torch.tensor([[1.0, 1.0, 1.0, 1.0]])  # 2 x 2 box around the point
    assert iou_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    half = torch.tensor([[1.0, 1.0, 0.0, 1.0]])  # left half: IoU 0.5
    assert iou_loss(half, t).item() == pytest.approx(math.log(2))
    zero = torch.zeros(1, 4)  # empty prediction: IoU clamped at 1e-6
    assert iou_loss(zero, t).item() == pytest.approx(-math.log(1e-6))
    # GIoU: prediction [0, 2] x [-1, 1] vs target [-1, 1]^2: IoU 1/3, enclosure 6, union 6 -> GIoU 1/3.
    shifted = torch.tensor([[0.0, 1.0, 2.0, 1.0]])
    assert iou_loss(shifted, t, kind="giou").item() == pytest.approx(1 - 1 / 3)
    with pytest.raises(ValueError):
        iou_loss(t, t, kind="l1")


# --- §3.3 level selection -------------------------------------------------------------------------------


def test_instance_level_losses_mean_and_inf():
    point_losses = torch.tensor([1.0, 3.0, 5.0, 2.0])
    inst = torch.tensor([0, 0, 0, 1])
    lvl = torch.tensor([0, 0, 2, 1])
    table = instance_level_losses(point_losses, inst, lvl, 3, 3)
    inf = float("inf")
    assert table.tolist() == [[2.0, inf, 5.0], [inf, 2.0, inf], [inf, inf, inf]]


def test_select_levels_phase1_and_phase2():
    inf = float("inf")
    losses = torch.tensor([[1.0, 0.5, inf, 2.0, inf], [inf, 3.0, inf, inf, inf], [inf] * 5])
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.25, 0.15]]).expand(3, 5)
    w, sel, argmin = select_levels(losses, probs, soft=False, topk=3)
    assert argmin.tolist() == [1, 1, -1]
    assert w.tolist() == [[0, 1, 0, 0, 0], [0, 1, 0, 0, 0], [0] * 5]  # one level, weight 1
    w, sel, _ = select_levels(losses, probs, soft=True, topk=3)
    assert sel.tolist() == [[True, True, False, True, False], [False, True, False, False, False], [False] * 5]
    assert w[0].tolist() == pytest.approx([0.1, 0.2, 0, 0.25, 0])  # not renormalised
    assert w[1].tolist() == pytest.approx([0, 0.2, 0, 0, 0])  # fewer candidates than k: all of them
    w, sel, _ = select_levels(losses, probs, soft=True, topk=2)
    assert sel[0].tolist() == [True, True, False, False, False]


def test_feature_selection_net_table1_shapes_and_init():
    net = FeatureSelectionNet(in_channels=8, channels=16)
    convs = [m for m in net.convs if isinstance(m, nn.Conv2d)]
    assert [c.in_channels for c in convs] == [40, 16, 16] and all(c.padding == (0, 0) for c in convs)
    assert net.fc.out_features == 5
    assert all(float(m.weight.detach().std()) < 0.02 for m in [*convs, net.fc])
    feats = [torch.randn(2, 8, h, w) for h, w in SIZES_64]
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [10.0, 5.0, 60.0, 50.0], [1.0, 1.0, 3.0, 3.0]])
    logits = net(feats, boxes, torch.tensor([0, 1, 1]), STRIDES)
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
    for m in net.modules():  # larger weights so that the comparison below means something
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.normal_(m.weight, std=0.1)
            nn.init.normal_(m.bias, std=0.1)
    literal = selection_forward_concat(net, feats, boxes, torch.tensor([0, 1, 1]), STRIDES)
    assert torch.allclose(net(feats, boxes, torch.tensor([0, 1, 1]), STRIDES), literal, atol=1e-5)
    assert literal.std() > 1e-3


# --- Eq. 5 / 6 through the criterion -----------------------------------------------------------------


def test_phase1_one_level_weight_one():
    out, targets = one_box_outputs()
    crit = SAPDCriterion()
    loss = crit(out, targets, STRIDES, FixedSelection(PROBS), phase=1)
    cls, loc, norm = expected_losses(out, P5_PTS, [1.0])  # argmin level P5, f(centre) = 1
    assert loss["num_pos"] == 1 and loss["pos_weight_sum"] == pytest.approx(1.0)
    assert loss["cls"].item() == pytest.approx(cls.item(), rel=1e-5)
    assert loss["loc"].item() == pytest.approx(loc.item(), abs=1e-5)
    assert [loss[f"sel_w/P{i}"].item() for i in range(3, 8)] == [0, 0, 1, 0, 0]
    # CE of the selection net against the argmin level (P5) with lambda = 0.1 in the total.
    assert loss["select"].item() == pytest.approx(-math.log(0.4), rel=1e-5)
    assert loss["total"].item() == pytest.approx((cls + loc + 0.1 * loss["select"]).item(), rel=1e-5)
    probs = crit.last_assignment.selection_probs
    assert probs.tolist() == [pytest.approx(PROBS.tolist())]
    assert not probs.requires_grad and loss["total"].requires_grad
    # the loss dict holds scalars only: the assignment is the criterion's, not the loss's
    assert all(v.dim() == 0 for v in loss.values())


@pytest.mark.parametrize("topk", [3, 2])
def test_phase2_topk_soft_weights_eq5(topk):
    out, targets = one_box_outputs()
    loss = SAPDCriterion(topk=topk)(out, targets, STRIDES, FixedSelection(PROBS), phase=2)
    # Eq. 4: f(12, 12 in [0, 32]^2) = (12/20)^2 = 0.36 on P3; f(8, 8) = (8/24)^2 = 1/9 on P4; 1 on P5.
    levels = {5: (P5_PTS, 0.4 * 1.0), 4: (P4_PTS, 0.2 / 9), 3: (P3_PTS, 0.1 * 0.36)}
    chosen = [5, 4, 3][:topk]
    pos = [p for lvl in chosen for p in levels[lvl][0]]
    weights = [levels[lvl][1] for lvl in chosen for _ in levels[lvl][0]]
    cls, loc, norm = expected_losses(out, pos, weights)
    assert norm == 1.0  # sum of weights < 1: the max(., 1) of Eq. 6
    assert loss["num_pos"] == len(pos)
    assert loss["pos_weight_sum"].item() == pytest.approx(sum(weights), rel=1e-5)
    assert loss["cls"].item() == pytest.approx(cls.item(), rel=1e-5)
    assert loss["loc"].item() == pytest.approx(loc.item(), rel=1e-5)
    sel_w = [loss[f"sel_w/P{i}"].item() for i in range(3, 8)]
    assert sel_w == pytest.approx([0.1 if topk == 3 else 0, 0.2, 0.4, 0, 0])


def test_soft_weight_off_and_normaliser_above_one():
    out, targets = one_box_outputs()
    crit = SAPDCriterion(soft_weight=False)
    loss = crit(out, targets, STRIDES, FixedSelection(PROBS), phase=2)
    weights = [0.4] + [0.2] * 4 + [0.1] * 4  # f := 1
    cls, loc, norm = expected_losses(out, P5_PTS + P4_PTS + P3_PTS, weights)
    assert norm == pytest.approx(1.6)
    assert loss["pos_weight_sum"].item() == pytest.approx(1.6)
    assert loss["cls"].item() == pytest.approx(cls.item(), rel=1e-5)
    assert loss["loc"].item() == pytest.approx(loc.item(), rel=1e-5)


def test_soft_select_off_ignores_phase():
    out, targets = one_box_outputs()
    crit = SAPDCriterion(soft_select=False)
    one = crit(out, targets, STRIDES, FixedSelection(PROBS), phase=1)
    two = crit(out, targets, STRIDES, FixedSelection(PROBS), phase=2)
    for key in ("cls", "loc", "num_pos", "pos_weight_sum"):
        assert one[key].item() == pytest.approx(two[key].item())
    assert two["num_pos"] == 1


def test_unselected_points_negative_or_ignored():
    out, targets = one_box_outputs()
    out["cls_logits"][0, P3_PTS + P4_PTS, 1] = 2.0  # confident on unselected owned points
    neg = SAPDCriterion()(out, targets, STRIDES, FixedSelection(PROBS), phase=1)
    ign = SAPDCriterion(unselected="ignore")(out, targets, STRIDES, FixedSelection(PROBS), phase=1)
    cls_neg, _, _ = expected_losses(out, P5_PTS, [1.0])
    cls_ign, _, _ = expected_losses(out, P5_PTS, [1.0], zero_class_weight=P3_PTS + P4_PTS)
    assert neg["cls"].item() == pytest.approx(cls_neg.item(), rel=1e-5)
    assert ign["cls"].item() == pytest.approx(cls_ign.item(), rel=1e-5)
    assert ign["cls"] < neg["cls"]
    with pytest.raises(ValueError):
        SAPDCriterion(unselected="drop")


def test_fsaf_ignore_region():
    out = head_outputs()
    out["cls_logits"][..., 1] = 1.0
    box = torch.tensor([[0.0, 0.0, 48.0, 48.0]])
    targets = [{"boxes": box, "labels": torch.tensor([1])}]
    pts, strs, _ = anchor_points(SIZES_64, STRIDES)
    ignored = inside_valid_box(pts, strs, box, 0.5)[:, 0] & ~inside_valid_box(pts, strs, box, 0.2)[:, 0]
    assert ignored.sum() > 0  # the 0.5-shrunk box reaches further than B_v
    plain = SAPDCriterion()(out, targets, STRIDES, FixedSelection(PROBS), phase=1)
    ign = SAPDCriterion(ignore_epsilon=0.5)(out, targets, STRIDES, FixedSelection(PROBS), phase=1)
    assert ign["pos_weight_sum"] == plain["pos_weight_sum"]
    norm = max(plain["pos_weight_sum"].item(), 1.0)
    # Ignored points lose their focal loss in the instance's class (as negatives there) and nothing else.
    x = out["cls_logits"][0, ignored, 1]
    dropped = torchvision.ops.sigmoid_focal_loss(x, torch.zeros_like(x), reduction="sum") / norm
    assert (plain["cls"] - ign["cls"]).item() == pytest.approx(dropped.item(), rel=1e-5)


def test_detection_loss_gives_no_gradient_to_selection_net():
    torch.manual_seed(0)
    out = head_outputs(num_images=2, channels=8)
    out["cls_logits"].requires_grad_(True)
    out["box_reg"] = out["box_reg"].clone().requires_grad_(True)
    for f in out["features"]:
        f.requires_grad_(True)
    targets = [
        {"boxes": torch.tensor([[0.0, 0.0, 32.0, 32.0], [30.0, 10.0, 62.0, 50.0]]), "labels": torch.tensor([0, 1])},
        {"boxes": torch.tensor([[4.0, 4.0, 60.0, 60.0]]), "labels": torch.tensor([1])},
    ]
    net = FeatureSelectionNet(in_channels=8, channels=16)
    loss = SAPDCriterion()(out, targets, STRIDES, net, phase=2)
    assert loss["pos_weight_sum"] > 0
    params = list(net.parameters())
    det = torch.autograd.grad(loss["cls"] + loss["loc"], params, retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in det)
    sel = torch.autograd.grad(loss["select"], params, retain_graph=True)
    assert any(g.abs().sum() > 0 for g in sel)
    head = torch.autograd.grad(loss["total"], [out["cls_logits"], out["box_reg"]])
    assert all(g.abs().sum() > 0 for g in head)


def test_empty_ground_truth():
    out = head_outputs(num_images=2)
    out["cls_logits"].requires_grad_(True)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    for sel, phase in ((FixedSelection(PROBS), 2), (None, 1)):
        crit = SAPDCriterion()
        loss = crit(out, [empty, empty], STRIDES, sel, phase=phase)
        assert torch.isfinite(loss["total"]) and loss["loc"] == 0 and loss["num_pos"] == 0
        assert crit.last_assignment.selection_probs.shape == (0, 5)
        ref = torchvision.ops.sigmoid_focal_loss(out["cls_logits"], torch.zeros(2, 86, 2), reduction="sum")
        assert loss["cls"].item() == pytest.approx(ref.item(), rel=1e-5)  # normaliser max(0, 1) = 1
        loss["total"].backward()


def test_unassigned_instances_counted():
    out, _ = one_box_outputs()
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 32.0, 32.0], [2.0, 2.0, 5.0, 5.0]]), "labels": torch.tensor([1, 0])}]
    loss = SAPDCriterion()(out, targets, STRIDES, FixedSelection(PROBS), phase=1)
    assert loss["num_unassigned"] == 1 and loss["num_pos"] == 1


def test_500_instances_800x1333():
    g = torch.Generator().manual_seed(3)
    sizes = [(math.ceil(800 / s), math.ceil(1344 / s)) for s in STRIDES]
    out = head_outputs(sizes, num_images=1, num_classes=3)
    xy = torch.rand(500, 2, generator=g) * torch.tensor([1300.0, 780.0])
    wh = torch.rand(500, 2, generator=g) ** 3 * torch.tensor([600.0, 400.0]) + 1
    boxes = torch.cat([xy, xy + wh], 1)
    targets = [{"boxes": boxes, "labels": torch.randint(0, 3, (500,), generator=g)}]
    loss = SAPDCriterion()(out, targets, STRIDES, FixedSelection(PROBS), phase=2)
    assert torch.isfinite(loss["total"])
    # Unassigned = instances owning no point, from the dense rule and smallest-area ownership.
    pts, strs, _ = anchor_points(sizes, STRIDES)
    dense = inside_valid_box(pts, strs, boxes)  # [P, M]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    owner = torch.where(dense, area[None], torch.tensor(float("inf"))).argmin(1)[dense.any(1)]
    assert loss["num_unassigned"].item() == 500 - owner.unique().numel()


def test_half_precision_head_outputs_give_float32_losses():
    out, targets = one_box_outputs()
    ref = SAPDCriterion()(out, targets, STRIDES, FixedSelection(PROBS), phase=1)
    half = dict(out, cls_logits=out["cls_logits"].bfloat16(), box_reg=out["box_reg"].bfloat16())
    loss = SAPDCriterion()(half, targets, STRIDES, FixedSelection(PROBS), phase=1)
    assert loss["total"].dtype == torch.float32
    assert loss["num_pos"] == ref["num_pos"]
    assert loss["cls"].item() == pytest.approx(ref["cls"].item(), rel=1e-2)


@pytest.mark.parametrize("detach", [False, True])
def test_selection_loss_reaches_features_unless_detached(detach):
    torch.manual_seed(0)
    out = head_outputs(num_images=1, channels=8)
    for f in out["features"]:
        f.requires_grad_(True)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 36.0]]), "labels": torch.tensor([0])}]
    net = FeatureSelectionNet(in_channels=8, channels=16, detach_features=detach)
    loss = SAPDCriterion()(out, targets, STRIDES, net, phase=2)
    grads = torch.autograd.grad(loss["select"], out["features"], allow_unused=True, retain_graph=True)
    reached = any(g is not None and g.abs().sum() > 0 for g in grads)
    assert reached is (not detach)  # §4.1: jointly trained by default
    assert any(g.abs().sum() > 0 for g in torch.autograd.grad(loss["select"], list(net.parameters())))


# --- switches: soft-weight normalisation and the Eq. 6 normaliser -------------------------------------


def test_level_max_normalised_hand_case():
    from sapd.models.criterion import level_max_normalised

    f = torch.tensor([0.2, 0.5, 0.1, 0.0, 0.3])
    group = torch.tensor([0, 0, 1, 2, 0])  # group 2 has only f = 0: its point weighs 1
    assert level_max_normalised(f, group, 3).tolist() == pytest.approx([0.4, 1.0, 1.0, 1.0, 0.6])


def test_soft_weight_level_max_gives_each_levels_best_point_weight_one():
    out, targets = one_box_outputs()
    crit = SAPDCriterion(soft_weight_norm="level_max")
    loss = crit(out, targets, STRIDES, FixedSelection(PROBS), phase=2)
    # The four P3 points all have f = 0.36 and the four P4 points f = 1/9 (symmetric about the centre):
    # divided by their level's best, every point weighs w_l^B alone.
    weights = [0.4] + [0.2] * 4 + [0.1] * 4
    cls, loc, norm = expected_losses(out, P5_PTS + P4_PTS + P3_PTS, weights)
    assert loss["pos_weight_sum"].item() == pytest.approx(1.6, rel=1e-5)
    assert loss["cls"].item() == pytest.approx(cls.item(), rel=1e-5)
    assert loss["loc"].item() == pytest.approx(loc.item(), rel=1e-5)
    # FSAF (soft_weight off) has f = 1 already: the switch changes nothing there.
    fsaf = dict(soft_weight=False, soft_select=False)
    a = SAPDCriterion(**fsaf)(out, targets, STRIDES, FixedSelection(PROBS), phase=2)
    b = SAPDCriterion(soft_weight_norm="level_max", **fsaf)(out, targets, STRIDES, FixedSelection(PROBS), phase=2)
    assert a["total"].item() == b["total"].item()


def test_normaliser_num_pos_divides_by_the_number_of_positive_points():
    out, targets = one_box_outputs()
    probs = FixedSelection(PROBS)
    paper = SAPDCriterion()(out, targets, STRIDES, probs, phase=2)
    count = SAPDCriterion(normaliser="num_pos")(out, targets, STRIDES, probs, phase=2)
    weights = [0.4] + [0.2 / 9] * 4 + [0.1 * 0.36] * 4  # Eq. 5 as in test_phase2_topk_soft_weights_eq5
    cls, loc, norm = expected_losses(out, P5_PTS + P4_PTS + P3_PTS, weights)
    assert norm == 1.0  # sum w = 0.63: the paper's normaliser is max(0.63, 1) = 1
    assert paper["cls"].item() == pytest.approx(cls.item(), rel=1e-5)
    assert count["cls"].item() == pytest.approx(cls.item() / 9, rel=1e-5)  # 9 positive points
    assert count["loc"].item() == pytest.approx(loc.item() / 9, rel=1e-5)


def test_centre_rule_in_the_criterion_trains_only_central_points():
    # B = [0, 100]^2 on a 128-px input, exact box predictions on P3 only, so phase 1 picks P3 under both
    # rules. Its positives: 3 x 3 points under cell_overlap, the 2 x 2 inside B_v under centre
    # (tests/test_targets.py).
    sizes = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    out = head_outputs(sizes)
    box = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    pts, strs, levels = anchor_points(sizes, STRIDES)
    p3 = torch.nonzero(levels == 0).squeeze(1)
    out["box_reg"][0, p3] = encode(pts[p3], strs[p3], box.expand(len(p3), 4)).clamp(min=0)
    targets = [{"boxes": box, "labels": torch.tensor([1])}]
    num_pos = {}
    for rule in ("cell_overlap", "centre"):
        loss = SAPDCriterion(soft_weight=False, soft_select=False, valid_region=rule)(
            out, targets, STRIDES, None, phase=1
        )
        num_pos[rule] = loss["num_pos"].item()
    assert num_pos == {"cell_overlap": 9, "centre": 4}


@pytest.mark.parametrize(
    "key, value", [("valid_region", "inside"), ("soft_weight_norm", "max"), ("normaliser", "count")]
)
def test_switch_values_are_checked(key, value):
    with pytest.raises(ValueError, match=f"model.criterion.{key} must be one of"):
        SAPDCriterion(**{key: value})
