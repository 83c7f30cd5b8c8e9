"""wandb needs no account: offline unless logged in; a short run writes its offline dashboard."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from conftest import TINY, compose_config
from sapd.callbacks import SelectionHistogram
from sapd.logging_setup import RankZeroFilter, configure_logging
from sapd.train import train
from sapd.wandb_logger import WANDB_ID_FILE, make_wandb_logger, resolve_wandb_mode, resume_wandb_config, stored_wandb_id

SRC = Path(__file__).resolve().parents[1] / "src"


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


@pytest.mark.slow
def test_offline_wandb_run_logs_everything_and_a_resumed_training_continues_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tiny = [o for o in TINY if not o.startswith("callbacks.detection_images")]
    common = [
        *tiny,
        "logger=wandb",
        "callbacks.detection_images.num_images=2",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "validate_best=false",
        "group=pytest",
    ]
    cfg = compose_config("train", [*common, "trainer.max_epochs=1"], tmp_path / "first")
    metrics, objects = train(cfg)
    # the selection net's probabilities reach the histogram callback through training_step's outputs
    hist = next(c for c in objects["trainer"].callbacks if isinstance(c, SelectionHistogram))
    assert hist.last_epoch is not None and hist.last_epoch.shape[1] == 5
    assert torch.allclose(hist.last_epoch.sum(1), torch.ones(len(hist.last_epoch)), atol=1e-3)
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = {p.name for p in runs[0].rglob("*")}
    assert any(name.endswith(".wandb") for name in files)  # the run's event log
    assert {"val/map", "val/map_best", "train/cls", "train/loc", "train/select", "train/phase"} <= set(metrics), sorted(
        metrics
    )

    # a resumed training continues the same offline wandb run
    run_id = (tmp_path / "first" / WANDB_ID_FILE).read_text().strip()
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["sapd_wandb_id"] == run_id
    resumed = compose_config("train", [*common, "trainer.max_epochs=2", f"ckpt_path={last}"], tmp_path / "resumed")
    train(resumed)
    # offline run folders are named offline-run-<time>-<id>: both runs are the one wandb run
    ids = {
        name: [p.name.rsplit("-", 1)[-1] for p in (tmp_path / name / "wandb").glob("offline-run-*")]
        for name in ("first", "resumed")
    }
    assert ids == {"first": [run_id], "resumed": [run_id]}
    assert (tmp_path / "resumed" / WANDB_ID_FILE).read_text().strip() == run_id
    resumed_last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert torch.load(resumed_last, map_location="cpu", weights_only=False)["sapd_wandb_id"] == run_id


def test_resume_takes_the_wandb_run_id_of_the_checkpoint(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "sapd_wandb_id": "abc123"}, ckpt)
    cfg = OmegaConf.create(
        {
            "wandb": {"_target_": "sapd.wandb_logger.make_wandb_logger", "id": None, "resume": "allow"},
            "csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": "."},
        }
    )
    resumed = resume_wandb_config(cfg, ckpt)
    assert resumed.wandb.id == "abc123" and resumed.wandb.resume == "allow"
    assert cfg.wandb.id is None and "id" not in resumed.csv  # the given config is left alone
    assert resume_wandb_config(cfg, None) is cfg  # not a resume: a new run
    explicit = OmegaConf.merge(cfg, {"wandb": {"id": "mine"}})
    assert resume_wandb_config(explicit, ckpt).wandb.id == "mine"  # an id given on the command line wins
    # a checkpoint without the key: the run folder's wandb_id.txt; neither: a new run
    other = tmp_path / "other" / "checkpoints" / "epoch_001.ckpt"
    other.parent.mkdir(parents=True)
    torch.save({"state_dict": {}}, other)
    assert stored_wandb_id(other) is None and resume_wandb_config(cfg, other) is cfg
    (tmp_path / "other" / WANDB_ID_FILE).write_text("fromfile\n")
    assert stored_wandb_id(other) == "fromfile"
    assert stored_wandb_id(tmp_path / "missing.ckpt") is None


def test_wandb_logger_knows_its_run_id_before_the_run_starts(tmp_path):
    given = make_wandb_logger(save_dir=str(tmp_path), mode="disabled", id="abc123")
    assert given.version == "abc123" and given._experiment is None
    drawn = make_wandb_logger(save_dir=str(tmp_path), mode="disabled")
    assert drawn.version and drawn.version != "abc123"


def test_logged_detection_images_share_one_size():
    from PIL import Image

    from sapd.callbacks.dashboard import _same_size

    pics = _same_size([Image.new("RGB", (30, 20), (255, 0, 0)), Image.new("RGB", (10, 40), (0, 255, 0))])
    assert [p.size for p in pics] == [(30, 40), (30, 40)]
    assert pics[0].getpixel((5, 5)) == (255, 0, 0) and pics[0].getpixel((5, 30)) == (127, 127, 127)
    assert _same_size([]) == []


def test_messages_come_from_rank_zero_and_library_chatter_is_quiet(monkeypatch):
    configure_logging()
    record = logging.LogRecord("sapd.train", logging.INFO, __file__, 1, "best checkpoint: x", None, None)
    warning = logging.LogRecord("sapd.module", logging.WARNING, __file__, 1, "non-finite loss", None, None)
    rank_filter = RankZeroFilter()
    assert rank_filter.filter(record) and rank_filter.filter(warning)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert not rank_filter.filter(record) and rank_filter.filter(warning)  # rank 1: warnings only
    assert logging.getLogger("sapd").getEffectiveLevel() == logging.INFO
    # Lightning's tips and accelerator inventory are INFO records of this logger: not shown
    assert not logging.getLogger("lightning.pytorch.utilities.rank_zero").isEnabledFor(logging.INFO)
    assert all(any(isinstance(f, RankZeroFilter) for f in h.filters) for h in logging.getLogger().handlers)


@pytest.mark.slow
def test_offline_wandb_prints_nothing_unless_verbose(tmp_path):
    """One process per run: wandb keeps some console state per process."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    env.update(WANDB_MODE="offline", PYTHONPATH=os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]))
    common = [*TINY, "logger=wandb", "trainer.max_epochs=1", "trainer.limit_train_batches=1"]
    common += ["trainer.limit_val_batches=1", "validate_best=false", "report.enabled=false"]
    counts = {}
    for verbose in (False, True):
        out = tmp_path / str(verbose)
        argv = [sys.executable, "-m", "sapd.train", *common, f"logger.wandb.verbose={verbose}", f"hydra.run.dir={out}"]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        counts[verbose] = sum(ln.lstrip().startswith("wandb:") for ln in (done.stdout + done.stderr).splitlines())
        assert list((out / "wandb").glob("offline-run-*"))  # the run is recorded either way
    assert counts[False] == 0 and counts[True] > 0, counts
