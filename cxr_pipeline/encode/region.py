"""The heatmap's most salient area as an ellipse on the source image (SR image region).

The SR's planar ROI group outlines where the classifier looked hardest. The area is the
connected part of the heatmap at or above ``level`` times its maximum that contains the
maximum (scipy's connected-component labelling); the ellipse is the one inscribed in that
part's bounding box, axis-aligned (OHIF v3 draws SCOORD ellipses without rotation).

Coordinates follow PS3.3 C.18.6.1.1 (SCOORD on an image): column then row, in pixels of
the referenced image, (0, 0) at the top-left corner of the top-left pixel. The heatmap
may be smaller than the stored image (``cxr-batch`` decodes at reduced resolution), so
positions are scaled to the source's Rows and Columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cxr_pipeline.errors import EncodeError

SALIENT_LEVEL = 0.5
"""Fraction of the heatmap maximum that bounds the salient area."""


@dataclass(frozen=True)
class Ellipse:
    """An axis-aligned ellipse in source-image pixel coordinates (column, row).

    Attributes
    ----------
    centre_col, centre_row
        Centre.
    half_width, half_height
        Semi-axes along the columns and the rows.
    salient
        True when it outlines a heatmap area; False when it is the whole image
        (no heatmap, or a flat one).
    """

    centre_col: float
    centre_row: float
    half_width: float
    half_height: float
    salient: bool

    def graphic_data(self) -> np.ndarray:
        """Return the four SCOORD ELLIPSE points: major axis end points, then minor axis end points.

        Returns
        -------
        numpy.ndarray
            float32 ``(4, 2)`` array of (column, row).
        """
        cx, cy, hw, hh = self.centre_col, self.centre_row, self.half_width, self.half_height
        horizontal = [(cx - hw, cy), (cx + hw, cy)]
        vertical = [(cx, cy - hh), (cx, cy + hh)]
        points = horizontal + vertical if hw >= hh else vertical + horizontal
        return np.asarray(points, dtype=np.float32)


def _whole_image(rows: int, cols: int) -> Ellipse:
    return Ellipse(cols / 2.0, rows / 2.0, cols / 2.0, rows / 2.0, salient=False)


def salient_ellipse(
    heatmap: np.ndarray | None, rows: int, cols: int, level: float = SALIENT_LEVEL
) -> Ellipse:
    """Ellipse around the heatmap's most salient area, on a ``rows x cols`` source image.

    Parameters
    ----------
    heatmap
        Map in [0, 1] over the image (any resolution with the image's aspect), or None.
    rows, cols
        Rows and Columns of the referenced source image.
    level
        Fraction of the map's maximum that bounds the area, in (0, 1].

    Returns
    -------
    Ellipse
        The salient ellipse, or the ellipse inscribed in the whole image (``salient``
        False) when there is no heatmap or it is zero everywhere.

    Raises
    ------
    EncodeError
        The heatmap is not a finite 2D array, or the image size is not positive.
    """
    if rows < 1 or cols < 1:
        raise EncodeError(f"source image size {rows}x{cols} is not positive")
    if heatmap is None:
        return _whole_image(rows, cols)
    if heatmap.ndim != 2 or min(heatmap.shape) < 1 or not np.isfinite(heatmap).all():
        raise EncodeError(f"heatmap must be a finite 2D array, got shape {heatmap.shape}")
    peak = float(heatmap.max())
    if peak <= 0.0:
        return _whole_image(rows, cols)
    labels, _ = ndimage.label(heatmap >= level * peak)
    peak_index = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    area = labels == labels[peak_index]
    found = ndimage.find_objects(area.astype(np.int32))[0]
    if found is None:  # cannot happen: the peak itself is in the area
        return _whole_image(rows, cols)
    row_slice, col_slice = found
    scale_r, scale_c = rows / heatmap.shape[0], cols / heatmap.shape[1]
    top, bottom = row_slice.start * scale_r, row_slice.stop * scale_r
    left, right = col_slice.start * scale_c, col_slice.stop * scale_c
    return Ellipse(
        centre_col=(left + right) / 2.0,
        centre_row=(top + bottom) / 2.0,
        half_width=(right - left) / 2.0,
        half_height=(bottom - top) / 2.0,
        salient=True,
    )
