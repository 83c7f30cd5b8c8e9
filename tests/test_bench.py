"""The benchmarks (top-level benchmarks/, not part of the sapd package) measure the project's own models.

No assertion is about speed: timings on a shared CPU are only checked to be finite and positive. Runs
use one thread, tiny images and one repetition.
"""

from __future__ import annotations

import ast
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ sits beside src/, outside the installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import __main__ as entry  # noqa: E402
from benchmarks import assign, data, memory, speed, train, workloads  # noqa: E402
from benchmarks.measure import frozen_heap, measure_extra_memory, run_interleaved  # noqa: E402
from benchmarks.report import evaluate_goals, to_markdown  # noqa: E402
from benchmarks.workloads import (  # noqa: E402
    BenchConfig,
    Workbench,
    batch_images,
    build_torchvision,
    padded_size,
    random_boxes,
)

import sapd.data.transforms  # noqa: E402
import sapd.paths  # noqa: E402
import sapd.utils  # noqa: E402

MODELS = ("sapd", "sapd_bfp", "retinanet", "fcos")
TINY = ["quick=true", "threads=1", "size=[64,96]", "seed=0"]
R18 = ["model=sapd", "model.backbone.pretrained=false", "model.backbone.name=resnet18"]  # what quick=true builds


def _positive_finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def project_config(*overrides: str):
    """The training config as sapd finds it (sapd.paths), composed independently of the benchmarks."""
    GlobalHydra.instance().clear()
    with sapd.paths.initialize_configs():
        return compose(config_name="train", overrides=list(overrides))


def _shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- models come from the project's configs


def test_benchmark_sapd_is_the_model_of_the_project_config():
    wb = Workbench(speed.parse_args(TINY))
    ref = instantiate(project_config(*R18).model, num_classes=80)
    model = wb.build_sapd()
    assert _shapes(model) == _shapes(ref)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        p.numel() for p in ref.parameters() if p.requires_grad
    )  # the same frozen stages
    assert model.criterion == ref.criterion and model.postprocessor == ref.postprocessor
    assert model.z == ref.z

    bfp = wb.build_sapd(bfp=True)  # the sapd_bfp row: the same model plus BFP in the neck
    ref_bfp = instantiate(project_config(*R18, "model.neck.bfp=true").model, num_classes=80)
    assert _shapes(bfp) == _shapes(ref_bfp) != _shapes(model)


def test_overrides_reach_every_sapd_and_the_torchvision_post_processing():
    over = "overrides=[model.head.num_convs=1,model.criterion.topk=2,model.postprocess.max_detections=7]"
    wb = Workbench(speed.parse_args([*TINY, over]))
    plain = Workbench(speed.parse_args(TINY))
    model = wb.build_sapd()
    assert model.criterion.topk == 2 and model.postprocessor.max_detections == 7
    assert len(model.head.cls_tower) < len(plain.build_sapd().head.cls_tower)
    fcos = wb.build_torchvision("fcos")
    assert fcos.detections_per_img == 7  # the SAPD config's post-processing numbers, not torchvision's
    post = project_config("model=sapd").model.postprocess
    default = plain.build_torchvision("retinanet")
    assert default.score_thresh == post.score_thresh and default.nms_thresh == post.nms_thresh
    assert default.detections_per_img == post.max_detections and default.topk_candidates == post.pre_nms_topk


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
    projects, _ = sapd.data.transforms.collate([(image, {})], size_divisor=128)
    assert torch.equal(batch.tensors, projects)  # neither normalised nor resized; padded as SAPD's batches
    assert batch.image_sizes == [(50, 70)]


def test_inputs_are_batched_by_the_project_collate():
    assert workloads.collate is sapd.data.transforms.collate
    images = [torch.randn(3, 50, 70), torch.randn(3, 61, 33)]
    batch = batch_images(images, 32)
    ref, targets = sapd.data.transforms.collate([(im, {}) for im in images], size_divisor=32)
    assert torch.equal(batch, ref) and batch.shape == (2, 3, 64, 96)
    assert padded_size((61, 70), 32) == targets[0]["pad_size"] == (64, 96)
    wb = Workbench(speed.parse_args([*TINY, "pad=64"]))
    assert torch.equal(wb.x_train, sapd.data.transforms.collate([(im, {}) for im in wb.images], 64)[0])
    assert wb.x1.shape == (1, 3, 64, 128)


# ---------------------------------------------------------------- running


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    threads = torch.get_num_threads()
    argv = [*TINY, "fps=true", "assign_memory_size=[64,96]", "assign_memory_instances=10", f"out={out}"]
    argv += ["warmup=0", "reps_infer=1"]  # one timed call of each task is enough to check the plumbing
    results = speed.main(argv)
    assert torch.get_num_threads() == threads  # the run restores the caller's thread count
    return results, out


