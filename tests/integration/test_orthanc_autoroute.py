"""Orthanc with the shipped Lua auto-routing rule, feeding a real ``cxr-listen``.

A chest CR uploaded to Orthanc through REST must be routed to the listener, analysed, and
its SR and heatmap SC stored back into the same study (sent to the calling AE, Orthanc,
found in ``send.known_peers``); a CT must not be routed, and the results must not be
routed again (no loop).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from cxr_pipeline.service.ledger import JobState, Ledger
from tests.conftest import REPO_ROOT
from tests.conftest import testdata as dicom_testdata
from tests.support.dicom_network import wait_until
from tests.support.orthanc import DEFAULT_AE_TITLE, free_port, orthanc_available, running_orthanc
from tests.support.services import running_listener, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LUA_SCRIPT = REPO_ROOT / "configs" / "orthanc" / "cxr-autoroute.lua"
EXAMPLE_CONFIG = REPO_ROOT / "configs" / "orthanc" / "orthanc.json"


def test_example_config_loads_the_shipped_script() -> None:
    config = json.loads(EXAMPLE_CONFIG.read_text())
    assert [Path(p).name for p in config["LuaScripts"]] == [LUA_SCRIPT.name]
    assert config["DicomModalities"][config["CxrPipeline"]["Modality"]][0] == "CXR_PIPELINE"
    assert config["CxrPipeline"]["Modalities"] == ["CR", "DX"]


def test_orthanc_routes_chest_cr_and_stores_results_in_same_study(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    if not orthanc_available():
        pytest.skip("Orthanc binary not installed (Debian package 'orthanc')")
    if shutil.which("storescu") is None:
        pytest.skip("DCMTK not installed")
    example = json.loads(EXAMPLE_CONFIG.read_text())
    listen_port = free_port()
    data_dir = tmp_path / "data"
    rg1 = dicom_testdata("RG1_UNCR.dcm")
    ct = dicom_testdata("CT_small.dcm")
    source = pydicom.dcmread(rg1, stop_before_pixels=True)
    study_uid = str(source.StudyInstanceUID)
    with running_orthanc(
        tmp_path / "orthanc",
        modalities={"cxr": ("CXR_PIPELINE", "127.0.0.1", listen_port)},
        extra_config={"LuaScripts": [str(LUA_SCRIPT)], "CxrPipeline": example["CxrPipeline"]},
    ) as pacs:
        config = write_config(
            tmp_path / "cxr.toml",
            {"data_dir": data_dir, "log_level": "INFO"},
            {
                "model": {"checkpoint": tiny_checkpoint, "device": "cpu"},
                "explain": {"method": "gradcam"},
                "listener": {"host": "127.0.0.1", "port": listen_port, "min_free_bytes": 0},
                "send": {"max_attempts": 3, "backoff_initial_s": 0.5},
                "send.known_peers": [
                    {"ae_title": DEFAULT_AE_TITLE, "host": "127.0.0.1", "port": pacs.dicom_port}
                ],
            },
        )
        with running_listener(config, listen_port, tmp_path / "listener.log") as listener:
            pacs.upload(ct)  # not CR/DX: must not be routed
            pacs.upload(rg1)  # routed synchronously by the Lua script
            found = pacs.wait_for_instances(study_uid, 3, timeout_s=240)
            assert len(found) == 3, pacs.log_tail() + listener.log_tail()
            # A CR stored by the pipeline's own AE (as if a result kept Modality CR) must not
            # go back to the listener either.
            own = subprocess.run(
                [
                    "storescu",
                    "-aet",
                    "CXR_PIPELINE",
                    "-aec",
                    pacs.ae_title,
                    "127.0.0.1",
                    str(pacs.dicom_port),
                    str(dicom_testdata("RG1_UNCI.dcm")),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert own.returncode == 0, own.stderr
            time.sleep(2.0)  # give a wrongly routed object time to reach the listener
            ledger = Ledger(data_dir / "ledger.sqlite3")
            # The results reach the PACS before the routed image's row turns DONE.
            finished = wait_until(
                lambda: [r.state for r in ledger.recent(10)] == [JobState.DONE], timeout_s=60
            )
            rows = ledger.recent(10)
            assert finished, rows
        tags = [pacs.get_instance_tags(i) for i in pacs.study_instances(study_uid)]
        orthanc_log = pacs.log_path.read_text(errors="replace")

    assert [r.sop_instance_uid for r in rows] == [str(source.SOPInstanceUID)]
    assert rows[0].state == JobState.DONE
    assert rows[0].calling_ae == DEFAULT_AE_TITLE
    own_cr = pydicom.dcmread(dicom_testdata("RG1_UNCI.dcm"), stop_before_pixels=True)
    inputs = {source.SOPInstanceUID, own_cr.SOPInstanceUID}  # RG1_UNCI shares RG1's study
    results = [t for t in tags if t["SOPInstanceUID"] not in inputs]
    assert len(results) == 2
    assert {t["SeriesInstanceUID"] for t in results}.isdisjoint({source.SeriesInstanceUID})
    assert "SR" in {t["Modality"] for t in results}
    assert sorted(rows[0].result_uids) == sorted(t["SOPInstanceUID"] for t in results)
    # The Lua rule saw each object and decided as documented.
    assert "cxr-autoroute: sending" in orthanc_log
    assert "(modality CT)" in orthanc_log
    assert orthanc_log.count("cxr-autoroute: sending") == 1
    assert orthanc_log.count("cxr-autoroute: not routing") == 4  # CT, SR, SC, own CR
    assert orthanc_log.count("(sent by the pipeline)") == 1
