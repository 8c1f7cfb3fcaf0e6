"""Architecture registry and safe checkpoints."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from cxr_pipeline.errors import CheckpointError, ConfigError
from cxr_pipeline.model.architectures import (
    ARCHITECTURES,
    PAPER_ARCHITECTURES,
    build_model,
    default_checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from cxr_pipeline.model.card import ModelCard

CARD = ModelCard(
    name="test",
    version="0.0.1",
    architecture="squeezenet1_1",
    device_uid="2.25.271828182845904523536028747135266249",
)


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: the classic code-execution pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_registry_is_the_papers_four_plus_efficientnet_lite0() -> None:
    assert PAPER_ARCHITECTURES == ("resnet18", "resnet50", "squeezenet1_1", "densenet121")
    assert ARCHITECTURES[:4] == PAPER_ARCHITECTURES
    assert ARCHITECTURES[4:] == ("efficientnet_lite0",)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_builds_a_two_class_head(architecture: str) -> None:
    torch.manual_seed(0)
    model = build_model(architecture, weights=None)
    assert not model.training
    with torch.inference_mode():
        logits = model(torch.randn(2, 3, 112, 112))
    assert logits.shape == (2, 2)
    probs = torch.softmax(logits, dim=1)
    assert torch.all((probs >= 0) & (probs <= 1))
    assert torch.allclose(probs.sum(dim=1), torch.ones(2), atol=1e-6)


def test_unknown_architecture_and_bad_class_count_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown architecture"):
        build_model("vgg16")
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("resnet18", num_classes=1)


def test_named_imagenet_weights_never_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "empty-hub"))
    try:
        with pytest.raises(CheckpointError, match="not in the torch hub cache"):
            build_model("squeezenet1_1", weights="IMAGENET1K_V1")
        with pytest.raises(ConfigError, match="unknown weights"):
            build_model("squeezenet1_1", weights="NO_SUCH_WEIGHTS")
    finally:
        torch.hub.set_dir(old)
    assert not (tmp_path / "empty-hub" / "checkpoints").exists()


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = build_model("squeezenet1_1")
    path = tmp_path / "sub" / "model.pt"
    save_checkpoint(path, model, CARD)
    loaded, card = load_checkpoint(path)
    assert card == CARD
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    assert not loaded.training
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary left behind


def test_tiny_checkpoint_fixture_loads(tiny_checkpoint: Path) -> None:
    _, card = load_checkpoint(tiny_checkpoint)
    assert card.architecture == "squeezenet1_1" and card.covid_index == 1


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": _Payload(marker), "card": CARD.to_dict()}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(path)
    assert not marker.exists()


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError):
        load_checkpoint(garbage)


def test_wrong_layout_card_and_weights_are_refused(tmp_path: Path) -> None:
    model = build_model("squeezenet1_1")
    state = model.state_dict()

    def write(obj: object) -> Path:
        path = tmp_path / "bad.pt"
        torch.save(obj, path)
        return path

    with pytest.raises(CheckpointError, match="lacks"):
        load_checkpoint(write([torch.zeros(1)]))
    with pytest.raises(CheckpointError, match="lacks"):
        load_checkpoint(write({"state_dict": state}))
    bad_card = CARD.to_dict() | {"class_names": ["a", "b"]}
    with pytest.raises(CheckpointError, match="covid"):
        load_checkpoint(write({"state_dict": state, "card": bad_card}))
    with pytest.raises(CheckpointError, match="invalid model card"):
        load_checkpoint(write({"state_dict": state, "card": CARD.to_dict() | {"x": 1}}))
    unknown = CARD.to_dict() | {"architecture": "vgg16"}
    with pytest.raises(CheckpointError, match="unknown architecture"):
        load_checkpoint(write({"state_dict": state, "card": unknown}))
    resnet_card = CARD.to_dict() | {"architecture": "resnet18"}
    with pytest.raises(CheckpointError, match="do not fit resnet18"):
        load_checkpoint(write({"state_dict": state, "card": resnet_card}))
    three = CARD.to_dict() | {"class_names": ["normal", "pneumonia", "covid"]}
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(write({"state_dict": state, "card": three}))
    with pytest.raises(CheckpointError, match="tensor mapping"):
        load_checkpoint(write({"state_dict": {"w": 1}, "card": CARD.to_dict()}))


def test_save_refuses_an_unknown_architecture(tmp_path: Path) -> None:
    card = ModelCard(name="x", version="1", architecture="vgg16", device_uid="2.25.1")
    with pytest.raises(ConfigError):
        save_checkpoint(tmp_path / "x.pt", build_model("squeezenet1_1"), card)


def test_default_checkpoint_path_is_packaged() -> None:
    path = default_checkpoint_path()
    assert path.name == "default.pt"
    assert path.parent.name == "packaged" and path.parent.parent.name == "model"
