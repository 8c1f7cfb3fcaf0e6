"""HEALTHCHECK of the cxr-pipeline images: ``GET /healthz`` of this container's service.

The listener serves it on ``CXR_METRICS__PORT``, a Celery worker's first process on
``CXR_METRICS__WORKER_PORT`` (the images set both). Each container has its own network
namespace, so whichever of the two answers belongs to this container. Exit status 0 when
one answers 200, else 1 (Docker and podman count a failed check). Standard library only:
the image has no curl.
"""

import os
import sys
import urllib.error
import urllib.request

host = os.environ.get("CXR_METRICS__HOST", "127.0.0.1")
if host in ("", "0.0.0.0", "::"):
    host = "127.0.0.1"
if ":" in host:
    host = f"[{host}]"
failures = []
for name in ("CXR_METRICS__PORT", "CXR_METRICS__WORKER_PORT"):
    port = os.environ.get(name, "")
    if not port:
        continue
    url = f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            if response.status == 200:
                sys.exit(0)
            failures.append(f"{url}: HTTP {response.status}")
    except (OSError, urllib.error.URLError) as exc:
        failures.append(f"{url}: {exc}")
print("unhealthy: " + "; ".join(failures or ["no CXR_METRICS__PORT/WORKER_PORT set"]))
sys.exit(1)
