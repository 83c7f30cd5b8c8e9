"""The settings of the loss (``model.criterion``) and of post-processing (``model.postprocess``), declared
once, without torch.

:class:`CriterionSettings` and :class:`PostProcessSettings` are dataclasses whose fields carry the defaults
(the paper's setting) and the values each accepts (:mod:`sapd.models.setting_rules`). The classes that
compute, :class:`sapd.models.SAPDCriterion` and :class:`sapd.models.PostProcess`, extend them; everything
else reads these declarations: the config node ``model/criterion=paper`` (:func:`paper_config`), the keys
a run summary records (:func:`reported_keys`), the paper's values that sapd.report names a variant
against (:func:`paper_setting`) and the commands' table of settings (:data:`sapd.checks.SETTINGS`). A
command that only composes configs or compares summaries therefore does not import torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from sapd.models.setting_rules import Rule, check_fields, flag, integer, number, one_of

# The two readings of "p inside B_v" (docs/design.md, "Valid region"): the point's cell overlaps B_v
# (the default, as the FSAF authors' assigner), or the point itself lies inside B_v (the paper's text).
VALID_REGIONS = ("cell_overlap", "centre")

# The ``report`` metadata of a criterion setting: what a run summary records and sapd.report names a row by.
ABLATION = "ablation"  # a Table 2 switch (SW, SS): names the row's ablation (FSAF, +SW, ...)
VARIANT = "variant"  # a value other than the paper's names the row's variant

CRITERION_TARGET = "sapd.models.SAPDCriterion"
POSTPROCESS_TARGET = "sapd.models.PostProcess"


def _setting(default: Any, rule: Rule, report: str | None = None) -> Any:
    """A field: its default, the values it accepts (checked when built, and by the commands' table of
    settings, sapd.checks.SETTINGS) and its ``report`` metadata."""
    return field(default=default, metadata={"rule": rule, "report": report})


@dataclass(kw_only=True)
class CriterionSettings:
    """The settings of the SAPD loss (config node ``model.criterion``); the defaults are the paper's.

    The number of classes comes from the logits and the box coding's ``z`` (Eq. 1) from the detector,
    which shares it with the post-processing.

    Args:
        soft_weight: SW switch (off: f := 1).
        soft_select: SS switch (off: FSAF single level whatever the phase).
        eta: exponent of f in Eq. 4 (>= 0; Table 3).
        topk: levels per instance in phase 2 (Table 4; 1 to the number of levels).
        epsilon: shrink factor of B_v, in (0, 1].
        valid_region: ``"cell_overlap"`` (the FSAF authors' assigner) or ``"centre"`` (the point itself
            inside B_v, at least the nearest point on each level the instance has); see
            :func:`~sapd.models.anchor_points.candidate_pairs`.
        soft_weight_norm: ``"none"`` (Eq. 4 as printed) or ``"level_max"``: f divided by the largest f
            of the instance's points on that level, so its best point there weighs 1.
        normaliser: denominator of Eq. 6: ``"weight_sum"`` (the paper: sum of w over positives) or
            ``"num_pos"`` (the number of positive points, as FSAF / RetinaNet).
        unselected: ``"negative"`` (paper) or ``"ignore"`` (MMDetection FSAF: weight 0 in the owner's
            class only) for points owned by an instance not assigned to their level.
        ignore_epsilon: FSAF ignore region (0.5) or None (off).
        lambda_select: lambda of Eq. 6.
        loc_loss: ``"iou"`` or ``"giou"``.
        focal_alpha, focal_gamma: of the focal loss (Eq. 2).
    """

    soft_weight: bool = _setting(True, flag(), ABLATION)
    soft_select: bool = _setting(True, flag(), ABLATION)
    eta: float = _setting(1.0, number(0), VARIANT)
    topk: int = _setting(3, integer(1), VARIANT)
    epsilon: float = _setting(0.2, number(0, 1, low_open=True), VARIANT)
    valid_region: str = _setting("cell_overlap", one_of(*VALID_REGIONS), VARIANT)
    soft_weight_norm: str = _setting("none", one_of("none", "level_max"), VARIANT)
    normaliser: str = _setting("weight_sum", one_of("weight_sum", "num_pos"), VARIANT)
    unselected: str = _setting("negative", one_of("negative", "ignore"), VARIANT)
    ignore_epsilon: float | None = _setting(None, number(0, 1, low_open=True, null="no ignore region"), VARIANT)
    lambda_select: float = _setting(0.1, number(0))
    loc_loss: str = _setting("iou", one_of("iou", "giou"))
    focal_alpha: float = _setting(0.25, number(0, 1))
    focal_gamma: float = _setting(2.0, number(0))

    def __post_init__(self) -> None:
        check_fields(self, "model.criterion")
        if self.ignore_epsilon is not None and not self.epsilon < self.ignore_epsilon:
            raise ValueError(f"model.criterion.ignore_epsilon must be in (epsilon, 1]; got {self.ignore_epsilon!r}")


def paper_config() -> dict[str, Any]:
    """The config node ``model.criterion`` of the paper's setting: the target and every default."""
    return {"_target_": CRITERION_TARGET, **{f.name: f.default for f in fields(CriterionSettings)}}


