"""Every setting has a checked range (sapd.checks), every refusal is one line and exit status 2, Hydra's
own included (sapd.app), and what a run needs from outside (a GPU, pretrained weights, a config folder)
is refused before any data set is read."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from conftest import compose_config, run_commands
from sapd.app import flatten
from sapd.checks import FREE, FREE_TREES, SETTINGS, check_config, check_settings
from sapd.errors import ConfigError
from sapd.models import PostProcess, SAPDCriterion
from sapd.paths import initialize_configs
from sapd.train import main as train_main

ROOT = Path(__file__).parents[1]


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# ----------------------------------------------------------------------------- the table


BAD = [
    # (config, override, the key the line names)
    ("train", "data.min_size=0", "data.min_size"),
    ("train", "data.min_size=[640,0]", "data.min_size"),
    ("train", "data.max_size=0", "data.max_size"),
    ("train", "data.max_size=-5", "data.max_size"),
    ("train", "data.val_max_size=0", "data.val_max_size"),
    ("train", "data.limit_val_images=-2", "data.limit_val_images"),
    ("train", "data.limit_val_images=0", "data.limit_val_images"),
    ("train", "data.flip_prob=1.5", "data.flip_prob"),
    ("train", "data.size_divisor=0", "data.size_divisor"),
    ("train", "data.seed=-1", "data.seed"),
    ("train", "data.batch_size=2.5", "data.batch_size"),
    ("train", "data.synthetic.num_train=0", "data.synthetic.num_train"),
    ("train", "data.synthetic.min_side=400", "data.synthetic.min_side"),
    ("train", "optim.optimizer.lr=0", "optim.optimizer.lr"),
    ("train", "optim.optimizer.lr=-0.01", "optim.optimizer.lr"),
    ("train", "optim.optimizer.lr=inf", "optim.optimizer.lr"),
    ("train", "optim.optimizer.lr=abc", "optim.optimizer.lr"),
    ("train", "optim.optimizer.weight_decay=-1", "optim.optimizer.weight_decay"),
    ("train", "optim.optimizer.weight_decay=nan", "optim.optimizer.weight_decay"),
    ("train", "optim.base_batch_size=0", "optim.base_batch_size"),
    ("train", "optim.scheduler.name=linear", "optim.scheduler"),
    ("train", "optim.scheduler.warmup_iters=-1", "optim.scheduler.warmup_iters"),
    ("train", "optim=sgd optim.scheduler.milestones=[8,-1]", "optim.scheduler.milestones"),
    ("train", "optim=sgd optim.optimizer.momentum=1", "optim.optimizer.momentum"),
    ("train", "seed=-1", "seed"),
    ("train", "seed=abc", "seed"),
    ("train", "num_threads=-3", "num_threads"),
    ("train", "num_threads=0", "num_threads"),
    ("train", "model.z=abc", "model.z"),
    ("train", "model.z=0", "model.z"),
    ("train", "model.neck.out_channels=0", "model.neck.out_channels"),
    ("train", "model.head.feat_channels=-8", "model.head.feat_channels"),
    ("train", "model.selection.channels=0", "model.selection.channels"),
    ("train", "model.backbone.frozen_stages=7", "model.backbone.frozen_stages"),
    ("train", "model.criterion.lambda_select=inf", "model.criterion.lambda_select"),
    ("train", "model.criterion.focal_gamma=nan", "model.criterion.focal_gamma"),
    ("train", "model.criterion.eta=abc", "model.criterion.eta"),
    ("train", "model.postprocess.score_thresh=2", "model.postprocess.score_thresh"),
    ("train", "model.postprocess.nms_thresh=1.5", "model.postprocess.nms_thresh"),
    ("train", "trainer.precision=17", "trainer.precision"),
    ("train", "trainer.devices=0", "trainer.devices"),
    ("train", "trainer.limit_train_batches=0", "trainer.limit_train_batches"),
    ("train", "trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"),
    ("train", "callbacks.phase_switch.switch_epoch=-1", "callbacks.phase_switch.switch_epoch"),
    ("train", "channels_last=maybe", "channels_last"),
    ("eval", "score_thresh=2", "score_thresh"),
    ("eval", "batch_size=0", "batch_size"),
    ("eval", "split=train", "split"),
    ("predict", "score_thresh=-0.1", "score_thresh"),
    ("predict", "device=gpu", "device"),
    ("export", "opset=abc", "opset"),
    ("export", "opset=11", "opset"),
    ("analysis", "batches=0", "batches"),
    ("synthetic", "workers=-1", "workers"),
    ("synthetic", "data.synthetic.crowd_frac=2", "data.synthetic.crowd_frac"),
]


@pytest.mark.parametrize("config, override, key", BAD, ids=[f"{c}:{o}" for c, o, _ in BAD])
def test_a_setting_out_of_range_is_one_line_naming_the_key(tmp_path, config, override, key):
    needs = {"train": [], "synthetic": [], "predict": ["ckpt_path=x.ckpt", "input=x.jpg"]}
    extra = needs.get(config, ["ckpt_path=x.ckpt"])  # the values each command needs
    overrides = [*override.split(" "), *extra]
    if config in ("export", "analysis", "synthetic"):  # no run folder (conf/hydra/tool.yaml)
        GlobalHydra.instance().clear()
        with initialize_configs():
            cfg = compose(config_name=config, overrides=overrides)
    else:
        cfg = compose_config(config, overrides, tmp_path)
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    message = str(info.value)
    assert message.startswith(key) and "\n" not in message, message


def _leaves(node, prefix=""):
    for key, value in node.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, full + ".")
        else:
            yield full


def test_a_results_file_that_cannot_be_written_is_refused_before_the_evaluation(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [(a_file / "results.json", "is a file, not a folder"), (tmp_path, "is a folder")]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((locked / "results.json", "permission denied"))
    for path, why in cases:
        cfg = compose_config("eval", ["ckpt_path=x.ckpt", f"results_file={path}"], tmp_path)
        with pytest.raises(ConfigError, match=f"results_file={path}.*{why}"):
            check_config(cfg)
    check_config(compose_config("eval", ["ckpt_path=x.ckpt", f"results_file={tmp_path / 'new' / 'r.json'}"], tmp_path))


def test_every_setting_of_every_config_has_a_rule():
    """Each key of the commands' configs (every experiment, model, optimiser and trainer choice) is in
    the table, or named as checked where it is used (paths, names): a new key needs its range."""
    choices = [("train", [])]
    for group in ("experiment", "model", "optim", "trainer", "data", "debug", "ablation"):
        choices += [("train", [f"{group}={p.stem}"]) for p in sorted((ROOT / "conf" / group).glob("*.yaml"))]
    choices += [(name, []) for name in ("eval", "predict", "export", "analysis", "report", "synthetic")]
    unchecked = set()
    for name, overrides in choices:
        GlobalHydra.instance().clear()
        with initialize_configs():
            cfg = compose(config_name=name, overrides=overrides)
        for key in _leaves(OmegaConf.to_container(cfg, resolve=False)):
            if key.rsplit(".", 1)[-1] in ("_target_", "_partial_", "_convert_"):
                continue
            if key not in SETTINGS and key not in FREE and not key.startswith(FREE_TREES):
                unchecked.add(f"{key} ({name} {' '.join(overrides)})")
    assert not unchecked, sorted(unchecked)


def test_the_opset_range_is_the_exporters():
    from sapd.export import ONNX_OPSETS

    low, high = ONNX_OPSETS
    rule = SETTINGS["opset"]
    assert rule.allows(low) and rule.allows(high) and rule.allows(None)
    assert not rule.allows(low - 1) and not rule.allows(high + 1) and not rule.allows("abc")


def _refused_alike(cls, node: str, key: str, value) -> str:
    """The line that refuses ``model.<node>.<key>=value``: the keys of ``model.<node>.*`` in the table are
    ``cls``'s fields, and ``cls`` built alone refuses the value with the command's config check's line."""
    keys = {k for k in SETTINGS if k.startswith(f"model.{node}.")}
    assert keys == {f"model.{node}.{f.name}" for f in dataclasses.fields(cls)}
    with pytest.raises(ValueError) as built:
        cls(**{key: value})
    with pytest.raises(ConfigError) as checked:
        check_settings(OmegaConf.create({"model": {node: {key: value}}}))
    assert str(built.value) == str(checked.value)
    return str(checked.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("topk", 0),
        ("topk", 2.5),
        ("eta", -1),
        ("epsilon", 0.0),
        ("ignore_epsilon", 1.5),
        ("focal_alpha", 1.5),
        ("focal_gamma", float("nan")),
        ("soft_weight", "yes"),
        ("valid_region", "box"),
    ],
)
def test_the_criterions_ranges_are_declared_once_and_refused_alike(key, value):
    """model.criterion.* in the table are the rules on SAPDCriterion's fields: a value the command
    refuses, the class built alone (library use) refuses with the same line."""
    line = _refused_alike(SAPDCriterion, "criterion", key, value)
    assert line.startswith(f"model.criterion.{key} must be ")


