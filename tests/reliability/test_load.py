"""Reduced load run: 4 concurrent associations x 10 images into one ``cxr-listen``.

The full run with figures is ``bench/bench_load.py`` (4 x 100). Here: everything is
accepted and processed, nothing lost or duplicated, listener memory bounded. No timing
asserts (a busy 2-core machine).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.harness import Pacs
from tests.reliability.load import run_load

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


def test_four_concurrent_associations(
    tmp_path: Path, pacs: Pacs, pngs: list[Path], tiny_checkpoint: Path
) -> None:
    result = run_load(
        tmp_path, pacs=pacs, checkpoint=tiny_checkpoint, pngs=pngs, associations=4,
        per_association=10, size=256, explain="none",
    )  # fmt: skip
    print("\n".join(result.lines()))
    assert result.accepted == result.sent == 40
    assert result.done == 40
    row = result.tally_row
    assert row["delivered"] == 40 and row["lost"] == 0 and row["duplicates"] == 0, row
    # Bounded: 40 small images must not grow the listener by more than 300 MiB over its
    # start (model and libraries loaded).
    growth_mib = (result.rss_peak_sampled_kib - result.rss_start_kib) / 1024
    assert growth_mib < 300, f"listener RSS grew by {growth_mib:.0f} MiB"
