"""The heatmap's salient area as an SR ellipse on the source image."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_pipeline.encode.region import salient_ellipse
from cxr_pipeline.errors import EncodeError


def test_ellipse_bounds_the_part_around_the_peak_scaled_to_the_source() -> None:
    heat = np.zeros((100, 200), dtype=np.float32)
    heat[10:30, 20:60] = 0.6  # the salient block (>= half the peak), holds the peak
    heat[15, 25] = 1.0
    heat[70:90, 150:190] = 0.4  # a second, weaker block below the level: left out
    ellipse = salient_ellipse(heat, rows=1000, cols=2000)
    assert ellipse.salient
    assert (ellipse.centre_col, ellipse.centre_row) == pytest.approx((400.0, 200.0))
    assert (ellipse.half_width, ellipse.half_height) == pytest.approx((200.0, 100.0))
    points = ellipse.graphic_data()
    assert points.shape == (4, 2)
    # major axis first (wider than tall: the horizontal one), then the minor axis
    assert points.tolist() == [[200.0, 200.0], [600.0, 200.0], [400.0, 100.0], [400.0, 300.0]]


def test_only_the_connected_part_holding_the_peak_counts() -> None:
    heat = np.zeros((50, 50), dtype=np.float32)
    heat[5:10, 5:10] = 0.9
    heat[30:40, 30:40] = 1.0
    ellipse = salient_ellipse(heat, rows=50, cols=50)
    assert (ellipse.centre_col, ellipse.centre_row) == pytest.approx((35.0, 35.0))
    assert ellipse.graphic_data().tolist() == [
        [30.0, 35.0],
        [40.0, 35.0],
        [35.0, 30.0],
        [35.0, 40.0],
    ]


@pytest.mark.parametrize("heat", [None, np.zeros((8, 8), dtype=np.float32)])
def test_no_or_flat_heatmap_gives_the_whole_image(heat: np.ndarray | None) -> None:
    ellipse = salient_ellipse(heat, rows=300, cols=400)
    assert not ellipse.salient
    assert (ellipse.centre_col, ellipse.centre_row) == (200.0, 150.0)
    assert (ellipse.half_width, ellipse.half_height) == (200.0, 150.0)


def test_bad_input_is_a_typed_error() -> None:
    with pytest.raises(EncodeError):
        salient_ellipse(np.full((4, 4), np.nan, dtype=np.float32), rows=4, cols=4)
    with pytest.raises(EncodeError):
        salient_ellipse(np.ones((4, 4, 3), dtype=np.float32), rows=4, cols=4)
    with pytest.raises(EncodeError):
        salient_ellipse(None, rows=0, cols=4)
