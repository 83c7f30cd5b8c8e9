"""wandb needs no account: offline unless logged in; a short run writes its offline dashboard."""

from __future__ import annotations

from pathlib import Path

from conftest import TINY, compose_config
from sapd.loggers import resolve_wandb_mode
from sapd.train import train


def test_wandb_mode_auto(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    assert resolve_wandb_mode("offline") == "offline"


def test_offline_wandb_run_logs_config_losses_histograms_and_images(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tiny = [o for o in TINY if not o.startswith("callbacks.detection_images")]
    cfg = compose_config(
        "train",
        [
            *tiny,
            "logger=wandb",
            "callbacks.detection_images.num_images=2",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "validate_best=false",
            "group=pytest",
        ],
        tmp_path,
    )
    metrics, _ = train(cfg)
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = {p.name for p in runs[0].rglob("*")}
    assert any(name.endswith(".wandb") for name in files)  # the run's event log
    assert {"val/map", "val/map_best", "train/cls", "train/loc", "train/select", "train/phase"} <= set(metrics), sorted(
        metrics
    )


def test_logged_detection_images_share_one_size():
    from PIL import Image

    from sapd.callbacks import _same_size

    pics = _same_size([Image.new("RGB", (30, 20), (255, 0, 0)), Image.new("RGB", (10, 40), (0, 255, 0))])
    assert [p.size for p in pics] == [(30, 40), (30, 40)]
    assert pics[0].getpixel((5, 5)) == (255, 0, 0) and pics[0].getpixel((5, 30)) == (127, 127, 127)
    assert _same_size([]) == []
