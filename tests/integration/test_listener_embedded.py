"""``cxr-listen`` in embedded mode, end to end with real peers.

A real Orthanc holds the source images; DCMTK ``storescu`` (calling AE = Orthanc's)
sends chest radiographs in several transfer syntaxes plus non-chest images to a real
``cxr-listen`` subprocess (tiny seeded model, Grad-CAM). The SR and SC of every chest
image must arrive in Orthanc in the source study; non-chest images must be SKIPPED in
the ledger as ``cxr-status`` reports it. A restarted listener picks up unfinished work.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pydicom
import pytest

from cxr_pipeline.dicom.codes import SopClass
from cxr_pipeline.encode.reading import read_structured_report
from cxr_pipeline.service.ledger import JobState, Ledger
from cxr_pipeline.service.spool import Spool
from tests.conftest import testdata as data_file
from tests.support.dicom_network import (
    ListenerProcess,
    dcmtk_available,
    echoscu,
    running_listener,
    storescu,
    wait_until,
)
from tests.support.orthanc import OrthancServer, free_port, orthanc_available, running_orthanc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHARED_CHEST = (
    "nih_dx_secondary_capture.dcm",  # DX Secondary Capture, implicit VR LE
    "rsna_cr_ap_jpeg_baseline.dcm",  # CR AP, JPEG baseline
    "siim_cr_pa_jpeg_baseline.dcm",  # CR PA, JPEG baseline
    "siim_cr_pa_fake_monochrome1.dcm",  # same SOP Instance UID as the previous one
)


def _needs_peers() -> None:
    if not orthanc_available():
        pytest.skip("Orthanc binary not installed (Debian package 'orthanc')")
    if not dcmtk_available():
        pytest.skip("DCMTK storescu/echoscu not installed")


def _environment(checkpoint: Path, pacs: OrthancServer) -> dict[str, str]:
    return {
        "CXR_MODEL__CHECKPOINT": str(checkpoint),
        "CXR_MODEL__DEVICE": "cpu",
        "CXR_EXPLAIN__METHOD": "gradcam",
        "CXR_LISTENER__ALLOWED_CALLING_AES": json.dumps([pacs.ae_title]),
        "CXR_LISTENER__MIN_FREE_BYTES": "1000000",
        "CXR_SEND__KNOWN_PEERS": json.dumps(
            [{"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}]
        ),
        "CXR_SEND__BACKOFF_INITIAL_S": "0.5",
    }


def _report(listener: ListenerProcess) -> dict[str, Any]:
    result = listener.status("--json", "--limit", "100")
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _settled(listener: ListenerProcess, total: int) -> dict[str, Any] | None:
    report = _report(listener)
    counts = report["counts"]
    busy = counts["received"] + counts["queued"] + counts["processing"]
    return report if busy == 0 and sum(counts.values()) == total else None


def _results_in_study(pacs: OrthancServer, source: pydicom.Dataset) -> dict[str, pydicom.Dataset]:
    """Result objects in the source's study on Orthanc, by SOP class."""
    found: dict[str, pydicom.Dataset] = {}
    for instance in pacs.study_instances(str(source.StudyInstanceUID)):
        ds = pydicom.dcmread(io.BytesIO(pacs.instance_file(instance)))
        if str(ds.SOPClassUID) == SopClass.COMPREHENSIVE_3D_SR:
            read = read_structured_report(ds)
            if read.source_sop_instance_uid == str(source.SOPInstanceUID):
                found["sr"] = ds
        elif str(ds.SOPClassUID) == SopClass.SECONDARY_CAPTURE and "SourceImageSequence" in ds:
            refs = {str(item.ReferencedSOPInstanceUID) for item in ds.SourceImageSequence}
            if str(source.SOPInstanceUID) in refs:
                found["sc"] = ds
    return found


