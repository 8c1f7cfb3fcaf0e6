"""A corpus of hostile and broken C-STORE payloads, generated from real pixels.

Each :class:`Case` is what goes on the wire: the command's SOP Class and Instance UIDs
and the data set bytes (no file meta), so a case can be anything from a subtly wrong
header to random bytes. The base image is a small real chest radiograph built by
``tests/support/dicom_factory.py``; every case gets fresh UIDs.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from tests.conftest import testdata
from tests.reliability.harness import PHI_ID, PHI_NAME, body_bytes

CR = str(ComputedRadiographyImageStorage)


@dataclass(frozen=True)
class Case:
    """One hostile C-STORE."""

    name: str
    sop_class: str
    sop_instance: str
    payload: bytes
    study: str = ""
    syntax: str = ExplicitVRLittleEndian


def _fresh(base: Dataset) -> Dataset:
    ds = deepcopy(base)
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _case(
    name: str,
    ds: Dataset,
    *,
    sop_class: str | None = None,
    sop_instance: str | None = None,
    payload: bytes | None = None,
) -> Case:
    return Case(
        name=name,
        sop_class=sop_class or str(ds.get("SOPClassUID", CR)),
        sop_instance=sop_instance or str(ds.get("SOPInstanceUID", generate_uid())),
        payload=payload if payload is not None else body_bytes(ds),
        study=str(ds.get("StudyInstanceUID", "")),
    )


def _edited(base: Dataset, edit: Callable[[Dataset], object]) -> Dataset:
    ds = _fresh(base)
    edit(ds)
    return ds


def _nested(body: bytes, depth: int) -> bytes:
    """``body`` with a ``depth``-level undefined-length Content Sequence before Pixel Data.

    Built as raw bytes: pydicom's writer takes exponential time on deep nesting.
    """
    opening = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    opening += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    leaf = _raw_element((0x0008, 0x0100), b"SH", b"X ")
    pixel_tag = body.rindex(struct.pack("<HH", 0x7FE0, 0x0010))
    return body[:pixel_tag] + opening * depth + leaf + closing * depth + body[pixel_tag:]


def _set(keyword: str, value: object) -> Callable[[Dataset], object]:
    return lambda ds: setattr(ds, keyword, value)


def _drop(keyword: str) -> Callable[[Dataset], object]:
    return lambda ds: delattr(ds, keyword)


def _bits(allocated: int) -> Callable[[Dataset], object]:
    def edit(ds: Dataset) -> None:
        ds.BitsAllocated = allocated
        ds.BitsStored = allocated
        ds.HighBit = allocated - 1
        count = int(ds.Rows) * int(ds.Columns)
        ds.PixelData = bytes(-(-count * allocated // 8))

    return edit


def _zero_length(ds: Dataset) -> None:
    ds.PatientName = ""
    ds.StudyDate = ""
    ds.BodyPartExamined = ""
    ds.WindowCenter = None
    ds.WindowWidth = None
    ds.ImagerPixelSpacing = None


def _truncate_pixels(ds: Dataset) -> None:
    ds.PixelData = bytes(ds.PixelData)[: len(ds.PixelData) // 3 * 2 // 2 * 2]


def _multiframe(ds: Dataset) -> None:
    ds.NumberOfFrames = 3
    ds.PixelData = bytes(ds.PixelData) * 3


def _raw_element(tag: tuple[int, int], vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """An explicit VR little endian element, with an optionally lying length field."""
    group, element = tag
    size = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR"):
        return struct.pack("<HH2sHI", group, element, vr, 0, size) + value
    return struct.pack("<HH2sH", group, element, vr, size) + value


def build_corpus(base: Dataset) -> list[Case]:
    """At least 30 hostile cases built from ``base`` (a valid small chest CR)."""
    rng = random.Random(20260425)
    cases: list[Case] = []

    # -- broken byte streams ----------------------------------------------------------
    for name, cut in (("truncated header", 200), ("truncated mid-element", 37)):
        ds = _fresh(base)
        cases.append(_case(name, ds, payload=body_bytes(ds)[:cut]))
    ds = _fresh(base)
    cases.append(_case("truncated pixel data stream", ds, payload=body_bytes(ds)[:-5000]))
    cases.append(_case("empty data set", _fresh(base), payload=b"\0\0\0\0"))
    cases.append(
        _case("random bytes", _fresh(base), payload=rng.randbytes(4096)),
    )
    ds = _fresh(base)
    lying = _raw_element((0x0010, 0x0010), b"PN", b"", length=0xFFF0)
    cases.append(_case("element length beyond end", ds, payload=body_bytes(ds)[:600] + lying))
    ds = _fresh(base)
    unclosed = _raw_element((0x0040, 0xA730), b"SQ", b"", length=0xFFFFFFFF)
    unclosed += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)  # an item, never closed
    cases.append(_case("unclosed undefined-length sequence", ds, payload=body_bytes(ds) + unclosed))
    ds = _fresh(base)
    cases.append(
        _case(
            "implicit VR bytes in explicit context",
            ds,
            payload=body_bytes(ds, ImplicitVRLittleEndian),
        )
    )

    # -- wrong or missing file meta -----------------------------------------------------
    ds = _fresh(base)
    part10 = b"\0" * 128 + b"DICM" + body_bytes(ds)
    cases.append(_case("Part 10 preamble inside the data set", ds, payload=part10))
    ds = _fresh(base)
    meta_in_body = _raw_element((0x0002, 0x0010), b"UI", b"1.2.840.10008.1.2.4.90\0")
    cases.append(
        _case("file meta group in the data set", ds, payload=meta_in_body + body_bytes(ds))
    )

    # -- header edits -----------------------------------------------------------------------
    edits: list[tuple[str, Callable[[Dataset], object]]] = [
        ("pixel data shorter than rows x columns", _truncate_pixels),
        ("no pixel data", _drop("PixelData")),
        ("zero-length pixel data", _set("PixelData", b"")),
        (
            "absurd rows/columns 65535 x 65535",
            lambda d: (_set("Rows", 65535)(d), _set("Columns", 65535)(d)),
        ),
        ("rows 0", _set("Rows", 0)),
        ("no rows", _drop("Rows")),
        ("bits allocated 1", _bits(1)),
        ("bits allocated 32", _bits(32)),
        ("bits stored > bits allocated", _set("BitsStored", 24)),
        (
            "photometric PALETTE COLOR without LUT",
            _set("PhotometricInterpretation", "PALETTE COLOR"),
        ),
        ("photometric YBR_FULL with one sample", _set("PhotometricInterpretation", "YBR_FULL")),
        ("photometric nonsense", _set("PhotometricInterpretation", "HSV")),
        ("samples per pixel 4", _set("SamplesPerPixel", 4)),
        ("multi-frame", _multiframe),
        ("zero-length elements", _zero_length),
        ("empty Study Instance UID", _set("StudyInstanceUID", "")),
        ("no SOP Instance UID in the data set", _drop("SOPInstanceUID")),
        ("body part SKULL", _set("BodyPartExamined", "SKULL")),
        ("modality MR on a CR class", _set("Modality", "MR")),
        ("window width 0", _set("WindowWidth", 0)),
        ("NaN pixel spacing", _set("PixelSpacing", ["NaN", "NaN"])),
        ("signed pixels", _set("PixelRepresentation", 1)),
        ("over-long patient name", _set("PatientName", PHI_NAME + "^" + "Q" * 70)),
        ("patient ID with control characters", _set("PatientID", PHI_ID + "\x07\x1b[2J")),
    ]
    for name, edit in edits:
        cases.append(_case(name, _edited(base, edit)))

    ds = _fresh(base)
    cases.append(
        _case("deeply nested sequence (500 levels)", ds, payload=_nested(body_bytes(ds), 500))
    )

    # -- command vs data set ----------------------------------------------------------------
    ds = _fresh(base)
    cases.append(_case("command UID differs from data set UID", ds, sop_instance=generate_uid()))
    ds = _fresh(base)
    cases.append(
        _case("command class differs from data set class", ds, sop_class=str(CTImageStorage))
    )

    # -- hostile UIDs: no path traversal into or out of the spool -----------------------------
    for name, uid in (
        ("UID with ../ traversal", "1.2.3/../../../../escaped"),
        ("UID that is an absolute path", "/tmp/escaped.dcm"),
        ("UID '..'", ".."),
        ("UID with NUL then path", "1.2.3\0/../escaped"),
        ("UID of 65 digits", "1." + "2" * 63),
    ):
        ds = _fresh(base)
        cases.append(_case(name, ds, sop_instance=uid))

    # -- real non-chest and non-image objects -----------------------------------------------
    ct = _fresh_real(testdata("CT_small.dcm"))
    cases.append(_case("real CT (non-chest)", ct))
    pdf = _encapsulated_pdf(base)
    cases.append(_case("encapsulated PDF (non-image)", pdf))
    return cases


def _fresh_real(path: Path) -> Dataset:
    import pydicom

    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _encapsulated_pdf(base: Dataset) -> Dataset:
    ds = Dataset()
    for keyword in ("PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber"):
        setattr(ds, keyword, base.get(keyword, ""))
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DOC"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    return ds


def fuzzed(payload: bytes, flips: list[tuple[int, int]]) -> bytes:
    """``payload`` with the byte at each (position, value) overwritten."""
    data = bytearray(payload)
    for position, value in flips:
        data[position % len(data)] = value
    return bytes(data)


def pixel_array_bytes(ds: Dataset) -> int:
    """Bytes the header says the pixel data holds (what a naive decoder would allocate)."""
    return int(np.prod([int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated) // 8 or 1]))
