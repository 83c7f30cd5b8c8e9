"""Data for SAPD: the image reader (:mod:`sapd.data.io`), COCO-format data sets, transforms, the
Lightning data module and a synthetic set.

Every data error a user can cause (missing files, corrupt images, inconsistent annotations)
raises :class:`DataError` with one line that names the offending path or id.
"""

from __future__ import annotations

from sapd.errors import UserError


class DataError(UserError):
    """Bad or missing input data. The message is one line naming the path / id and the fix."""


COCO_HOWTO = (
    "get COCO 2017 from https://cocodataset.org/#download (train2017.zip, val2017.zip and "
    "annotations_trainval2017.zip, unzipped into one folder) and point data.root=... at it, "
    "or train on the embedded synthetic set with data=synthetic"
)

__all__ = ["COCO_HOWTO", "DataError"]