@pytest.mark.parametrize(
    ("key", "value"),
    [("score_thresh", 1.0), ("score_thresh", -0.1), ("nms_thresh", 0.0), ("pre_nms_topk", 0), ("max_detections", 2.5)],
)
def test_the_postprocess_ranges_are_declared_once_and_refused_alike(key, value):
    """model.postprocess.* likewise: the rules on PostProcess's fields, and the per-call threshold's."""
    line = _refused_alike(PostProcess, "postprocess", key, value)
    if key == "score_thresh":
        with pytest.raises(ValueError) as per_call:
            PostProcess().thresh(value)
        assert str(per_call.value) == line


def test_hydra_messages_become_one_line():
    text = (
        "In 'train': Could not find 'model/nope'\n\nAvailable options in 'model':\n\tfcos\n\tsapd\n\ttiny\n"
        "Config search path:\n\tprovider=hydra, path=pkg://hydra.conf\n"
    )
    assert flatten(text) == "In 'train': Could not find 'model/nope'; Available options in 'model': fcos, sapd, tiny"


# ----------------------------------------------------------------------------- before any data set


def _no_coco(tmp_path) -> list[str]:
    """A COCO data config whose folder does not exist: reading it would be a different refusal."""
    return ["data=coco", f"data.root={tmp_path / 'no-coco'}"]


