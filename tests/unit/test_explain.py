"""Grad-CAM and occlusion heatmaps, and their mapping back onto the radiograph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cxr_pipeline.errors import ConfigError, ModelError
from cxr_pipeline.explain.gradcam import gradcam
from cxr_pipeline.explain.heatmap import heatmap_for_image
from cxr_pipeline.explain.occlusion import occlusion
from cxr_pipeline.model.architectures import ARCHITECTURES, build_model
from cxr_pipeline.model.card import ModelCard, PreprocessingSpec
from cxr_pipeline.model.inference import Predictor
from cxr_pipeline.model.preprocess import input_geometry, preprocess
from cxr_pipeline.settings import ExplainSettings

SMALL = PreprocessingSpec(resize=80, crop=64)  # small model input keeps the tests fast


def _card(architecture: str, spec: PreprocessingSpec = SMALL) -> ModelCard:
    return ModelCard(
        name=f"test-{architecture}",
        version="0",
        architecture=architecture,
        device_uid="2.25.1",
        preprocessing=spec,
    )


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    return Predictor(build_model("squeezenet1_1"), _card("squeezenet1_1"), device="cpu")


@pytest.fixture(scope="module")
def pixels(nih_png_paths: list[Path]) -> np.ndarray:
    from cxr_pipeline.dicom.ingest import load_picture

    return load_picture(nih_png_paths[1])[::4, ::4].copy()  # real radiograph, 256 px


class RegionModel(nn.Module):
    """A classifier that, by construction, looks only at the top-left quadrant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // 4, x.shape[-1] // 4
        evidence = x[:, :, :h, :w].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(evidence), 4.0 * evidence], dim=1)


def test_occlusion_finds_the_region_the_model_relies_on() -> None:
    spec = PreprocessingSpec(resize=64, crop=64)
    region = Predictor(RegionModel(), _card("squeezenet1_1", spec), device="cpu")
    image = np.full((64, 64), 0.3, dtype=np.float32)
    image[:16, :16] = 1.0  # bright evidence where the model looks
    image[40:56, 40:56] = 1.0  # the same brightness where it does not
    tensor = preprocess(image, spec)
    heat = occlusion(region, tensor, patch=8, stride=4, batch=16)
    assert heat.shape == (64, 64) and heat.dtype == np.float32
    assert heat.max() == pytest.approx(1.0)
    assert heat[:12, :12].mean() > 0.5  # the relied-on region is hot
    assert np.all(heat[24:, :] == 0) and np.all(heat[:, 24:] == 0)  # the decoy is not
    # And occluding that region really lowers the probability.
    before = float(region.predict_tensors(tensor[None])[0])
    occluded = tensor.clone()
    occluded[:, :16, :16] = tensor.mean()
    assert float(region.predict_tensors(occluded[None])[0]) < before - 0.1


def test_occlusion_map_agrees_with_real_occlusions(
    predictor: Predictor, pixels: np.ndarray
) -> None:
    tensor = preprocess(pixels, SMALL)
    heat = occlusion(predictor, tensor, patch=16, stride=8, batch=16)
    base = float(predictor.predict_tensors(tensor[None])[0])

    def drop_at(row: int, col: int) -> float:
        r0, c0 = max(0, min(row - 8, 48)), max(0, min(col - 8, 48))
        occluded = tensor.clone()
        occluded[:, r0 : r0 + 16, c0 : c0 + 16] = tensor.mean()
        return base - float(predictor.predict_tensors(occluded[None])[0])

    hot = np.unravel_index(int(np.argmax(heat)), heat.shape)
    cold = np.unravel_index(int(np.argmin(heat)), heat.shape)
    assert drop_at(int(hot[0]), int(hot[1])) > drop_at(int(cold[0]), int(cold[1]))


def test_occlusion_is_deterministic_and_in_range(predictor: Predictor, pixels: np.ndarray) -> None:
    tensor = preprocess(pixels, SMALL)
    a = occlusion(predictor, tensor, patch=16, stride=8, batch=7)
    b = occlusion(predictor, tensor, patch=16, stride=8, batch=64)
    assert a.shape == (64, 64) and a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_allclose(a, b, atol=1e-5)  # batching does not change the map


