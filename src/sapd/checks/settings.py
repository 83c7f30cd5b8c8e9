"""The allowed values of every setting of sapd's commands, in one table: :data:`SETTINGS`.

It maps each config key (dotted, as on the command line) to its :class:`~sapd.models.setting_rules.Rule`:
its kind (integer, number, true/false, one of a list) and range, and what null means where null is
allowed. The criterion's keys (``model.criterion.*``) are read from the criterion's own fields
(:class:`~sapd.models.settings.CriterionSettings`), which check the same rules when built. Keys of :data:`FREE`
(paths, names, class paths) and of :data:`FREE_TREES` are checked where they are used (a missing file
is named when it is opened).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from omegaconf import ListConfig

from sapd.checks.kinds import batches, device, devices, milestones, sizes
from sapd.models.setting_rules import Rule, field_rules, flag, integer, is_int, number, one_of
from sapd.models.settings import SCORE_THRESH_RULE, CriterionSettings, PostProcessSettings

SEED_MAX = 2**32 - 1  # numpy's and Lightning's seed range: [0, 2**32 - 1]

PRECISIONS = (
    "auto",  # sapd: 16-mixed on CUDA, bf16-mixed on a CPU with native bf16, else 32-true
    "32-true",
    "32",
    32,
    "16-mixed",
    "16",
    16,
    "bf16-mixed",
    "bf16",
    "16-true",
    "bf16-true",
    "64-true",
    "64",
    64,
)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")

PROB = number(0, 1)
POSITIVE = number(0, low_open=True)
THREADS = integer(1, null="torch's default")
SEED = integer(0, SEED_MAX)

#: Every setting with a range: key -> rule. A key of one command only (``opset``) or of several
#: (``num_threads``, ``score_thresh``) is listed once; a config that lacks a key skips its rule.
SETTINGS: dict[str, Rule] = {
    # --- the run (conf/train.yaml)
    "seed": integer(0, SEED_MAX, null="no seeding"),
    "num_threads": THREADS,
    "channels_last": flag(),
    "train": flag(),
    "validate_best": flag(),
    "report.enabled": flag(),
    "report.score_thresh": PROB,
    "report.num_images": integer(0),
    "report.class_table": flag(),
    "learning_check.max_skipped_fraction": number(0, 1),
    "ablation.soft_weight": flag(),
    "ablation.soft_select": flag(),
    # --- data (conf/data/*.yaml)
    "data.batch_size": integer(1),
    "data.val_batch_size": integer(1, null="data.batch_size"),
    "data.num_workers": integer(0),
    "data.persistent_workers": flag(),
    "data.pin_memory": flag(null="on when CUDA is available"),
    "data.min_size": sizes(1),
    "data.max_size": integer(1),
    "data.val_min_size": integer(1, null="the largest data.min_size"),
    "data.val_max_size": integer(1, null="data.max_size"),
    "data.flip_prob": PROB,
    "data.size_divisor": integer(1),
    "data.aspect_ratio_groups": integer(0),
    "data.drop_empty": flag(),
    "data.skip_bad_images": flag(),
    "data.allow_outside_root": flag(),
    "data.limit_val_images": integer(1, null="every validation image"),
    "data.seed": integer(0, SEED_MAX, null="the run's seed"),
    "data.test_split": one_of("test-dev", "val", "test"),
    "data.synthetic.num_train": integer(1),
    "data.synthetic.num_val": integer(1),
    "data.synthetic.seed": SEED,
    "data.synthetic.min_side": integer(32),
    "data.synthetic.max_side": integer(32),
    "data.synthetic.max_objects": integer(1),
    "data.synthetic.min_object_size": integer(1),
    "data.synthetic.empty_frac": PROB,
    "data.synthetic.crowd_frac": PROB,
    # --- the model (conf/model/*.yaml)
    "model.z": POSITIVE,
    "model.backbone.pretrained": flag(),
    "model.backbone.frozen_stages": integer(-1, 4),
    "model.backbone.norm_eval": flag(),
    "model.backbone.dcn": flag(),
    "model.neck.out_channels": integer(1),
    "model.neck.num_levels": integer(3),
    "model.neck.bfp": flag(),
    "model.head.feat_channels": integer(1),
    "model.head.num_convs": integer(0),
    "model.head.norm": one_of("gn", null="no normalisation"),
    # null: no selection network (Table 2's FSAF, +SW and +BFP rows); a node's keys are checked below
    "model.selection": Rule("a selection-network node", lambda v: isinstance(v, Mapping), "no selection network"),
    "model.selection.roi_size": integer(1),
    "model.selection.channels": integer(1),
    "model.selection.detach_features": flag(),
    "model.num_convs": integer(1),  # FCOS head
    "model.center_sampling_radius": number(0),  # FCOS
    # the criterion's own rules, declared once on its fields (SAPDCriterion checks them when built)
    **{f"model.criterion.{name}": rule for name, rule in field_rules(CriterionSettings).items()},
    **{f"model.postprocess.{name}": rule for name, rule in field_rules(PostProcessSettings).items()},
    # --- optimisation (conf/optim/*.yaml)
    "optim.optimizer.lr": POSITIVE,
    "optim.optimizer.weight_decay": number(0),
    "optim.optimizer.momentum": number(0, 1, high_open=True),
    "optim.optimizer.fused": flag(null="torch's default"),
    "optim.base_batch_size": integer(1),
    "optim.no_decay_norm_bias": flag(),
    "optim.scheduler.warmup_iters": integer(0),
    "optim.scheduler.warmup_ratio": number(0, 1, low_open=True),
    "optim.scheduler.gamma": number(0, 1, low_open=True),
    "optim.scheduler.milestones": milestones(),
    "optim.scheduler.min_ratio": PROB,
    # --- the trainer (conf/trainer/*.yaml)
    "trainer.accelerator": one_of(*ACCELERATORS),
    "trainer.devices": devices(),
    "trainer.num_nodes": integer(1),
    "trainer.max_epochs": integer(1, also={-1: "no limit"}),
    "trainer.precision": one_of(*PRECISIONS),
    "trainer.gradient_clip_val": number(0, null="no clipping"),
    "trainer.gradient_clip_algorithm": one_of("norm", "value"),
    "trainer.log_every_n_steps": integer(1),
    "trainer.check_val_every_n_epoch": integer(1, null="validation by steps"),
    "trainer.num_sanity_val_steps": integer(0, also={-1: "all"}),
    "trainer.limit_train_batches": batches(zero=False),
    "trainer.limit_val_batches": batches(zero=True),
    "trainer.accumulate_grad_batches": integer(1),
    "trainer.fast_dev_run": Rule(
        "true, false or an integer >= 0 (batches)", lambda v: isinstance(v, bool) or (is_int(v) and v >= 0)
    ),
    "trainer.overfit_batches": Rule(
        "an integer >= 0 (batches) or a fraction in [0, 1]",
        lambda v: (is_int(v) and v >= 0) or (isinstance(v, float) and 0.0 <= v <= 1.0),
    ),
    "trainer.deterministic": Rule("true, false or 'warn'", lambda v: isinstance(v, bool) or v == "warn"),
    "trainer.benchmark": flag(null="Lightning's default"),
    "trainer.sync_batchnorm": flag(),
    "trainer.use_distributed_sampler": flag(),
    "trainer.detect_anomaly": flag(),
    "callbacks.phase_switch.switch_epoch": integer(0, null="half of trainer.max_epochs"),
    "callbacks.step_checkpoint.every_n_train_steps": integer(1, null="by time"),
    "callbacks.last_checkpoint.every_n_epochs": integer(1),
    "callbacks.detection_images.num_images": integer(0),
    # --- evaluate, predict, export (conf/eval.yaml, predict.yaml, export.yaml)
    "split": one_of("val", "test"),
    "score_thresh": replace(SCORE_THRESH_RULE, null="the model's own, model.postprocess.score_thresh"),
    "batch_size": integer(1, null="the checkpoint's data.val_batch_size"),
    "device": device(),
    "format": Rule("onnx or torchscript", lambda v: isinstance(v, str) and v.lower() in ("onnx", "torchscript")),
    "opset": integer(18, 23, null="the exporter's default"),  # sapd.export.ONNX_OPSETS
    "verify": flag(),
    # --- the tools (conf/analysis.yaml, report.yaml, synthetic.yaml)
    "batches": integer(1),
    "decide": flag(),
    "compare": Rule(
        "a list of two results files or evaluation folders, compare='[A,B]'",
        lambda v: isinstance(v, (list, tuple, ListConfig)) and len(v) == 2 and all(isinstance(p, str) and p for p in v),
        "no comparison",
    ),
    "same_commit": flag(),
    "workers": integer(1, null="up to 2"),
}

#: Keys whose values are names, paths or objects: checked where they are used, not here.
FREE = (
    "task_name",
    "tags",
    "group",
    "ckpt_path",
    "optimized_metric",
    "input",
    "output",
    "results_file",
    "out",
    "dirs",
    "annotations",
    "reference",
    "logger",
    "data.name",
    "data.root",
    "data.cache_dir",
    "data.train_ann",
    "data.train_images",
    "data.val_ann",
    "data.val_images",
    "data.test_ann",
    "data.test_images",
    "model.backbone.name",
    "model.backbone.checkpoint_path",
    "optim.scheduler.name",  # sapd.optim.lr_factor names the schedules (checked by calling it)
    "trainer.strategy",
    "trainer.default_root_dir",
    "trainer.profiler",
)
FREE_TREES = ("hydra.", "paths.", "logger.", "callbacks.", "debug.")