def _refused(cfg, caplog, monkeypatch) -> str:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        train_main(cfg)
    assert exit_info.value.code == 2
    (line,) = _errors(caplog)
    assert line.startswith("sapd.train: ") and "\n" not in line
    return line


def test_a_gpu_trainer_without_a_gpu_names_trainer_cpu(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    cfg = compose_config("train", ["experiment=r50", f"data.root={tmp_path / 'no-coco'}"], tmp_path)
    line = _refused(cfg, caplog, monkeypatch)
    assert "trainer.accelerator=gpu needs a CUDA GPU" in line and "trainer=cpu" in line
    caplog.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = compose_config("train", ["experiment=r50", "trainer=ddp", "trainer.devices=8", *_no_coco(tmp_path)], tmp_path)
    assert "trainer.devices=8 asks for 8 GPUs and torch sees 2" in _refused(cfg, caplog, monkeypatch)


def test_pretrained_weights_that_cannot_be_fetched_name_checkpoint_path(tmp_path, caplog, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))  # nothing cached
    cfg = compose_config("train", ["model.backbone.pretrained=true", *_no_coco(tmp_path)], tmp_path)
    line = _refused(cfg, caplog, monkeypatch)
    assert "cannot get the pretrained weights of backbone 'resnet10t'" in line
    assert "model.backbone.checkpoint_path=" in line and "model.backbone.pretrained=false" in line