@pytest.mark.slow  # builds and trains every detector: ~1 min on a loaded 2-core machine
def test_tiny_run_writes_json_and_markdown_naming_every_model(tiny_run):
    results, out = tiny_run
    md = out.with_suffix(".md")
    assert out.is_file() and md.is_file()
    data = json.loads(out.read_text())  # strict JSON: NaN would have been written as null
    assert data["config"]["quick"] is True and data["config"]["size"] == [64, 96]
    assert data["meta"]["command"].startswith("python -m benchmarks quick=true")
    assert data["meta"]["machine"]["torch_threads"] == 1
    assert data["meta"]["machine"]["cpu_flags"] == sapd.utils.cpu_flags()
    text = md.read_text()
    assert text == to_markdown(results)
    for heading in ("## Goals", "## Inference", "## Training step", "## Assignment cost", "## Speed options", "## GPU"):
        assert heading in text
    for m in MODELS:
        assert f"| {m} |" in text
        assert results["params"][m] > 0
    for name in ("sapd_p1", "sapd_p2", "fcos"):
        assert f"| {name} |" in text
    assert "| sapd / retinanet |" in text and "| sapd_bfp / fcos |" in text
    assert "not measured" in text  # the paper's GPU rows were not run here


@pytest.mark.slow
def test_tiny_run_every_row_is_timed_and_every_ratio_is_finite(tiny_run):
    results, _ = tiny_run
    expected = {f"infer/{mode}/{m}" for mode in ("network", "e2e") for m in MODELS}
    expected |= {"train/sapd_p1", "train/sapd_p2", "train/fcos", "assign/10", "assign/100", "assign_big/10"}
    assert expected <= set(results["timings"])
    for name, stats in results["timings"].items():
        assert stats["n"] >= 1 and _positive_finite(stats["median"]), name
    for m in MODELS:  # post="cap": every detector fills its post-processing (the config's 100 detections)
        assert results["timings"][f"infer/e2e/{m}/detections"]["median"] == 100.0
    ratios = results["ratios"]
    assert {f"infer/e2e:{a}/{b}" for a in ("sapd", "sapd_bfp") for b in ("retinanet", "fcos")} <= set(ratios)
    assert all(_positive_finite(v) for v in ratios.values()), ratios
    assert set(results["share"]) == {"10", "100"} and all(_positive_finite(v) for v in results["share"].values())
    for name, mem in results["memory"].items():
        assert _positive_finite(mem["extra_bytes"]), name
    statuses = [g["status"] for g in results["goals"]]
    assert len(statuses) == 6 and set(statuses) <= {"PASS", "MISS"}
    assert results["options"]["fp32"]["speedup"] == pytest.approx(1.0)
    assert _positive_finite(results["fps"]["resnet18"]) and _positive_finite(results["fps"]["resnet18_dcn"])


# ---------------------------------------------------------------- the assignment suite


def _hand_made_case(part: assign.LossPart):
    """One 128 x 128 image, a 48-px box at (40, 40) and a 2-px box at (1, 1).

    Counted by hand with epsilon 0.2 (B_v of the big box: 59.2 ... 68.8) and the rule "point strictly
    inside B, its s x s cell overlaps B_v by > 1 %": P3 (s 8) cells 56-64 and 64-72 in x and y -> 4
    points; P4 (s 16) 48-64, 64-80 -> 4; P5 (s 32) 32-64, 64-96 with centres 48, 80 inside B -> 4; P6
    (s 64) centres 32, 96 on or outside B -> 0; P7 (s 128) overlap 9.6^2 < 1 % of 128^2 -> 0. The 2-px
    box contains no point centre on any level: unassigned.
    """
    outputs = assign.head_outputs(1, (128, 128), 3, 16, part.strides, seed=0)
    targets = [
        {"boxes": torch.tensor([[40.0, 40.0, 88.0, 88.0], [1.0, 1.0, 3.0, 3.0]]), "labels": torch.tensor([1, 2])}
    ]
    return outputs, targets


def test_assignment_counts_positives_as_the_criterion_does():
    cfg = assign.AssignConfig(channels=16, overrides=("model.criterion.topk=5",))
    part = assign.build_loss_part(cfg)
    assert part.criterion.topk == 5 and part.strides == [8, 16, 32, 64, 128]
    outputs, targets = _hand_made_case(part)
    phase1 = assign.measure_case(part, outputs, targets, 1, repeats=1)
    phase2 = assign.measure_case(part, outputs, targets, 2, repeats=1)
    assert phase1["num_pos"] == 4  # phase 1: the one level of least loss, all 4 of its points
    assert phase2["num_pos"] == 12  # phase 2, top-5 of 5 levels: every candidate point
    assert phase1["num_unassigned"] == phase2["num_unassigned"] == 1
    assert _positive_finite(phase1["ms"]) and _positive_finite(phase2["ms"])

    # the project's criterion, instantiated from its own config, reports the same
    node = project_config("model=sapd", "model.criterion.topk=5").model
    criterion = instantiate(node.criterion)
    assert criterion == part.criterion
    losses = criterion(outputs, targets, part.strides, part.selection, 2, z=float(node.z))
    assert int(losses["num_pos"]) == phase2["num_pos"]


