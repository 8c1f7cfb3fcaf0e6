"""The heatmap as a Secondary Capture image a PACS viewer shows beside the radiograph.

The display-ready radiograph (float, bright = dense) is downsampled to at most
``sc_max_size`` pixels on its longest side, the heatmap is coloured with a matplotlib
colormap and blended in (opacity ``heatmap_alpha`` times the map value), and a
"NOT FOR DIAGNOSTIC USE" mark plus the result statement are burned in with Pillow: the
decision always beside its operating point and the calibrated probability ("COVID-19
suspected (above the 98 %-sensitivity point, 12 %): probability 23 %"), and what set the
operating point when a site profile did. The result is an 8-bit RGB SC image (highdicom
``SCImage``) in the source study, in its own series, with Burned In Annotation YES and a
Source Image Sequence reference to the analysed radiograph.
"""

from __future__ import annotations

import re

import highdicom as hd
import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from cxr_pipeline.dicom.codes import BODY_PART_CHEST, SOURCE_IMAGE_FOR_PROCESSING
from cxr_pipeline.dicom.uids import ResultUid, instance_uid, series_uid
from cxr_pipeline.encode._common import (
    NOT_FOR_DIAGNOSTIC_USE,
    evidence_dataset,
    processing_equipment,
    series_date_time,
    series_description,
    source_reference,
    without_person_names,
)
from cxr_pipeline.errors import EncodeError
from cxr_pipeline.model.card import ModelCard
from cxr_pipeline.results import Finding
from cxr_pipeline.settings import OutputSettings

_ORIENTATION = re.compile(r"^[APRLHF]+$")
_TEXT_COLOUR = (255, 255, 255)
_MARK_COLOUR = (255, 64, 64)
_BOX_COLOUR = (0, 0, 0)


def _as_unit_image(array: np.ndarray, what: str) -> np.ndarray:
    """Check a 2D finite float image and clip it to [0, 1]."""
    if not isinstance(array, np.ndarray) or array.ndim != 2 or min(array.shape) < 1:
        shape = getattr(array, "shape", None)
        raise EncodeError(f"{what} must be a 2D array, got shape {shape}")
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        raise EncodeError(f"{what} must be numeric, got {array.dtype}")
    values = array.astype(np.float32, copy=False)
    if not np.isfinite(values).all():
        raise EncodeError(f"{what} contains NaN or infinite values")
    return np.clip(values, 0.0, 1.0)


