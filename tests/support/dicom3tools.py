"""Run the independent DICOM checkers on files the tests write.

``dciodvfy`` (dicom3tools) checks an object against its IOD; ``dsrdump`` and
``dsr2html`` (DCMTK) parse an SR document tree with a second implementation. A test
that needs a missing tool skips with the reason.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

_TIMEOUT_S = 60


def require_tool(name: str) -> str:
    """Path of an installed command-line tool; skip the calling test where it is absent."""
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (Debian packages dicom3tools / dcmtk)")
    return found


@dataclass(frozen=True)
class DciodvfyReport:
    """Outcome of one ``dciodvfy`` run."""

    returncode: int
    errors: list[str]
    """Lines starting with ``Error -``."""
    warnings: list[str]
    """Lines starting with ``Warning -``."""
    output: str


def dciodvfy(path: Path | str) -> DciodvfyReport:
    """Run ``dciodvfy`` on a file and split its report into errors and warnings."""
    tool = require_tool("dciodvfy")
    run = subprocess.run(
        [tool, str(path)], capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
    )
    output = run.stdout + run.stderr
    lines = [line.strip() for line in output.splitlines()]
    return DciodvfyReport(
        returncode=run.returncode,
        errors=[line for line in lines if line.startswith("Error -")],
        warnings=[line for line in lines if line.startswith("Warning -")],
        output=output,
    )


def dciodvfy_errors(path: Path | str) -> list[str]:
    """The ``Error -`` lines ``dciodvfy`` reports for a file (empty when valid)."""
    return dciodvfy(path).errors


def _dcmtk(tool_name: str, *args: str) -> str:
    tool = require_tool(tool_name)
    run = subprocess.run(
        [tool, *args], capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
    )
    if run.returncode != 0:
        raise AssertionError(
            f"{tool_name} {' '.join(args)} exited {run.returncode}:\n{run.stdout}{run.stderr}"
        )
    return run.stdout


def dsrdump(path: Path | str) -> str:
    """DCMTK text rendering of an SR (full values, all codes); AssertionError on failure."""
    return _dcmtk("dsrdump", "+Pl", "+Pc", str(path))


def dsr2html(path: Path | str) -> str:
    """The DCMTK HTML rendering of an SR document; raises AssertionError if it fails."""
    return _dcmtk("dsr2html", str(path))
