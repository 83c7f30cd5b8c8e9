"""COCODetection on a small hand-written COCO json holding COCO's quirks, and its error messages."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sapd.data import DataError
from sapd.data.coco import COCODetection
from sapd.data.io import SkippedImage
from sapd.data.transforms import build_transforms, collate, denormalize

# crowd mask: rows 5..14 x cols 30..39 of a 48 x 64 image, as uncompressed column-major RLE
CROWD_RLE = {"counts": [30 * 48 + 5] + [10, 38] * 9 + [10, 33 + 24 * 48], "size": [48, 64]}


def _write_quirky_set(root: Path) -> tuple[Path, Path]:
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[:, :32] = (200, 30, 30)
    Image.fromarray(rgb).save(img_dir / "rgb.jpg", quality=95)
    Image.new("L", (40, 30), 128).save(img_dir / "gray.png")
    Image.new("RGBA", (40, 30), (10, 200, 10, 0)).save(img_dir / "rgba.png")
    pal = Image.new("P", (40, 30), 1)
    pal.putpalette([0, 0, 0, 0, 0, 250] + [0] * 762)
    pal.save(img_dir / "palette.png", transparency=0)
    # stored 50 wide x 30 tall with a red top-left corner; EXIF orientation 6 (rotate 90 clockwise
    # for display) makes it 30 wide x 50 tall with the red corner at the top right
    raw = np.full((30, 50, 3), 255, np.uint8)
    raw[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(raw).save(img_dir / "exif.jpg", exif=exif, quality=95)
    Image.new("RGB", (20, 20), (0, 0, 0)).save(img_dir / "empty.jpg")
    images = [
        {"id": 11, "file_name": "rgb.jpg", "width": 64, "height": 48},
        {"id": 12, "file_name": "gray.png", "width": 40, "height": 30},
        {"id": 13, "file_name": "rgba.png", "width": 40, "height": 30},
        {"id": 14, "file_name": "palette.png", "width": 40, "height": 30},
        {"id": 15, "file_name": "exif.jpg", "width": 30, "height": 50},
        {"id": 16, "file_name": "empty.jpg", "width": 20, "height": 20},
    ]

    def ann(i, img, cat, bbox, **kw):
        return {"id": i, "image_id": img, "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3],
                "iscrowd": 0, "segmentation": [], **kw}  # fmt: skip

    annotations = [
        ann(1, 11, 5, [4, 4, 20, 10]),
        ann(2, 11, 5, [50, 30, 30, 30]),  # partly outside: clipped to the image for training
        ann(3, 11, 9, [10, 10, 0.5, 8]),  # degenerate (0.5 px wide)
        ann(4, 11, 2, [30, 5, 10, 10], iscrowd=1, segmentation=CROWD_RLE, area=100),
        ann(5, 12, 2, [1, 2, 10, 12]),
        ann(6, 13, 9, [5, 5, 20, 20]),
        ann(7, 14, 5, [0, 0, 40, 30]),
        ann(8, 15, 9, [2, 3, 20, 40]),
    ]
    categories = [  # out of order and with gaps: labels follow sorted ids
        {"id": 9, "name": "nine", "supercategory": "x"},
        {"id": 2, "name": "two", "supercategory": "x"},
        {"id": 5, "name": "five", "supercategory": "x"},
    ]
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_file, img_dir


@pytest.fixture
def quirky(tmp_path):
    return _write_quirky_set(tmp_path)


def _by_id(ds: COCODetection, image_id: int):
    return ds[ds.ids.index(image_id)]


def test_label_map_and_boxes(quirky):
    ds = COCODetection(*quirky)
    assert ds.num_classes == 3 and ds.label_to_cat_id == [2, 5, 9] and ds.class_names == ["two", "five", "nine"]
    assert ds.cat_id_to_label == {2: 0, 5: 1, 9: 2}
    assert len(ds) == 6  # the empty image is kept as a negative
    assert ds.stats["degenerate_boxes"] == 1 and ds.stats["crowd"] == 1 and ds.stats["empty_images"] == 1
    assert ds.stats["annotations"] == 8 and ds.stats["boxes"] == 6
    assert ds.stats["tiny_boxes"] == 1 and ds.stats["zero_size_boxes"] == ds.stats["outside_boxes"] == 0
    assert ds.stats["no_annotations"] == 1 and ds.stats["unknown_category"] == 0
    assert all(type(v) is int for v in ds.stats.values())  # a plain dict of ints, json-ready

    img, t = _by_id(ds, 11)
    assert img.shape == (3, 48, 64) and img.dtype == torch.float32
    assert torch.equal(t["boxes"], torch.tensor([[4.0, 4, 24, 14], [50, 30, 64, 48]]))  # xywh -> xyxy, clipped
    assert t["labels"].tolist() == [1, 1]
    assert torch.equal(t["crowd_boxes"], torch.tensor([[30.0, 5, 40, 15]]))
    assert t["image_id"] == 11 and t["orig_size"] == (48, 64) and t["scale_factor"] == (1.0, 1.0)
    # evaluation ground truth: every annotation, unclipped, original pixels, with crowd flags
    assert t["eval_boxes"].shape == (4, 4) and t["eval_boxes"][1].tolist() == [50, 30, 80, 60]
    assert t["eval_labels"].tolist() == [1, 1, 2, 0]
    assert t["eval_iscrowd"].tolist() == [False, False, False, True]
    assert t["eval_area"].tolist() == [200, 900, 4, 100]

    _, empty = _by_id(ds, 16)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["eval_boxes"].shape == (0, 4)
    assert len(COCODetection(*quirky, drop_empty=True)) == 5


def test_crowd_rle_is_valid_coco(quirky):
    ds = COCODetection(*quirky)
    crowd = ds.coco.loadAnns([4])[0]
    m = ds.coco.annToMask(crowd)
    assert m.sum() == 100 and m[5:15, 30:40].all()


def test_image_modes_become_rgb_and_exif_is_applied(quirky):
    ds = COCODetection(*quirky)
    for image_id, colour in ((12, (128, 128, 128)), (13, (10, 200, 10)), (14, (0, 0, 250))):
        img, _ = _by_id(ds, image_id)
        assert img.shape == (3, 30, 40)
        px = denormalize(img)[:, 15, 20] * 255
        assert torch.allclose(px, torch.tensor(colour, dtype=torch.float32), atol=1.0), (image_id, px)
    img, t = _by_id(ds, 15)
    assert img.shape == (3, 50, 30) and t["orig_size"] == (50, 30)
    rgb = denormalize(img) * 255
    assert rgb[0, 2, 27] > 200 and rgb[1, 2, 27] < 60  # red corner now at the top right
    assert rgb[1, 2, 2] > 200  # the top left is white


def test_transforms_map_back_to_original_pixels(quirky):
    tf = build_transforms(train=True, min_size=[70, 90], max_size=120, flip_prob=0.0)
    ds = COCODetection(*quirky, transforms=tf)
    raw = COCODetection(*quirky)
    for i in range(len(ds)):
        img, t = ds[i]
        _, r = raw[i]
        sx, sy = t["scale_factor"]
        assert tuple(img.shape[1:]) == t["img_size"]
        assert 70 <= min(t["img_size"]) <= 90 or max(t["img_size"]) == 120
        back = t["boxes"] / torch.tensor([sx, sy, sx, sy])
        assert torch.allclose(back, r["boxes"], atol=1e-4)
        assert torch.equal(t["eval_boxes"], r["eval_boxes"])  # evaluation stays in original pixels


def test_image_info_only_json(tmp_path, quirky):
    ann_file, img_dir = quirky
    ds = json.loads(ann_file.read_text())
    del ds["annotations"]
    info = tmp_path / "image_info_test-dev.json"
    info.write_text(json.dumps(ds))
    test = COCODetection(info, img_dir)
    assert len(test) == 6 and not test.has_annotations
    _, t = test[0]
    assert t["boxes"].shape == (0, 4) and "eval_boxes" not in t


def test_max_images_restricts_the_ground_truth(quirky):
    ds = COCODetection(*quirky, max_images=2)
    assert ds.ids == [11, 12] and sorted(ds.coco.getImgIds()) == [11, 12]
    assert sorted(ds.coco.getAnnIds()) == [1, 2, 3, 4, 5]


# -- errors -----------------------------------------------------------------------------------------


def test_missing_annotation_file_and_image_folder(tmp_path, quirky):
    ann_file, img_dir = quirky
    with pytest.raises(DataError) as e:
        COCODetection(tmp_path / "nope" / "instances_val2017.json", img_dir)
    msg = str(e.value)
    assert str(tmp_path / "nope" / "instances_val2017.json") in msg
    assert "cocodataset.org" in msg and "data.root=" in msg and "\n" not in msg
    with pytest.raises(DataError) as e:
        COCODetection(ann_file, tmp_path / "val2017")
    assert str(tmp_path / "val2017") in str(e.value) and "cocodataset.org" in str(e.value)


def test_not_json(tmp_path, quirky):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(DataError, match="cannot read annotation file .*bad.json"):
        COCODetection(bad, quirky[1])


def test_unknown_category_is_skipped_and_counted(tmp_path, quirky):
    ann_file, img_dir = quirky
    ds = json.loads(ann_file.read_text())
    ds["annotations"].append({**ds["annotations"][0], "id": 77, "category_id": 99})
    ann_file.write_text(json.dumps(ds))
    data = COCODetection(ann_file, img_dir)  # no longer a DataError
    assert data.stats["unknown_category"] == 1 and data.unknown_category_ids == {99}
    assert data.stats["annotations"] == 9 and data.stats["boxes"] == 6  # counted, not trained on
    _, t = _by_id(data, 11)
    assert len(t["boxes"]) == 2 and len(t["eval_boxes"]) == 4  # nor evaluated


@pytest.mark.parametrize("kind", ["missing", "corrupt", "wrong_size"])
def test_bad_image_raises_naming_the_file(quirky, kind):
    ann_file, img_dir = quirky
    path = img_dir / "gray.png"
    if kind == "missing":
        path.unlink()
    elif kind == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    else:
        Image.new("L", (41, 30)).save(path)
    ds = COCODetection(ann_file, img_dir)
    with pytest.raises(DataError) as e:
        ds[ds.ids.index(12)]
    assert str(path) in str(e.value)
    assert {"missing": "not found", "corrupt": "cannot decode", "wrong_size": "41x30"}[kind] in str(e.value)
    assert "data.skip_bad_images=true skips such images" in str(e.value) and "\n" not in str(e.value)
    skipping = COCODetection(ann_file, img_dir, skip_bad_images=True)
    marker = skipping[skipping.ids.index(12)]
    assert isinstance(marker, SkippedImage) and marker.image_id == 12
    assert marker.reason == {"missing": "missing", "corrupt": "unreadable", "wrong_size": "wrong_size"}[kind]


def test_skip_bad_images_skips_and_never_replaces(quirky):
    """A bad image is left out, not replaced by the next one under its id: no image twice."""
    ann_file, img_dir = quirky
    (img_dir / "gray.png").unlink()
    (img_dir / "rgba.png").write_bytes(b"garbage")
    ds = COCODetection(ann_file, img_dir, skip_bad_images=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the data set returns markers; the data module logs them
        items = [ds[i] for i in range(len(ds))]
    assert items[ds.ids.index(12)] == SkippedImage(12, "missing", items[ds.ids.index(12)].message)
    assert "gray.png" in items[ds.ids.index(12)].message
    assert items[ds.ids.index(13)][:2] == (13, "unreadable") and "rgba.png" in items[ds.ids.index(13)].message
    images, targets = collate(items, size_divisor=32)
    assert [t["image_id"] for t in targets] == [11, 14, 15, 16] and images.shape[0] == 4  # each image once
    assert [(s.image_id, s.reason) for s in targets.skipped] == [(12, "missing"), (13, "unreadable")]
    assert ds[0][1]["image_id"] == 11  # good images are untouched


def test_annotations_made_in_the_unrotated_frame_are_turned_with_the_image(quirky):
    """One image, one orientation: exif.jpg (stored 50 x 30, EXIF tag 6) is read upright by training and
    evaluation, as predict and the API read it, also where the annotation file gives the stored size;
    its boxes turn with it and results turn back into the file's frame."""
    from sapd.data.coco import to_annotation_frame
    from sapd.data.io import read_image
    from sapd.data.transforms import preprocess_image

    ann_file, img_dir = quirky
    ds = json.loads(ann_file.read_text())
    ds["images"][4].update(width=50, height=30)  # exif.jpg as stored, ignoring its EXIF rotation
    ds["annotations"][7]["bbox"] = [0, 0, 8, 8]  # the red corner, in the stored pixels
    ann_file.write_text(json.dumps(ds))
    data = COCODetection(ann_file, img_dir)
    with pytest.warns(UserWarning, match="EXIF"):
        img, t = _by_id(data, 15)
    assert img.shape == (3, 50, 30) and t["orig_size"] == (50, 30) and t["exif_turn"] == 6
    api, meta = preprocess_image(Image.open(img_dir / "exif.jpg"), min_size=50, max_size=50)
    assert meta["orig_size"] == (50, 30) and torch.equal(api, img)  # the API reads the same pixels
    upright = torch.from_numpy(np.array(read_image(img_dir / "exif.jpg"))).permute(2, 0, 1).float()
    assert torch.allclose(denormalize(img) * 255, upright, atol=1e-3)  # and so does predict
    assert t["boxes"].tolist() == [[22, 0, 30, 8]] and t["eval_boxes"].tolist() == [[22, 0, 30, 8]]
    rgb = denormalize(img) * 255
    assert rgb[0, 2, 27] > 200 and rgb[1, 2, 27] < 60  # the box holds the red corner, now at the top right
    assert to_annotation_frame(t["eval_boxes"], t).tolist() == [[0, 0, 8, 8]]  # results in the file's frame
    from sapd.evaluation import coco_results

    det = {"boxes": t["eval_boxes"], "scores": torch.ones(1), "labels": t["eval_labels"]}
    (entry,) = coco_results([det], [t], data.label_to_cat_id)
    assert entry["bbox"] == [0, 0, 8, 8] and entry["image_id"] == 15 and entry["category_id"] == 9
    _, upright_t = _by_id(COCODetection(*_write_quirky_set(ann_file.parent / "again")), 15)
    assert "exif_turn" not in upright_t and to_annotation_frame(upright_t["boxes"], upright_t) is upright_t["boxes"]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_boxes_turn_with_every_exif_orientation(tmp_path, orientation):
    """A block drawn in the stored pixels lies inside its turned box after PIL's exif_transpose."""
    from sapd.data.transforms import EXIF_INVERSE, orient_boxes

    raw = np.zeros((30, 50, 3), np.uint8)
    raw[4:10, 12:20] = 255  # the box [12, 4, 20, 10]
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(raw).save(tmp_path / "o.png", exif=exif)
    from sapd.data.io import read_image

    up = np.asarray(read_image(tmp_path / "o.png"))[..., 0] > 127  # [h, w]
    ys, xs = np.nonzero(up)
    box = orient_boxes(torch.tensor([[12.0, 4, 20, 10]]), orientation, 50, 30)
    assert box.tolist() == [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]
    h, w = up.shape
    back = orient_boxes(box, EXIF_INVERSE.get(orientation, orientation), w, h)
    assert back.tolist() == [[12.0, 4, 20, 10]]