def reported_keys() -> tuple[str, ...]:
    """The settings a run summary records (flat, beside the model's ``_target_``), in declaration order."""
    return tuple(f.name for f in fields(CriterionSettings) if f.metadata.get("report"))


def paper_setting() -> dict[str, Any]:
    """The paper's value of each setting whose other values name a variant in sapd.report."""
    return {f.name: f.default for f in fields(CriterionSettings) if f.metadata.get("report") == VARIANT}


# What a score threshold accepts: model.postprocess.score_thresh, and the per-call threshold.
SCORE_THRESH_RULE = number(0, 1, high_open=True)


def check_score_thresh(value: float) -> float:
    """``value`` when it is a score threshold in [0, 1); else one ``ValueError`` naming the setting."""
    try:
        as_float = float(value)  # a numpy or 0-d tensor threshold too
    except (TypeError, ValueError):
        as_float = None
    if isinstance(value, bool) or not SCORE_THRESH_RULE.allows(as_float):
        raise ValueError(SCORE_THRESH_RULE.refusal("model.postprocess.score_thresh", value))
    return value


@dataclass(frozen=True)
class PostProcessSettings:
    """The settings of post-processing (config node ``model.postprocess``). Frozen: a caller that wants
    other settings passes ``score_thresh`` per call or makes a :meth:`replace` copy.

    Args:
        score_thresh: keep (point, class) pairs with sigmoid score above it (0.05).
        pre_nms_topk: at most this many pairs per level before NMS (1000).
        nms_thresh: IoU of the class-aware NMS (0.5).
        max_detections: detections kept per image (100).
    """

    # each field's rule: checked when built, and read into the commands' table (sapd.checks.SETTINGS)
    score_thresh: float = field(default=0.05, metadata={"rule": SCORE_THRESH_RULE})
    pre_nms_topk: int = field(default=1000, metadata={"rule": integer(1)})
    nms_thresh: float = field(default=0.5, metadata={"rule": number(0, 1, low_open=True)})
    max_detections: int = field(default=100, metadata={"rule": integer(1)})

    def __post_init__(self) -> None:
        check_fields(self, "model.postprocess")

    def replace(self, **changes: Any) -> PostProcessSettings:
        """A copy with ``changes`` (checked as the constructor checks them), of the same class."""
        return dataclasses.replace(self, **changes)

    def thresh(self, score_thresh: float | None = None) -> float:
        """The threshold of one call: ``score_thresh`` when given (checked), else this object's."""
        return float(self.score_thresh if score_thresh is None else check_score_thresh(score_thresh))
