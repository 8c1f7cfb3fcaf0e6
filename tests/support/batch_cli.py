"""Run ``cxr-batch`` as a user does: ``python -m cxr_pipeline.batch`` in a child process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_batch_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``cxr-batch ARGS --no-progress`` from the repository root; output captured."""
    return subprocess.run(
        [sys.executable, "-m", "cxr_pipeline.batch", *args, "--no-progress"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
