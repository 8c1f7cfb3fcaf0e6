"""Deterministic result UIDs: same inputs, same UID; any change, a different UID."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.uid import UID

from cxr_pipeline.dicom.uids import ResultUid, instance_uid, result_uid, series_uid
from cxr_pipeline.errors import EncodeError

SOURCE = "1.3.6.1.4.1.5962.1.1.9.1.1.20040826185059.5457"
STUDY = "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"
DEVICE = "2.25.314159265358979323846264338327950288"

uid_text = st.from_regex(r"[1-9][0-9]{0,5}(\.(0|[1-9][0-9]{0,8})){1,8}", fullmatch=True)


def test_result_uid_is_a_valid_2_25_uid() -> None:
    uid = result_uid(ResultUid.SR_INSTANCE, SOURCE, DEVICE)
    assert uid.startswith("2.25.")
    assert len(uid) <= 64
    assert UID(uid).is_valid


def test_same_inputs_give_the_same_uid() -> None:
    assert result_uid(ResultUid.SR_INSTANCE, SOURCE, DEVICE) == result_uid(
        ResultUid.SR_INSTANCE, SOURCE, DEVICE
    )


def test_derivation_is_stable_across_releases() -> None:
    # Results already stored on a PACS must be replaced, not duplicated, after an
    # upgrade: the derivation must never change silently.
    assert (
        result_uid(ResultUid.SR_INSTANCE, SOURCE, DEVICE)
        == "2.25.196640739433681960351293918263159059698"
    )


def test_kind_device_and_source_all_change_the_uid() -> None:
    uids = {result_uid(kind, SOURCE, DEVICE) for kind in ResultUid} | {
        result_uid(ResultUid.SR_INSTANCE, SOURCE, "2.25.1"),
        result_uid(ResultUid.SR_INSTANCE, SOURCE + ".1", DEVICE),
        result_uid(ResultUid.SR_INSTANCE, DEVICE, SOURCE),
    }
    assert len(uids) == len(ResultUid) + 3


def test_part_boundaries_matter() -> None:
    assert result_uid(ResultUid.SC_INSTANCE, "1.2", "3.4") != result_uid(
        ResultUid.SC_INSTANCE, "1.23", ".4"
    )


def test_series_and_instance_helpers() -> None:
    assert series_uid(ResultUid.SR_SERIES, STUDY, DEVICE) == result_uid(
        ResultUid.SR_SERIES, STUDY, DEVICE
    )
    assert instance_uid(ResultUid.SC_INSTANCE, SOURCE, DEVICE) == result_uid(
        ResultUid.SC_INSTANCE, SOURCE, DEVICE
    )
    with pytest.raises(EncodeError):
        series_uid(ResultUid.SR_INSTANCE, STUDY, DEVICE)
    with pytest.raises(EncodeError):
        instance_uid(ResultUid.SC_SERIES, SOURCE, DEVICE)


@pytest.mark.parametrize("parts", [(), ("",), (SOURCE, "  ")])
def test_missing_parts_are_a_typed_error(parts: tuple[str, ...]) -> None:
    with pytest.raises(EncodeError):
        result_uid(ResultUid.SR_INSTANCE, *parts)


@given(source=uid_text, device=uid_text)
def test_any_uid_inputs_give_a_valid_deterministic_uid(source: str, device: str) -> None:
    first = result_uid(ResultUid.SC_INSTANCE, source, device)
    assert first == result_uid(ResultUid.SC_INSTANCE, source, device)
    assert UID(first).is_valid
    assert first != result_uid(ResultUid.SR_INSTANCE, source, device)
