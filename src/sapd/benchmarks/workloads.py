"""What ``sapd.bench`` runs: the models, the shared inputs, and one closure per measured call.

All detectors get the same backbone configuration, the same padded input tensor and the same
post-processing numbers:

- SAPD: ``TimmBackbone(name, pretrained=False)`` (frozen BatchNorm, stem and first stage frozen), FPN
  P3-P7 of 256 channels (optionally BFP), a 4 x 256 head, the feature-selection net.
- torchvision RetinaNet / FCOS: ``resnet_fpn_backbone(norm_layer=FrozenBatchNorm2d, trainable_layers=3,
  returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))`` - the backbone that
  ``retinanet_resnet50_fpn`` / ``fcos_resnet50_fpn`` build when ``weights_backbone`` is given
  (torchvision ``models/detection/retinanet.py``, ``fcos.py``). With ``weights_backbone=None`` those
  factories switch to trainable ``BatchNorm2d`` and five trainable stages, which would not be the
  detector anyone trains; with random weights here the two are the same network otherwise.
  Their ``GeneralizedRCNNTransform`` is replaced by one that neither normalises nor resizes, only pads
  to the same size divisor, so they see the very tensor SAPD sees.
- Post-processing: score > 0.05, top 1000 per level, NMS IoU 0.5, 100 detections (SPEC §5) for all
  three (torchvision's defaults differ: FCOS 0.2 / 0.6, RetinaNet 300 detections).
- ``post="cap"`` sets every classification bias to 0 in the inference models: with random weights
  the scores are then ~0.5, every level fills its 1000 pre-NMS candidates and NMS sees 5 x 1000 boxes,
  the worst case a trained detector meets on a busy image. ``post="init"`` keeps the prior-0.01 bias:
  nothing passes 0.05 and post-processing costs almost nothing.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch import Tensor, nn

Task = Callable[[], object]


@dataclass
class BenchConfig:
    """Every setting of a benchmark run (the CLI maps onto it one to one; stored in the results)."""

    device: str = "cpu"
    size: tuple[int, int] = (512, 853)  # (H, W) of the image before padding
    pad: int = 128  # size divisor of the padded batch (SPEC §6: 128)
    backbone: str = "resnet50"
    num_classes: int = 80
    threads: int = 0  # 0: all logical cores
    warmup: int = 1
    reps_infer: int = 5
    reps_train: int = 5
    reps_assign: int = 7
    train_batch: int = 2
    train_instances: int = 10
    share_instances: tuple[int, ...] = (10, 100)
    assign_instances: tuple[int, ...] = (1, 10, 100, 500)
    assign_memory_size: tuple[int, int] = (800, 1333)
    assign_memory_instances: int = 500
    memory: str = "subprocess"  # subprocess | inprocess | off
    channels_last: bool = False
    amp: bool = False
    amp_dtype: str = "bfloat16"
    compile: bool = False
    options: bool = True
    fps: bool = False
    fps_backbones: tuple[str, ...] = ("resnet50", "resnet101", "resnext101_64x4d")
    fps_reps: int = 10
    post: str = "cap"  # cap | init
    lr: float = 1e-6
    seed: int = 0
    profile: bool = False
    quick: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BenchConfig:
        tuples = {"size", "share_instances", "assign_instances", "assign_memory_size", "fps_backbones"}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in data.items()})


def padded_size(size: tuple[int, int], divisor: int) -> tuple[int, int]:
    """``(H, W)`` rounded up to multiples of ``divisor`` (as the SAPD collate and torchvision pad)."""
    h, w = size
    return math.ceil(h / divisor) * divisor, math.ceil(w / divisor) * divisor


def random_images(num: int, size: tuple[int, int], generator: torch.Generator) -> list[Tensor]:
    """``num`` normalised-looking images FloatTensor[3, H, W] (standard normal)."""
    return [torch.randn(3, *size, generator=generator) for _ in range(num)]


def random_boxes(num: int, size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """``num`` valid ground-truth boxes FloatTensor[num, 4] inside an ``(H, W)`` image: side length
    log-uniform in [16, 0.6 min(H, W)] px, aspect ratio log-uniform in [1/2, 2]."""
    h, w = size
    lo, hi = math.log(16.0), math.log(max(0.6 * min(h, w), 17.0))
    u = torch.rand(num, 4, generator=generator)
    side = torch.exp(lo + (hi - lo) * u[:, 0])
    aspect = torch.exp(math.log(2.0) * (2 * u[:, 1] - 1))
    bw = (side * aspect.sqrt()).clamp(4, w - 1)
    bh = (side / aspect.sqrt()).clamp(4, h - 1)
    x1 = u[:, 2] * (w - bw)
    y1 = u[:, 3] * (h - bh)
    return torch.stack([x1, y1, x1 + bw, y1 + bh], dim=1)


def random_targets(
    num_images: int, instances: int, size: tuple[int, int], num_classes: int, generator: torch.Generator
) -> list[dict[str, Tensor]]:
    """Per image ``boxes`` FloatTensor[instances, 4] and ``labels`` LongTensor[instances] in 0..K-1."""
    return [
        {
            "boxes": random_boxes(instances, size, generator),
            "labels": torch.randint(0, num_classes, (instances,), generator=generator),
        }
        for _ in range(num_images)
    ]


def pad_batch(images: list[Tensor], divisor: int) -> Tensor:
    """Zero-pad images at the bottom/right to a common size divisible by ``divisor`` -> [N, 3, Hp, Wp]."""
    h = max(im.shape[-2] for im in images)
    w = max(im.shape[-1] for im in images)
    hp, wp = padded_size((h, w), divisor)
    batch = images[0].new_zeros(len(images), images[0].shape[0], hp, wp)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[-2], : im.shape[-1]].copy_(im)
    return batch


# --------------------------------------------------------------------------- builders


def build_sapd(backbone: str = "resnet50", *, num_classes: int = 80, bfp: bool = False, dcn: bool = False) -> nn.Module:
    """SAPD of SPEC §1 with random weights: timm backbone, FPN 256 (optionally BFP), 4 x 256 head."""
    from sapd.models import FPN, SAPD, FeatureSelectionNet, SAPDHead, TimmBackbone

    return SAPD(
        num_classes=num_classes,
        backbone=TimmBackbone(name=backbone, pretrained=False, dcn=dcn),
        neck=partial(FPN, out_channels=256, num_levels=5, bfp=bfp),
        head=partial(SAPDHead, feat_channels=256, num_convs=4),
        selection=partial(FeatureSelectionNet, roi_size=7, channels=256),
    )


def _no_resize_transform(size_divisible: int) -> nn.Module:
    """A ``GeneralizedRCNNTransform`` that only pads (no normalisation, no resize)."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class PadOnlyTransform(GeneralizedRCNNTransform):
        """Images arrive normalised and sized; only batch them with zero padding to ``size_divisible``."""

        def normalize(self, image: Tensor) -> Tensor:
            return image

        def resize(self, image: Tensor, target: dict | None = None) -> tuple[Tensor, dict | None]:
            return image, target

    return PadOnlyTransform(1, 1, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], size_divisible=size_divisible)


