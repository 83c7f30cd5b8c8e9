"""SAPD on a CUDA GPU: the same numbers as on the CPU, mixed precision that stays finite, a whole
Lightning run, and a 2-GPU NCCL step where one process's batch holds no box. Skipped where torch sees no
GPU (the 2-GPU step where it sees one); ``make gpu-check`` runs them (docs/gpu_check.md). Nothing here
asks an untrained network to score above a threshold.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sapd.models import FPN, SAPD, FeatureSelectionNet, PostProcess, SAPDCriterion, SAPDHead, TimmBackbone

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_CHECK = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"
DDP_TIMEOUT_S = 180  # two processes import torch and start NCCL; a hang at the gradient all-reduce ends here

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


@needs_cuda
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


@needs_cuda
def test_detections_match_the_cpu():
    """Post-processing on the GPU gives the CPU's detections from the same head outputs. Confident
    (point, class) pairs are planted in the logits, so there are detections whatever an untrained
    network scores (about 0.01 everywhere, below the 0.05 threshold)."""
    cpu = small_sapd().eval()
    gpu = cuda_copy(cpu).eval()
    images, _ = batch()
    sizes = [tuple(images.shape[-2:])] * len(images)
    with torch.no_grad():
        out = cpu(images)
    num_images, num_points, num_classes = out["cls_logits"].shape
    g = torch.Generator().manual_seed(2)
    points = torch.randperm(num_points, generator=g)[:40]
    classes = torch.randint(num_classes, (40,), generator=g)
    logits = out["cls_logits"].clone()
    logits[:, points, classes] = torch.linspace(1.0, 6.0, 40)  # scores 0.73 to 0.998, all distinct
    out = dict(out, cls_logits=logits)
    det_cpu = cpu.postprocess(out, sizes)
    det_gpu = gpu.postprocess(dict(out, cls_logits=logits.cuda(), box_reg=out["box_reg"].cuda()), sizes)
    for a, b in zip(det_cpu, det_gpu):
        assert len(a["scores"]) == len(b["scores"]) > 0
        torch.testing.assert_close(b["scores"].cpu(), a["scores"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b["boxes"].cpu(), a["boxes"], rtol=1e-5, atol=1e-3)
        assert torch.equal(b["labels"].cpu(), a["labels"])


@needs_cuda
def test_the_whole_gpu_inference_path_without_a_score_threshold():
    """Forward and post-processing on the GPU at score_thresh=0: every image gets its max_detections,
    best first, inside the image (the test holds for any weights, trained or not)."""
    gpu = cuda_copy(small_sapd()).eval()
    gpu.postprocessor = PostProcess(score_thresh=0.0, max_detections=100)
    images, _ = batch("cuda")
    h, w = images.shape[-2:]
    with torch.no_grad():
        detections = gpu.postprocess(gpu(images), [(h, w)] * len(images))
    for det in detections:
        assert len(det["scores"]) == 100 and det["boxes"].is_cuda
        assert bool((det["scores"][:-1] >= det["scores"][1:]).all())
        boxes = det["boxes"]
        assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all())
        assert bool((boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all())


@needs_cuda
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


@needs_cuda
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


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp_steps(rank: int, world: int, port: int, backend: str, phase: int, out: str, empty_rank: int | None) -> None:
    """One process of :func:`test_two_gpu_nccl_ddp_steps_keep_the_processes_equal` (``backend="gloo"``
    runs it on the CPU): 5 fp16 steps of DDP without find_unused_parameters, process ``empty_rank``'s
    batch without any box; rank 0 writes the largest weight difference between the processes to ``out``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=DDP_TIMEOUT_S))
    cuda = backend == "nccl"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = small_sapd().to(device)  # the same seed: the same weights in every process
    model.set_phase(phase)
    start = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    images, targets = batch(device)
    if rank == empty_rank:  # this process's whole batch holds no training box
        targets = [{k: v[:0] for k, v in t.items()} for t in targets]
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    for _ in range(5):
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss = model.loss(net(images), targets)["total"]
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(world)]
    dist.all_gather(gathered, weights)
    if rank == 0:
        result = {
            "max_difference": max(float((g - weights).abs().max()) for g in gathered),
            "moved": float((weights - start).abs().max()),
        }
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def run_ddp(world: int, backend: str, phase: int, out: Path, empty_rank: int | None = 1) -> dict:
    """:func:`ddp_steps` in ``world`` spawned processes; fails when they do not finish in DDP_TIMEOUT_S."""
    args = (world, _free_port(), backend, phase, str(out), empty_rank)
    context = mp.spawn(ddp_steps, args=args, nprocs=world, join=False)
    deadline = time.monotonic() + DDP_TIMEOUT_S + 60
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in context.processes:
                proc.kill()
            pytest.fail(f"{world} {backend} processes still running after {DDP_TIMEOUT_S + 60} s: a hung all-reduce")
    return json.loads(out.read_text())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (the 2-process NCCL step)")
@pytest.mark.parametrize("phase", [1, 2])
def test_two_gpu_nccl_ddp_steps_keep_the_processes_equal(tmp_path, phase):
    result = run_ddp(2, "nccl", phase, tmp_path / "ddp.json")
    assert result["moved"] > 0  # the steps trained
    assert result["max_difference"] == 0.0  # every process applied the same all-reduced gradients


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: make gpu-check runs there")
@pytest.mark.parametrize("steps", [[], ["cuda", "ddp"]])
def test_gpu_check_stops_in_one_line_without_cuda(tmp_path, steps):
    out = tmp_path / "gpu"
    env = dict(os.environ, PY=sys.executable, OUT_DIR=str(out))
    proc = subprocess.run(["bash", str(GPU_CHECK), *steps], env=env, capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("gpu-check: ") and "CUDA" in lines[0]
    assert not out.exists()  # nothing written on a machine that cannot run it


def test_gpu_check_refuses_an_unknown_step_in_one_line(tmp_path):
    env = dict(os.environ, PY=sys.executable, OUT_DIR=str(tmp_path / "gpu"))
    proc = subprocess.run(["bash", str(GPU_CHECK), "tests"], env=env, capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 2 and lines == [
        "gpu-check: unknown step 'tests': choose from cuda, ddp, bench, train, suite"
    ]
