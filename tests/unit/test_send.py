"""C-STORE SCU against real peers: a pynetdicom SCP on a free port and a real Orthanc."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from cxr_pipeline.dicom.codes import DimseStatus
from cxr_pipeline.dicom.decode import transfer_syntax_of
from cxr_pipeline.errors import SendError
from cxr_pipeline.service.send import send_datasets
from cxr_pipeline.settings import Destination, SendSettings
from tests.conftest import testdata as data_file
from tests.support.dicom_network import UNCOMPRESSED_ONLY, recording_scp
from tests.support.orthanc import free_port, orthanc_available, running_orthanc

SETTINGS = SendSettings(calling_ae_title="CXR_TEST", timeout_s=10.0)


def _dest(port: int, ae: str = "TEST_PACS") -> Destination:
    return Destination(ae_title=ae, host="127.0.0.1", port=port)


@pytest.fixture(scope="module")
def ct_and_mr() -> list[pydicom.Dataset]:
    return [pydicom.dcmread(data_file("CT_small.dcm")), pydicom.dcmread(data_file("MR_small.dcm"))]


def test_sends_every_dataset_in_its_own_syntax(ct_and_mr: list[pydicom.Dataset]) -> None:
    j2k = pydicom.dcmread(data_file("RG1_J2KR.dcm"))
    with recording_scp() as scp:
        send_datasets([*ct_and_mr, j2k], _dest(scp.port), SETTINGS)
    assert [str(d.SOPInstanceUID) for d in scp.received] == [
        str(d.SOPInstanceUID) for d in (*ct_and_mr, j2k)
    ]
    assert scp.calling_aes == ["CXR_TEST"] * 3
    assert scp.transfer_syntaxes[2] == JPEG2000Lossless
    assert scp.received[0].PatientName == ct_and_mr[0].PatientName


def test_compressed_dataset_is_decompressed_for_an_uncompressed_peer() -> None:
    j2k = pydicom.dcmread(data_file("RG1_J2KR.dcm"))
    reference = pydicom.dcmread(data_file("RG1_UNCR.dcm"))
    assert transfer_syntax_of(j2k).is_compressed
    with recording_scp(transfer_syntaxes=UNCOMPRESSED_ONLY) as scp:
        send_datasets([j2k], _dest(scp.port), SETTINGS)
    assert scp.transfer_syntaxes[0] in UNCOMPRESSED_ONLY
    got = scp.received[0]
    # J2KR is lossless: the peer receives exactly the uncompressed pixels.
    assert (got.pixel_array == reference.pixel_array).all()
    # The caller's dataset is untouched.
    assert transfer_syntax_of(j2k) == JPEG2000Lossless


def test_failure_status_raises_send_error(ct_and_mr: list[pydicom.Dataset]) -> None:
    with (
        recording_scp(status=DimseStatus.OUT_OF_RESOURCES) as scp,
        pytest.raises(SendError, match="0xA700"),
    ):
        send_datasets(ct_and_mr, _dest(scp.port), SETTINGS)
    assert len(scp.received) == 1  # stopped at the first refusal


def test_warning_status_counts_as_stored(ct_and_mr: list[pydicom.Dataset]) -> None:
    with recording_scp(status=DimseStatus.WARNING_COERCION) as scp:
        send_datasets(ct_and_mr, _dest(scp.port), SETTINGS)
    assert len(scp.received) == 2


def test_rejected_association_raises_send_error(ct_and_mr: list[pydicom.Dataset]) -> None:
    with (
        recording_scp(require_calling_aet=["SOMEONE_ELSE"]) as scp,
        pytest.raises(SendError, match="rejected"),
    ):
        send_datasets(ct_and_mr, _dest(scp.port), SETTINGS)
    assert scp.received == []


def test_nobody_listening_raises_send_error(ct_and_mr: list[pydicom.Dataset]) -> None:
    with pytest.raises(SendError):
        send_datasets(ct_and_mr, _dest(free_port()), SETTINGS)


def test_timeout_raises_send_error(ct_and_mr: list[pydicom.Dataset]) -> None:
    quick = SendSettings(calling_ae_title="CXR_TEST", timeout_s=1.0)
    with recording_scp(delay_s=3.0) as scp, pytest.raises(SendError):
        send_datasets(ct_and_mr[:1], _dest(scp.port), quick)


def test_dataset_without_uids_is_refused() -> None:
    with pytest.raises(SendError, match="SOP"):
        send_datasets([pydicom.Dataset()], _dest(free_port()), SETTINGS)


def test_nothing_to_send_opens_no_association() -> None:
    send_datasets([], _dest(free_port()), SETTINGS)


@pytest.mark.integration
def test_real_orthanc_stores_what_we_send(tmp_path: Path) -> None:
    if not orthanc_available():
        pytest.skip("Orthanc binary not installed (Debian package 'orthanc')")
    files = [data_file("RG1_J2KR.dcm"), data_file("CT_small.dcm")]
    datasets = [pydicom.dcmread(f) for f in files]
    with running_orthanc(tmp_path / "orthanc") as pacs:
        send_datasets(datasets, _dest(pacs.dicom_port, pacs.ae_title), SETTINGS)
        for ds in datasets:
            ids = pacs.study_instances(str(ds.StudyInstanceUID))
            uids = {pacs.get_instance_tags(i)["SOPInstanceUID"] for i in ids}
            assert str(ds.SOPInstanceUID) in uids
