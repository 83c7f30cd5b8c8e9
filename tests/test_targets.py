"""Anchor points, B_v membership, ownership, Eq. 1 and Eq. 4 on hand-computed cases (docs/design.md §2-§3)."""

import math

import pytest
import torch

from references import inside_valid_box
from sapd.models.anchor_points import (
    anchor_points,
    assign_owners,
    candidate_pairs,
    decode,
    encode,
    level_strides,
    shrink_boxes,
    soft_weight,
)

STRIDES = [8, 16, 32, 64, 128]
SIZES_64 = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]  # a 64 x 64 input


def owners(boxes, sizes, strides, epsilon=0.2, box_images=None, num_images=1):
    """Ownership of every point of ``num_images`` images, as the criterion's assignment step takes it."""
    num_slots = num_images * sum(h * w for h, w in sizes)
    return assign_owners(boxes, candidate_pairs(boxes, sizes, strides, epsilon, box_images), num_slots)


def test_level_strides():
    assert level_strides() == STRIDES


def test_anchor_points_locations_levels_and_order():
    pts, strides, levels = anchor_points([(2, 3), (1, 2)], [8, 16])
    expected = [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12], [8, 8], [24, 8]]
    assert pts.tolist() == expected
    assert strides.tolist() == [8] * 6 + [16] * 2
    assert levels.tolist() == [0] * 6 + [1] * 2


def test_shrink_boxes():
    got = shrink_boxes(torch.tensor([[0.0, 0.0, 32.0, 64.0]]), 0.2)[0].tolist()
    assert got == pytest.approx([12.8, 25.6, 19.2, 38.4])


def _positive_points(box, sizes=SIZES_64, strides=STRIDES, epsilon=0.2):
    pts, strs, _ = anchor_points(sizes, strides)
    inside = inside_valid_box(pts, strs, torch.tensor([box], dtype=torch.float32), epsilon)[:, 0]
    return {(int(s), float(x), float(y)) for (x, y), s in zip(pts[inside].tolist(), strs[inside].tolist())}


def test_inside_valid_box_32px_box_every_level():
    # B = [0, 32]^2, B_v = [12.8, 19.2]^2. Stride 8: cells [8,16] and [16,24] overlap B_v by 3.2 px each
    # way (10.24 > 0.64). Stride 16: cells [0,16], [16,32] overlap 3.2^2 = 10.24 > 2.56. Stride 32: the
    # cell [0,32]^2 holds all of B_v. Stride 64: the point (32, 32) is on B's border, not inside B.
    got = _positive_points([0.0, 0.0, 32.0, 32.0])
    assert got == {
        (8, 12.0, 12.0),
        (8, 20.0, 12.0),
        (8, 12.0, 20.0),
        (8, 20.0, 20.0),
        (16, 8.0, 8.0),
        (16, 24.0, 8.0),
        (16, 8.0, 24.0),
        (16, 24.0, 24.0),
        (32, 16.0, 16.0),
    }


def test_inside_valid_box_reads_cell_overlap_not_centre():
    # The point (12, 12) is not inside B_v = [12.8, 19.2]^2, but its cell overlaps it (docs/design.md §3).
    assert (8, 12.0, 12.0) in _positive_points([0.0, 0.0, 32.0, 32.0])


def test_boxes_too_small_for_a_level():
    # 10 px box: B_v = [4, 6]^2 overlaps the stride-8 cell of (4, 4) by 4 px^2 > 0.64 and the
    # stride-16 cell of (8, 8) by 4 > 2.56; on stride 32 the point (16, 16) is outside B.
    assert _positive_points([0.0, 0.0, 10.0, 10.0]) == {(8, 4.0, 4.0), (16, 8.0, 8.0)}
    # Shifted so that B_v = [4.5, 5.5]^2 (1 px^2): > 0.64 on stride 8, < 2.56 on stride 16.
    assert _positive_points([2.5, 2.5, 7.5, 7.5]) == {(8, 4.0, 4.0)}
    # 3 px box: B_v is 0.6 x 0.6 = 0.36 px^2 < 0.64 on stride 8; nothing on any level.
    assert _positive_points([2.0, 2.0, 5.0, 5.0]) == set()
    # B = [5, 15]^2, B_v = [9, 11]^2: on stride 8 only the cell of (12, 12) overlaps B_v enough
    # (2 x 2 = 4 > 0.64; the cell of (4, 4) does not touch B_v); on stride 16 the point (8, 8) lies in B
    # and its cell [0, 16]^2 covers B_v (4 > 2.56); on stride 32 (16, 16) is outside B.
    assert _positive_points([5.0, 5.0, 15.0, 15.0]) == {(8, 12.0, 12.0), (16, 8.0, 8.0)}