def test_non_numeric_bbox(quirky):
    ann_file, img_dir = quirky
    ds = json.loads(ann_file.read_text())
    ds["annotations"][0]["bbox"] = ["a", 1, 2, 3]
    ann_file.write_text(json.dumps(ds))
    with pytest.raises(DataError, match=r"annotation id 1 \(image id 11\) has a non-numeric bbox"):
        COCODetection(ann_file, img_dir)


# -- a data set that lies: refused in one line, or dropped and counted -------------------------------


def _edit(ann_file: Path, change) -> Path:
    """The annotation file after ``change(dataset)``, written back as json (NaN / Infinity as Python writes them)."""
    ds = json.loads(ann_file.read_text())
    change(ds)
    ann_file.write_text(json.dumps(ds))
    return ann_file


def _one_line(e: pytest.ExceptionInfo, *parts: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg and all(p in msg for p in parts), msg


def test_repeated_image_id_is_refused(quirky):
    ann_file, img_dir = quirky
    _edit(ann_file, lambda ds: ds["images"][2].update(id=11))  # rgba.png takes rgb.jpg's id
    with pytest.raises(DataError) as e:
        COCODetection(ann_file, img_dir)
    _one_line(e, str(ann_file), "image id 11 is given to more than one image", "'rgba.png'", "fix the annotation file")


def test_repeated_category_id_is_refused(quirky):
    ann_file, img_dir = quirky
    _edit(ann_file, lambda ds: ds["categories"][1].update(id=9))  # "two" takes "nine"'s id
    with pytest.raises(DataError) as e:
        COCODetection(ann_file, img_dir)
    _one_line(e, str(ann_file), "category id 9 is given to 2 categories (nine, two)", "fix the annotation file")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda ds: ds.update(annotations={"1": ds["annotations"][0]}), "'annotations' is a dict, not a list"),
        (lambda ds: ds["images"][1].pop("id"), "images[1] ('gray.png') has no 'id'"),
        (lambda ds: ds["images"][1].update(id="12"), "images[1] ('gray.png') has id '12', a str"),
        (lambda ds: ds["images"][1].update(id=True), "has id True, a bool"),
        (lambda ds: ds["images"][1].update(width=0), "image id 12 (gray.png) has width 0"),
        (lambda ds: ds["images"][1].update(height=-30), "has height -30"),
        (lambda ds: ds["images"][1].update(height="30"), "has height '30'"),
        (lambda ds: ds["images"][1].pop("file_name"), "image id 12 has no 'file_name'"),
        (lambda ds: ds["annotations"].append([1, 2]), "annotations[8] is a list, not an object"),
        (lambda ds: ds["categories"].append({"name": "no id"}), "'categories' must be a list of objects"),
    ],
    ids=["annotations-dict", "no-id", "str-id", "bool-id", "width-0", "height-neg", "height-str", "no-file",
         "ann-list", "cat-no-id"],
)  # fmt: skip
def test_malformed_annotation_files_are_one_line(quirky, change, expected):
    ann_file, img_dir = quirky
    _edit(ann_file, change)
    with pytest.raises(DataError) as e:
        COCODetection(ann_file, img_dir)
    _one_line(e, str(ann_file), expected)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("bbox", [True, 1, 2, 3], "has a non-numeric bbox [True, 1, 2, 3]"),
        ("bbox", ["12", 1, 2, 3], "has a non-numeric bbox ['12', 1, 2, 3]"),
        ("bbox", [None, 1, 2, 3], "has a non-numeric bbox [None, 1, 2, 3]"),
        ("bbox", [1, 2, 3], "has no valid bbox: [1, 2, 3]"),
        ("bbox", {"x": 1}, "has no valid bbox"),
        ("iscrowd", "0", "has iscrowd '0' (0, 1, true or false only)"),
        ("iscrowd", 2, "has iscrowd 2"),
        ("iscrowd", 0.5, "has iscrowd 0.5"),
        ("iscrowd", None, "has iscrowd None"),
    ],
)
def test_boolean_string_and_malformed_values_are_refused(quirky, field, value, expected):
    ann_file, img_dir = quirky
    _edit(ann_file, lambda ds: ds["annotations"][4].update({field: value}))
    with pytest.raises(DataError) as e:
        COCODetection(ann_file, img_dir)
    _one_line(e, str(ann_file), "annotation id 5 (image id 12)", expected, "fix the annotation file")


