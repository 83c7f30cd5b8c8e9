"""What the speed suite runs: the models, the shared inputs, and one closure per measured call.

All detectors get the same backbone configuration, the same padded input tensor and the same
post-processing numbers:

- SAPD: composed from the project's ``conf/`` (``model=sapd`` with random weights, :mod:`.configs`):
  timm backbone with frozen BatchNorm and frozen stem and first stage, FPN P3-P7 of 256 channels
  (``sapd_bfp``: with BFP), a 4 x 256 head, the feature-selection net; ``overrides`` change it as on
  the training command line.
- torchvision RetinaNet / FCOS: ``resnet_fpn_backbone(norm_layer=FrozenBatchNorm2d, trainable_layers=3,
  returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))`` - the backbone that
  ``retinanet_resnet50_fpn`` / ``fcos_resnet50_fpn`` build when ``weights_backbone`` is given
  (torchvision ``models/detection/retinanet.py``, ``fcos.py``). With ``weights_backbone=None`` those
  factories switch to trainable ``BatchNorm2d`` and five trainable stages, which would not be the
  detector anyone trains; with random weights here the two are the same network otherwise.
  Their ``GeneralizedRCNNTransform`` is replaced by one that neither normalises nor resizes, only pads
  to the same size divisor, so they see the very tensor SAPD sees.
- Post-processing: the numbers of SAPD's ``model.postprocess`` node (score > 0.05, top 1000 per level,
  NMS IoU 0.5, 100 detections) for all three (torchvision's defaults differ: FCOS 0.2 / 0.6,
  RetinaNet 300 detections).
- Padding: the project's :func:`sapd.data.transforms.collate` pads every batch.
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
from dataclasses import asdict, dataclass, fields
from functools import partial

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from sapd.data.transforms import collate

from .cli import option
from .configs import sapd_config
from .measure import synchronize

Task = Callable[[], object]


CHOICES = {"memory": ("subprocess", "inprocess", "off"), "post": ("cap", "init"), "amp_dtype": ("bfloat16", "float16")}


@dataclass
class BenchConfig:
    """Every setting of a speed run: the command line maps onto it one to one; stored in the results."""

    device: str = option("cpu", "cpu or cuda[:i]; cuda also sets size=[800,1333], more repetitions, fps, fp16")
    size: tuple[int, int] = option((512, 853), "[H,W] of the image before padding (CUDA: [800,1333])")
    pad: int = option(128, "size divisor of the padded input (the SAPD collate of COCO: 128)")
    backbone: str = option("resnet50", "timm / torchvision ResNet name for all three detectors")
    num_classes: int = option(80, "K, the number of classes")
    threads: int = option(0, "torch threads (0: all logical cores)")
    warmup: int = option(1, "warm-up rounds dropped before timing")
    reps_infer: int = option(5, "timed rounds for inference")
    reps_train: int = option(5, "timed rounds for training steps")
    reps_assign: int = option(7, "timed rounds for the loss part (3 at assign_memory_size)")
    train_batch: int = option(2, "images per training step")
    train_instances: int = option(10, "ground-truth boxes per image in training")
    share_instances: tuple[int, ...] = option((10, 100), "instances per image for the loss part's share of a step")
    assign_instances: tuple[int, ...] = option((1, 10, 100, 500), "instances per image for the loss part alone")
    assign_memory_size: tuple[int, int] = option((800, 1333), "[H,W] of the big-assignment memory check")
    assign_memory_instances: int = option(500, "instances per image there")
    memory: str = option("subprocess", "peak memory: subprocess (fresh process each) | inprocess | off")
    channels_last: bool = option(False, "all models and inputs in channels_last")
    amp: bool = option(False, "autocast for all models (see amp_dtype)")
    amp_dtype: str = option("bfloat16", "bfloat16 | float16 (CUDA default: float16)")
    compile: bool = option(False, "also time torch.compile of the SAPD network (slow on CPU)")
    options: bool = option(True, "the speed-options section (false skips it)")
    fps: bool = option(False, "the FPS table on this device (always on with cuda)")
    fps_backbones: tuple[str, ...] = option(("resnet50", "resnet101", "resnext101_64x4d"), "backbones of the FPS table")
    fps_reps: int = option(10, "timed rounds of the FPS table")
    post: str = option("cap", "cap: scores ~0.5, every level fills 1000 NMS candidates; init: prior-0.01 bias")
    overrides: tuple[str, ...] = option((), "Hydra overrides of conf/ for every SAPD, e.g. [model.neck.bfp=true]")
    lr: float = option(1e-6, "SGD learning rate (tiny: keeps random weights stable; same work per step)")
    seed: int = option(0, "seed of the weights and the inputs")
    profile: bool = option(False, "add torch.profiler tables of the SAPD step and inference")
    quick: bool = option(False, "tiny sizes, resnet18, 1-2 repetitions, memory in process (smoke runs, tests)")
    out: str = option("benchmarks/results.json", "JSON path; the Markdown is written beside it (.md)")

    def __post_init__(self) -> None:
        for f in fields(self):  # YAML lists from the command line -> the tuples above
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, tuple(value))
        if str(self.memory).lower() == "false":  # YAML reads memory=off as the boolean false
            self.memory = "off"
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BenchConfig:
        return cls(**data)


def padded_size(size: tuple[int, int], divisor: int) -> tuple[int, int]:
    """``(H, W)`` rounded up to multiples of ``divisor``: the ``pad_size`` the project's collate gives."""
    h, w = size
    return math.ceil(h / divisor) * divisor, math.ceil(w / divisor) * divisor