def test_owner_smallest_area_wins_whatever_the_order():
    big = [0.0, 0.0, 32.0, 32.0]
    small = [8.0, 8.0, 17.0, 17.0]  # B_v = [11.6, 13.4]^2: claims the point (12, 12) on stride 8
    for boxes, small_idx in (([big, small], 1), ([small, big], 0)):
        owner = owners(torch.tensor(boxes), SIZES_64, STRIDES)
        p = 1 * 8 + 1  # (12, 12) on P3: row 1, column 1
        assert owner[p].item() == small_idx
        assert owner[2 * 8 + 2].item() == 1 - small_idx  # (20, 20): only the big box
        assert (owner[64:] == 1 - small_idx).sum() == 5  # P4 (4 points) + P5 (1): the big box only


def test_owner_ties_go_to_lowest_index_and_empty_points_are_minus_one():
    box = [0.0, 0.0, 32.0, 32.0]
    owner = owners(torch.tensor([box, box]), SIZES_64, STRIDES)
    assert set(owner.tolist()) == {-1, 0}
    assert (owner == 0).sum() == 9
    assert (owners(torch.zeros(0, 4), SIZES_64, STRIDES) == -1).all()


def test_candidate_pairs_match_dense_rule_random_boxes():
    g = torch.Generator().manual_seed(0)
    h, w = 203, 317
    sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES]
    xy = torch.rand(80, 2, generator=g) * torch.tensor([w, h])
    wh = torch.rand(80, 2, generator=g) ** 2 * torch.tensor([w, h]) + 1
    boxes = torch.cat([xy, (xy + wh)], 1)
    boxes[:, 2:] = torch.minimum(boxes[:, 2:], torch.tensor([w, h]))
    boxes[:5, 2:] = boxes[:5, :2] + 1.5  # some tiny boxes
    pts, strs, _ = anchor_points(sizes, STRIDES)
    for eps in (0.2, 0.5):
        dense = inside_valid_box(pts, strs, boxes, eps)  # [P, M]
        m, p = candidate_pairs(boxes, sizes, STRIDES, eps)
        sparse = torch.zeros_like(dense)
        sparse[p, m] = True
        assert len(m) == dense.sum() > 0
        assert torch.equal(sparse, dense)
    # Ownership = smallest-area claimant of the dense matrix.
    dense = inside_valid_box(pts, strs, boxes, 0.2)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    masked = torch.where(dense, area[None], torch.full_like(dense, float("inf"), dtype=area.dtype))
    expected = torch.where(dense.any(1), masked.argmin(1), -1)
    assert torch.equal(owners(boxes, sizes, STRIDES, 0.2), expected)


def test_batched_ownership_offsets_points_by_image():
    box = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    single = owners(box, SIZES_64, STRIDES)
    batched = owners(box.repeat(2, 1), SIZES_64, STRIDES, box_images=torch.tensor([1, 0]), num_images=2)
    p = single.numel()
    assert torch.equal(batched[:p] >= 0, single >= 0) and torch.equal(batched[p:] >= 0, single >= 0)
    assert set(batched[:p][batched[:p] >= 0].tolist()) == {1}
    assert set(batched[p:][batched[p:] >= 0].tolist()) == {0}


def test_500_instances_on_800x1333_is_cheap_and_right():
    g = torch.Generator().manual_seed(1)
    h, w = 800, 1344
    sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES]
    xy = torch.rand(500, 2, generator=g) * torch.tensor([w - 10, h - 10])
    wh = torch.rand(500, 2, generator=g) * torch.tensor([w, h]) / 2 + 2
    boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w, h]))], 1)
    m, p = candidate_pairs(boxes, sizes, STRIDES)
    assert len(m) < 5_000_000  # far below P * M = 22k * 500 dense
    owner = assign_owners(boxes, (m, p), sum(h * w for h, w in sizes))  # the pairs above
    assert (owner >= 0).sum() > 0 and owner.max() < 500


def test_encode_eq1_hand_case_and_round_trip():
    pts = torch.tensor([[12.0, 12.0], [24.0, 40.0]])
    strides = torch.tensor([8.0, 16.0])
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [3.0, 5.0, 61.0, 90.0]])
    d = encode(pts, strides, boxes, z=4.0)
    assert d[0].tolist() == pytest.approx([12 / 32, 12 / 32, 20 / 32, 20 / 32])
    assert d[1].tolist() == pytest.approx([21 / 64, 35 / 64, 37 / 64, 50 / 64])
    assert torch.allclose(decode(pts, strides, d, z=4.0), boxes)
    assert torch.allclose(decode(pts[None], strides[None], d[None], z=4.0)[0], boxes)  # batched dims


