"""The training graph does not depend on the data, and the loss is float32 under any autocast.

Under DDP with ``find_unused_parameters=False`` every process must produce a gradient for every trainable
parameter at every step, or the gradient all-reduce waits forever on the processes that did (for
example, when one process's batch has no training box). These tests check the property on one process, for every
model and every kind of batch; tests/test_ddp.py checks it with two gloo processes.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, compose_config
from sapd.build import build_module

NUM_CLASSES = 3


def _net(tmp_path, *overrides: str):
    base = TINY
    if "model=fcos" in overrides:  # FCOS has torchvision's head and no selection net
        base = [o for o in TINY if not o.startswith(("model.head.", "model.selection."))]
    cfg = compose_config("train", [*base, *overrides], tmp_path)
    torch.manual_seed(0)
    return build_module(cfg, label_to_cat_id=list(range(1, NUM_CLASSES + 1)), pretrained=False).net


def _targets(kind: str) -> list[dict]:
    """Two images' training targets: ``kind`` says what they hold."""
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    boxes = {"boxes": torch.tensor([[10.0, 12.0, 70.0, 90.0], [40.0, 30.0, 120.0, 100.0]])}
    boxes["labels"] = torch.tensor([0, 2])
    degenerate = {"boxes": torch.tensor([[50.0, 50.0, 50.0, 80.0], [20.0, 20.0, 20.5, 20.5]])}  # zero or tiny width
    degenerate["labels"] = torch.tensor([1, 1])
    return {
        "none": [empty, empty],
        "one_image_empty": [boxes, empty],
        "only_degenerate": [degenerate, empty],
        "both": [boxes, boxes],
    }[kind]


MODELS = {
    "sapd": [],
    "fsaf": ["ablation=fsaf"],
    "sw": ["ablation=sw"],
    "sapd_no_selection_loss": ["model.criterion.lambda_select=0"],
    "sapd_fpn_selection_loss": ["model.selection.detach_features=false"],
    "sapd_ignore": ["model.criterion.unselected=ignore", "model.criterion.ignore_epsilon=0.5"],
    "fcos": ["model=fcos", "model.neck.out_channels=32"],
}


@pytest.mark.parametrize("kind", ["none", "one_image_empty", "only_degenerate", "both"])
@pytest.mark.parametrize("phase", [1, 2])
@pytest.mark.parametrize("model", list(MODELS))
def test_every_trainable_parameter_gets_a_gradient_whatever_the_batch_holds(tmp_path, model, phase, kind):
    overrides = MODELS[model]
    if model == "fcos" and phase == 2:
        pytest.skip("FCOS has one phase")
    net = _net(tmp_path, *overrides)
    if hasattr(net, "set_phase"):
        net.set_phase(phase)
    images = torch.randn(2, 3, 128, 128)
    losses = net.loss(net(images), _targets(kind))
    assert torch.isfinite(losses["total"])
    losses["total"].backward()
    missing = [name for name, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{model}, phase {phase}, batch {kind}: no gradient for {missing[:5]} ({len(missing)} in all)"


def test_a_batch_without_boxes_trains_the_selection_net_with_a_zero_gradient(tmp_path):
    net = _net(tmp_path)
    net.set_phase(2)
    losses = net.loss(net(torch.randn(2, 3, 128, 128)), _targets("none"))
    losses["total"].backward()
    assert float(losses["select"].detach()) == 0.0
    assert all(float(p.grad.abs().sum()) == 0.0 for p in net.selection.parameters())


def test_instances_without_a_target_level_leave_the_selection_loss_unchanged(tmp_path):
    """The selection loss is the mean over the instances that have a target level: adding boxes that own no
    anchor point (zero width) changes neither it nor the other losses."""
    net = _net(tmp_path)
    net.set_phase(2)
    outputs = net(torch.randn(2, 3, 128, 128))
    plain = net.loss(outputs, _targets("one_image_empty"))
    targets = _targets("one_image_empty")
    targets[1] = _targets("only_degenerate")[0]
    padded = net.loss(outputs, targets)
    assert int(padded["num_unassigned"]) == 2 and int(plain["num_unassigned"]) == 0
    for key in ("cls", "loc", "select", "total"):
        assert float(padded[key]) == pytest.approx(float(plain[key]), rel=1e-6), key
    assert float(plain["select"]) > 0


# ---------------------------------------------------------------------------- half precision


def _worst_case(num_boxes: int = 500, size: tuple[int, int] = (800, 1344), num_classes: int = 80):
    """Outputs and targets at COCO's largest scale: 1333-px-wide images, 500 boxes, logits of +-20."""
    gen = torch.Generator().manual_seed(0)
    h, w = size
    strides = [8, 16, 32, 64, 128]
    level_sizes = [((h + s - 1) // s, (w + s - 1) // s) for s in strides]
    num_points = sum(a * b for a, b in level_sizes)
    logits = (torch.randint(0, 2, (1, num_points, num_classes), generator=gen) * 40 - 20).float()
    box_reg = torch.rand(1, num_points, 4, generator=gen) * 3
    xy = torch.rand(num_boxes, 2, generator=gen) * torch.tensor([w - 40.0, h - 40.0])
    wh = 8 + torch.rand(num_boxes, 2, generator=gen) * torch.tensor([w / 2, h / 2])
    boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w - 1.0, h - 1.0]))], dim=1)
    labels = torch.randint(0, num_classes, (num_boxes,), generator=gen)
    features = [torch.randn(1, 16, a, b, generator=gen) for a, b in level_sizes]
    outputs = {"cls_logits": logits, "box_reg": box_reg, "features": features, "level_sizes": level_sizes}
    return outputs, [{"boxes": boxes, "labels": labels}], strides


