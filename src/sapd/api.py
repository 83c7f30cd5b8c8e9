"""The Python API for running a trained detector on images.

.. code-block:: python

    from sapd import Detector

    det = Detector.from_checkpoint("logs/train/runs/<time>/checkpoints/last.ckpt", device="cpu")
    result = det("photo.jpg")                        # one image -> one Detections
    results = det(["a.jpg", pil_image, array], batch_size=8, score_thresh=0.2)  # a list -> a list
    # score_thresh: SCORE_THRESH (0.4, as python -m sapd.predict) unless given; None: all the model returns

Inputs, alone or in a list (a list may mix kinds):

- a path (``str`` or :class:`pathlib.Path`): decoded by :func:`sapd.data.io.read_image`, the decoder
  of training and evaluation (EXIF orientation applied, any mode to RGB);
- a PIL image of any mode (brought upright and to RGB the same way);
- a numpy array ``(H, W, 3)`` of ``uint8`` in **RGB** channel order (OpenCV's ``cv2.imread`` gives
  BGR: pass ``img[..., ::-1]``);
- a torch tensor ``(3, H, W)``, ``uint8`` in 0..255 or floating point in [0, 1], RGB, on any device;
  a 4-D tensor ``(N, 3, H, W)`` or array ``(N, H, W, 3)`` counts as a list of N images.

Each image is resized as the run's validation resized it (``eval_size`` of the checkpoint's data
config), normalised and padded by :func:`sapd.data.transforms.collate`; images are run in batches of
``batch_size``. A batch only ever holds images of the same padded size, so that an image's
detections do not depend on which other images share its batch (GroupNorm in the head and the
convolutions at the image border see the padding). Boxes come back in the pixels of the image as
given (of the upright image for a file or a PIL image with an EXIF orientation), as CPU tensors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor

from sapd.data.transforms import collate, eval_size, preprocess_image
from sapd.inputs import ImageInput, as_list, check_input, is_single, to_pil

if TYPE_CHECKING:
    from omegaconf import DictConfig

# The default score threshold of Detector and of ``python -m sapd.predict`` (conf/predict.yaml reads it as
# ``${sapd.score_thresh:}``, as do the run reports' drawings): 0.4 maximised F1 of the kept boxes against the
# ground truth (same class, IoU >= 0.5) on the 250 synthetic validation images for a default-budget +SW+SS
# checkpoint (49.5 AP), 2026-11-25 (docs/decisions/score_thresh_default.md; benchmarks/score_threshold.py). A model
# trained only a few steps scores lower: give it score_thresh=0.05, or None for the model's own threshold.
SCORE_THRESH = 0.4

log = logging.getLogger(__name__)

__all__ = ["Detections", "Detector", "ImageInput", "check_input", "resolve_device", "run_eval_size", "to_pil"]


@dataclass
class Detections:
    """The detections of one image, sorted by decreasing score (CPU tensors).

    Attributes:
        boxes: FloatTensor[D, 4], ``x1, y1, x2, y2`` in the pixels of the original image.
        scores: FloatTensor[D], in [0, 1].
        labels: LongTensor[D], contiguous class indices 0..K-1.
        category_ids: LongTensor[D], the data set's category ids (the COCO ids of the annotations).
        names: the class name of each detection (D strings).
        image_size: ``(height, width)`` of the original image.

    ``result["boxes"]`` reads a field as from a dict (so a result can be passed where sapd takes a
    detection dict, e.g. :func:`sapd.diagnostics.detections.draw_detections`); ``result[:5]`` or
    ``result[result.scores > 0.5]`` selects detections; :meth:`to_records` gives JSON-ready rows.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    category_ids: Tensor
    names: list[str] = field(default_factory=list)
    image_size: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return int(self.scores.numel())

    def __getitem__(self, key: str | int | slice | Tensor) -> Any:
        """``result["boxes"]``: a field; ``result[:10]`` or ``result[result.scores > 0.5]``: those detections."""
        if isinstance(key, str):
            if key not in self.__dataclass_fields__:
                raise KeyError(f"Detections has no field {key!r}; fields: {', '.join(self.__dataclass_fields__)}")
            return getattr(self, key)
        idx = torch.arange(len(self))[key].reshape(-1)  # slice, int, index or bool-mask tensor -> row indices
        return Detections(
            boxes=self.boxes[idx],
            scores=self.scores[idx],
            labels=self.labels[idx],
            category_ids=self.category_ids[idx],
            names=[self.names[i] for i in idx.tolist()],
            image_size=self.image_size,
        )

    def keys(self) -> list[str]:
        return list(self.__dataclass_fields__)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (tensors are not copied)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def to_records(self, decimals: int = 2) -> list[dict[str, Any]]:
        """JSON-ready rows: ``bbox_xyxy``, ``score``, ``label``, ``category_id``, ``category_name`` per detection."""
        return [
            {
                "bbox_xyxy": [round(v, decimals) for v in box],
                "score": round(score, 4),
                "label": label,
                "category_id": cat,
                "category_name": name,
            }
            for box, score, label, cat, name in zip(
                self.boxes.tolist(), self.scores.tolist(), self.labels.tolist(), self.category_ids.tolist(), self.names
            )
        ]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` / None -> CUDA when available, else CPU; a CUDA device that is absent is one clear error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a device: {exc} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but torch sees no CUDA GPU here; use device=cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def run_eval_size(data_cfg: Mapping | DictConfig) -> tuple[int, int | None]:
    """The (shorter side, longer-side cap) at which a run with data config ``data_cfg`` was validated."""
    return eval_size(
        data_cfg.get("min_size", 800),
        data_cfg.get("max_size", 1333),
        data_cfg.get("val_min_size"),
        data_cfg.get("val_max_size"),
    )


def _check_thresh(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in [0, 1]; got {value!r}") from None
    if not 0.0 <= out <= 1.0:
        raise ValueError(f"{what} must be in [0, 1]; got {value!r}")
    return out


class Detector:
    """A trained detector ready for inference: inputs in, :class:`Detections` in original pixels out.

    Build it with :meth:`from_checkpoint` (or from a network and its settings), then call it on one
    image or a list of images (see the module docstring for the accepted kinds).

    Args:
        net: the plain-PyTorch detector (``forward(images)`` and ``postprocess(outputs, image_sizes,
            scale_factors)``), e.g. ``module.net`` of a :class:`sapd.module.SAPDLitModule`.
        min_size, max_size: shorter side and longer-side cap images are resized to.
        size_divisor: padding multiple of the batch (the run's ``data.size_divisor``).
        class_names: name of each contiguous label (None: the label number as text).
        category_ids: data-set category id of each contiguous label (None: the label).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a torch.device.
        score_thresh: detections below it are dropped (:data:`SCORE_THRESH`, 0.4, by default); None: the
            network's post-processing threshold (``model.postprocess.score_thresh``, 0.05), i.e. all it returns.
        channels_last: feed batches in channels-last memory format (as the run did).
    """

    def __init__(
        self,
        net: torch.nn.Module,
        *,
        min_size: int,
        max_size: int | None,
        size_divisor: int = 32,
        class_names: Sequence[str] | None = None,
        category_ids: Sequence[int] | None = None,
        device: str | torch.device | None = "auto",
        score_thresh: float | None = SCORE_THRESH,
        channels_last: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self.net = net.to(self.device).eval()
        self.min_size, self.max_size = int(min_size), (None if max_size is None else int(max_size))
        self.size_divisor = max(int(size_divisor), 1)
        self.channels_last = bool(channels_last)
        post = getattr(net, "postprocessor", None)
        self.model_score_thresh = float(getattr(post, "score_thresh", 0.0))
        self.score_thresh = _check_thresh(score_thresh, "score_thresh")
        if self.score_thresh is None:
            self.score_thresh = self.model_score_thresh
        num = len(class_names) if class_names is not None else len(category_ids) if category_ids is not None else None
        self.names: list[str] = list(class_names) if class_names is not None else [str(i) for i in range(num or 0)]
        self.category_ids: list[int] = (
            [int(c) for c in category_ids] if category_ids is not None else list(range(len(self.names)))
        )
        self.run_config: DictConfig | None = None

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        device: str | torch.device | None = "auto",
        score_thresh: float | None = SCORE_THRESH,
        min_size: int | None = None,
        max_size: int | None = None,
    ) -> Detector:
        """The detector of a sapd training checkpoint (its model and data config travel inside it).

        Images are resized to the run's evaluation size unless ``min_size`` / ``max_size`` are given;
        ``score_thresh`` as in the class (None: the model's own threshold).
        Raises :class:`sapd.checkpoint.CheckpointError` naming the file when it cannot be loaded.
        """
        from sapd.checkpoint import load_detector  # Hydra: only when a checkpoint is read

        module, run_cfg = load_detector(path)
        eval_min, eval_max = run_eval_size(run_cfg.data)
        det = cls(
            module.net,
            min_size=eval_min if min_size is None else min_size,
            max_size=eval_max if max_size is None else max_size,
            size_divisor=int(run_cfg.data.get("size_divisor", 32)),
            class_names=module.class_names,
            category_ids=module.label_to_cat_id,
            device=device,
            score_thresh=score_thresh,
            channels_last=module.channels_last,
        )
        det.run_config = run_cfg
        return det

    def __repr__(self) -> str:
        return (
            f"Detector({type(self.net).__name__}, {len(self.names)} classes, device={self.device}, "
            f"size={self.min_size}/{self.max_size}, score_thresh={self.score_thresh})"
        )

    def to(self, device: str | torch.device) -> Detector:
        """Moves the network to ``device`` (in place) and returns the detector."""
        self.device = resolve_device(device)
        self.net.to(self.device)
        return self

    # ------------------------------------------------------------------ running

    def __call__(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        score_thresh: float | None = None,
        batch_size: int = 8,
    ) -> Detections | list[Detections]:
        """Detections of one image (-> :class:`Detections`) or of a list of images (-> list, same order).

        Args:
            images: one input or a list of inputs (see the module docstring).
            score_thresh: drop detections below it for this call (None: ``self.score_thresh``).
            batch_size: images per forward pass (results do not depend on it).
        """
        single = is_single(images)
        items = [images] if single else as_list(images)
        name = "image" if single else "images"
        for i, item in enumerate(items):  # fail before any work on a bad item of a long list
            check_input(item, name if single else f"{name}[{i}]")
        out: list[Detections | None] = [None] * len(items)
        for i, result in self._stream(items, score_thresh, batch_size, name):
            out[i] = result
        return out[0] if single else out  # type: ignore[return-value]

    def stream(
        self,
        images: Iterable[ImageInput],
        *,
        score_thresh: float | None = None,
        batch_size: int = 8,
    ) -> Iterator[tuple[int, Detections]]:
        """Yields ``(index, Detections)`` as batches finish, reading ``images`` lazily.

        For long sequences (a folder of photos): at most one partial batch per padded size is held
        in memory. Results come out of order (grouped by padded size); ``index`` is the input's position.
        """
        return self._stream(images, score_thresh, batch_size, "images")

    def _stream(
        self, images: Iterable[ImageInput], score_thresh: float | None, batch_size: int, name: str
    ) -> Iterator[tuple[int, Detections]]:
        thresh = self.score_thresh if score_thresh is None else _check_thresh(score_thresh, "score_thresh")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
        pending: dict[tuple[int, int], list[tuple[int, Tensor, dict]]] = {}
        for index, image in enumerate(images):
            where = name if name == "image" else f"{name}[{index}]"
            tensor, meta = preprocess_image(to_pil(image, where), min_size=self.min_size, max_size=self.max_size)
            d = self.size_divisor
            key = (math.ceil(tensor.shape[-2] / d) * d, math.ceil(tensor.shape[-1] / d) * d)
            group = pending.setdefault(key, [])
            group.append((index, tensor, meta))
            if len(group) == batch_size:
                yield from self._run(pending.pop(key), thresh)
        for key in list(pending):
            yield from self._run(pending.pop(key), thresh)

    def _run(self, group: list[tuple[int, Tensor, dict]], thresh: float) -> Iterator[tuple[int, Detections]]:
        """One forward pass over images of one padded size; results on the CPU, outside inference mode."""
        indices = [i for i, _, _ in group]
        metas = [m for _, _, m in group]
        with torch.inference_mode():
            images, _ = collate([(t, dict(m)) for _, t, m in group], size_divisor=self.size_divisor)
            if self.device.type == "cuda":
                images = images.pin_memory()
            images = images.to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            outputs = self.net(images)
            dets = self._postprocess(
                outputs,
                [tuple(m["img_size"]) for m in metas],
                [tuple(m["scale_factor"]) for m in metas],
                thresh,
            )
            dets = [{k: v.cpu() for k, v in det.items()} for det in dets]
        # clones made outside inference mode: the caller may edit them in place or use them in autograd
        for index, meta, det in zip(indices, metas, dets):
            yield index, self._detections(det, meta, thresh)

    def _postprocess(self, outputs: dict, image_sizes: list, scale_factors: list, thresh: float) -> list[dict]:
        post = getattr(self.net, "postprocessor", None)
        if post is None or thresh >= float(post.score_thresh):
            return self.net.postprocess(outputs, image_sizes, scale_factors)
        # below the network's own threshold: this call's threshold, the shared network left as it is
        return self.net.postprocess(outputs, image_sizes, scale_factors, score_thresh=thresh)

    def _detections(self, det: dict[str, Tensor], meta: dict, thresh: float) -> Detections:
        keep = det["scores"] >= thresh
        labels = det["labels"][keep].clone().long()
        label_list = labels.tolist()
        names = [self.names[i] if i < len(self.names) else str(i) for i in label_list]
        cats = [self.category_ids[i] if i < len(self.category_ids) else i for i in label_list]
        return Detections(
            boxes=det["boxes"][keep].clone().float(),
            scores=det["scores"][keep].clone().float(),
            labels=labels,
            category_ids=torch.tensor(cats, dtype=torch.long),
            names=names,
            image_size=(int(meta["orig_size"][0]), int(meta["orig_size"][1])),
        )

    def draw(self, image: ImageInput, result: Detections) -> Image.Image:
        """``image`` (any input kind, upright RGB) with the boxes of ``result`` drawn and labelled."""
        from sapd.data.io import to_rgb
        from sapd.diagnostics.detections import draw_detections

        return draw_detections(to_rgb(to_pil(image)), result, self.names)
