"""The shared preprocessing chain on real radiographs (and its MONAI equivalence)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cxr_pipeline.errors import UnsupportedPixelData
from cxr_pipeline.explain.heatmap import map_to_image
from cxr_pipeline.model.augment import RandWindow, build_transform
from cxr_pipeline.model.card import PreprocessingSpec
from cxr_pipeline.model.preprocess import build_resized, input_geometry, preprocess
from cxr_pipeline.model.steps import RankNormalize, resized_shape

SPEC = PreprocessingSpec()
MEAN = torch.tensor(SPEC.mean)[:, None, None]
STD = torch.tensor(SPEC.std)[:, None, None]


def _grey(tensor: torch.Tensor) -> np.ndarray:
    """Undo the ImageNet normalisation of channel 0: the resized, cropped grey image."""
    return (tensor * STD + MEAN)[0].numpy()


@pytest.fixture(scope="module")
def nih_pixels(nih_png_paths: list[Path]) -> np.ndarray:
    from cxr_pipeline.dicom.ingest import load_picture

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
    from cxr_pipeline.dicom.ingest import load_picture, load_radiograph
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
    from cxr_pipeline.dicom.ingest import load_radiograph
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


RANK = PreprocessingSpec(intensity="rank", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_rank_normalisation_ignores_any_increasing_intensity_map(nih_pixels: np.ndarray) -> None:
    reference = preprocess(nih_pixels, RANK)
    maps = {
        "gamma 0.7": np.power(nih_pixels, 0.7),
        "gamma 1.4": np.power(nih_pixels, 1.4),
        "level/width without clipping": 0.2 + 0.6 * nih_pixels,
        "12-bit": np.round(nih_pixels * 4095) / 4095,  # the 8-bit PNG's levels stay apart
        "log": np.log1p(9 * nih_pixels) / np.log(10),
    }
    for name, mapped in maps.items():
        out = preprocess(np.asarray(mapped, dtype=np.float32), RANK)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0, msg=name)
    # Without the rank step the same maps change the model input a lot.
    plain = replace(RANK, intensity="none")
    moved = preprocess(np.power(nih_pixels, 0.7).astype(np.float32), plain)
    assert float((moved - preprocess(nih_pixels, plain)).abs().max()) > 0.1


def test_rank_normalisation_is_the_mid_rank_cdf() -> None:
    image = np.array([[0.1, 0.1], [0.5, 0.9]], dtype=np.float32)
    # Two tied pixels share the mid-rank 1/4 (the middle of 0 and 2/4); then 5/8, 7/8.
    np.testing.assert_allclose(RankNormalize()(image), [[0.25, 0.25], [0.625, 0.875]])
    assert np.array_equal(RankNormalize()(np.full((3, 3), 0.3, np.float32)),
                          np.full((3, 3), 0.5, np.float32))


def test_a_clipping_window_barely_changes_the_ranked_input(nih_pixels: np.ndarray) -> None:
    lo, hi = np.quantile(nih_pixels, [0.05, 0.95])
    windowed = ((np.clip(nih_pixels, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    diff = (preprocess(windowed, RANK) - preprocess(nih_pixels, RANK)).abs()
    # Only the clipped 10 % of the pixels tie: in [-1, 1] units they move by <= 0.1.
    assert float(diff.max()) <= 0.1 and float(diff.mean()) < 0.01


def test_cached_resized_images_give_the_inference_tensor(nih_pixels: np.ndarray) -> None:
    for spec in (RANK, SPEC):
        cached = build_transform(spec, resized=True)(build_resized(spec)(nih_pixels))
        torch.testing.assert_close(cached, preprocess(nih_pixels, spec), atol=1e-6, rtol=0)


def test_random_window_clips_at_random_quantiles_and_is_seeded(nih_pixels: np.ndarray) -> None:
    window = RandWindow(prob=1.0, max_clip=0.08)
    window.set_random_state(seed=3)
    first = window(nih_pixels)
    assert first.min() == 0.0 and first.max() == 1.0
    clipped = float(np.mean((first == 0.0) | (first == 1.0)))
    assert 0.0 < clipped <= 0.17
    again = RandWindow(prob=1.0, max_clip=0.08)
    again.set_random_state(seed=3)
    np.testing.assert_array_equal(again(nih_pixels), first)
    never = RandWindow(prob=0.0)
    np.testing.assert_array_equal(never(nih_pixels), nih_pixels)


def test_training_chain_with_rank_and_windows_is_seeded(nih_pixels: np.ndarray) -> None:
    small = build_resized(RANK)(nih_pixels)
    a, b = build_transform(RANK, train=True, resized=True), build_transform(
        RANK, train=True, resized=True)
    a.set_random_state(7)  # type: ignore[attr-defined]
    b.set_random_state(7)  # type: ignore[attr-defined]
    outs = [a(small) for _ in range(3)]
    for out, again in zip(outs, (b(small) for _ in range(3)), strict=True):
        torch.testing.assert_close(out, again)
        assert out.shape == (3, 224, 224) and -1.0 <= float(out.min()) <= float(out.max()) <= 1.0
    assert not torch.equal(outs[0], outs[1])


def test_unknown_intensity_step_is_refused() -> None:
    with pytest.raises(ValueError, match="intensity"):
        PreprocessingSpec(intensity="clahe")


def test_rank_clip_makes_windows_that_clip_less_than_it_exact(nih_pixels: np.ndarray) -> None:
    clipped_spec = replace(RANK, rank_clip=0.08)
    reference = preprocess(nih_pixels, clipped_spec)
    for low, high in ((0.01, 0.99), (0.05, 0.95), (0.0, 0.93)):
        lo, hi = np.quantile(nih_pixels, [low, high])
        windowed = ((np.clip(nih_pixels, lo, hi) - lo) / (hi - lo)).astype(np.float32)
        torch.testing.assert_close(preprocess(windowed, clipped_spec), reference,
                                   atol=1e-5, rtol=0, msg=f"{low}-{high}")
    # A window clipping more than the rank clip still changes the input.
    lo, hi = np.quantile(nih_pixels, [0.2, 0.8])
    wide = ((np.clip(nih_pixels, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    assert float((preprocess(wide, clipped_spec) - reference).abs().max()) > 0.1
    with pytest.raises(ValueError, match="rank_clip"):
        PreprocessingSpec(intensity="rank", rank_clip=0.5)


def _monai_eval_chain(spec: PreprocessingSpec) -> Any:
    """The evaluation chain in MONAI's own transforms: the reference for the torch one."""
    from monai.transforms.compose import Compose
    from monai.transforms.croppad.array import CenterSpatialCrop, SpatialPad
    from monai.transforms.intensity.array import NormalizeIntensity
    from monai.transforms.spatial.array import Resize
    from monai.transforms.utility.array import EnsureChannelFirst, EnsureType, RepeatChannel

    def resize(img: Any) -> Any:
        rows, cols = int(img.shape[-2]), int(img.shape[-1])
        mode = "area" if min(rows, cols) > spec.resize else "bilinear"
        return Resize(spatial_size=resized_shape((rows, cols), spec.resize), mode=mode)(img)

    steps: list[Any] = [RankNormalize(spec.rank_clip)] if spec.intensity == "rank" else []
    return Compose([
        *steps,
        EnsureChannelFirst(channel_dim="no_channel"),
        resize,
        CenterSpatialCrop(roi_size=(spec.crop, spec.crop)),
        SpatialPad(spatial_size=(spec.crop, spec.crop), method="symmetric", mode="constant"),
        RepeatChannel(repeats=3),
        NormalizeIntensity(subtrahend=np.asarray(spec.mean, dtype=np.float32),
                           divisor=np.asarray(spec.std, dtype=np.float32), channel_wise=True),
        EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
    ])  # fmt: skip