def _resize(image: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Resize a float image to (rows, cols) with Pillow's 32-bit float mode."""
    rows, cols = size
    if image.shape == (rows, cols):
        return image
    resized = Image.fromarray(image, mode="F").resize((cols, rows), resample=resample)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _target_size(shape: tuple[int, int], max_size: int) -> tuple[int, int]:
    rows, cols = shape
    scale = min(1.0, max_size / max(rows, cols))
    return max(1, round(rows * scale)), max(1, round(cols * scale))


def blend_heatmap(
    pixels: np.ndarray, heatmap: np.ndarray | None, settings: OutputSettings
) -> np.ndarray:
    """Colour a heatmap and blend it into a grey image.

    Parameters
    ----------
    pixels
        Grey image, float in [0, 1], (rows, cols).
    heatmap
        Map in [0, 1] of the same shape, or None for the plain radiograph.
    settings
        ``heatmap_alpha`` (opacity where the map is 1) and ``heatmap_colormap``.

    Returns
    -------
    numpy.ndarray
        uint8 RGB image (rows, cols, 3).

    Raises
    ------
    EncodeError
        Unknown colormap name.
    """
    grey = pixels[..., None]
    if heatmap is None:
        rgb = np.broadcast_to(grey, (*pixels.shape, 3))
    else:
        try:
            colormap = matplotlib.colormaps[settings.heatmap_colormap]
        except KeyError as exc:
            raise EncodeError(f"unknown colormap {settings.heatmap_colormap!r}") from exc
        # The colormap's own N-entry table, indexed as matplotlib does (floor(x * N),
        # 1.0 -> last entry): same colours, without per-pixel float64 RGBA arrays.
        table = np.asarray(colormap(np.arange(colormap.N))[:, :3], dtype=np.float32)
        index = np.minimum((heatmap * colormap.N).astype(np.intp), colormap.N - 1)
        alpha = (np.float32(settings.heatmap_alpha) * heatmap)[..., None]
        # grey + alpha * (colour - grey) == (1 - alpha) * grey + alpha * colour
        rgb = table[index]
        rgb -= grey
        rgb *= alpha
        rgb += grey
    # Inputs are in [0, 1] and the blend is convex, so no clipping is needed.
    return np.asarray(rgb * np.float32(255.0) + np.float32(0.5), dtype=np.uint8)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled default font: no font files needed on the host.
    return ImageFont.load_default(size=size)


def _draw_block(
    draw: ImageDraw.ImageDraw,
    lines: list[tuple[str, tuple[int, int, int]]],
    width: int,
    top: int | None,
    bottom: int | None,
) -> None:
    """Draw text lines on an opaque box at the top or bottom of the image."""
    size = max(12, width // 32)
    margin = max(2, size // 4)
    # Shrink the font until the longest line fits the image width.
    while size > 6:
        font = _font(size)
        widths = [draw.textlength(text, font=font) for text, _ in lines]
        if max(widths) + 2 * margin <= width:
            break
        size -= 1
    font = _font(size)
    line_height = size + margin
    box_height = line_height * len(lines) + margin
    y0 = top if top is not None else (bottom or 0) - box_height
    box_width = int(max(draw.textlength(text, font=font) for text, _ in lines)) + 2 * margin
    draw.rectangle((0, y0, min(width, box_width) - 1, y0 + box_height - 1), fill=_BOX_COLOUR)
    for index, (text, colour) in enumerate(lines):
        draw.text((margin, y0 + margin + index * line_height), text, fill=colour, font=font)


def annotation_lines(finding: Finding, card: ModelCard) -> list[str]:
    """List the result text burned into the SC, one line each.

    Parameters
    ----------
    finding
        Calibrated probability, threshold on its scale and what set it.
    card
        Model name and version.

    Returns
    -------
    list of str
        The statement (:meth:`Finding.statement`), the model, and, when anything other
        than the model card set the operating point (a site profile), what did.
    """
    lines = [finding.statement(), f"{card.name} {card.version}"]
    if finding.decided_by and not finding.decided_by.startswith("model card"):
        lines.append(f"operating point: {finding.decided_by}")
    return lines


def burn_in_annotations(rgb: np.ndarray, finding: Finding, card: ModelCard) -> np.ndarray:
    """Burn the research-use mark and the result statement into an image.

    Parameters
    ----------
    rgb
        uint8 RGB image (rows, cols, 3).
    finding
        Calibrated probability and threshold.
    card
        Model name and version, written under the statement.

    Returns
    -------
    numpy.ndarray
        A new uint8 RGB image with the text drawn on black boxes (top-left: the
        mark; bottom-left: :func:`annotation_lines`).
    """
    image = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(image)
    rows, cols = rgb.shape[:2]
    _draw_block(draw, [(f"{NOT_FOR_DIAGNOSTIC_USE} - research only", _MARK_COLOUR)], cols, 0, None)
    _draw_block(
        draw, [(line, _TEXT_COLOUR) for line in annotation_lines(finding, card)], cols, None, rows
    )
    return np.asarray(image, dtype=np.uint8)


def _patient_orientation(source: Dataset) -> tuple[str, str] | None:
    values = source.get("PatientOrientation")
    if values is None or isinstance(values, str) or len(values) != 2:
        return None
    row, col = (str(v).strip().upper() for v in values)
    if _ORIENTATION.match(row) and _ORIENTATION.match(col):
        return row, col
    return None


def build_secondary_capture(
    source: Dataset,
    pixels: np.ndarray,
    heatmap: np.ndarray | None,
    finding: Finding,
    card: ModelCard,
    settings: OutputSettings,
) -> hd.sc.SCImage:
    """Build the heatmap Secondary Capture for one analysed radiograph.

    Parameters
    ----------
    source
        Header of the analysed image: patient/study are copied, the image is referenced.
    pixels
        The display-ready radiograph, float (rows, cols) in [0, 1], bright = dense
        (MONOCHROME1 sources already inverted by ingest).
    heatmap
        Map in [0, 1] with the shape of ``pixels``, or None (radiograph and text only).
    finding
        Calibrated probability and threshold, burned in as one statement.
    card
        Model card: name/version burned in, Device UID for the UIDs and equipment.
    settings
        Output settings: series number, size limit, colormap, opacity, manufacturer.

    Returns
    -------
    highdicom.sc.SCImage
        8-bit RGB Secondary Capture, Burned In Annotation YES.

    Raises
    ------
    EncodeError
        Missing source UIDs, pixels or heatmap not 2D finite arrays of the same
        shape, an unknown colormap, or a value highdicom rejects.
    """
    ref = source_reference(source)
    grey = _as_unit_image(pixels, "pixels")
    heat = None if heatmap is None else _as_unit_image(heatmap, "heatmap")
    if heat is not None and heat.shape != grey.shape:
        raise EncodeError(f"heatmap shape {heat.shape} differs from image shape {grey.shape}")
    size = _target_size(grey.shape, settings.sc_max_size)
    # BOX averages whole source pixels: anti-aliased downsampling of the radiograph.
    grey = _resize(grey, size, Image.Resampling.BOX)
    if heat is not None:
        heat = _resize(heat, size, Image.Resampling.BILINEAR)
    rgb = burn_in_annotations(blend_heatmap(grey, heat, settings), finding, card)

    evidence = evidence_dataset(source)
    orientation = _patient_orientation(evidence)
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=without_person_names(evidence),
            pixel_array=rgb,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid(
                ResultUid.SC_SERIES, ref.study_instance_uid, card.device_uid
            ),
            series_number=settings.sc_series_number,
            sop_instance_uid=instance_uid(
                ResultUid.SC_INSTANCE, ref.sop_instance_uid, card.device_uid
            ),
            instance_number=1,
            manufacturer=settings.manufacturer,
            # highdicom requires an orientation for PATIENT images; where the source
            # has none, a placeholder is replaced by an empty (Type 2) value below.
            patient_orientation=orientation or ("L", "F"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=series_description("AI COVID-19 heatmap"),
            manufacturer_model_name=card.name,
            software_versions=card.version,
            institution_name=settings.institution_name,
            contributing_equipment=[
                processing_equipment(
                    card,
                    settings,
                    f"Heatmap of the COVID-19 classifier over the referenced radiograph. "
                    f"{card.intended_use}",
                )
            ],
        )
        sc.copy_patient_and_study_information(evidence)
    except (ValueError, TypeError) as exc:
        raise EncodeError(f"cannot build SC for {ref.sop_instance_uid}: {exc}") from exc

    # Attributes of the SC Image IOD that highdicom's SCImage takes no argument for.
    if orientation is None:
        sc["PatientOrientation"].value = None  # Type 2: empty = unknown
    # General Series: only chest radiographs are analysed, so the body part is the
    # source's value or CHEST; Laterality (Type 2C) is then absent for this unpaired
    # part unless the source gives one.
    sc.BodyPartExamined = str(evidence.get("BodyPartExamined") or "") or BODY_PART_CHEST
    if evidence.get("Laterality"):
        sc.Laterality = evidence.Laterality
    sc.ConversionType = "WSD"  # made on a workstation, not digitised from film/video
    sc.BurnedInAnnotation = "YES"
    decided = f" Operating point set by the {finding.decided_by}." if finding.decided_by else ""
    sc.ImageComments = f"{card.intended_use} {finding.statement()}.{decided}"
    sc.DerivationDescription = (
        "Source radiograph downsampled, classifier heatmap blended in colour, "
        "annotations burned in."
    )
    reference = Dataset()
    reference.ReferencedSOPClassUID = ref.sop_class_uid
    reference.ReferencedSOPInstanceUID = ref.sop_instance_uid
    reference.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(SOURCE_IMAGE_FOR_PROCESSING)
    ]
    sc.SourceImageSequence = [reference]
    series_date_time(sc)
    # True colour pixels are shown as stored: no VOI (window or LUT) may come along
    # from the grey source, or viewers would window the RGB values.
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTSequence", "VOILUTFunction"):
        if keyword in sc:
            delattr(sc, keyword)
    return sc
