"""Probes run inside worker processes; this module imports nothing heavy on purpose."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def imported(names: Sequence[str]) -> list[bool]:
    """Return, for each module name, whether this process has already imported it."""
    return [name in sys.modules for name in names]
