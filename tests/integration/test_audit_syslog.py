"""Audit messages to a real Debian ``rsyslogd`` on loopback: RFC 5424 over UDP, TCP and TLS.

The daemon is started by the test with a temporary configuration on free ports
(:mod:`tests.support.rsyslog`); its RFC 5424 parser must recover APP-NAME, MSGID and a
MSG that is the audit message's XML, byte for byte as written to the audit file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cxr_pipeline.dicom import codes
from cxr_pipeline.dicom.codes import AuditOutcome
from cxr_pipeline.service.audit import AuditTrail, Participant, read_trail
from cxr_pipeline.service.syslog import MSGID_AUDIT, SEVERITY_WARNING, format_rfc5424
from cxr_pipeline.settings import load_settings
from tests.support.pki import make_pki
from tests.support.rsyslog import rsyslog_available, running_rsyslog, tls_driver_available

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not rsyslog_available(), reason="Debian package rsyslog not installed"),
]

BOM = "\ufeff"


def _alert(trail: AuditTrail, n: int) -> str | None:
    caller = Participant("PACS", "10.0.0.9", True, codes.AUDIT_ROLE_SOURCE)
    return trail.record(
        f"association rejected {n}",
        codes.AUDIT_SECURITY_ALERT,
        outcome=AuditOutcome.MINOR_FAILURE,
        participants=[caller],
        event_type=codes.AUDIT_NODE_AUTHENTICATION,
        description=f"test alert {n}",
        node="10.0.0.9",
    )


def _msg(line: str) -> str:
    return line.split("|", 3)[3].removeprefix(BOM)


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
def test_audit_messages_reach_rsyslog(tmp_path: Path, transport: str) -> None:
    tls = None
    syslog_tls: dict[str, object] = {}
    if transport == "tls":
        if not tls_driver_available():
            pytest.skip("rsyslog-openssl (TLS driver) not installed")
        pki = make_pki(tmp_path / "pki")
        tls = (pki.ca, pki.server.certificate, pki.server.key)
        syslog_tls = {"enabled": True, "ca_certificates": str(pki.ca), "server_name": "localhost"}
    with running_rsyslog(tmp_path / "rsyslog", tls=tls) as collector:
        port = {"udp": collector.udp_port, "tcp": collector.tcp_port}.get(
            transport, collector.tls_port
        )
        settings = load_settings(
            data_dir=tmp_path / "data",
            audit={"syslog_host": "127.0.0.1", "syslog_port": port,
                   "syslog_transport": transport, "syslog_tls": syslog_tls},
        )  # fmt: skip
        trail = AuditTrail(settings)
        sent = [_alert(trail, n) for n in range(3)]
        lines = collector.wait_for(lambda got: len(got) >= 3)
        trail.close()
    assert all(sent)
    assert len(lines) == 3, (collector.lines(), (tmp_path / "rsyslog" / "rsyslogd.log").read_text())
    for line, xml in zip(lines, sent, strict=True):
        app, msgid, severity, _ = line.split("|", 3)
        assert (app, msgid, int(severity)) == ("cxr-pipeline", MSGID_AUDIT, SEVERITY_WARNING)
        assert _msg(line) == xml
    # The same messages are in the append-only file.
    assert [m["xml"] for m in read_trail(trail.path)] == sent


def test_collector_down_does_not_lose_the_file_copy(tmp_path: Path) -> None:
    from tests.support.orthanc import free_port

    settings = load_settings(
        data_dir=tmp_path / "data",
        audit={"syslog_host": "127.0.0.1", "syslog_port": free_port(), "syslog_transport": "tcp"},
    )
    trail = AuditTrail(settings)
    assert _alert(trail, 1) is not None
    assert len(read_trail(trail.path)) == 1


def test_rfc5424_header() -> None:
    frame = format_rfc5424("<AuditMessage/>", app_name="cxr pipeline", hostname="node 1")
    header, _, message = frame.partition(b" \xef\xbb\xbf")
    parts = header.decode().split(" ")
    assert parts[0] == "<85>1"  # facility 10 (authpriv) x 8 + severity 5 (notice)
    assert parts[1].endswith("Z") and parts[2] == "node1" and parts[3] == "cxrpipeline"
    assert parts[5:] == [MSGID_AUDIT, "-"] and message == b"<AuditMessage/>"