def batch_images(images: list[Tensor], divisor: int) -> Tensor:
    """Images FloatTensor[3, h_i, w_i] -> the padded batch [N, 3, Hp, Wp] of :func:`sapd.data.transforms.collate`."""
    batch, _ = collate([(im, {}) for im in images], size_divisor=divisor)
    return batch


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


# --------------------------------------------------------------------------- builders


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


def torchvision_postprocess(postprocess: DictConfig | dict) -> dict:
    """SAPD's ``model.postprocess`` node as the keyword arguments of torchvision's RetinaNet / FCOS."""
    return {
        "score_thresh": float(postprocess["score_thresh"]),
        "nms_thresh": float(postprocess["nms_thresh"]),
        "detections_per_img": int(postprocess["max_detections"]),
        "topk_candidates": int(postprocess["pre_nms_topk"]),
    }


def build_torchvision(
    kind: str,
    backbone: str = "resnet50",
    *,
    num_classes: int = 80,
    pad: int = 128,
    postprocess: DictConfig | dict | None = None,
) -> nn.Module:
    """torchvision ``RetinaNet`` or ``FCOS`` on a frozen-BN ResNet-FPN (see the module docstring).

    Args:
        postprocess: SAPD's ``model.postprocess`` node (None: the one of ``conf/model/sapd.yaml``).
    """
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if postprocess is None:
        postprocess = sapd_config().model.postprocess
    body = resnet_fpn_backbone(
        backbone_name=backbone,
        weights=None,
        norm_layer=FrozenBatchNorm2d,
        trainable_layers=3,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),
    )
    post = torchvision_postprocess(postprocess)
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
        self.x1 = batch_images(self.image1, cfg.pad)  # [1, 3, Hp, Wp]: the network-only input of every model
        self.x_train = batch_images(self.images, cfg.pad)
        self._gen_seed = cfg.seed + 1

    # ---- helpers
    def _cached(self, key, make: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def autocast(self, enabled: bool | None = None):
        """``torch.autocast`` for ``amp=true`` (bf16 on CPU by default), else a null context."""
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
    def sapd_config(self, *, bfp: bool = False, backbone: str | None = None, dcn: bool = False) -> DictConfig:
        """The composed training config whose ``model`` node builds this run's SAPD (cached)."""
        backbone = backbone or self.cfg.backbone
        key = ("sapd_config", bfp, backbone, dcn)
        return self._cached(key, lambda: sapd_config(backbone, bfp=bfp, dcn=dcn, extra=self.cfg.overrides))

    def build_sapd(self, *, bfp: bool = False, backbone: str | None = None, dcn: bool = False) -> nn.Module:
        """A new SAPD with random weights: ``instantiate(cfg.model, num_classes=K)`` of :meth:`sapd_config`."""
        from hydra.utils import instantiate

        cfg = self.sapd_config(bfp=bfp, backbone=backbone, dcn=dcn)
        return instantiate(cfg.model, num_classes=self.cfg.num_classes)

    def build_torchvision(self, name: str, backbone: str | None = None) -> nn.Module:
        """torchvision ``retinanet`` / ``fcos`` with SAPD's post-processing numbers and this run's padding."""
        return build_torchvision(
            name,
            backbone or self.cfg.backbone,
            num_classes=self.cfg.num_classes,
            pad=self.cfg.pad,
            postprocess=self.sapd_config().model.postprocess,
        )

    def infer_model(self, name: str, backbone: str | None = None, dcn: bool = False) -> nn.Module:
        """An eval-mode detector ``sapd`` / ``sapd_bfp`` / ``retinanet`` / ``fcos`` for inference."""
        backbone = backbone or self.cfg.backbone

        def make():
            torch.manual_seed(self.cfg.seed)
            if name in ("sapd", "sapd_bfp"):
                model = self.build_sapd(bfp=name == "sapd_bfp", backbone=backbone, dcn=dcn)
            else:
                model = self.build_torchvision(name, backbone)
            if self.cfg.post == "cap":
                with torch.no_grad():
                    cls_bias(model).zero_()
            model = model.to(self.device).eval()
            return self._memory_format(model, self.cfg.channels_last)

        return self._cached(("infer", name, backbone, dcn), make)

    def train_model(self, name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
        """A train-mode ``sapd`` or ``fcos`` with its SGD optimizer (momentum 0.9, weight decay 1e-4 as the
        COCO recipe; a tiny lr keeps the random weights stable over the repetitions, the work per step is the
        same)."""

        def make():
            torch.manual_seed(self.cfg.seed)
            model = self.build_sapd() if name == "sapd" else self.build_torchvision(name)
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
                    batch = self._input(batch_images(self.image1, self.cfg.pad), self.cfg.channels_last)
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
        sync = partial(synchronize, self.device)

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
                out = model(batch_images(imgs, self.cfg.pad))

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
                batch = self._input(batch_images(self.image1, self.cfg.pad), self.cfg.channels_last)
                return {"detections": float(len(model.postprocess(model(batch), image_sizes)[0]["boxes"]))}

        return run

    def num_parameters(self, name: str) -> int:
        return sum(p.numel() for p in self.infer_model(name).parameters())
