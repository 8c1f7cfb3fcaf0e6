"""A realistic mixed input folder for ``cxr-batch`` tests, built from real files.

Chest radiographs are real NIH pixels wrapped by :mod:`tests.support.dicom_factory` in
several transfer syntaxes and photometric interpretations, plus a real preamble-less
dataset; the rest are real pydicom(-data) files (tibia CR, CT, a DICOMDIR), a truncated
chest DICOM, a text file and a real PNG. :func:`build_tree` returns what each file's row
must say.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pydicom import uid
from pydicom.data import get_testdata_file

from tests.support import dicom_factory as factory

DONE, SKIPPED, FAILED = "done", "skipped", "failed"


def _testdata(name: str) -> Path:
    found = get_testdata_file(name, download=False)
    if found is None:
        raise FileNotFoundError(f"{name} not installed (pip install pydicom-data)")
    return Path(str(found))


def build_tree(root: Path, nih_pngs: list[Path], *, size: int = 256) -> dict[str, tuple[str, str]]:
    """Write the mixed folder under ``root``.

    Parameters
    ----------
    root
        Empty folder to fill.
    nih_pngs
        At least 4 real NIH PNGs.
    size
        Side of the generated radiographs (small keeps tests fast).

    Returns
    -------
    dict
        Path relative to ``root`` -> (expected status, expected reason; "" for done;
        alternatives separated by ``|``: a file cut inside its pixel data may fail to
        parse or to decode, depending on where the cut falls).
    """
    expected: dict[str, tuple[str, str]] = {}
    pixels = [factory.load_png(p, size=size) for p in nih_pngs[:4]]

    chest = [
        (
            "chest/cr_explicit_le.dcm",
            pixels[0],
            "CR",
            "MONOCHROME2",
            12,
            uid.ExplicitVRLittleEndian,
        ),
        ("chest/dx_mono1_j2k.dcm", pixels[1], "DX", "MONOCHROME1", 12, uid.JPEG2000Lossless),
        ("chest/a/b/cr_jpegls", pixels[2], "CR", "MONOCHROME2", 16, uid.JPEGLSLossless),
        ("chest/a/cr_rle.DCM", pixels[3], "CR", "MONOCHROME1", 10, uid.RLELossless),
        (
            "chest/cr_deflate.dcm",
            pixels[0],
            "CR",
            "MONOCHROME2",
            12,
            uid.DeflatedExplicitVRLittleEndian,
        ),
    ]
    if factory.dcmtk_available():
        chest.append(
            ("chest/dx_jpeg_baseline.dcm", pixels[1], "DX", "MONOCHROME2", 8, uid.JPEGBaseline8Bit)
        )
    for rel, px, modality, photometric, bits, syntax in chest:
        ds = factory.make_dicom(
            px,
            modality=modality,
            photometric=photometric,
            bits_stored=bits,  # type: ignore[arg-type]
            transfer_syntax=syntax,
        )
        factory.write(ds, root / rel)
        expected[rel] = (DONE, "")

    # A raw dataset: implicit VR, no preamble, no file meta, no extension.
    raw = factory.make_dicom(pixels[2], modality="CR", transfer_syntax=uid.ImplicitVRLittleEndian)
    raw_path = root / "chest" / "raw_dataset"
    raw.preamble = None
    del raw.file_meta
    raw.save_as(raw_path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert raw_path.read_bytes()[128:132] != b"DICM"
    expected["chest/raw_dataset"] = (DONE, "")

    # A chest DICOM cut in the middle of its pixel data.
    whole = factory.to_bytes(factory.make_dicom(pixels[3], modality="DX"))
    (root / "broken").mkdir(parents=True)
    (root / "broken" / "truncated.dcm").write_bytes(whole[: len(whole) // 2])
    expected["broken/truncated.dcm"] = (FAILED, "corrupt_pixel_data|not_dicom")

    others = root / "other"
    others.mkdir()
    shutil.copyfile(_testdata("RG3_UNCR.dcm"), others / "tibia_cr.dcm")
    expected["other/tibia_cr.dcm"] = (SKIPPED, "not_chest_radiograph")
    shutil.copyfile(_testdata("CT_small.dcm"), others / "ct.dcm")
    expected["other/ct.dcm"] = (SKIPPED, "not_chest_radiograph")
    shutil.copyfile(_testdata("DICOMDIR"), root / "DICOMDIR")
    expected["DICOMDIR"] = (SKIPPED, "not_image")
    (others / "notes.dcm").write_text("not a DICOM file, whatever the name says\n")
    expected["other/notes.dcm"] = (SKIPPED, "not_dicom")

    (root / "pictures").mkdir()
    shutil.copyfile(nih_pngs[0], root / "pictures" / "nih.png")
    expected["pictures/nih.png"] = (DONE, "")
    return expected
