"""The same real radiograph stored as DICOM the ways different PACS and modalities send it.

Used by the intensity-robustness test and ``bench/bench_intensity.py``. Each variant is a
real DICOM dataset (synthetic header around the real pixels) that goes through the real
ingest path (:func:`cxr_pipeline.dicom.ingest.load_radiograph`: decode, modality/VOI LUT) before
the model sees it:

* ``full range``: 16-bit stored values, a window spanning the stored range (reference);
* ``1-99 % window`` / ``5-95 % window``: the same stored values with Window Center/Width
  set to the 1st-99th (5th-95th) percentile of the stored values, as many modalities send;
* ``gamma 0.7`` / ``gamma 1.4``: stored values after a gamma curve (a different modality
  processing of the same exposure), full-range window;
* ``12-bit``: the picture stored with Bits Stored 12 instead of 16, full-range window.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from cxr_pipeline.dicom.ingest import load_radiograph
from cxr_pipeline.settings import IngestSettings
from tests.support.dicom_factory import make_dicom, to_bytes

REFERENCE = "full range"


def _percentile_window(pixels: NDArray[np.float32], low: float, high: float) -> Dataset:
    ds = make_dicom(pixels, bits_stored=16, window="full")
    stored = ds.pixel_array.astype(np.float64)
    lo, hi = np.percentile(stored, [low, high])
    hi = max(hi, lo + 1.0)
    # PS3.3 C.11.2.1.2.1: values <= c - 0.5 - (w - 1) / 2 map to the bottom, values
    # > c - 0.5 + (w - 1) / 2 to the top; so w - 1 = hi - lo and c - 0.5 = (lo + hi) / 2.
    ds.WindowCenter = f"{(lo + hi) / 2 + 0.5:.1f}"
    ds.WindowWidth = f"{hi - lo + 1:.1f}"
    return ds


VARIANTS: dict[str, Callable[[NDArray[np.float32]], Dataset]] = {
    REFERENCE: lambda p: make_dicom(p, bits_stored=16, window="full"),
    "1-99 % window": lambda p: _percentile_window(p, 1.0, 99.0),
    "5-95 % window": lambda p: _percentile_window(p, 5.0, 95.0),
    "gamma 0.7": lambda p: make_dicom(np.power(p, 0.7, dtype=np.float32), bits_stored=16),
    "gamma 1.4": lambda p: make_dicom(np.power(p, 1.4, dtype=np.float32), bits_stored=16),
    "12-bit": lambda p: make_dicom(p, bits_stored=12, window="full"),
}
"""Variant name -> builder of the DICOM dataset from display pixels in [0, 1]."""

BEYOND_CLIP: dict[str, Callable[[NDArray[np.float32]], Dataset]] = {
    "10-90 % window": lambda p: _percentile_window(p, 10.0, 90.0),
    "20-80 % window": lambda p: _percentile_window(p, 20.0, 80.0),
}
"""Harsher windows than the issue's set, clipping more than the default's 8 % rank clip:
the benchmark shows them as the limit of the invariance (not part of the 0.05 target)."""


def ingest_variants(pixels: NDArray[np.float32], *, beyond_clip: bool = False
                    ) -> dict[str, NDArray[np.float32]]:
    """Store ``pixels`` as every variant and read each back through the real ingest path.

    Parameters
    ----------
    pixels
        Display-ready float32 ``(rows, cols)`` in [0, 1] (a real radiograph).

    beyond_clip
        Add the :data:`BEYOND_CLIP` windows.

    Returns
    -------
    dict
        Variant name -> the display-ready pixels :func:`load_radiograph` returns.
    """
    policy = IngestSettings()
    out: dict[str, NDArray[np.float32]] = {}
    builders = {**VARIANTS, **(BEYOND_CLIP if beyond_clip else {})}
    for name, build in builders.items():
        data = to_bytes(build(pixels))
        out[name] = load_radiograph(io.BytesIO(data), policy).pixels
    return out
