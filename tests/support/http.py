"""A plain HTTP GET for tests of the metrics and health endpoints."""

from __future__ import annotations

import urllib.error
import urllib.request


def http_get(url: str, timeout_s: float = 10.0) -> tuple[int, str]:
    """GET ``url``; return the status code and the body (also for 4xx/5xx answers)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()
