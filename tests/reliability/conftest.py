"""Fixtures of the reliability suite and the end-of-run table of scenarios."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.reliability.harness import REPORT_ROWS, Pacs


def _require(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (needed for a real-peer reliability test)")


@pytest.fixture
def pacs_factory(tmp_path: Path) -> Iterator[Callable[[Mapping[str, tuple[str, str, int]]], Pacs]]:
    """Start real Orthanc servers (restartable); all are stopped at the end."""
    _require("Orthanc")
    started: list[Pacs] = []

    def make(modalities: Mapping[str, tuple[str, str, int]] | None = None) -> Pacs:
        pacs = Pacs(tmp_path / f"orthanc{len(started)}", modalities or {})
        started.append(pacs)
        pacs.start()
        return pacs

    yield make
    for pacs in started:
        pacs.stop()


@pytest.fixture
def pacs(pacs_factory: Callable[..., Pacs]) -> Pacs:
    """One running, restartable Orthanc."""
    return pacs_factory()


@pytest.fixture(scope="session")
def pngs(nih_png_paths: list[Path]) -> list[Path]:
    """Real NIH radiographs the generated DICOMs take their pixels from."""
    if len(nih_png_paths) < 4:
        pytest.skip("NIH PNGs not found in the shared data folder")
    return nih_png_paths[:8]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print scenario | sent | acknowledged | delivered | failed | lost | duplicates."""
    if not REPORT_ROWS:
        return
    columns = ("sent", "acknowledged", "delivered", "failed_with_reason", "lost", "duplicates")
    width = max(len(r["scenario"]) for r in REPORT_ROWS)
    terminalreporter.section("reliability: no accepted image lost")
    terminalreporter.write_line(
        f"{'scenario':<{width}} | " + " | ".join(f"{c:>{len(c)}}" for c in columns)
    )
    for row in REPORT_ROWS:
        terminalreporter.write_line(
            f"{row['scenario']:<{width}} | " + " | ".join(f"{row[c]:>{len(c)}}" for c in columns)
        )
