"""The container stack, built and run: ``scripts/containers-test`` under pytest.

Marked ``containers`` (and ``slow``): it builds the images of ``docker/`` with podman on a
debootstrapped Debian base and runs ``docker/compose.yaml`` (with ``docker/compose.local.yaml``
swapping in Redis and Orthanc images built from Debian's packages), sends the real radiographs
through Orthanc's auto-routing, kills the worker container mid-job and checks that one SR and
one SC per file come back. A cold run (nothing cached) takes about 13 minutes here, a warm one
about 3 (numbers in docker/README.md). Deselect with ``-m "not containers"``.
The transcript is kept in ``var/test-artifacts/containers/transcript.txt``.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support.services import REPO_ROOT

pytestmark = [pytest.mark.containers, pytest.mark.slow]


@pytest.mark.timeout(3600)
def test_container_stack_end_to_end() -> None:
    artifacts = REPO_ROOT / "var" / "test-artifacts" / "containers"
    artifacts.mkdir(parents=True, exist_ok=True)
    transcript = artifacts / "transcript.txt"
    with transcript.open("w") as out:
        result = subprocess.run(
            [str(REPO_ROOT / "scripts" / "containers-test")],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
            timeout=3500,
            check=False,
        )
    text = transcript.read_text(errors="replace")
    assert result.returncode == 0, f"scripts/containers-test failed; transcript:\n{text[-6000:]}"
    assert "PASSED" in text
