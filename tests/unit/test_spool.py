"""The durable spool: UID validation, atomic writes, outbox."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import pydicom
import pytest

from cxr_pipeline.errors import InvalidUid, RejectedInput
from cxr_pipeline.service.spool import Spool, validate_uid

UID = "1.2.826.0.1.3680043.8.498.12345"


def test_store_round_trips_a_real_dicom_file(tmp_path: Path, rg1_uncr: Path) -> None:
    spool = Spool(tmp_path / "spool")
    data = rg1_uncr.read_bytes()
    ds = pydicom.dcmread(rg1_uncr, stop_before_pixels=True)
    uid = str(ds.SOPInstanceUID)

    path = spool.store(uid, lambda f: f.write(data))

    assert path == spool.path_for(uid)
    assert path.parent == tmp_path / "spool" / "incoming"
    assert path.read_bytes() == data
    assert pydicom.dcmread(path).SOPInstanceUID == uid
    assert spool.exists(uid)
    # No temporary files left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == [f"{uid}.dcm"]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "../etc/passwd",
        "1.2/../../x",
        "1.2.3/4",
        "..",
        "1..2",
        "1.2.",
        ".1.2",
        "1.02.3",
        "1.2.a",
        "1" + ".2" * 40,
        "/abs/1.2",
    ],
)
def test_invalid_uids_are_refused_with_a_typed_error(tmp_path: Path, bad: str) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(InvalidUid) as info:
        spool.store(bad, lambda f: f.write(b"x"))
    assert isinstance(info.value, RejectedInput)
    with pytest.raises(InvalidUid):
        spool.outbox_dir(bad)
    assert list((tmp_path / "incoming").iterdir()) == []


def test_trailing_padding_is_stripped() -> None:
    assert validate_uid("1.2.3\x00") == "1.2.3"
    assert validate_uid("1.2.3 ") == "1.2.3"


def test_failed_write_leaves_nothing_and_keeps_previous_version(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.store(UID, lambda f: f.write(b"first"))

    def broken(f: BinaryIO) -> None:
        f.write(b"half")
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        spool.store(UID, broken)
    assert spool.path_for(UID).read_bytes() == b"first"
    assert [p.name for p in (tmp_path / "incoming").iterdir()] == [f"{UID}.dcm"]


def test_store_again_replaces_atomically(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.store(UID, lambda f: f.write(b"one"))
    spool.store(UID, lambda f: f.write(b"two"))
    assert spool.path_for(UID).read_bytes() == b"two"


def test_outbox_and_remove(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.store(UID, lambda f: f.write(b"x"))
    box = spool.outbox_dir(UID)
    assert box.is_dir() and box.parent == tmp_path / "outbox"
    (box / "2.25.1.dcm").write_bytes(b"sr")
    (box / "2.25.2.dcm").write_bytes(b"sc")
    (box / "notes.txt").write_text("ignored")
    assert [p.name for p in spool.outbox_files(UID)] == ["2.25.1.dcm", "2.25.2.dcm"]
    spool.remove(UID)
    assert not spool.exists(UID)
    assert spool.outbox_files(UID) == []
    spool.remove(UID)  # idempotent


def test_free_bytes_matches_the_file_system(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    st = os.statvfs(tmp_path)
    expected = st.f_bavail * st.f_frsize
    assert abs(spool.free_bytes() - expected) < 64 * 1024 * 1024
    assert spool.free_bytes() > 0
