"""sapd.analysis: the statistics behind the pictures (sapd.diagnostics.soft_weights), the pictures of a checkpoint."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from sapd.analysis import main
from sapd.checkpoint import load_module
from sapd.diagnostics.soft_weights import SIZE_NAMES, default_out, size_bin, weight_statistics
from sapd.paths import initialize_configs


def analysis_config(*overrides: str):
    """conf/analysis.yaml with ``overrides``, as ``python -m sapd.analysis`` composes it."""
    GlobalHydra.instance().clear()
    with initialize_configs():
        return compose("analysis", overrides=list(overrides))


def test_size_bins_by_sqrt_area():
    boxes = torch.tensor([[0, 0, 4, 4], [0, 0, 8, 8], [0, 0, 10, 40], [0, 0, 200, 100]], dtype=torch.float32)
    # sqrt(area): 4, 8, 20, 141 -> "< 8", "8-16" (edges belong to the bin above), "16-32", "> 128"
    assert [SIZE_NAMES[i] for i in size_bin(boxes).tolist()] == ["< 8", "8-16", "16-32", "> 128"]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory):
    """A copy of the shared checkpoint in a run folder of its own (the pictures go next to it by default)."""
    ckpt = tmp_path_factory.mktemp("run") / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    shutil.copy(tiny_checkpoint[0], ckpt)
    return ckpt


@pytest.mark.slow
def test_weight_shares_and_what_the_switches_leave_alone(checkpoint):
    module, run_cfg = load_module(checkpoint)
    from hydra.utils import instantiate

    datamodule = instantiate(run_cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batches = [next(iter(datamodule.train_dataloader()))]
    stats = weight_statistics(module.net.float().eval(), batches)
    for key, share in stats["share"].items():
        assert share.sum().item() == pytest.approx(1.0, abs=1e-5), key
    # FSAF has f = 1: soft-weight normalisation changes nothing; it does move +SW's weights.
    for valid in ("cell_overlap", "centre"):
        assert torch.allclose(stats["share"][("FSAF", valid, "none")], stats["share"][("FSAF", valid, "level_max")])
    f, bins = stats["f"]["cell_overlap"]
    assert len(f) == len(bins) > 0 and (f >= 0).all() and (f <= 1).all()
    best, _ = stats["best_f"]["centre"]
    assert (best > 0).all()
    assert stats["objects"].sum() == sum(len(t["boxes"]) for _, targets in batches for t in targets)
    # Weight sum over the number of positives: exactly 1 without soft weights; below 1 with Eq. 4 as
    # printed; level_max (each level's best point weighs 1) never lowers a weight, so its ratio lies
    # between none's and 1 (1 where every object owns one point per level).
    ratio = stats["weight_ratio"]
    for valid in ("cell_overlap", "centre"):
        for norm in ("none", "level_max"):
            assert ratio[("FSAF", valid, norm)] == pytest.approx(1.0)
        assert 0 < ratio[("+SW", valid, "none")] < ratio[("+SW", valid, "level_max")] <= 1 + 1e-6


def test_cli_errors_are_one_line_and_exit_code_2(tmp_path, caplog):
    for overrides, message in (
        ([f"ckpt_path={tmp_path / 'nope.ckpt'}"], "checkpoint not found"),
        ([], "give the checkpoint to analyse"),
    ):
        caplog.clear()
        with pytest.raises(SystemExit) as exit_info:
            main(analysis_config(*overrides, f"out={tmp_path / 'figures'}"))
        assert exit_info.value.code == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and errors[0].startswith("sapd.analysis: ") and message in errors[0]
    assert not (tmp_path / "figures").exists()


@pytest.mark.slow
def test_pictures_are_written(checkpoint, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        main(analysis_config(f"ckpt_path={checkpoint}", f"out={tmp_path}", "batches=1"))
    paths = [tmp_path / r.getMessage().removeprefix("wrote ") for r in caplog.records if "wrote" in r.getMessage()]
    assert all(p.is_file() for p in paths)
    names = sorted(p.name for p in paths)
    assert names == [
        "f_by_size.png",
        "selection_by_size.png",
        "selection_examples.png",
        "weight_share_by_size.md",
        "weight_share_by_size.png",
    ]
    table = (tmp_path / "weight_share_by_size.md").read_text()
    assert "| cell_overlap, level_max | +SW+SS |" in table and "median f" in table
    assert "| setting | FSAF | +SW | +SW+SS |" in table and "| centre, level_max | 1.00 | " in table
    for p in (p for p in paths if p.suffix == ".png"):
        with Image.open(p) as im:
            assert im.width > 400 and im.height > 300
            assert len(set(im.convert("L").getdata())) > 20  # a drawing, not a blank canvas


@pytest.mark.slow
def test_without_out_the_pictures_go_to_the_checkpoints_run_folder(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not into the working folder's docs/figures
    main(analysis_config(f"ckpt_path={checkpoint}", "batches=1"))
    run = checkpoint.parent.parent
    assert (run / "analysis" / "weight_share_by_size.md").is_file()
    assert not (tmp_path / "docs").exists()
    assert default_out(tmp_path / "model.ckpt") == tmp_path / "analysis"  # a checkpoint outside a run folder