def test_torch_chain_computes_what_the_monai_chain_does(nih_png_paths: list[Path]) -> None:
    from cxr_pipeline.dicom.ingest import load_picture

    rng = np.random.default_rng(1)
    images = [load_picture(path) for path in nih_png_paths[:4]]
    # Upsampled, padded on one or both sides, odd sizes, portrait and landscape.
    shapes = [(97, 101), (300, 150), (150, 300), (224, 224), (255, 1000), (1955, 1841)]
    images += [rng.random(shape, dtype=np.float32) for shape in shapes]
    rank_clip = replace(RANK, rank_clip=0.08)
    small = replace(SPEC, resize=64, crop=80)  # a crop larger than the resize: padding
    for spec in (SPEC, RANK, rank_clip, small):
        reference = _monai_eval_chain(spec)
        for image in images:
            expected = reference(np.ascontiguousarray(image))
            torch.testing.assert_close(preprocess(image, spec), expected, atol=1e-6, rtol=0)


def test_inference_imports_neither_monai_nor_torchvision() -> None:
    """One image must not pay MONAI's import-everything ``__init__`` (seconds) or torchvision."""
    code = (
        "import sys, cxr_pipeline.pipeline, cxr_pipeline.explain, cxr_pipeline.model.inference; "
        "print(sorted(m for m in ('monai', 'torchvision', 'torch._dynamo') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
