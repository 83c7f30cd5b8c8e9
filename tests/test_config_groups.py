"""The model configs compose from shared groups (model/backbone, model/neck, model/criterion) to the
same resolved ``model`` node as the standalone files they replaced.

``tests/data/composed_models.json`` holds the resolved ``model`` node of every model option, every
experiment and every (model, ablation) pair, as composed before the groups existed. A deliberate
change of a model config rewrites it: ``python tests/test_config_groups.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sapd.models.criterion import SAPDCriterion
from sapd.models.settings import paper_config
from sapd.paths import initialize_configs

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("data") / "composed_models.json"


def cases() -> dict[str, list[str]]:
    conf = ROOT / "conf"
    out = {f"model={p.stem}": [f"model={p.stem}"] for p in sorted((conf / "model").glob("*.yaml"))}
    out |= {f"experiment={p.stem}": [f"experiment={p.stem}"] for p in sorted((conf / "experiment").glob("*.yaml"))}
    for model in ("tiny", "sapd", "fcos"):
        for ablation in ("fsaf", "sw", "sapd"):
            out[f"model={model},ablation={ablation}"] = [f"model={model}", f"ablation={ablation}"]
    return out


def composed_model(overrides: list[str]) -> dict:
    GlobalHydra.instance().clear()
    with initialize_configs():
        cfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_container(cfg.model, resolve=True)


def test_every_model_and_experiment_composes_to_the_recorded_model():
    golden = json.loads(GOLDEN.read_text())
    now = {name: composed_model(overrides) for name, overrides in cases().items()}
    assert sorted(now) == sorted(golden)
    for name in golden:
        assert now[name] == golden[name], name


def test_tiny_and_fcos_take_backbone_and_neck_from_the_same_groups():
    tiny, fcos = composed_model(["model=tiny"]), composed_model(["model=fcos"])
    assert tiny["backbone"] == fcos["backbone"] and tiny["neck"] == fcos["neck"]
    # a group option swaps the whole node under either detector
    paper = composed_model(["model=sapd"])
    swapped = composed_model(["model=fcos", "model/backbone=resnet50", "model/neck=fpn"])
    assert swapped["backbone"] == paper["backbone"] and swapped["neck"] == paper["neck"]
    assert swapped["_target_"] == "sapd.models.FCOSDetector"


@pytest.mark.parametrize("model", ["sapd", "tiny"])
def test_the_criterion_node_is_the_dataclass_defaults_and_the_stated_differences(model):
    node = composed_model([f"model={model}", "ablation=sapd"])["criterion"]
    stated = {"tiny": {"soft_weight_norm": "level_max"}}.get(model, {})
    assert node == {**paper_config(), **stated}
    assert instantiate(node) == SAPDCriterion(**stated)


if __name__ == "__main__":  # rewrite the record after a deliberate change of a model config
    sys.path.insert(0, str(ROOT / "src"))
    GOLDEN.write_text(json.dumps({n: composed_model(o) for n, o in cases().items()}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
