"""Predictor: batched, deterministic COVID probabilities from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_pipeline.errors import CheckpointError, ConfigError, ModelError
from cxr_pipeline.model.architectures import default_checkpoint_path
from cxr_pipeline.model.inference import Predictor, resolve_device
from cxr_pipeline.model.preprocess import preprocess
from cxr_pipeline.settings import ModelSettings


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(tiny_checkpoint, device="cpu", batch_size=3)


@pytest.fixture(scope="module")
def images(nih_png_paths: list[Path]) -> list[np.ndarray]:
    from cxr_pipeline.dicom.ingest import load_picture

    # Real radiographs, halved to keep the test light (the chain resizes anyway).
    return [load_picture(p)[::2, ::2].copy() for p in nih_png_paths[:4]]


def test_predictor_state(predictor: Predictor) -> None:
    assert predictor.device == torch.device("cpu")
    assert not predictor.model.training
    assert predictor.card.architecture == "squeezenet1_1"
    conv = next(m for m in predictor.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_batch_equals_one_by_one_and_is_deterministic(
    predictor: Predictor, images: list[np.ndarray]
) -> None:
    batched = predictor.predict_images(images)  # micro-batches of 3, 1
    assert batched.shape == (4,) and batched.dtype == np.float32
    assert np.all((batched >= 0) & (batched <= 1))
    single = np.concatenate([predictor.predict_images([im]) for im in images])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_array_equal(predictor.predict_images(images), batched)
    # Different images, different answers: the model looks at the pixels.
    assert np.ptp(batched) > 0


def test_probability_is_the_softmax_of_the_covid_logit(
    predictor: Predictor, images: list[np.ndarray]
) -> None:
    tensors = torch.stack([preprocess(im, predictor.card.preprocessing) for im in images[:2]])
    with torch.inference_mode():
        logits = predictor.model(tensors)
    expected = torch.softmax(logits, dim=1)[:, predictor.card.covid_index].numpy()
    np.testing.assert_allclose(predictor.predict_tensors(tensors), expected, atol=1e-6)


def test_channels_last_does_not_change_results(
    tiny_checkpoint: Path, predictor: Predictor, images: list[np.ndarray]
) -> None:
    plain = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", channels_last=False)
    np.testing.assert_allclose(
        plain.predict_images(images[:3]), predictor.predict_images(images[:3]), atol=1e-5
    )


def test_from_settings(tiny_checkpoint: Path) -> None:
    settings = ModelSettings(checkpoint=tiny_checkpoint, device="cpu", batch_size=2)
    loaded = Predictor.from_settings(settings)
    assert loaded.batch_size == 2 and loaded.card.name == "test-squeezenet1_1"


def test_from_settings_without_checkpoint_uses_the_packaged_default() -> None:
    settings = ModelSettings(device="cpu")
    if default_checkpoint_path().is_file():
        assert Predictor.from_settings(settings).card.architecture
    else:
        with pytest.raises(CheckpointError, match=r"default\.pt"):
            Predictor.from_settings(settings)


def test_empty_input(predictor: Predictor) -> None:
    assert predictor.predict_images([]).shape == (0,)
    assert predictor.predict_tensors(torch.zeros(0, 3, 224, 224)).shape == (0,)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(3, 224, 224),
        torch.zeros(1, 1, 224, 224),
        torch.zeros(1, 3, 224, 224, dtype=torch.uint8),
        torch.full((1, 3, 224, 224), float("nan")),
    ],
)
def test_bad_tensors_are_model_errors(predictor: Predictor, bad: torch.Tensor) -> None:
    with pytest.raises(ModelError):
        predictor.predict_tensors(bad)


def test_devices() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ConfigError):
        resolve_device("tpu")
    with pytest.raises(ConfigError):
        resolve_device("not a device")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_bad_batch_size(tiny_checkpoint: Path) -> None:
    with pytest.raises(ConfigError):
        Predictor.from_checkpoint(tiny_checkpoint, device="cpu", batch_size=0)


def test_bfloat16_forward_stays_close_to_float32(images: list[np.ndarray]) -> None:
    # The packaged trained model on real radiographs: bf16 autocast moves probabilities
    # by a little, never the class order of the batch by much.
    full = Predictor.from_checkpoint(default_checkpoint_path(), device="cpu")
    half = Predictor.from_checkpoint(default_checkpoint_path(), device="cpu", precision="bfloat16")
    assert half.precision == "bfloat16"
    reference = full.predict_images(images)
    fast = half.predict_images(images)
    assert fast.dtype == np.float32
    np.testing.assert_allclose(fast, reference, atol=0.02)
    assert not np.array_equal(fast, reference)  # it really ran in bfloat16
    settings = ModelSettings(device="cpu", precision="bfloat16")
    assert Predictor.from_settings(settings).precision == "bfloat16"


def test_unknown_precision_is_a_config_error(tiny_checkpoint: Path) -> None:
    with pytest.raises(ConfigError, match="precision"):
        Predictor.from_checkpoint(tiny_checkpoint, device="cpu", precision="int4")


def test_folded_batch_norms_give_the_same_probabilities() -> None:
    # ResNet-18 has a BatchNorm after every convolution; with non-trivial running
    # statistics, the folded copy must compute the same function and drop every BN.
    from cxr_pipeline.model.architectures import build_model
    from cxr_pipeline.model.card import ModelCard
    from cxr_pipeline.model.inference import fold_batch_norms

    torch.manual_seed(0)
    model = build_model("resnet18", weights=None)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    card = ModelCard(name="t", version="0", architecture="resnet18", device_uid="2.25.1")
    folded = Predictor(model, card, device="cpu")
    plain = Predictor(model, card, device="cpu", fold_batch_norm=False)
    assert plain.inference_model is plain.model
    assert folded.model is model and folded.inference_model is not model
    bns = [m for m in folded.inference_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns == []
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # untouched
    x = torch.randn(4, 3, 96, 96)
    np.testing.assert_allclose(folded.predict_tensors(x), plain.predict_tensors(x), atol=1e-5)
    assert np.ptp(plain.predict_tensors(x)) > 0
    # A model FX cannot trace is run as it is.
    untraceable = _Untraceable().eval()
    assert fold_batch_norms(untraceable) is untraceable
    # Nothing to fold (SqueezeNet, the default model's architecture): no copy is made.
    squeezenet = build_model("squeezenet1_1", weights=None).eval()
    assert fold_batch_norms(squeezenet) is squeezenet


class _Untraceable(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: FX symbolic tracing fails
            return self.norm(x)
        return -x
