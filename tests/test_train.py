"""The training application end to end: every experiment runs, the phase switch, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from conftest import TINY, TO_SYNTHETIC, compose_config, train_with
from sapd import error_analysis as ea
from sapd import run_report
from sapd.train import train

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml"))


class PhaseRecorder(L.Callback):
    """Records the detector's phase at every training batch: {epoch: phase}."""

    def __init__(self) -> None:
        self.phases: dict[int, set[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.phases.setdefault(trainer.current_epoch, set()).add(int(pl_module.net.phase))


@pytest.mark.slow
def test_default_config_fast_dev_run(train_cfg):
    cfg = train_cfg("+trainer.fast_dev_run=true")
    metrics, objects = train(cfg)
    assert "train/total_step" in metrics and torch.isfinite(torch.tensor(metrics["train/total_step"]))
    assert objects["module"].net.num_classes == objects["datamodule"].num_classes


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_a_step(train_cfg, experiment):
    cfg = train_cfg(f"experiment={experiment}", *TO_SYNTHETIC, "+trainer.fast_dev_run=true")
    assert cfg.task_name == experiment
    metrics, objects = train(cfg)
    net = objects["module"].net
    assert torch.isfinite(torch.tensor(metrics["train/total_step"]))
    # the experiment's own switches survive the tiny-model overrides
    assert net.criterion.soft_weight == cfg.model.criterion.soft_weight
    assert net.criterion.soft_select == cfg.model.criterion.soft_select


@pytest.mark.slow
def test_phase_switch_at_epoch_and_after_resume(train_cfg, tmp_path):
    common = [
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "callbacks.phase_switch.switch_epoch=2",
        "validate_best=false",
    ]
    cfg = train_cfg(*common)
    recorder = PhaseRecorder()
    _, objects = train_with(cfg, recorder)
    assert recorder.phases == {0: {1}, 1: {1}, 2: {2}}
    # default: half of the schedule (a run folder of its own: the first one holds a run)
    half = [
        "trainer.max_epochs=4",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "validate_best=false",
    ]
    cfg = compose_config("train", [*TINY, *half], tmp_path / "half")
    recorder = PhaseRecorder()
    train_with(cfg, recorder)
    assert recorder.phases == {0: {1}, 1: {1}, 2: {2}, 3: {2}}
    # every finished run leaves a summary for sapd.report in its folder
    summary = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    assert summary["seed"] == 42 and summary["global_step"] == 4 and summary["max_epochs"] == 4
    assert summary["model"]["soft_weight"] is True and summary["model"]["valid_region"] == "cell_overlap"
    assert "trainer.max_epochs=4" in summary["overrides"]
    assert summary["seconds_per_step"] > 0 and "map" in summary["metrics"]
    assert summary["phase_switch_epoch"] == 2  # half of 4, stored with the run


@pytest.mark.parametrize(
    "search, swept",
    [
        ("table2", {"ablation", "seed"}),
        ("table2_screen", {"model.criterion.valid_region", "model.criterion.soft_weight_norm", "seed"}),
    ],
)
def test_table2_sweeps_compose(train_cfg, search, swept):
    cfg = train_cfg(f"hparams_search={search}")
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert set(cfg.hydra.sweeper.params) == swept
    assert all(len(str(v).split(",")) >= 2 for v in cfg.hydra.sweeper.params.values())
    assert "3" not in str(cfg.hydra.sweeper.params["seed"]).split(",")  # seeds 0, 1, 2
    assert cfg.group.startswith(search + "_")  # one wandb group per sweep (its start time)
    if search == "table2_screen":
        assert cfg.trainer.max_epochs == 4 and cfg.model.criterion.soft_weight and cfg.model.criterion.soft_select


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e.startswith(("r", "x", "table2"))])
def test_coco_experiments_state_the_papers_loss(tmp_path, experiment):
    """The COCO experiments keep the paper's reading of the loss whatever the CPU default is."""
    criterion = compose_config("train", [f"experiment={experiment}"], tmp_path).model.criterion
    assert (criterion.valid_region, criterion.soft_weight_norm, criterion.normaliser) == (
        "cell_overlap",
        "none",
        "weight_sum",
    )
    text = (Path(__file__).parents[1] / "conf" / "experiment" / f"{experiment}.yaml").read_text()
    assert "the paper's" in text  # each file says which setting it uses


