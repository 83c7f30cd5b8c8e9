"""Anchor points, valid boxes, ownership and the box coding of SAPD (paper §3.1-§3.2; docs/design.md §2-§3).

Conventions used throughout ``sapd.models``:
    M = ground-truth boxes, P = anchor points over all levels (levels concatenated, P3 first),
    L = pyramid levels, K = classes. Boxes are ``x1, y1, x2, y2`` in pixels of the network input.

Every function here is one equation of the paper and can be called on its own:

- :func:`anchor_points` - point locations ``X = s_l (i + 0.5)``, ``Y = s_l (j + 0.5)`` (§3.1).
- :func:`shrink_boxes` - the valid box ``B_v`` (§3.1, epsilon = 0.2).
- :func:`candidate_pairs` - the "p inside B_v" rule (docs/design.md §3), sparse and vectorised: only
  (box, point) pairs that pass;
  ``valid_region="centre"`` narrows it to the literal reading (the point itself inside B_v).
- :func:`assign_owners` - the owner instance (or -1) of every point among its candidate pairs: smallest
  area wins (docs/design.md §3).
- :func:`encode` / :func:`decode` - Eq. 1 and its exact inverse.
- :func:`soft_weight` - f of Eq. 4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from sapd.models.settings import VALID_REGIONS

# A point counts as inside B_v when its cell overlaps B_v by more than this fraction of the cell's area
# (MMDetection ``CenterRegionAssigner(min_pos_iof=0.01)``, the FSAF authors' assigner).
MIN_POS_IOF = 0.01


def level_name(level: int) -> str:
    """The name of pyramid level ``level`` (0 = the finest, stride 8): ``P3``, ``P4``, ..."""
    return f"P{level + 3}"


def level_strides(num_levels: int = 5, first_stride: int = 8) -> list[int]:
    """Strides ``s_l = 2^l`` of levels P3.. (§3.1): ``[8, 16, 32, 64, 128]`` for 5 levels."""
    return [first_stride * 2**i for i in range(num_levels)]


def anchor_points(
    level_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """Image-space locations of every anchor point, levels concatenated (P3 first), row-major per level.

    Args:
        level_sizes: ``(H_l, W_l)`` of each level's feature map.
        strides: ``s_l`` of each level.

    Returns:
        points (FloatTensor[P, 2]): ``(X, Y)`` with ``X = s_l (i + 0.5)``, ``Y = s_l (j + 0.5)`` (§3.1).
        point_strides (FloatTensor[P]): ``s_l`` of the level each point belongs to.
        point_levels (LongTensor[P]): level index 0..L-1 of each point.
    """
    pts, strs, lvls = [], [], []
    for lvl, ((h, w), s) in enumerate(zip(level_sizes, strides)):
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * s  # [W]
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * s  # [H]
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # [H, W]
        pts.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))  # [H*W, 2]
        strs.append(torch.full((h * w,), float(s), device=device, dtype=dtype))
        lvls.append(torch.full((h * w,), lvl, device=device, dtype=torch.long))
    return torch.cat(pts), torch.cat(strs), torch.cat(lvls)


def shrink_boxes(boxes: Tensor, epsilon: float) -> Tensor:
    """Valid box ``B_v`` (§3.1): ``B`` shrunk about its centre to ``epsilon * w`` by ``epsilon * h``.

    Args:
        boxes (FloatTensor[M, 4]): x1, y1, x2, y2.
    Returns:
        FloatTensor[M, 4]: the shrunk boxes.
    """
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    hw = (boxes[:, 2] - boxes[:, 0]) * epsilon / 2
    hh = (boxes[:, 3] - boxes[:, 1]) * epsilon / 2
    return torch.stack([cx - hw, cy - hh, cx + hw, cy + hh], dim=1)


def _inside_rule(xy: Tensor, s: Tensor, boxes: Tensor, valid: Tensor) -> Tensor:
    """The cell-overlap rule (docs/design.md §3) for matched rows: (X, Y) strictly inside B and the
    s x s cell overlaps B_v by > 1 %.

    ``xy`` [R, 2], ``s`` [R], ``boxes`` [R, 4], ``valid`` [R, 4] (B_v); all broadcastable row by row.
    The strict inequalities follow MMDetection ``CenterRegionAssigner`` (``is_located_in``).
    """
    x, y = xy[..., 0], xy[..., 1]
    in_box = (x > boxes[..., 0]) & (x < boxes[..., 2]) & (y > boxes[..., 1]) & (y < boxes[..., 3])
    half = s / 2
    ow = (torch.minimum(x + half, valid[..., 2]) - torch.maximum(x - half, valid[..., 0])).clamp(min=0)
    oh = (torch.minimum(y + half, valid[..., 3]) - torch.maximum(y - half, valid[..., 1])).clamp(min=0)
    return in_box & (ow * oh > MIN_POS_IOF * s * s)


@torch.no_grad()
def candidate_pairs(
    boxes: Tensor,
    level_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    epsilon: float = 0.2,
    box_images: Tensor | None = None,
    valid_region: str = "cell_overlap",
) -> tuple[Tensor, Tensor]:
    """All (box, point) pairs with the point inside B_v of the box (docs/design.md §3), without a dense [P, M] test.

    For each box and level only the grid cells in the box's index range are enumerated (a cell can
    only pass when it overlaps B_v and its centre lies in B), so the work is proportional to the
    number of candidate pairs, not to P * M.

    Args:
        boxes (FloatTensor[M, 4]): x1, y1, x2, y2, of all images of a batch.
        level_sizes, strides: as in :func:`anchor_points` (the same for every image).
        box_images (LongTensor[M] or None): image index of each box; point indices are then global,
            ``image * P + p``, i.e. indices into a batch's points flattened as ``[N * P]``.
        valid_region: ``"cell_overlap"`` (the rule above) or ``"centre"``: of the pairs the rule above
            gives a box on one level, only those whose point (X, Y) lies strictly inside B_v; where
            none does, the point(s) nearest to the box centre (all of them on a tie). A box thus keeps
            the same levels as under ``"cell_overlap"`` (small boxes are still trained) but only its
            central points, where f of Eq. 4 is large (>= 0.44 inside B_v at epsilon 0.2).

    Returns:
        box_idx (LongTensor[T]), point_idx (LongTensor[T]): the pairs.
    """
    device = boxes.device
    num_levels = len(level_sizes)
    sizes = torch.tensor(level_sizes, device=device, dtype=torch.long).reshape(num_levels, 2)  # [L, 2]
    hs, ws = sizes[:, 0], sizes[:, 1]
    counts_per_level = hs * ws
    num_points = sum(h * w for h, w in level_sizes)  # on the host: level_sizes are Python ints
    level_start = torch.cumsum(counts_per_level, 0) - counts_per_level  # [L]
    s = torch.tensor(strides, device=device, dtype=boxes.dtype)  # [L]
    if boxes.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    valid = shrink_boxes(boxes, epsilon)  # [M, 4]

    # Index ranges per (box, level), loose by one cell on each side; the exact rule runs below.
    # X = s (i + .5) > x1 and cell [X - s/2, X + s/2] overlaps [vx1, vx2]  =>  i in (lo, hi).
    sl = s[None, :]  # [1, L]
    lo_x = torch.maximum(boxes[:, 0:1] / sl - 0.5, valid[:, 0:1] / sl - 1).floor().long()  # [M, L]
    hi_x = torch.minimum(boxes[:, 2:3] / sl - 0.5, valid[:, 2:3] / sl).ceil().long()
    lo_y = torch.maximum(boxes[:, 1:2] / sl - 0.5, valid[:, 1:2] / sl - 1).floor().long()
    hi_y = torch.minimum(boxes[:, 3:4] / sl - 0.5, valid[:, 3:4] / sl).ceil().long()
    lo_x, lo_y = lo_x.clamp(min=0), lo_y.clamp(min=0)
    hi_x = torch.minimum(hi_x, ws[None] - 1)
    hi_y = torch.minimum(hi_y, hs[None] - 1)
    nx = (hi_x - lo_x + 1).clamp(min=0)  # [M, L]
    ny = (hi_y - lo_y + 1).clamp(min=0)
    count = (nx * ny).reshape(-1)  # [M * L]

    # Enumerate every cell of every range at once: pair t belongs to range ml[t], offset local[t].
    ml = torch.repeat_interleave(torch.arange(count.numel(), device=device), count)  # [T]
    local = torch.arange(ml.numel(), device=device) - (torch.cumsum(count, 0) - count)[ml]
    m, lvl = ml // num_levels, ml % num_levels
    nx_t = nx.reshape(-1)[ml]
    ix = lo_x.reshape(-1)[ml] + local % nx_t
    iy = lo_y.reshape(-1)[ml] + local // nx_t
    st = s[lvl]  # [T]
    xy = torch.stack([(ix.to(boxes.dtype) + 0.5) * st, (iy.to(boxes.dtype) + 0.5) * st], dim=1)  # [T, 2]
    keep = _inside_rule(xy, st, boxes[m], valid[m])
    if valid_region == "centre":
        keep = _centre_points(keep, xy, m * num_levels + lvl, boxes[m], valid[m], count.numel())
    elif valid_region != "cell_overlap":
        raise ValueError(f"valid_region must be one of {VALID_REGIONS}, got {valid_region!r}")
    kept = torch.nonzero(keep).squeeze(1)  # one read of the count, then plain indexing
    m, point = m[kept], (level_start[lvl] + iy * ws[lvl] + ix)[kept]
    if box_images is not None:
        point = point + box_images[m] * num_points
    return m, point


def _centre_points(keep: Tensor, xy: Tensor, group: Tensor, boxes: Tensor, valid: Tensor, num_groups: int) -> Tensor:
    """``valid_region="centre"`` of :func:`candidate_pairs` for enumerated rows [T]: of the rows that pass
    ``keep``, those with (X, Y) strictly inside B_v, or, in a (box, level) ``group`` with none, the ones
    nearest to the box centre."""
    x, y = xy[:, 0], xy[:, 1]
    in_valid = keep & (x > valid[:, 0]) & (x < valid[:, 2]) & (y > valid[:, 1]) & (y < valid[:, 3])  # [T]
    has_centre = torch.zeros(num_groups, device=keep.device).index_add_(0, group, in_valid.float()) > 0
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    dist = torch.where(keep, (x - cx).square() + (y - cy).square(), torch.full_like(x, math.inf))  # [T]
    nearest = torch.full((num_groups,), math.inf, dtype=dist.dtype, device=keep.device)
    nearest.scatter_reduce_(0, group, dist, reduce="amin")
    return in_valid | (keep & ~has_centre[group] & (dist == nearest[group]))


@torch.no_grad()
def assign_owners(boxes: Tensor, pairs: tuple[Tensor, Tensor], num_slots: int) -> Tensor:
    """Owner instance of every anchor point (docs/design.md §3): among the boxes that claim the point in
    ``pairs`` (:func:`candidate_pairs`), the one of smallest area (ties: lowest index); -1 when none.
    Each point belongs to one level, so this is the per-level ownership of the paper.

    Args:
        boxes (FloatTensor[M, 4]): x1, y1, x2, y2, the boxes ``pairs`` index.
        pairs (LongTensor[T], LongTensor[T]): box and point index of each candidate pair.
        num_slots: the number of points the point indices run over (``num_images * P`` for a batch).

    Returns:
        LongTensor[num_slots]: index into ``boxes`` or -1.
    """
    box_idx, point_idx = pairs
    owner = torch.full((num_slots,), -1, dtype=torch.long, device=boxes.device)
    if box_idx.numel() == 0:
        return owner
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = torch.sort(area, stable=True).indices  # rank r -> box order[r]; ties keep index order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=boxes.device)
    best = torch.full_like(owner, order.numel())
    best.scatter_reduce_(0, point_idx, rank[box_idx], reduce="amin")  # smallest-area claimant per point
    owned = best < order.numel()
    return torch.where(owned, order[best.clamp(max=order.numel() - 1)], owner)


def encode(points: Tensor, point_strides: Tensor, boxes: Tensor, z: float = 4.0) -> Tensor:
    """Eq. 1: normalised distances ``d = (X - x1, Y - y1, x2 - X, y2 - Y) / (z s_l)``.

    Args:
        points (FloatTensor[R, 2]), point_strides (FloatTensor[R]), boxes (FloatTensor[R, 4]) row-matched.
    Returns:
        FloatTensor[R, 4]: d_l, d_t, d_r, d_b.
    """
    x, y = points[:, 0], points[:, 1]
    d = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], dim=1)
    return d / (z * point_strides)[:, None]  # Eq. 1


def decode(points: Tensor, point_strides: Tensor, distances: Tensor, z: float = 4.0) -> Tensor:
    """Reverse of Eq. 1 (§3.4 inference): boxes from normalised distances.

    Args:
        points (FloatTensor[..., 2]), point_strides (FloatTensor[...]), distances (FloatTensor[..., 4]).
    Returns:
        FloatTensor[..., 4]: x1, y1, x2, y2.
    """
    d = distances * (z * point_strides)[..., None]
    x, y = points[..., 0], points[..., 1]
    return torch.stack([x - d[..., 0], y - d[..., 1], x + d[..., 2], y + d[..., 3]], dim=-1)


def soft_weight(distances: Tensor, eta: float = 1.0) -> Tensor:
    """f of Eq. 4: ``[min(dl, dr) min(dt, db) / (max(dl, dr) max(dt, db))] ** eta``; 0/0 gives 0.

    Args:
        distances (FloatTensor[..., 4]): d_l, d_t, d_r, d_b (any common unit; f is scale-free).
    Returns:
        FloatTensor[...]: weights in [0, 1].
    """
    dl, dt, dr, db = distances.unbind(-1)
    num = torch.minimum(dl, dr) * torch.minimum(dt, db)
    den = torch.maximum(dl, dr) * torch.maximum(dt, db)
    ratio = torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), torch.zeros_like(den))
    return ratio.clamp(min=0) ** eta  # Eq. 4