@pytest.mark.parametrize("crowd", [0, 1, True, False])
def test_iscrowd_takes_0_1_true_false(quirky, crowd):
    ann_file, img_dir = quirky
    _edit(ann_file, lambda ds: ds["annotations"][4].update(iscrowd=crowd))  # image 12's only box
    _, t = _by_id(COCODetection(ann_file, img_dir), 12)
    assert len(t["boxes"]) == (0 if crowd else 1) and len(t["crowd_boxes"]) == (1 if crowd else 0)
    assert t["eval_iscrowd"].tolist() == [bool(crowd)]


def _impossible_boxes(ds: dict) -> None:
    """Image 12 (40 x 30) gets boxes no detector can find, after its one true box [1, 2, 10, 12]."""
    extra = [
        [float("nan"), 2, 5, 5],
        [1, 2, float("inf"), 5],  # an infinite width: not a box to the image's edge
        [float("-inf"), 2, 5, 5],
        [1, 2, 5, float("nan")],
        [50, 2, 5, 5],  # wholly right of the image
        [1, -20, 5, 5],  # wholly above it
    ]
    base = ds["annotations"][4]
    ds["annotations"] += [{**base, "id": 100 + k, "bbox": b, "area": 25} for k, b in enumerate(extra)]
    ds["annotations"].append({**base, "id": 200, "bbox": [1, 2, float("nan"), 5], "iscrowd": 1})