def _weights_files(folder: Path) -> dict[str, tuple[Path, str]]:
    folder.mkdir()
    other = folder / "resnet18.pth"  # a whole state dict of another ResNet: names match, shapes do not
    torch.save(timm.create_model("resnet18").state_dict(), other)
    dump = folder / "dump.pth"  # a 4 KB state dict of something else
    torch.save({"conv.weight": torch.zeros(16, 3, 3, 3), "conv.bias": torch.zeros(16)}, dump)
    noise = folder / "noise.pth"
    noise.write_bytes(bytes((i * 37 + 11) % 256 for i in range(4096)))
    text = folder / "notes.safetensors"
    text.write_text("not weights\n")
    return {
        "another-resnet": (other, "tensors are missing (e.g. conv1.0.weight); 3 have another shape (e.g. layer2"),
        "another-model": (dump, "tensors are missing (e.g. conv1.0.weight)"),
        "random-bytes": (noise, "cannot be read as weights"),
        "text-as-safetensors": (text, "cannot be read as weights"),
        "folder": (folder, "is not a file"),
    }


def test_a_weights_file_of_another_model_or_not_weights_is_one_line(tmp_path, caplog, monkeypatch):
    for case, (path, what) in _weights_files(tmp_path / "weights").items():
        caplog.clear()
        cfg = compose_config("train", [f"model.backbone.checkpoint_path={path}", *_no_coco(tmp_path)], tmp_path)
        line = _refused(cfg, caplog, monkeypatch)
        assert f"model.backbone.checkpoint_path={path}" in line and what in line, (case, line)


def test_a_backbone_name_timm_does_not_know_is_one_line(tmp_path, caplog, monkeypatch):
    cfg = compose_config("train", ["model.backbone.name=resnet5O", *_no_coco(tmp_path)], tmp_path)
    assert "model.backbone.name='resnet5O' is not a timm model" in _refused(cfg, caplog, monkeypatch)


# ----------------------------------------------------------------------------- the commands themselves


def test_commands_refuse_in_one_line_with_exit_status_2_hydras_own_refusals_too(tmp_path):
    """The commands as a user runs them (Hydra parses the command line): Hydra's own refusals, a
    missing ckpt_path, a config folder that is not there and a value out of range are each one line
    ``sapd.<command>: ...`` and exit status 2; a refused job of a -m sweep is listed and the sweep
    goes on. One process runs them all (importing sapd once)."""
    logs = f"paths.log_dir={tmp_path / 'logs'}"
    cases = [
        ("sapd.evaluate", [logs], {}, "ckpt_path has no value: give ckpt_path="),
        ("sapd.train", [logs, "foo=1"], {}, "foo is not a key of this config (a new key needs +foo=...)"),
        ("sapd.train", [logs, "lr=0.1"], {}, "did you mean optim.optimizer.lr?"),
        ("sapd.train", [logs, "optim.weight_decay=0"], {}, "did you mean optim.optimizer.weight_decay?"),
        ("sapd.train", [logs, "model=nope"], {}, "Could not find 'model/nope'; Available options in 'model': fcos"),
        ("sapd.train", [logs, "data.batch_size=="], {}, "data.batch_size"),
        ("sapd.train", [logs, "seed=-1"], {}, "seed must be an integer in [0, 4294967295]"),
        ("sapd.predict", [logs], {"SAPD_CONFIG_DIR": str(tmp_path / "no-conf")}, "SAPD_CONFIG_DIR="),
        ("sapd.evaluate", [logs], {"SAPD_CONFIG_DIR": str(tmp_path)}, "has no eval.yaml"),
        ("sapd.export", ["ckpt_path=x.ckpt", "opset=abc"], {}, "opset must be an integer in [18, 23]"),
        ("sapd.train", [logs, "data.synthetic.num_train=${oc.env:SAPD_TEST_UNSET_H1}"], {}, "SAPD_TEST_UNSET_H1"),
    ]
    sweep = ("sapd.train", ["-m", logs, "data.batch_size=0,-1"], {}, "2 job(s) of this sweep refused")
    out = tmp_path / "console"
    codes = run_commands([c[:3] for c in [*cases, sweep]], out, HYDRA_FULL_ERROR="0")
    for i, (module, args, _, message) in enumerate(cases):
        lines = [ln for ln in (out / f"{i}.out").read_text().splitlines() if ln.strip()]
        assert codes[i] == 2 and len(lines) == 1, (module, args, codes[i], lines)
        assert f"{module}: " in lines[0] and message in lines[0], (module, args, lines)
    # the sweep: both jobs ran and were refused, each in one line, then the list and exit status 2
    assert codes[-1] == 2
    text = (out / f"{len(cases)}.out").read_text()
    assert "sapd.train: data.batch_size must be an integer >= 1; got 0" in text
    assert "sapd.train: data.batch_size must be an integer >= 1; got -1" in text
    assert "sapd.train: 2 job(s) of this sweep refused" in text and "Traceback" not in text
    (refused,) = (tmp_path / "logs").glob("train/multiruns/*/refused.jsonl")
    rows = [json.loads(line) for line in refused.read_text().splitlines()]
    assert [(r["job"], r["overrides"][-1]) for r in rows] == [(0, "data.batch_size=0"), (1, "data.batch_size=-1")]


