"""The project's own Hydra configs, composed for the benchmarks: a benchmarked SAPD is the model training builds.

Every SAPD (and the loss part, and the data loaders) is made from ``conf/`` at the repository root by
``hydra.compose`` of the training config plus overrides for what a benchmark varies (backbone, BFP,
DCN, channels), then ``hydra.utils.instantiate(cfg.model, num_classes=K)`` as ``sapd.train`` does.
Nothing about the detector is restated here, so a change to ``conf/model/sapd.yaml`` is benchmarked
as it is trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"


def compose_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """``conf/<config_name>.yaml`` of this repository composed with Hydra ``overrides`` (not resolved)."""
    if not (CONF_DIR / f"{config_name}.yaml").is_file():
        raise FileNotFoundError(f"no {config_name}.yaml in {CONF_DIR}: the benchmarks read the repository's conf/")
    from sapd.paths import register_configs

    register_configs()  # the config nodes declared in code (model/criterion=paper)
    GlobalHydra.instance().clear()  # a benchmark is its own program: no Hydra app runs around it
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def _flag(value: bool) -> str:
    return "true" if value else "false"


def sapd_overrides(
    backbone: str | None = None, *, bfp: bool = False, dcn: bool = False, extra: Sequence[str] = ()
) -> list[str]:
    """Overrides that make ``model=sapd`` (the paper's COCO model) a random-weight benchmark model.

    Args:
        backbone: timm name for ``model.backbone.name`` (None: the config's).
        bfp: Balanced Feature Pyramid in the neck.
        dcn: deformable convolutions in the backbone.
        extra: further overrides, applied last (they win).
    """
    out = ["model=sapd", "model.backbone.pretrained=false", "model.backbone.checkpoint_path=null"]
    if backbone:
        out.append(f"model.backbone.name={backbone}")
    out += [f"model.backbone.dcn={_flag(dcn)}", f"model.neck.bfp={_flag(bfp)}"]
    return out + list(extra)


def sapd_config(
    backbone: str | None = None, *, bfp: bool = False, dcn: bool = False, extra: Sequence[str] = ()
) -> DictConfig:
    """The composed training config whose ``model`` node is the benchmark's SAPD (see :func:`sapd_overrides`)."""
    return compose_config(sapd_overrides(backbone, bfp=bfp, dcn=dcn, extra=extra))


def build_sapd(
    backbone: str | None = None,
    *,
    num_classes: int = 80,
    bfp: bool = False,
    dcn: bool = False,
    extra: Sequence[str] = (),
) -> nn.Module:
    """SAPD with random weights, instantiated from the composed config as training instantiates it."""
    cfg = sapd_config(backbone, bfp=bfp, dcn=dcn, extra=extra)
    return instantiate(cfg.model, num_classes=num_classes)