def test_embedded_listener_end_to_end(
    tmp_path: Path, tiny_checkpoint: Path, shared_dicom_dir: Path
) -> None:
    _needs_peers()
    chest = [data_file("RG1_UNCR.dcm"), data_file("RG1_J2KR.dcm")]
    chest += [shared_dicom_dir / name for name in SHARED_CHEST]
    non_chest = [data_file("RG3_UNCR.dcm"), data_file("CT_small.dcm")]
    sources = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in chest + non_chest}
    chest_sources = {str(sources[p].SOPInstanceUID): sources[p] for p in chest}
    assert len(chest_sources) == len(chest) - 1  # the two SIIM files share one UID
    total = len(chest_sources) + len(non_chest)

    listen_port = free_port()
    with running_orthanc(
        tmp_path / "orthanc", modalities={"cxr": ("CXR_PIPELINE", "127.0.0.1", listen_port)}
    ) as pacs:
        for path in chest:
            pacs.upload(path)
        with running_listener(
            tmp_path / "data", environment=_environment(tiny_checkpoint, pacs), port=listen_port
        ) as listener:
            assert echoscu(listener.port, calling_ae=pacs.ae_title).returncode == 0
            assert pacs.echo("cxr")  # Orthanc reaches the listener through its modality entry

            sent = storescu(listener.port, chest + non_chest, calling_ae=pacs.ae_title)
            assert sent.returncode == 0, sent.stdout + sent.stderr + listener.log_tail()

            assert wait_until(lambda: _settled(listener, total), timeout_s=500), listener.log_tail()
            report = _report(listener)
            status_text = listener.status().stdout

            rows = {r["sop_instance_uid"]: r for r in report["recent"]}
            assert report["counts"] == {
                "received": 0,
                "queued": 0,
                "processing": 0,
                "done": len(chest_sources),
                "skipped": len(non_chest),
                "failed": 0,
            }, listener.log_tail()
            for path in non_chest:
                row = rows[str(sources[path].SOPInstanceUID)]
                assert row["state"] == "skipped"
                assert row["reason"].split(":")[0] in {"not_chest_radiograph", "not_image"}
                assert row["sop_instance_uid"] in status_text
            assert "skipped" in status_text and "done" in status_text

            for uid, source in chest_sources.items():
                assert rows[uid]["state"] == "done"
                assert rows[uid]["calling_ae"] == pacs.ae_title
                results = _results_in_study(pacs, source)
                assert set(results) == {"sr", "sc"}, uid
                assert {str(results["sr"].SOPInstanceUID), str(results["sc"].SOPInstanceUID)} == (
                    set(rows[uid]["result_uids"])
                )
                for ds in results.values():
                    assert ds.StudyInstanceUID == source.StudyInstanceUID
                    assert ds.PatientID == source.PatientID
                    assert ds.SeriesInstanceUID != source.SeriesInstanceUID

            # Sending the same image again changes nothing: the job is already done.
            before = len(pacs.instances())
            again = storescu(listener.port, chest[:1], calling_ae=pacs.ae_title)
            assert again.returncode == 0
            assert _report(listener)["counts"]["done"] == len(chest_sources)
            assert len(pacs.instances()) == before

        assert listener.process.returncode == 0, listener.log_tail()  # clean SIGTERM exit
        # Nothing patient-identifying in the listener's log.
        log_text = listener.log_path.read_text()
        for source in sources.values():
            name = str(source.get("PatientName", "") or "")
            if len(name) > 3:
                assert name not in log_text


def test_restarted_listener_requeues_unfinished_work(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """A job left RECEIVED by a crash (file spooled, row recorded) runs on the next start."""
    _needs_peers()
    data_dir = tmp_path / "data"
    source_path = data_file("RG1_UNCR.dcm")
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    uid = str(source.SOPInstanceUID)
    listen_port = free_port()
    with running_orthanc(
        tmp_path / "orthanc", modalities={"cxr": ("CXR_PIPELINE", "127.0.0.1", listen_port)}
    ) as pacs:
        # The state a listener leaves when it dies right after acknowledging a C-STORE.
        spool = Spool(data_dir / "spool")
        path = spool.store(uid, lambda f: f.write(source_path.read_bytes()))
        ledger = Ledger(data_dir / "ledger.sqlite3")
        ledger.record_received(
            uid, study_uid=str(source.StudyInstanceUID), calling_ae=pacs.ae_title, spool_path=path
        )
        ledger.mark(uid, JobState.PROCESSING)
        with running_listener(
            data_dir, environment=_environment(tiny_checkpoint, pacs), port=listen_port
        ) as listener:
            assert wait_until(lambda: _settled(listener, 1), timeout_s=300), listener.log_tail()
            record = ledger.get(uid)
            assert record is not None and record.state is JobState.DONE
            assert set(_results_in_study(pacs, source)) == {"sr", "sc"}
            assert "queued 1 unfinished jobs again" in listener.log_tail(400)
        assert listener.process.returncode == 0, listener.log_tail()