@pytest.mark.parametrize(
    ("eta", "expected"), [(1.0, 1 / 6), (2.0, 1 / 36), (0.5, (1 / 6) ** 0.5), (0.1, (1 / 6) ** 0.1)]
)
def test_soft_weight_eq4(eta, expected):
    # d = (l, t, r, b) = (1, 2, 3, 4): min(l, r) min(t, b) / (max(l, r) max(t, b)) = 1 * 2 / (3 * 4)
    assert soft_weight(torch.tensor([1.0, 2.0, 3.0, 4.0]), eta).item() == pytest.approx(expected)


def test_soft_weight_centre_is_one_and_degenerate_is_zero():
    d = torch.tensor([[2.0, 5.0, 2.0, 5.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 2.0, 1.0]])
    for eta in (0.1, 1.0, 2.0):
        f = soft_weight(d, eta)
        assert torch.isfinite(f).all()
        assert f.tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])


# --- valid_region="centre": the point itself inside B_v ---------------------------------------------

SIZES_128 = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]  # a 128 x 128 input


def _pairs(box, valid_region, sizes=SIZES_128):
    pts, strs, _ = anchor_points(sizes, STRIDES)
    _, p = candidate_pairs(torch.tensor([box]), sizes, STRIDES, 0.2, valid_region=valid_region)
    return {(int(strs[i]), float(pts[i, 0]), float(pts[i, 1])) for i in p.tolist()}


def test_centre_rule_keeps_points_inside_valid_box_and_the_nearest_elsewhere():
    # B = [0, 100]^2, B_v = [40, 60]^2. Stride 8: cells of X = 44, 52, 60 overlap B_v (3 x 3 points under
    # cell_overlap); X = 60 is on B_v's border, so "centre" keeps X, Y in {44, 52}. Stride 16: X = 40 and
    # 56 overlap B_v, only 56 lies strictly inside it. Stride 32: (48, 48) is inside B_v. Strides 64 and
    # 128: the single candidate (32, 32) / (64, 64) is outside B_v, kept as the nearest to the centre.
    cell = _pairs([0.0, 0.0, 100.0, 100.0], "cell_overlap")
    centre = _pairs([0.0, 0.0, 100.0, 100.0], "centre")
    assert len(cell) == 9 + 4 + 1 + 1 + 1
    assert centre == {
        (8, 44.0, 44.0),
        (8, 52.0, 44.0),
        (8, 44.0, 52.0),
        (8, 52.0, 52.0),
        (16, 56.0, 56.0),
        (32, 48.0, 48.0),
        (64, 32.0, 32.0),
        (128, 64.0, 64.0),
    }


def test_centre_rule_keeps_every_nearest_point_on_a_tie():
    # B = [0, 32]^2, B_v = [12.8, 19.2]^2: no point of stride 8 or 16 is inside B_v and the four candidates
    # of each are equally near the centre (16, 16), so all are kept: the same pairs as cell_overlap.
    box = [0.0, 0.0, 32.0, 32.0]
    assert _pairs(box, "centre", SIZES_64) == _pairs(box, "cell_overlap", SIZES_64) == _positive_points(box)


def test_centre_rule_is_a_subset_with_the_same_levels_random_boxes():
    g = torch.Generator().manual_seed(3)
    h, w = 211, 300
    sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES]
    xy = torch.rand(60, 2, generator=g) * torch.tensor([w, h])
    wh = torch.rand(60, 2, generator=g) ** 2 * torch.tensor([w, h]) + 2
    boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w, h]))], 1)
    _, _, levels = anchor_points(sizes, STRIDES)
    m_cell, p_cell = candidate_pairs(boxes, sizes, STRIDES)
    m_cen, p_cen = candidate_pairs(boxes, sizes, STRIDES, valid_region="centre")
    assert set(zip(m_cen.tolist(), p_cen.tolist())) <= set(zip(m_cell.tolist(), p_cell.tolist()))
    assert len(m_cen) < len(m_cell)
    same_levels = set(zip(m_cen.tolist(), levels[p_cen].tolist()))
    assert same_levels == set(zip(m_cell.tolist(), levels[p_cell].tolist()))
    # f of Eq. 4 at eta = 1 is at least (0.4 / 0.6)^2 = 4/9 for a point strictly inside B_v (epsilon 0.2).
    pts, strs, _ = anchor_points(sizes, STRIDES)
    f = soft_weight(encode(pts[p_cen], strs[p_cen], boxes[m_cen]))
    valid = shrink_boxes(boxes[m_cen], 0.2)
    x, y = pts[p_cen, 0], pts[p_cen, 1]
    inside = (x > valid[:, 0]) & (x < valid[:, 2]) & (y > valid[:, 1]) & (y < valid[:, 3])
    assert inside.any() and (f[inside] >= 4 / 9 - 1e-6).all()


def test_valid_region_must_be_known():
    with pytest.raises(ValueError, match="valid_region"):
        candidate_pairs(torch.tensor([[0.0, 0.0, 32.0, 32.0]]), SIZES_64, STRIDES, valid_region="inside")