@pytest.mark.parametrize("phase", [1, 2])
def test_the_losses_stay_float32_under_fp16_autocast_with_worst_case_inputs(tmp_path, phase):
    from sapd.models.selection import FeatureSelectionNet

    outputs, targets, strides = _worst_case()
    criterion = _net(tmp_path, "model.criterion.soft_weight_norm=none").criterion
    torch.manual_seed(0)
    selection = FeatureSelectionNet(in_channels=16, num_levels=5, channels=16)

    def run(half: bool) -> dict:
        outs = dict(outputs)
        if half:  # what the network hands the loss under fp16 autocast
            outs = {**outs, "cls_logits": outs["cls_logits"].half(), "box_reg": outs["box_reg"].half()}
            outs["features"] = [f.half() for f in outs["features"]]
        with torch.autocast("cpu", dtype=torch.float16, enabled=half):
            return criterion(outs, targets, strides, selection, phase)

    full, half = run(False), run(True)
    for key in ("cls", "loc", "select", "total", "pos_weight_sum"):
        assert torch.isfinite(half[key]), key
        assert half[key].dtype == torch.float32, key
        assert float(half[key]) == pytest.approx(float(full[key]), rel=0.01), key
    # the focal sum before Eq. 6's normaliser (the weight sum) is far outside fp16's range (65504)
    assert float(full["cls"]) * float(full["pos_weight_sum"]) > 65504


def test_the_non_local_attention_of_bfp_runs_in_float32_under_fp16_autocast():
    from sapd.models.neck import NonLocal2d

    torch.manual_seed(0)
    block = NonLocal2d(32)
    torch.nn.init.normal_(block.out.weight, std=0.1)
    for conv in (block.theta, block.phi):
        torch.nn.init.normal_(conv.weight, std=1.0)
    x = torch.randn(1, 32, 25, 42) * 8  # large features: theta^T phi reaches ~1e5, past fp16's 65504
    full = block(x)
    with torch.autocast("cpu", dtype=torch.float16):
        half = block(x)
    assert torch.isfinite(half).all()  # in fp16, theta^T phi overflows to inf and the softmax gives NaN
    # so peaked a softmax turns fp16's rounding of theta and phi into an occasional other argmax: most
    # outputs agree closely, not all
    error = (half.float() - full).abs()
    assert float(error.median()) < 0.01 * float(full.abs().mean())


# ---------------------------------------------------------------------------- host-device synchronisation


@pytest.mark.parametrize("overrides", [[], ["model.criterion.valid_region=centre"]], ids=["cell_overlap", "centre"])
@pytest.mark.parametrize("phase", [1, 2])
def test_the_training_step_reads_the_device_five_times(tmp_path, overrides, phase):
    """What makes the host wait for the device in one SAPD training step: the count of candidate (box,
    point) pairs (1), the kept pairs (1), the owned points (1), the positives (1), all sizes of
    data-dependent outputs; and whether the loss is finite (1), which decides whether the step is taken.
    Everything else (labels' range, the phase, the selection loss's mask, the counters) stays on the device."""
    from sync_counter import HostSyncCounter

    cfg = compose_config("train", [*TINY, *overrides], tmp_path)
    module = build_module(cfg, label_to_cat_id=list(range(1, NUM_CLASSES + 1)), pretrained=False)
    module.log = lambda *args, **kwargs: None  # no trainer to log into
    module.net.set_phase(phase)
    targets = [{**t, "image_id": i} for i, t in enumerate(_targets("both"))]
    with HostSyncCounter() as counter:
        out = module.training_step((torch.randn(2, 3, 128, 128), targets), 0)
    assert torch.isfinite(out["loss"])
    assert counter.total == 5, dict(counter.counts)
    assert module.instance_counts == {"instances": 4, "without_anchor_point": 0}


def test_soft_selection_without_a_selection_net_is_refused_when_the_model_is_built(tmp_path):
    from sapd.errors import ConfigError  # the apps' one-line refusal, exit 2

    with pytest.raises(ConfigError, match="soft_select=true needs a feature-selection network"):
        _net(tmp_path, "model.selection=null", "model.criterion.lambda_select=0")
