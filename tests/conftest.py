"""Fixtures shared by every test: real data locations and a small seeded checkpoint.

Real data comes from ``../shared/data/cxr`` (or ``$CXR_DATASET_DIR``) and from the
``pydicom-data`` package; nothing is downloaded and no shared image is copied into the
repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    env = os.environ.get("CXR_DATASET_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "cxr"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The shared real-data folder; tests needing it skip with a reason where absent."""
    path = _shared_data_dir()
    if not (path / "manifest.csv").is_file():
        pytest.skip(f"shared real data not found at {path} (set CXR_DATASET_DIR)")
    return path


@pytest.fixture(scope="session")
def shared_dicom_dir(shared_data_dir: Path) -> Path:
    return shared_data_dir / "dicom"


@pytest.fixture(scope="session")
def nih_png_paths(shared_data_dir: Path) -> list[Path]:
    """The NIH ChestX-ray8 PNGs (no restrictions on use), sorted."""
    return sorted((shared_data_dir / "images" / "nih").glob("*.png"))


def testdata(name: str) -> Path:
    """Path of a pydicom / pydicom-data test file (e.g. ``RG1_UNCR.dcm``), no download."""
    from pydicom.data import get_testdata_file

    found = get_testdata_file(name, download=False)
    if found is None:
        raise FileNotFoundError(f"{name} not installed (pip install pydicom-data)")
    return Path(str(found))


testdata.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@pytest.fixture(scope="session")
def rg1_uncr() -> Path:
    """Real 16-bit MONOCHROME1 chest CR, explicit VR little endian."""
    return testdata("RG1_UNCR.dcm")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded, untrained SqueezeNet 1.1 checkpoint with a full model card.

    Untrained weights give arbitrary but deterministic probabilities: enough to test
    every stage without downloading anything.
    """
    import torch

    from cxr_pipeline.model.architectures import build_model, save_checkpoint
    from cxr_pipeline.model.card import ModelCard

    torch.manual_seed(0)
    model = build_model("squeezenet1_1", weights=None)
    card = ModelCard(
        name="test-squeezenet1_1",
        version="0.0.1-test",
        architecture="squeezenet1_1",
        device_uid="2.25.314159265358979323846264338327950288",
        threshold=0.5,
        training_data="untrained, seeded weights for tests",
    )
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model, card)
    return path