def test_impossible_boxes_leave_training_and_evaluation_and_are_counted(quirky):
    ann_file, img_dir = quirky
    _edit(ann_file, _impossible_boxes)
    ds = COCODetection(ann_file, img_dir)
    s = ds.stats
    assert s["non_finite_boxes"] == 5 and s["outside_boxes"] == 2 and s["crowd"] == 1  # the NaN crowd box too
    assert s["boxes"] == 6 and s["annotations"] == 15
    _, t = _by_id(ds, 12)
    assert t["boxes"].tolist() == [[1, 2, 11, 14]] and t["crowd_boxes"].shape == (0, 4)
    assert t["eval_boxes"].tolist() == [[1, 2, 11, 14]] and t["eval_area"].tolist() == [120]
    assert all(torch.isfinite(_by_id(ds, i)[1]["eval_boxes"]).all() for i in ds.ids)


def test_perfect_predictions_score_ap_1_despite_impossible_boxes(quirky):
    """Impossible boxes are not ground truth: with perfect detections AP is 1.0 (0.833 when NaN, infinite
    and outside boxes stayed in the evaluation ground truth)."""
    from sapd.evaluation import coco_metric, eval_targets

    ann_file, img_dir = quirky
    _edit(ann_file, _impossible_boxes)
    ds = COCODetection(ann_file, img_dir)
    targets = [ds[i][1] for i in range(len(ds))]
    gt = eval_targets(targets)
    preds = []
    for g in gt:
        real = g["iscrowd"] == 0
        preds.append({"boxes": g["boxes"][real], "labels": g["labels"][real], "scores": torch.ones(int(real.sum()))})
    metric = coco_metric()
    metric.update(preds, gt)
    assert metric.compute()["map"].item() == pytest.approx(1.0)