def test_assignment_without_selection_net_turns_soft_selection_off():
    part = assign.build_loss_part(assign.AssignConfig(channels=16, selection=False))
    assert part.selection is None and part.criterion.soft_select is False
    outputs, targets = _hand_made_case(part)
    assert assign.measure_case(part, outputs, targets, 2, repeats=1)["num_pos"] == 4  # phase 2 = phase 1


@pytest.mark.slow
def test_assignment_run_gives_a_row_per_instance_count():
    cfg = assign.AssignConfig(height=128, width=192, channels=16, instances=(1, 5), repeats=1)
    rows = assign.run(cfg)
    assert [r["instances"] for r in rows] == [1, 5]
    for r in rows:
        assert _positive_finite(r["phase1_ms"]) and _positive_finite(r["phase2_ms"]) and r["num_pos"] > 0
    assert "peak_extra_mib" in rows[1] and "peak_extra_mib" not in rows[0]


# ---------------------------------------------------------------- the data suite


def test_data_suite_uses_the_coco_training_sizes_for_800px():
    coco = project_config("data=coco").data
    over = data.coco_training_overrides()
    assert f"data.size_divisor={coco.size_divisor}" in over and f"data.max_size={coco.max_size}" in over
    cfg = data.DataConfig(workers=3, batch_size=5)
    composed = project_config(*data.data_overrides(cfg, batch_size=5, root="/tmp/x", num_train=7), *over).data
    assert composed.size_divisor == coco.size_divisor and composed.min_size == coco.min_size
    assert composed.num_workers == 3 and composed.batch_size == 5 and composed.synthetic.num_train == 7


def test_data_suite_quick_run_measures_both_loaders():  # draws two tiny synthetic sets in a temporary folder
    results = data.main(["quick=true", "workers=0"])
    assert set(results) == {"synthetic", "800px"}
    assert all(_positive_finite(v) for v in results.values())


def test_train_suite_times_each_case_in_its_phase(capsys):  # a tiny synthetic set, 3 short fits
    results = train.main(["quick=true"])
    assert list(results) == ["sapd_p1", "sapd_p2", "fcos"]
    assert [r["phase"] for r in results.values()] == [1, 2, None]  # the switch epoch reached the detector
    assert all(_positive_finite(r["median"]) and r["steps"] == 2 for r in results.values())
    table = capsys.readouterr().out
    assert "| FCOS (model=fcos) |" in table and "| SAPD phase 2 (model=tiny, soft selection) |" in table


def test_train_suite_refuses_unknown_cases(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["cases=[sapd_p1,retinanet]"])
    assert exc.value.code == 2 and "retinanet" in capsys.readouterr().err


def test_memory_suite_draws_a_coco_file_and_measures_parsing_and_workers(tmp_path, capsys):
    """A tiny drawn file: valid COCO (segmentations, crowd RLE, images without annotations) that the loader
    reads; each case measured in its own process, the workers seen and counted."""
    from sapd.data.coco import COCODetection

    argv = [f"folder={tmp_path / 'drawn'}", "images=60", "boxes=400", "val_images=8", "num_workers=1"]
    results = memory.main([*argv, "cases=[parse,workers]", f"out={tmp_path / 'mem.json'}"])
    ann = tmp_path / "drawn" / memory.TRAIN
    drawn = json.loads(ann.read_text())
    assert len(drawn["images"]) == 60 and len(drawn["annotations"]) == 400 and len(drawn["categories"]) == 80
    assert any(a["iscrowd"] and isinstance(a["segmentation"], dict) for a in drawn["annotations"])
    assert all(len(a["segmentation"][0]) >= 6 for a in drawn["annotations"] if not a["iscrowd"])
    ds = COCODetection(ann, tmp_path / "drawn" / "train")
    assert ds.stats["annotations"] == 400 and ds.stats["unknown_image"] == 0 and ds.stats["non_finite_boxes"] == 0
    parse = results["parse"]
    assert parse["images"] == 60 and parse["stats"] == ds.stats
    assert parse["peak_rss"] >= parse["rss"] > parse["start_rss"] > 0 and _positive_finite(parse["parse_s"])
    work = results["workers"]
    assert work["items"] == {"train": 60, "val": 8} and len(work["workers"]) == 2  # one train, one val worker
    assert all(_positive_finite(w["uss"]) and w["pss"] <= w["rss"] for w in work["workers"])
    assert work["total"]["rss"] == pytest.approx(work["main"]["rss"] + sum(w["rss"] for w in work["workers"]))
    table = (tmp_path / "mem.md").read_text()
    assert "| parse |" in table and "| workers (2 workers) |" in table and "| parse |" in capsys.readouterr().out


