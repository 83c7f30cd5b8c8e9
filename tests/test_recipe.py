"""The COCO recipe where the paper speaks: Table 2's rows, the §4.1 joint-selection experiment, the
ImageNet weights of the paper's baseline, and one GPU setting for one and for several GPUs."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from conftest import compose_config
from sapd.build import build_module

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml"))
# Table 2 rows built on FSAF's level selection, which has no feature-selection net (rows 1, 2 and 4).
NO_SELECTION_NET = ("table2_fsaf", "table2_sw", "table2_bfp")
# Eq. 6's lambda of the rows that train the selection net (§3.4: "We set lambda = 0.1").
PAPER_LAMBDA = 0.1
# The same shrunk network for every experiment (the backbone keeps its family: DCN, frozen BatchNorm).
SMALL = [
    "model.backbone.pretrained=false",
    "model.neck.out_channels=16",
    "model.head.feat_channels=16",
    "model.head.num_convs=1",
]


def experiment(name: str, tmp_path: Path, *overrides: str):
    return compose_config("train", [f"experiment={name}", *overrides], tmp_path)


@pytest.mark.parametrize("name", NO_SELECTION_NET)
def test_table2_fsaf_rows_train_no_selection_net(tmp_path, name):
    model = experiment(name, tmp_path).model
    assert model.selection is None and model.criterion.lambda_select == 0
    assert model.criterion.soft_select is False


@pytest.mark.parametrize("name", [e for e in EXPERIMENTS if e not in NO_SELECTION_NET])
def test_the_other_coco_experiments_train_the_selection_net_with_the_papers_lambda(tmp_path, name):
    model = experiment(name, tmp_path).model
    assert model.selection is not None and model.selection.detach_features is False  # its loss reaches the FPN
    assert model.criterion.lambda_select == PAPER_LAMBDA


def test_joint_select_is_table2_sw_plus_a_selection_net_whose_weights_go_unused(tmp_path):
    """§4.1's 37.1 AP experiment: +SW with the selection net trained jointly, FSAF's selection throughout."""
    joint = experiment("table2_sw_joint_select", tmp_path)
    sw = experiment("table2_sw", tmp_path)
    crit = joint.model.criterion
    assert crit.soft_weight is True and crit.soft_select is False  # Eq. 4 weights, one level per instance
    assert joint.model.selection is not None and crit.lambda_select == PAPER_LAMBDA
    # otherwise the +SW row: same loss, network, data and schedule
    for key in ("eta", "topk", "epsilon", "valid_region", "soft_weight_norm", "normaliser", "unselected"):
        assert crit[key] == sw.model.criterion[key], key
    assert joint.model.neck == sw.model.neck and joint.model.backbone == sw.model.backbone
    assert joint.data == sw.data and joint.optim == sw.optim and joint.trainer == sw.trainer


@pytest.mark.parametrize("name", ["table2_fsaf", "table2_sw_joint_select", "table2_all"])
def test_every_trainable_parameter_of_a_table2_row_gets_a_gradient(tmp_path, name):
    """What DDP needs without find_unused_parameters: a row either trains its selection net or has none."""
    cfg = experiment(name, tmp_path, *SMALL)
    net = build_module(cfg, label_to_cat_id=list(range(1, 6))).net
    net.set_phase(1)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 256, 256)
    boxes = [[[10.0, 20.0, 90.0, 120.0], [100.0, 40.0, 250.0, 230.0]], [[30.0, 30.0, 200.0, 180.0]]]
    targets = [{"boxes": torch.tensor(b), "labels": torch.tensor(labels)} for b, labels in zip(boxes, [[0, 3], [2]])]
    net.loss(net(images), targets)["total"].backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert (net.selection is None) == (name == "table2_fsaf")


@pytest.mark.parametrize("name", [e for e in EXPERIMENTS if e.startswith(("r", "table2"))])
def test_resnet_experiments_load_torchvisions_imagenet_weights(tmp_path, name):
    """FSAF (MMDetection) initialises R-50 / R-101 from torchvision's ImageNet weights: timm's tv_in1k."""
    backbone = experiment(name, tmp_path).model.backbone
    assert backbone.pretrained is True and backbone.checkpoint_path is None
    assert backbone.name.endswith(".tv_in1k") and backbone.name in timm.list_pretrained()
    assert timm.models.get_pretrained_cfg(backbone.name).url.startswith("https://download.pytorch.org/models/")


@pytest.mark.parametrize("name", [e for e in EXPERIMENTS if e.startswith("x")])
def test_resnext_experiments_name_weights_timm_has(tmp_path, name):
    """No torchvision-recipe ResNeXt-101 64x4d in timm: the config names a pretrained tag timm ships."""
    backbone = experiment(name, tmp_path).model.backbone
    assert backbone.pretrained is True and "." in backbone.name
    assert backbone.name in timm.list_pretrained()


def test_one_and_several_gpus_share_precision_and_cudnn_benchmark(tmp_path):
    gpu = compose_config("train", ["trainer=gpu"], tmp_path).trainer
    ddp = compose_config("train", ["trainer=ddp"], tmp_path).trainer
    assert gpu.benchmark is True
    for key in ("precision", "benchmark", "deterministic", "gradient_clip_val", "accelerator"):
        assert gpu.get(key) == ddp.get(key), key
    assert ddp.strategy == "ddp" and ddp.use_distributed_sampler is True
