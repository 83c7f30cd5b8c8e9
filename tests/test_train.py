"""The training application end to end: every experiment runs, the run's report and summary; the phase switch."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from conftest import TINY, TO_SYNTHETIC, compose_config
from sapd.callbacks import PhaseSwitch
from sapd.checkpoint import saved_step
from sapd.diagnostics import class_ap, detections, training_curves
from sapd.diagnostics import error_analysis as ea
from sapd.evaluation import Evaluation
from sapd.train import best_is_current, train

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml"))


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


def epoch_phases(callback: PhaseSwitch, net, max_epochs: int) -> list[int]:
    """The detector's phase in each epoch of a ``max_epochs`` run, the callback called as Lightning calls it."""
    phases = []
    for epoch in range(max_epochs):
        trainer = SimpleNamespace(max_epochs=max_epochs, current_epoch=epoch)
        callback.on_train_epoch_start(trainer, SimpleNamespace(net=net))
        phases.append(int(net.phase))
    return phases


def test_the_phase_switches_at_the_given_epoch_or_half_the_schedule(tmp_path):
    net = instantiate(compose_config("train", TINY, tmp_path).model, num_classes=3)
    assert epoch_phases(PhaseSwitch(switch_epoch=2), net, 3) == [1, 1, 2]
    default = PhaseSwitch()
    assert default.state_dict() == {}  # nothing to store before the first epoch
    assert epoch_phases(default, net, 4) == [1, 1, 2, 2]  # half of 4
    assert default.state_dict() == {"switch_epoch": 2} and default.switch_epoch_in_use == 2  # stored with the run
    assert epoch_phases(PhaseSwitch(), net, 5) == [1, 1, 2, 2, 2]  # half of 5, rounded down
    assert epoch_phases(PhaseSwitch(switch_epoch=0), net, 3) == [2, 2, 2]
    assert epoch_phases(PhaseSwitch(switch_epoch=3), net, 3) == [1, 1, 1]  # never switches (FSAF selection only)
    assert net.current_phase == 1


def test_the_best_checkpoint_is_validated_again_unless_the_latest_validation_made_it(tmp_path):
    """The step the best checkpoint was saved at decides, not its score: a score of float32 (as Lightning
    logs it) is current when its checkpoint is of the latest step, and an earlier checkpoint that scored the
    same as the latest validation (kept as best: a tie does not replace it) is not."""

    def saved(name: str, step: int) -> str:
        path = tmp_path / f"{name}.ckpt"
        torch.save({"global_step": step, "state_dict": {}}, path)
        return str(path)

    def best(path: str, score: float) -> SimpleNamespace:
        return SimpleNamespace(monitor="val/map", best_model_path=path, best_model_score=torch.tensor(score))

    trainer = SimpleNamespace(global_step=40)
    at_40, at_20 = saved("epoch_001", 40), saved("epoch_000", 20)
    # 0.3 is not a float32: the logged best score differs from the table's float, the checkpoint is the latest
    assert best_is_current(best(at_40, 0.3), Evaluation("val", 40, {"map": 0.3}), trainer)
    # the same score at step 20 and at step 40: the best checkpoint is step 20's, validated again
    assert not best_is_current(best(at_20, 0.25), Evaluation("val", 40, {"map": 0.25}), trainer)
    latest = Evaluation("val", 40, {"map": 0.25})
    assert best_is_current(best(at_40, 0.25), latest, trainer)
    assert not best_is_current(best(at_40, 0.25), Evaluation("val", 30, {"map": 0.25}), trainer)  # steps since
    assert not best_is_current(best(at_40, 0.25), Evaluation("val", 40, {}), trainer)  # nothing scored
    assert not best_is_current(best(at_40, 0.25), Evaluation("test", 40, {"map": 0.25}), trainer)
    assert not best_is_current(None, latest, trainer) and not best_is_current(best(at_40, 0.25), None, trainer)
    assert not best_is_current(best("", 0.25), latest, trainer)  # no best checkpoint kept
    assert not best_is_current(best(str(tmp_path / "gone.ckpt"), 0.25), latest, trainer)  # its step is unknown
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    assert saved_step(tmp_path / "broken.ckpt") is None and saved_step(at_20) == 20


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
    """The COCO experiments keep the paper's reading of the loss whatever the CPU default (model=tiny) is."""
    criterion = compose_config("train", [f"experiment={experiment}"], tmp_path).model.criterion
    assert (criterion.valid_region, criterion.soft_weight_norm, criterion.normaliser) == (
        "cell_overlap",
        "none",
        "weight_sum",
    )


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
    # every finished run leaves a summary for sapd.report in its folder
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 42 and summary["global_step"] == 4 and summary["max_epochs"] == 2
    assert summary["model"]["soft_weight"] is True and summary["model"]["valid_region"] == "cell_overlap"
    assert "trainer.max_epochs=2" in summary["overrides"]
    assert summary["seconds_per_step"] > 0 and "map" in summary["metrics"]
    assert summary["phase_switch_epoch"] == 1  # the switch epoch in use, stored with the run
    datamodule, module = objects["datamodule"], objects["module"]
    (metrics_csv,) = out.glob("csv/version_*/metrics.csv")
    series = training_curves.read_metrics([metrics_csv])
    assert {"train/total_step", "val/map"} <= set(series) and any(k.startswith("lr-") for k in series)
    report = out / "report"
    pictures = {class_ap.CLASS_PNG, class_ap.PR_PNG, training_curves.CURVES_PNG, detections.IMAGES_PNG}
    errors = {ea.ERRORS_CSV, ea.ERRORS_PNG, ea.CONFUSION_CSV, ea.CONFUSION_PNG, ea.CALIBRATION_CSV, ea.CALIBRATION_PNG}
    assert {p.name for p in report.iterdir()} == pictures | errors | {class_ap.CLASS_CSV}
    for name in pictures:
        with Image.open(report / name) as image:
            assert image.width >= 600 and image.height >= 300, name
    with open(report / class_ap.CLASS_CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(class_ap.CSV_COLUMNS)
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

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: True)
    assert utils.resolve_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: False)
    assert utils.resolve_precision("auto", "cpu") == "32-true"
    assert utils.resolve_precision("16-mixed", "gpu") == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert utils.resolve_precision("auto", "auto") == "16-mixed"