def test_annotations_of_unknown_images_are_counted(quirky):
    from sapd.data.data_counts import format_counts

    ann_file, img_dir = quirky

    def orphans(ds):
        base = ds["annotations"][0]
        ds["annotations"] += [{**base, "id": 300, "image_id": 999}, {**base, "id": 301, "image_id": "11"}]
        ds["annotations"].append({k: v for k, v in base.items() if k != "image_id"} | {"id": 302})

    _edit(ann_file, orphans)
    ds = COCODetection(ann_file, img_dir)
    assert ds.stats["unknown_image"] == 3 and ds.stats["annotations"] == 8 and ds.stats["boxes"] == 6
    assert "3 of an unknown image id skipped" in format_counts("train", ann_file, ds.stats)
    limited = COCODetection(ann_file, img_dir, max_images=2)  # images past max_images are not unknown
    assert limited.stats["unknown_image"] == 3 and limited.stats["annotations"] == 5


@pytest.mark.parametrize("name", ["../outside.jpg", "sub/../../outside.jpg", "ABS"])
def test_file_name_outside_the_data_root_is_refused_unless_allowed(quirky, name):
    ann_file, img_dir = quirky
    outside = img_dir.parent / "outside.jpg"
    (img_dir / "sub").mkdir()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(outside)
    name = str(outside) if name == "ABS" else name
    _edit(ann_file, lambda ds: ds["images"][1].update(file_name=name))
    with pytest.raises(DataError) as e:
        COCODetection(ann_file, img_dir)
    _one_line(e, str(ann_file), f"image id 12 has file_name {name!r}", "data.allow_outside_root=true")
    img, _ = _by_id(COCODetection(ann_file, img_dir, allow_outside_root=True), 12)
    assert img.shape == (3, 30, 40)
    if not name.startswith("/"):  # inside the data root (here the folder above the images): allowed
        assert len(COCODetection(ann_file, img_dir, root=img_dir.parent)) == 6


