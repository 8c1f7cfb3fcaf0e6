"""TLS for DICOM associations: the contexts are built in :mod:`cxr_pipeline.service.tls`.

Kept so ``listeners.tls`` imports keep working; the listener and the result sender share
one implementation there.
"""

from __future__ import annotations

from cxr_pipeline.service.tls import (
    client_context,
    describe_tls_error,
    peer_context,
    server_context,
)

__all__ = ["client_context", "describe_tls_error", "peer_context", "server_context"]