@pytest.mark.slow
def test_resume_after_switch_continues_in_phase_two(train_cfg):
    first = train_cfg(
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "callbacks.phase_switch.switch_epoch=1",
        "validate_best=false",
    )
    _, objects = train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["epoch"] == 1
    assert [int(v) for k, v in state["state_dict"].items() if k.endswith("phase")] == [2]
    resumed = train_cfg(
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "callbacks.phase_switch.switch_epoch=1",
        "validate_best=false",
        f"ckpt_path={last}",
    )
    recorder = PhaseRecorder()
    train_with(resumed, recorder)
    assert recorder.phases == {2: {2}}


@pytest.mark.slow
def test_training_leaves_a_report_with_logger_none(train_cfg, capsys):
    """logger=none (the tiny config's): metrics.csv is still recorded, and report/ holds every part."""
    cfg = train_cfg(
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.log_every_n_steps=1",
        "callbacks.phase_switch.switch_epoch=1",
        "report.num_images=3",
    )
    assert cfg.logger is None or not cfg.logger
    _, objects = train(cfg)
    out = Path(cfg.paths.output_dir)
    datamodule, module = objects["datamodule"], objects["module"]
    (metrics_csv,) = out.glob("csv/version_*/metrics.csv")
    series = run_report.read_metrics([metrics_csv])
    assert {"train/total_step", "val/map"} <= set(series) and any(k.startswith("lr-") for k in series)
    report = out / "report"
    pictures = {run_report.CLASS_PNG, run_report.PR_PNG, run_report.CURVES_PNG, run_report.IMAGES_PNG}
    errors = {ea.ERRORS_CSV, ea.ERRORS_PNG, ea.CONFUSION_CSV, ea.CONFUSION_PNG, ea.CALIBRATION_CSV, ea.CALIBRATION_PNG}
    assert {p.name for p in report.iterdir()} == pictures | errors | {run_report.CLASS_CSV}
    for name in pictures:
        with Image.open(report / name) as image:
            assert image.width >= 600 and image.height >= 300, name
    with open(report / run_report.CLASS_CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(run_report.CSV_COLUMNS)
    assert [r["name"] for r in rows] == list(datamodule.class_names)
    assert [int(r["category_id"]) for r in rows] == list(datamodule.label_to_cat_id)
    anns = datamodule.val_dataset.coco.dataset["annotations"]
    assert sum(int(r["num_gt"]) for r in rows) == sum(1 for a in anns if not a.get("iscrowd"))
    # the per-class APs average to the AP of the same evaluation
    evaluation = module.evaluator.result
    assert evaluation.class_metrics.mean_ap() == pytest.approx(evaluation.table["map"], abs=1e-6)
    assert "Per-class AP" not in capsys.readouterr().out  # the per-class table is printed on request only


@pytest.mark.slow
def test_bf16_mixed_channels_last_step_on_cpu(train_cfg):
    """The embedded default's speed settings (bf16 autocast, channels-last) train with finite losses."""
    cfg = train_cfg("trainer.precision=bf16-mixed", "channels_last=true", "+trainer.fast_dev_run=2")
    metrics, objects = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/total_step"]))
    assert objects["trainer"].precision == "bf16-mixed"


def test_precision_auto(monkeypatch):
    import sapd.utils as utils

    monkeypatch.setattr(utils.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: True)
    assert utils.resolve_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: False)
    assert utils.resolve_precision("auto", "cpu") == "32-true"
    assert utils.resolve_precision("16-mixed", "gpu") == "16-mixed"
    monkeypatch.setattr(utils.torch.cuda, "is_available", lambda: True)
    assert utils.resolve_precision("auto", "auto") == "16-mixed"


def test_the_cpu_default_uses_the_decided_soft_weight_norm(tmp_path):
    """model=tiny (the CPU default) takes level_max, the variant the default-budget Table 2 decided for;
    the paper's model config keeps the plain Eq. 4."""
    assert compose_config("train", [], tmp_path).model.criterion.soft_weight_norm == "level_max"
    assert compose_config("train", ["model=sapd"], tmp_path).model.criterion.soft_weight_norm == "none"
