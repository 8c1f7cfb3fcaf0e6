"""The shared MONAI preprocessing chain on real radiographs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_pipeline.errors import UnsupportedPixelData
from cxr_pipeline.explain import map_to_image
from cxr_pipeline.model_card import PreprocessingSpec
from cxr_pipeline.preprocess import build_transform, input_geometry, preprocess, resized_shape

SPEC = PreprocessingSpec()
MEAN = torch.tensor(SPEC.mean)[:, None, None]
STD = torch.tensor(SPEC.std)[:, None, None]


def _grey(tensor: torch.Tensor) -> np.ndarray:
    """Undo the ImageNet normalisation of channel 0: the resized, cropped grey image."""
    return (tensor * STD + MEAN)[0].numpy()


@pytest.fixture(scope="module")
def nih_pixels(nih_png_paths: list[Path]) -> np.ndarray:
    from cxr_pipeline.ingest import load_picture

    return load_picture(nih_png_paths[0])


@pytest.mark.parametrize("shape", [(1024, 1024), (1955, 1841), (300, 500), (100, 150), (97, 101)])
def test_eval_output_shape_dtype_and_geometry(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    out = preprocess(rng.random(shape, dtype=np.float32), SPEC)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    grey = out * STD + MEAN  # the three channels are the same grey image
    assert torch.allclose(grey[0], grey[1], atol=1e-5) and torch.allclose(
        grey[0], grey[2], atol=1e-5
    )
    geometry = input_geometry(shape, SPEC)
    assert min(geometry.resized_shape) == SPEC.resize
    assert geometry.resized_shape == resized_shape(shape, SPEC.resize)


def test_imagenet_normalisation_of_a_constant_image() -> None:
    out = preprocess(np.full((300, 400), 0.5, dtype=np.float32), SPEC)
    expected = (0.5 - torch.tensor(SPEC.mean)) / torch.tensor(SPEC.std)
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    assert torch.allclose(out.std(dim=(1, 2)), torch.zeros(3), atol=1e-5)


def test_png_and_dicom_of_the_same_pixels_give_the_same_tensor(
    nih_png_paths: list[Path], tmp_path: Path
) -> None:
    from cxr_pipeline.ingest import load_picture, load_radiograph
    from cxr_pipeline.settings import IngestSettings
    from tests.support.dicom_factory import make_dicom, write

    png = nih_png_paths[3]
    from_png = load_picture(png)
    stored = np.rint(from_png * 255).astype(np.uint8)
    tensors = [preprocess(from_png, SPEC)]
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        ds = make_dicom(stored, photometric=photometric, bits_stored=8, window=None)
        path = write(ds, tmp_path / f"{photometric}.dcm")
        image = load_radiograph(path, IngestSettings())
        assert image.pixels.shape == from_png.shape
        tensors.append(preprocess(image.pixels, SPEC))
    for other in tensors[1:]:
        assert torch.allclose(tensors[0], other, atol=1e-4), float((tensors[0] - other).abs().max())


def test_real_chest_cr_dicom_is_preprocessed(rg1_uncr: Path) -> None:
    from cxr_pipeline.ingest import load_radiograph
    from cxr_pipeline.settings import IngestSettings

    image = load_radiograph(rg1_uncr, IngestSettings())
    out = preprocess(image.pixels, SPEC)
    assert out.shape == (3, 224, 224)
    grey = _grey(out)
    assert grey.min() >= 0.0 and grey.max() <= 1.0 + 1e-5
    assert grey.std() > 0.05  # real anatomy, not a flat image


def test_geometry_maps_the_model_input_back_onto_the_image(nih_pixels: np.ndarray) -> None:
    for pixels in (nih_pixels, nih_pixels[100:700, :]):  # square and landscape
        geometry = input_geometry(pixels.shape, SPEC)
        back = map_to_image(_grey(preprocess(pixels, SPEC)), geometry)
        assert back.shape == pixels.shape
        top, left, bottom, right = (round(v) for v in geometry.image_box)
        inner = (slice(top + 8, bottom - 8), slice(left + 8, right - 8))
        # Inside the box: the image itself, blurred by the down- and up-sampling.
        corr = np.corrcoef(back[inner].ravel(), pixels[inner].ravel())[0, 1]
        assert corr > 0.97
        assert np.abs(back[inner] - pixels[inner]).mean() < 0.03
        # Outside: zeros.
        if left > 2:
            assert np.all(back[:, : left - 2] == 0) and np.all(back[:, right + 2 :] == 0)
        if top > 2:
            assert np.all(back[: top - 2] == 0) and np.all(back[bottom + 2 :] == 0)


def test_geometry_of_an_image_smaller_than_the_crop() -> None:
    spec = PreprocessingSpec(resize=64, crop=80)
    pixels = np.random.default_rng(1).random((64, 90), dtype=np.float32)
    out = preprocess(pixels, spec)
    assert out.shape == (3, 80, 80)
    geometry = input_geometry(pixels.shape, spec)
    assert geometry.crop_start[0] == -8  # padded 8 rows above
    assert geometry.crop_start[1] == 5  # centre crop of the 90 columns
    back = map_to_image(np.ones((80, 80), dtype=np.float32), geometry)
    assert back.shape == pixels.shape
    assert (
        np.allclose(back[:, 8:82], 1.0) and np.all(back[:, :4] == 0) and np.all(back[:, 86:] == 0)
    )


def test_train_transform_is_random_but_seedable(nih_pixels: np.ndarray) -> None:
    first = build_transform(SPEC, train=True)
    second = build_transform(SPEC, train=True)
    first.set_random_state(7)  # type: ignore[attr-defined]
    second.set_random_state(7)  # type: ignore[attr-defined]
    a = [first(nih_pixels) for _ in range(3)]
    b = [second(nih_pixels) for _ in range(3)]
    for x, y in zip(a, b, strict=True):
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
        assert torch.equal(x, y)
    assert not torch.equal(a[0], a[1]) or not torch.equal(a[1], a[2])
    assert not torch.equal(a[0], preprocess(nih_pixels, SPEC))


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10, 10, 3), dtype=np.float32),
        np.zeros((0, 10), dtype=np.float32),
        np.full((32, 32), np.nan, dtype=np.float32),
    ],
)
def test_bad_input_is_a_typed_error(bad: np.ndarray) -> None:
    with pytest.raises(UnsupportedPixelData):
        preprocess(bad, SPEC)