def build_torchvision(kind: str, backbone: str = "resnet50", *, num_classes: int = 80, pad: int = 128) -> nn.Module:
    """torchvision ``RetinaNet`` or ``FCOS`` on a frozen-BN ResNet-FPN (see the module docstring)."""
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    body = resnet_fpn_backbone(
        backbone_name=backbone,
        weights=None,
        norm_layer=FrozenBatchNorm2d,
        trainable_layers=3,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),
    )
    post = {"score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_img": 100, "topk_candidates": 1000}
    if kind == "retinanet":
        model = RetinaNet(body, num_classes, **post)
    elif kind == "fcos":
        model = FCOS(body, num_classes, **post)
    else:
        raise ValueError(f"unknown torchvision detector {kind!r}")
    model.transform = _no_resize_transform(pad)
    return model


def cls_bias(model: nn.Module) -> Tensor:
    """The bias of the final classification conv of a SAPD / RetinaNet / FCOS model."""
    if hasattr(model, "criterion"):  # SAPD
        return model.head.cls_out.bias
    return model.head.classification_head.cls_logits.bias


# --------------------------------------------------------------------------- workbench


class Workbench:
    """Builds (lazily, once) the models and inputs of a run and hands out one closure per measurement.

    Task names: ``infer/network/<model>``, ``infer/e2e/<model>`` (models ``sapd``, ``sapd_bfp``,
    ``retinanet``, ``fcos``), ``train/sapd_p1``, ``train/sapd_p2``, ``train/sapd_p2@<n>``, ``train/fcos``,
    ``assign/<n>`` and ``assign_big/<n>`` (loss part at ``assign_memory_size``), ``option/<variant>``,
    ``fps/<backbone>[_dcn]``.
    """

    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self._cache: dict = {}
        gen = torch.Generator().manual_seed(cfg.seed)
        self.images = [im.to(self.device) for im in random_images(cfg.train_batch, cfg.size, gen)]
        self.image1 = self.images[:1]
        self.x1 = pad_batch(self.image1, cfg.pad)  # [1, 3, Hp, Wp]: the network-only input of every model
        self.x_train = pad_batch(self.images, cfg.pad)
        self._gen_seed = cfg.seed + 1

    # ---- helpers
    def _cached(self, key, make: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def autocast(self, enabled: bool | None = None):
        """``torch.autocast`` for ``--amp`` (bf16 on CPU by default), else a null context."""
        enabled = self.cfg.amp if enabled is None else enabled
        if not enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.cfg.amp_dtype))

    def _memory_format(self, model: nn.Module, channels_last: bool) -> nn.Module:
        return model.to(memory_format=torch.channels_last) if channels_last else model

    def _input(self, x: Tensor, channels_last: bool) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def targets(self, instances: int, size: tuple[int, int] | None = None) -> list[dict[str, Tensor]]:
        """Cached random targets (batch ``train_batch``) with ``instances`` boxes per image."""
        size = size or self.cfg.size

        def make():
            gen = torch.Generator().manual_seed(self._gen_seed + instances * 7919 + size[0] * 31 + size[1])
            ts = random_targets(self.cfg.train_batch, instances, size, self.cfg.num_classes, gen)
            return [{k: v.to(self.device) for k, v in t.items()} for t in ts]

        return self._cached(("targets", instances, size), make)

    # ---- models
    def infer_model(self, name: str, backbone: str | None = None, dcn: bool = False) -> nn.Module:
        """An eval-mode detector ``sapd`` / ``sapd_bfp`` / ``retinanet`` / ``fcos`` for inference."""
        backbone = backbone or self.cfg.backbone

        def make():
            torch.manual_seed(self.cfg.seed)
            if name in ("sapd", "sapd_bfp"):
                model = build_sapd(backbone, num_classes=self.cfg.num_classes, bfp=name == "sapd_bfp", dcn=dcn)
            else:
                model = build_torchvision(name, backbone, num_classes=self.cfg.num_classes, pad=self.cfg.pad)
            if self.cfg.post == "cap":
                with torch.no_grad():
                    cls_bias(model).zero_()
            model = model.to(self.device).eval()
            return self._memory_format(model, self.cfg.channels_last)

        return self._cached(("infer", name, backbone, dcn), make)

    def train_model(self, name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
        """A train-mode ``sapd`` or ``fcos`` with its SGD optimizer (momentum 0.9, wd 1e-4, SPEC §6; a tiny
        lr keeps the random weights stable over the repetitions, the work per step is the same)."""

        def make():
            torch.manual_seed(self.cfg.seed)
            if name == "sapd":
                model = build_sapd(self.cfg.backbone, num_classes=self.cfg.num_classes)
            else:
                model = build_torchvision(name, self.cfg.backbone, num_classes=self.cfg.num_classes, pad=self.cfg.pad)
            model = self._memory_format(model.to(self.device).train(), self.cfg.channels_last)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.SGD(params, lr=self.cfg.lr, momentum=0.9, weight_decay=1e-4)
            return model, opt

        return self._cached(("train", name), make)

    # ---- tasks
    def task(self, name: str) -> Task:
        """The closure measured under ``name`` (see the class docstring)."""
        parts = name.split("/")
        if parts[0] == "infer":
            return self._infer_task(parts[1], parts[2])
        if parts[0] == "train":
            model, _, inst = parts[1].partition("@")
            instances = int(inst) if inst else self.cfg.train_instances
            if model.startswith("sapd_p"):
                return self._sapd_train_task(int(model[-1]), instances)
            return self._torchvision_train_task(model, instances)
        if parts[0] in ("assign", "assign_big"):
            big = parts[0] == "assign_big"
            return self._assign_task(int(parts[1]), self.cfg.assign_memory_size if big else self.cfg.size)
        if parts[0] == "option":
            return self._option_task(parts[1])
        if parts[0] == "fps":
            return self._fps_task(parts[1].removesuffix("_dcn"), parts[1].endswith("_dcn"))
        raise KeyError(f"unknown task {name!r}")

    def _infer_task(self, mode: str, name: str) -> Task:
        model = self.infer_model(name)
        x = self._input(self.x1, self.cfg.channels_last)
        image_sizes = [tuple(im.shape[-2:]) for im in self.image1]
        sapd = name.startswith("sapd")
        amp = self.autocast

        if mode == "network":
            if sapd:

                def run():
                    with torch.inference_mode(), amp():
                        return model(x)["cls_logits"].shape[1]
            else:

                def run():
                    with torch.inference_mode(), amp():
                        return model.head(list(model.backbone(x).values()))["cls_logits"].shape[1]

            return run
        if mode != "e2e":
            raise KeyError(mode)
        if sapd:

            def run():
                with torch.inference_mode(), amp():
                    batch = self._input(pad_batch(self.image1, self.cfg.pad), self.cfg.channels_last)
                    dets = model.postprocess(model(batch), image_sizes)
                return {"detections": float(len(dets[0]["boxes"]))}
        else:

            def run():
                with torch.inference_mode(), amp():
                    dets = model(self.image1)
                return {"detections": float(len(dets[0]["boxes"]))}

        return run

    def _sapd_train_task(self, phase: int, instances: int) -> Task:
        model, opt = self.train_model("sapd")
        targets = self.targets(instances)
        x = self._input(self.x_train, self.cfg.channels_last)
        sync = partial(_sync, self.device)

        def run():
            model.set_phase(phase)
            with self.autocast():
                with torch.profiler.record_function("sapd/forward"):
                    outputs = model(x)
                sync()
                t0 = time.perf_counter()
                with torch.profiler.record_function("sapd/loss"):
                    losses = model.loss(outputs, targets)
                sync()
                t_loss = time.perf_counter() - t0
            with torch.profiler.record_function("sapd/backward"):
                losses["total"].backward()
            with torch.profiler.record_function("sapd/optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
            return {"loss_forward": t_loss}

        return run

    def _torchvision_train_task(self, name: str, instances: int) -> Task:
        model, opt = self.train_model(name)
        targets = self.targets(instances)
        images = self.images

        def run():
            with self.autocast():
                losses = model(images, targets)
            sum(losses.values()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    def head_outputs(self, size: tuple[int, int]) -> dict:
        """Real SAPD head outputs (batch ``train_batch``, one no-grad forward at ``size``) as leaf tensors
        with ``requires_grad``: the loss part's input with the network cut off."""

        def make():
            model, _ = self.train_model("sapd")
            gen = torch.Generator().manual_seed(self.cfg.seed + 2)
            imgs = [im.to(self.device) for im in random_images(self.cfg.train_batch, size, gen)]
            with torch.no_grad():
                out = model(pad_batch(imgs, self.cfg.pad))

            def leaf(t: Tensor) -> Tensor:
                return t.detach().clone().requires_grad_(True)

            return {
                "cls_logits": leaf(out["cls_logits"]),
                "box_reg": leaf(out["box_reg"]),
                "features": [leaf(f) for f in out["features"]],
                "level_sizes": out["level_sizes"],
            }

        return self._cached(("head_outputs", size), make)

    def _assign_task(self, instances: int, size: tuple[int, int]) -> Task:
        model, _ = self.train_model("sapd")
        outputs = self.head_outputs(size)
        targets = self.targets(instances, size)
        leaves = [outputs["cls_logits"], outputs["box_reg"], *outputs["features"]]

        def run():
            model.set_phase(2)
            losses = model.loss(outputs, targets)  # targets + losses + selection net
            losses["total"].backward()  # their backward, down to the (leaf) head outputs
            model.zero_grad(set_to_none=True)
            for t in leaves:
                t.grad = None

        return run

    def option_variants(self) -> list[str]:
        """SAPD inference speed options measured side by side (network only)."""
        variants = ["fp32", "channels_last", "bf16_autocast", "channels_last+bf16_autocast", "bf16_weights"]
        if self.device.type == "cuda":
            variants += ["fp16_autocast", "channels_last+fp16_autocast"]
        if self.cfg.compile:
            variants += ["compile", "channels_last+compile"]
        return variants

    def _option_model(self, variant: str) -> nn.Module:
        def make():
            base = self.infer_model("sapd")
            model = copy.deepcopy(base).to(memory_format=torch.contiguous_format)
            if "channels_last" in variant:
                model = model.to(memory_format=torch.channels_last)
            if variant == "bf16_weights":
                model = model.to(torch.bfloat16)
            if "compile" in variant:
                model = torch.compile(model)
            return model

        return self._cached(("option", variant), make)

    def _option_task(self, variant: str) -> Task:
        model = self._option_model(variant)
        x = self.x1.contiguous()
        if "channels_last" in variant:
            x = x.contiguous(memory_format=torch.channels_last)
        if variant == "bf16_weights":
            x = x.to(torch.bfloat16)
        ctx = contextlib.nullcontext
        if "autocast" in variant:
            dtype = torch.float16 if "fp16" in variant else torch.bfloat16
            ctx = partial(torch.autocast, self.device.type, dtype=dtype)

        def run():
            with torch.inference_mode(), ctx():
                return model(x)["cls_logits"].shape[1]

        return run

    def _fps_task(self, backbone: str, dcn: bool) -> Task:
        model = self.infer_model("sapd_bfp", backbone=backbone, dcn=dcn)
        image_sizes = [tuple(im.shape[-2:]) for im in self.image1]

        def run():
            with torch.inference_mode(), self.autocast():
                batch = self._input(pad_batch(self.image1, self.cfg.pad), self.cfg.channels_last)
                return {"detections": float(len(model.postprocess(model(batch), image_sizes)[0]["boxes"]))}

        return run

    def num_parameters(self, name: str) -> int:
        return sum(p.numel() for p in self.infer_model(name).parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
