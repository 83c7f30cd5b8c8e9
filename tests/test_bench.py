"""sapd.bench: the quick run produces the whole table, and the measurement pieces behave.

No assertion is about speed: timings on a shared CPU are only printed. The quick run uses one thread
(a 2-thread run on a loaded 2-core machine measures the scheduler, not the model).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from sapd import bench
from sapd.benchmarks.measure import measure_extra_memory, run_interleaved
from sapd.benchmarks.report import evaluate_goals, to_markdown
from sapd.benchmarks.workloads import BenchConfig, build_torchvision, pad_batch, random_boxes


def _positive_finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    threads = torch.get_num_threads()
    results = bench.main(["--quick", "--threads", "1", "--fps", "--out", str(out)])
    assert torch.get_num_threads() == threads  # the run restores the caller's thread count
    return results, out


def test_quick_run_writes_json_and_markdown(quick):
    results, out = quick
    md = out.with_suffix(".md")
    assert out.is_file() and md.is_file()
    data = json.loads(out.read_text())  # strict JSON: NaN would have been written as null
    assert data["config"]["quick"] is True
    assert data["meta"]["command"].startswith("python -m sapd.bench --quick")
    for key in ("cpu", "logical_cores", "torch_threads", "torch"):
        assert data["meta"]["machine"][key]
    assert data["meta"]["machine"]["torch_threads"] == 1
    text = md.read_text()
    for heading in ("## Goals", "## Inference", "## Training step", "## Assignment cost", "## Speed options", "## GPU"):
        assert heading in text
    assert "| sapd / retinanet |" in text and "| sapd_bfp / fcos |" in text
    assert "not measured" in text  # the paper's GPU rows were not run here
    assert text == to_markdown(results)


def test_quick_run_every_ratio_is_positive_and_finite(quick):
    results, _ = quick
    ratios = results["ratios"]
    expected = {
        f"infer/{m}:{a}/{b}" for m in ("network", "e2e") for a in ("sapd", "sapd_bfp") for b in ("retinanet", "fcos")
    }
    expected |= {"train:sapd_p1/fcos", "train:sapd_p2/fcos", "memory/train:sapd_p2/fcos"}
    assert expected <= set(ratios)
    assert all(_positive_finite(v) for v in ratios.values()), ratios
    assert all(_positive_finite(v) for v in results["share"].values())
    assert set(results["share"]) == {"10", "100"}
    for name, stats in results["timings"].items():
        assert stats["n"] >= 1 and _positive_finite(stats["median"]), name


def test_quick_run_goals_and_measurements(quick):
    results, _ = quick
    statuses = {g["goal"]: g["status"] for g in results["goals"]}
    assert len(statuses) == 6 and set(statuses.values()) <= {"PASS", "MISS"}
    for name, mem in results["memory"].items():
        assert _positive_finite(mem["extra_bytes"]), name
    # post="cap": every detector fills its post-processing (100 detections kept)
    for m in ("sapd", "sapd_bfp", "retinanet", "fcos"):
        assert results["timings"][f"infer/e2e/{m}/detections"]["median"] == 100
    assert {"fp32", "channels_last", "bf16_autocast"} <= set(results["options"])
    assert results["options"]["fp32"]["speedup"] == pytest.approx(1.0)
    assert _positive_finite(results["fps"]["resnet18"]) and _positive_finite(results["fps"]["resnet18_dcn"])


def test_cli_defaults_and_overrides():
    cfg, out = bench.parse_args([])
    assert (cfg.size, cfg.backbone, cfg.memory, cfg.fps) == ((512, 853), "resnet50", "subprocess", False)
    assert cfg.assign_instances == (1, 10, 100, 500) and cfg.assign_memory_size == (800, 1333)
    assert out.as_posix() == "benchmarks/results.json"
    cfg, _ = bench.parse_args(["--device", "cuda"])
    assert cfg.size == (800, 1333) and cfg.fps and cfg.amp_dtype == "float16"
    cfg, _ = bench.parse_args(["--quick", "--size", "64", "96", "--threads", "3"])
    assert cfg.size == (64, 96) and cfg.backbone == "resnet18" and cfg.threads == 3
    assert BenchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_torchvision_models_match_their_factories_and_see_the_same_tensor():
    from torchvision.models.detection import retinanet_resnet50_fpn
    from torchvision.ops import FrozenBatchNorm2d

    model = build_torchvision("retinanet", "resnet50", num_classes=80, pad=128)
    ref = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=80)
    shapes = sorted(tuple(p.shape) for p in model.state_dict().values() if p.dim() > 0)
    assert shapes == sorted(tuple(p.shape) for p in ref.state_dict().values() if p.dim() > 0)
    body = model.backbone.body
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    assert not any(p.requires_grad for p in body.layer1.parameters())  # trainable_layers=3
    assert all(p.requires_grad for p in body.layer2.parameters())

    image = torch.randn(3, 50, 70)
    batch, _ = model.transform([image])
    assert torch.equal(batch.tensors, pad_batch([image], 128))  # neither normalised nor resized
    assert batch.image_sizes == [(50, 70)]


def test_random_boxes_are_valid():
    boxes = random_boxes(500, (128, 192), torch.Generator().manual_seed(0))
    assert boxes.shape == (500, 4)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 192).all() and (boxes[:, 3] <= 128).all()
    assert ((boxes[:, 2:] - boxes[:, :2]) >= 4).all()


def test_run_interleaved_rotates_drops_warmup_and_keeps_subtimings():
    calls = []
    tasks = {name: (lambda n=name: calls.append(n) or {"part": 0.5}) for name in "abc"}
    samples = run_interleaved(tasks, reps=3, warmup=1, label="test")
    assert calls == list("abc" + "bca" + "cab" + "abc")
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3, "c": 3, "a/part": 3, "b/part": 3, "c/part": 3}
    assert samples["a/part"] == [0.5, 0.5, 0.5]


def test_extra_memory_sees_a_large_temporary_tensor():
    def alloc():
        t = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so its pages are resident
        return float(t.sum())

    mem = measure_extra_memory(alloc)
    assert mem["extra_bytes"] >= 48 * 2**20, mem


def test_goals_pass_and_miss():
    res = {
        "ratios": {"infer/e2e:sapd/retinanet": 0.6, "infer/e2e:sapd/fcos": 1.2, "train:sapd_p2/fcos": 0.9},
        "share": {"10": 0.05, "100": 0.5},
        "memory": {"assign_big/500": {"extra_bytes": 2.0 * 2**30}},
        "config": {"assign_memory_instances": 500, "assign_memory_size": [800, 1333]},
    }
    assert [g["status"] for g in evaluate_goals(res)] == ["PASS", "MISS", "PASS", "PASS", "MISS", "MISS"]
    res["memory"] = {}
    assert evaluate_goals(res)[-1]["status"] == "N/A"


@pytest.mark.slow  # a fresh Python process with torch: ~10 s
def test_memory_worker_subprocess_measures_one_task():
    cfg, _ = bench.parse_args(["--quick", "--threads", "1", "--memory", "subprocess"])
    mem = bench._memory_subprocess(cfg, "assign/1")
    assert _positive_finite(mem["extra_bytes"]) and mem["peak_bytes"] > mem["extra_bytes"]