QUICK_EXIT = textwrap.dedent(
    """
    import atexit, sys
    from sapd.app import quick_exit

    class Cycle:
        def __del__(self):
            print("freed", flush=True)

    cycle = Cycle()
    cycle.me = cycle  # freed at exit only by Python's last garbage collection
    atexit.register(print, "handler ran", flush=True)
    if sys.argv[1] == "quick":
        quick_exit()
    """
)


def test_quick_exit_leaves_the_objects_to_the_system_and_runs_the_exit_handlers():
    """What each command's process does at exit (sapd.app.quick_exit): the exit handlers run, the objects
    in reference cycles are not collected one by one."""
    out = {
        mode: subprocess.run([sys.executable, "-c", QUICK_EXIT, mode], capture_output=True, text=True, check=True)
        for mode in ("plain", "quick")
    }
    assert out["plain"].stdout.split() == ["handler", "ran", "freed"]
    assert out["quick"].stdout.split() == ["handler", "ran"] and out["quick"].stderr == ""


# ----------------------------------------------------------------------------- resume


def _checkpoint_of(path: Path, cfg, label_to_cat_id: list[int]) -> Path:
    """A file with what a sapd checkpoint says about its run (its config and classes)."""
    run = OmegaConf.to_container(cfg, resolve=False)
    run.pop("hydra", None)
    model = OmegaConf.to_container(OmegaConf.create({"m": cfg.model, "ablation": cfg.ablation}), resolve=True)["m"]
    torch.save(
        {
            "state_dict": {},
            "sapd_config": {**run, "model": model},
            "sapd_classes": {"label_to_cat_id": label_to_cat_id},
        },
        path,
    )
    return path


def test_resume_from_a_checkpoint_of_another_model_or_classes_is_one_line(train_cfg, tmp_path, caplog, monkeypatch):
    # the backbone of the default (TINY's is test_resnet), so that the first difference is the neck's width
    other = _checkpoint_of(
        tmp_path / "other.ckpt", train_cfg("model.backbone.name=resnet10t", "model.neck.out_channels=32"), [1, 2, 3]
    )
    cfg = compose_config("train", [f"ckpt_path={other}", *_no_coco(tmp_path)], tmp_path)  # 64 channels
    line = _refused(cfg, caplog, monkeypatch)  # before the (missing) COCO folder is read
    assert f"ckpt_path={other} holds another model: model.neck.out_channels is 32 there and 64 here" in line
    caplog.clear()
    cfg = train_cfg()
    classes = _checkpoint_of(tmp_path / "classes.ckpt", cfg, [1, 2, 3])  # the synthetic set has 8
    with open_dict(cfg):
        cfg.ckpt_path = str(classes)
    line = _refused(cfg, caplog, monkeypatch)
    assert f"ckpt_path={classes} was trained on 3 classes and this data set has 8" in line