@pytest.mark.parametrize(
    ("patch", "stride", "batch"), [(0, 1, 1), (16, 17, 1), (16, 8, 0), (65, 8, 1)]
)
def test_occlusion_bad_parameters(
    predictor: Predictor, patch: int, stride: int, batch: int
) -> None:
    with pytest.raises(ConfigError):
        occlusion(predictor, torch.zeros(3, 64, 64), patch=patch, stride=stride, batch=batch)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_gradcam_every_architecture(architecture: str, pixels: np.ndarray) -> None:
    torch.manual_seed(1)
    model = build_model(architecture)
    pred = Predictor(model, _card(architecture), device="cpu")
    tensor = preprocess(pixels, SMALL)
    first = gradcam(pred, tensor)
    assert first.shape == (64, 64) and first.dtype == np.float32
    assert first.min() >= 0.0 and first.max() <= 1.0
    np.testing.assert_array_equal(first, gradcam(pred, tensor))  # deterministic
    # The serving model is left alone: no hooks, in-place ReLUs intact.
    assert all(not m._forward_hooks and not m._backward_hooks for m in pred.model.modules())
    np.testing.assert_array_equal(
        pred.predict_tensors(tensor[None]), pred.predict_tensors(tensor[None])
    )


def _monai_gradcam(pred: Predictor, tensor: torch.Tensor) -> np.ndarray:
    """``monai.visualize.GradCAM`` on a copy of the model: the reference map."""
    import copy

    from monai.visualize.class_activation_maps import GradCAM

    from cxr_pipeline.explain.gradcam import TARGET_LAYERS

    cam = GradCAM(
        nn_module=copy.deepcopy(pred.model).eval(),
        target_layers=TARGET_LAYERS[pred.card.architecture],
        postprocessing=lambda x: x,
    )
    with torch.inference_mode(False), torch.enable_grad():
        x = pred.to_model_input(tensor[None].clone())
        raw = cam(x, class_idx=pred.card.covid_index)[0, 0].detach().float().clamp_min(0.0)
    peak = float(raw.max())
    return (raw / peak if peak > 0 else raw).numpy()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_gradcam_is_the_map_monai_computes(architecture: str, pixels: np.ndarray) -> None:
    torch.manual_seed(2)
    pred = Predictor(build_model(architecture), _card(architecture), device="cpu")
    tensor = preprocess(pixels, SMALL)
    np.testing.assert_allclose(gradcam(pred, tensor), _monai_gradcam(pred, tensor), atol=1e-4)


def test_gradcam_of_the_packaged_model_is_the_map_monai_computes(pixels: np.ndarray) -> None:
    from cxr_pipeline.model.architectures import default_checkpoint_path

    pred = Predictor.from_checkpoint(default_checkpoint_path(), device="cpu")
    tensor = preprocess(pixels, pred.card.preprocessing)
    ours = gradcam(pred, tensor)
    assert ours.max() == pytest.approx(1.0)
    np.testing.assert_allclose(ours, _monai_gradcam(pred, tensor), atol=1e-4)


def test_gradcam_depends_on_the_image_and_works_under_inference_mode(
    predictor: Predictor, pixels: np.ndarray
) -> None:
    tensor = preprocess(pixels, SMALL)
    plain = gradcam(predictor, tensor)
    assert plain.max() == pytest.approx(1.0)
    with torch.inference_mode():
        inside = gradcam(predictor, preprocess(pixels, SMALL))
    np.testing.assert_array_equal(plain, inside)
    flipped = gradcam(predictor, preprocess(np.ascontiguousarray(pixels[:, ::-1]), SMALL))
    assert not np.array_equal(plain, flipped)


def test_gradcam_bad_input(predictor: Predictor) -> None:
    with pytest.raises(ModelError):
        gradcam(predictor, torch.zeros(2, 3, 64, 64))
    with pytest.raises(ModelError):
        gradcam(predictor, torch.zeros(3, 64, 64), target_layer="no.such.layer")


@pytest.mark.parametrize("method", ["gradcam", "occlusion"])
def test_heatmap_for_image_at_image_resolution(
    predictor: Predictor, pixels: np.ndarray, method: str
) -> None:
    landscape = pixels[40:200, :]  # 160 x 256: the crop leaves columns out on both sides
    settings = ExplainSettings(
        method=method,  # type: ignore[arg-type]
        occlusion_patch=16,
        occlusion_stride=8,
        occlusion_batch=32,
    )
    heat = heatmap_for_image(predictor, landscape, settings)
    assert heat is not None
    assert heat.shape == landscape.shape and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() <= 1.0 and heat.max() > 0.5
    _, left, _, right = input_geometry(landscape.shape, SMALL).image_box
    assert np.all(heat[:, : int(left) - 2] == 0) and np.all(heat[:, int(right) + 2 :] == 0)


def test_no_heatmap_when_disabled(predictor: Predictor, pixels: np.ndarray) -> None:
    assert heatmap_for_image(predictor, pixels, ExplainSettings(method="none")) is None
