"""Logging set-up shared by the command-line entry points.

Third-party libraries are chatty at INFO: highdicom logs about twenty lines per result
object it builds (every content item it copies or checks), pynetdicom every PDU. The
entry points demote them to WARNING, so one analysed image gives a few lines of our own.
Their warnings and errors still come through.
"""

from __future__ import annotations

import logging

NOISY_LIBRARIES: tuple[str, ...] = ("highdicom", "pynetdicom", "PIL", "matplotlib", "monai")
"""Loggers whose INFO (and DEBUG) records are dropped by :func:`quiet_third_party`."""

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def quiet_third_party(level: int = logging.WARNING) -> None:
    """Set the third-party loggers in :data:`NOISY_LIBRARIES` to ``level``.

    Parameters
    ----------
    level
        The lowest level they still emit (WARNING by default).
    """
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(level)


def configure_logging(level: str | int = logging.INFO) -> None:
    """Configure the root logger for a command-line tool and quieten third parties.

    Parameters
    ----------
    level
        Level name (``"INFO"``) or number for our own loggers.
    """
    logging.basicConfig(
        level=level.upper() if isinstance(level, str) else level, format=LOG_FORMAT
    )
    quiet_third_party()