def test_memory_suite_never_draws_into_the_repository(capsys):
    with pytest.raises(SystemExit) as exc:
        memory.main([f"folder={ROOT / 'data'}"])
    assert exc.value.code == 2 and "inside the repository" in capsys.readouterr().err


# ---------------------------------------------------------------- command line


def test_command_line_defaults_presets_and_overrides():
    cfg = speed.parse_args([])
    assert (cfg.size, cfg.backbone, cfg.memory, cfg.fps) == ((512, 853), "resnet50", "subprocess", False)
    assert cfg.assign_instances == (1, 10, 100, 500) and cfg.assign_memory_size == (800, 1333)
    assert cfg.out == "benchmarks/results.json" and cfg.threads >= 1
    cfg = speed.parse_args(["device=cuda"])  # what --device cuda did
    assert cfg.size == (800, 1333) and cfg.fps and cfg.amp_dtype == "float16" and cfg.memory == "inprocess"
    cfg = speed.parse_args(["quick=true", "size=[64,96]", "threads=3", "memory=off", "options=false"])
    assert cfg.size == (64, 96) and cfg.backbone == "resnet18" and cfg.threads == 3  # given keys beat presets
    assert cfg.memory == "off" and cfg.options is False  # YAML reads "off" as false; the suite reads it back
    assert BenchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg = speed.parse_args(["overrides=[model.neck.bfp=true,model.criterion.eta=0.5]"])
    assert cfg.overrides == ("model.neck.bfp=true", "model.criterion.eta=0.5")


@pytest.mark.parametrize(
    "argv", [["--device", "cuda"], ["nope=1"], ["reps_infer=many"], ["memory=disk"], ["post=maybe"]]
)
def test_command_line_rejects_what_it_cannot_use(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        speed.parse_args(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_one_entry_dispatches_suites_and_prints_their_keys(capsys):
    assert entry.main(["help"]) is None
    listing = capsys.readouterr().out
    assert all(f"suite={name}" in listing for name in ("speed", "data", "assign", "train", "memory"))
    with pytest.raises(SystemExit) as exc:
        entry.main(["suite=assign", "help"])
    assert exc.value.code == 0
    keys = capsys.readouterr().out
    assert "instances=[1,10,100,500]" in keys and "selection=true" in keys
    with pytest.raises(SystemExit):
        entry.main(["suite=nope"])


# ---------------------------------------------------------------- measurement pieces


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


def test_frozen_heap_nests_and_hands_the_objects_back():
    import gc

    gc.unfreeze()  # sapd's loaders freeze the heap before forking workers; start from none frozen
    with frozen_heap():
        frozen = gc.get_freeze_count()
        assert frozen > 1000  # this process's modules, torch's and pytest's objects
        with frozen_heap():
            assert gc.get_freeze_count() == frozen  # an inner block freezes nothing more
        assert gc.get_freeze_count() == frozen
    assert gc.get_freeze_count() == 0
    gc.freeze()  # frozen before the block: left frozen after it
    before = gc.get_freeze_count()
    with frozen_heap():
        pass
    assert gc.get_freeze_count() >= before > 0
    gc.unfreeze()


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


def test_cpu_flags_live_in_the_package(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse amx_bf16 avx2 foo\n")
    assert sapd.utils.cpu_flags(info) == ["avx2", "amx_bf16"]  # in CPU_FLAGS order, unknown flags dropped
    assert sapd.utils.cpu_flags(tmp_path / "missing") == []
    info.write_text("processor\t: 0\n")
    assert sapd.utils.cpu_flags(info) == []
    from benchmarks import measure

    assert measure.cpu_flags is sapd.utils.cpu_flags


def test_the_package_does_not_import_the_benchmarks():
    offenders = []
    for path in (ROOT / "src" / "sapd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "benchmarks" or ".bench" in n]
    assert offenders == []


@pytest.mark.slow  # a fresh Python process with torch: ~10 s
def test_memory_worker_subprocess_measures_one_task():
    cfg = speed.parse_args([*TINY, "memory=subprocess"])
    mem = speed._memory_subprocess(cfg, "assign/1")
    assert _positive_finite(mem["extra_bytes"]) and mem["peak_bytes"] > mem["extra_bytes"]
