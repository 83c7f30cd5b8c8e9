"""SAPD on a CUDA GPU: the same numbers as on the CPU, mixed precision that stays finite, and a whole
Lightning run. Skipped where torch sees no GPU; ``make gpu-check`` runs them (README, "GPU check")."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from sapd.models import FPN, SAPD, FeatureSelectionNet, SAPDCriterion, SAPDHead, TimmBackbone

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LOSS_KEYS = ("cls", "loc", "select", "total")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """TF32 off: the CPU parity tests compare float32 with float32, not with 10-bit mantissas."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def small_sapd(**criterion) -> SAPD:
    torch.manual_seed(0)
    return SAPD(
        num_classes=5,
        backbone=TimmBackbone(name="resnet10t", frozen_stages=-1, norm_eval=False),
        neck=functools.partial(FPN, out_channels=32),
        head=functools.partial(SAPDHead, feat_channels=32, num_convs=2, norm="gn"),
        selection=functools.partial(FeatureSelectionNet, channels=32),
        criterion=SAPDCriterion(**criterion),
    )


def batch(device="cpu", n=2, size=(256, 320)):
    """Images and targets with small, large, overlapping and no objects (the second image is empty)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, *size, generator=g)
    boxes = torch.tensor([[10.0, 12.0, 40.0, 50.0], [30.0, 20.0, 250.0, 200.0], [100.0, 90.0, 180.0, 240.0]])
    targets = [{"boxes": boxes, "labels": torch.tensor([0, 3, 4])}]
    targets += [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * (n - 1)
    return images.to(device), [{k: v.to(device) for k, v in t.items()} for t in targets]


def cuda_copy(model: SAPD) -> SAPD:
    twin = small_sapd(soft_weight=model.criterion.soft_weight, soft_select=model.criterion.soft_select)
    twin.load_state_dict(model.state_dict())
    return twin.cuda()


@pytest.mark.parametrize("phase", [1, 2])
def test_forward_losses_and_gradients_match_the_cpu(phase):
    cpu = small_sapd()
    cpu.set_phase(phase)
    gpu = cuda_copy(cpu)
    images, targets = batch()
    out_cpu = cpu(images)
    loss_cpu = cpu.loss(out_cpu, targets)
    loss_cpu["total"].backward()
    gi, gt = batch("cuda")
    out_gpu = gpu(gi)
    loss_gpu = gpu.loss(out_gpu, gt)
    loss_gpu["total"].backward()

    for key in ("cls_logits", "box_reg"):
        torch.testing.assert_close(out_gpu[key].cpu(), out_cpu[key], rtol=1e-3, atol=1e-3)
    for key in LOSS_KEYS:
        torch.testing.assert_close(loss_gpu[key].cpu(), loss_cpu[key], rtol=1e-4, atol=1e-5, msg=key)
    grads_cpu = dict(cpu.named_parameters())
    for name, p in gpu.named_parameters():
        if p.grad is None:
            assert grads_cpu[name].grad is None, name
            continue
        torch.testing.assert_close(p.grad.cpu(), grads_cpu[name].grad, rtol=1e-2, atol=1e-4, msg=name)


def test_detections_match_the_cpu():
    cpu = small_sapd().eval()
    gpu = cuda_copy(cpu).eval()
    images, _ = batch()
    sizes = [tuple(images.shape[-2:])] * len(images)
    with torch.no_grad():
        det_cpu = cpu.postprocess(cpu(images), sizes)
        det_gpu = gpu.postprocess(gpu(images.cuda()), sizes)
    for a, b in zip(det_cpu, det_gpu):
        assert len(a["scores"]) == len(b["scores"]) > 0
        torch.testing.assert_close(b["scores"].cpu(), a["scores"], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(b["boxes"].cpu(), a["boxes"], rtol=1e-3, atol=1e-2)
        assert torch.equal(b["labels"].cpu(), a["labels"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_precision_training_steps_stay_finite_and_near_fp32(dtype):
    """Autocast with a GradScaler (float16) or without (bfloat16), as Lightning's 16-mixed / bf16-mixed run it:
    the losses come out in float32, close to the float32 losses, and 20 steps lower them with finite weights."""
    model = small_sapd(soft_weight=True, soft_select=True).cuda()
    model.set_phase(2)
    images, targets = batch("cuda")
    with torch.no_grad():
        reference = model.loss(model(images), targets)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    totals = []
    for step in range(20):
        with torch.autocast("cuda", dtype=dtype):
            loss = model.loss(model(images), targets)
        if step == 0:
            for key in LOSS_KEYS:
                assert loss[key].dtype == torch.float32, key
                assert math.isclose(loss[key].item(), reference[key].item(), rel_tol=0.05), key
        opt.zero_grad()
        scaler.scale(loss["total"]).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        scaler.step(opt)
        scaler.update()
        totals.append(loss["total"].item())
    assert all(math.isfinite(t) for t in totals)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert min(totals[-3:]) < totals[0]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_lightning_run_on_the_gpu(train_cfg, tmp_path, precision):
    """``trainer=gpu``: a whole run (both phases, validation, summary) trains and evaluates on the GPU."""
    from sapd.train import train

    cfg = train_cfg(
        "trainer=gpu",
        f"trainer.precision={precision}",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=3",
        "callbacks.phase_switch.switch_epoch=1",
        "validate_best=false",
    )
    train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"]["type"] == "cuda" and summary["device"]["peak_memory_gib"] > 0
    assert summary["global_step"] == 6 and summary["phase_switch_epoch"] == 1
    assert 0.0 <= summary["metrics"]["map"] <= 1.0