def test_file_name_under_a_subfolder_is_fine(quirky):
    ann_file, img_dir = quirky
    (img_dir / "sub").mkdir()
    (img_dir / "gray.png").rename(img_dir / "sub" / "gray.png")
    _edit(ann_file, lambda ds: ds["images"][1].update(file_name="sub/./gray.png"))
    img, _ = _by_id(COCODetection(ann_file, img_dir), 12)
    assert img.shape == (3, 30, 40)


def test_allow_outside_root_is_a_data_setting():
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "data"
    for name in ("coco.yaml", "synthetic.yaml"):
        assert OmegaConf.load(conf / name).allow_outside_root is False, name


# -- what stays in memory after parsing -------------------------------------------------------------


def _python_objects(obj, seen=None, depth=0):
    """Every dict, list and tuple reachable from ``obj``'s attributes (numpy arrays are leaves)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    children = ()
    if isinstance(obj, dict):
        yield obj
        children = list(obj.values())
    elif isinstance(obj, list | tuple | set):
        yield obj
        children = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type | np.ndarray | torch.Tensor):
        children = list(vars(obj).values())
    for child in children:
        yield from _python_objects(child, seen, depth + 1)


def test_parsed_records_keep_what_training_and_evaluation_need_and_no_segmentation(quirky):
    ds = COCODetection(*quirky)
    assert ds._coco is None  # pycocotools' copy of the json is read only when asked for
    held = list(_python_objects(ds))
    assert not any(isinstance(o, dict) and ("segmentation" in o or "bbox" in o) for o in held)
    assert max(len(o) for o in held) <= max(len(ds), 16)  # no list or dict per annotation
    arrays = [v for v in vars(ds).values() if isinstance(v, np.ndarray)]
    assert sum(a.nbytes for a in arrays) < 2000  # 8 annotations, 6 images: a few bytes each
    # what training and evaluation read is all there: boxes, labels, crowd, iscrowd, area, sizes, names
    _, t = _by_id(ds, 11)
    assert t["boxes"].tolist() == [[4, 4, 24, 14], [50, 30, 64, 48]] and t["labels"].tolist() == [1, 1]
    assert t["eval_iscrowd"].tolist() == [False, False, False, True] and t["eval_area"].tolist() == [200, 900, 4, 100]
    assert [ds.file_name(i) for i in range(len(ds))][:2] == ["rgb.jpg", "gray.png"]
    truth = ds.ground_truth(11)
    assert torch.equal(torch.from_numpy(truth["boxes"]), t["eval_boxes"]) and truth["iscrowd"].tolist()[-1]
    assert ds.aspect_ratios[0] == pytest.approx(64 / 48)
    crowd = ds.coco.loadAnns([4])[0]  # asked for: the file as written, segmentation included
    assert crowd["segmentation"] == CROWD_RLE and ds._coco is not None


def test_data_module_passes_the_data_root_and_allow_outside_root(tmp_path):
    from sapd.data.datamodule import COCODataModule

    root = tmp_path / "set"
    ann_file, img_dir = _write_quirky_set(root)
    (img_dir / "gray.png").rename(root / "gray.png")  # beside the image folder, inside data.root
    Image.new("RGB", (40, 30)).save(tmp_path / "far.png")  # outside data.root
    _edit(ann_file, lambda ds: ds["images"][1].update(file_name="../gray.png"))
    _edit(ann_file, lambda ds: ds["images"][2].update(file_name="../../far.png"))
    kw = {"train_ann": "instances.json", "train_images": "images", "num_workers": 0}
    with pytest.raises(DataError) as e:
        COCODataModule(root, **kw, val_ann="instances.json", val_images="images").setup("validate")
    _one_line(e, "image id 13 has file_name '../../far.png'", "data.allow_outside_root=true")
    dm = COCODataModule(root, **kw, val_ann="instances.json", val_images="images", allow_outside_root=True)
    dm.setup("validate")
    assert [dm.val_dataset[i][1]["image_id"] for i in (1, 2)] == [12, 13]  # both read


def test_categories_read_before_the_data_sets_are_checked(tmp_path):
    from sapd.data.datamodule import COCODataModule

    ann_file, _ = _write_quirky_set(tmp_path)
    _edit(ann_file, lambda ds: ds["categories"][1].update(id=9))
    dm = COCODataModule(tmp_path, val_ann="instances.json", val_images="images", num_workers=0)
    with pytest.raises(DataError) as e:
        dm.label_to_cat_id  # noqa: B018 -- read before setup (the model is built from it)
    _one_line(e, "category id 9 is given to 2 categories")


def test_loader_workers_fork_from_a_frozen_heap(tmp_path):
    """A worker's garbage collection does not copy the main process's pages: they are frozen before the fork."""
    import gc

    from sapd.data.datamodule import COCODataModule

    _write_quirky_set(tmp_path)
    dm = COCODataModule(tmp_path, val_ann="instances.json", val_images="images", num_workers=1)
    dm.setup("validate")
    gc.unfreeze()
    try:
        dm.val_dataloader()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
