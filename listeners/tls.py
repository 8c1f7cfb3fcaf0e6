"""TLS for DICOM associations (PS3.15 Annex B, "basic TLS secure transport").

Builds :class:`ssl.SSLContext` objects from :class:`~cxr_pipeline.settings.TlsSettings`
with the standard library's defaults (TLS 1.2 or newer, certificate verification on);
pynetdicom wraps its sockets with them.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cxr_pipeline.errors import ConfigError
from cxr_pipeline.settings import TlsSettings


def _readable(path: Path | None, what: str) -> Path:
    if path is None:
        raise ConfigError(f"listener.tls.enabled needs listener.tls.{what}")
    if not Path(path).is_file():
        raise ConfigError(f"listener.tls.{what} file not found: {path}")
    return Path(path)


def server_context(settings: TlsSettings) -> ssl.SSLContext | None:
    """Build the listener's TLS context, or None when TLS is disabled.

    Parameters
    ----------
    settings
        Certificate, private key, optional CA bundle for client certificates and whether
        a client certificate is required.

    Returns
    -------
    ssl.SSLContext or None
        A server-side context: TLS 1.2+, client certificates verified against
        ``ca_certificates`` when given (required when ``require_client_certificate``).

    Raises
    ------
    ConfigError
        A file is missing or unreadable, or a client certificate is required without a CA.
    """
    if not settings.enabled:
        return None
    certificate = _readable(settings.certificate, "certificate")
    private_key = _readable(settings.private_key, "private_key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=certificate, keyfile=private_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the listener's TLS certificate or key: {exc}") from exc
    if settings.ca_certificates is not None:
        ca = _readable(settings.ca_certificates, "ca_certificates")
        try:
            context.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS CA certificates: {exc}") from exc
        context.verify_mode = (
            ssl.CERT_REQUIRED if settings.require_client_certificate else ssl.CERT_OPTIONAL
        )
    elif settings.require_client_certificate:
        raise ConfigError("listener.tls.require_client_certificate needs ca_certificates")
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(
    ca_certificates: Path,
    *,
    certificate: Path | None = None,
    private_key: Path | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """Build a client-side TLS context (an SCU connecting to a TLS listener).

    Parameters
    ----------
    ca_certificates
        CA bundle (or the self-signed server certificate) that signs the server's.
    certificate, private_key
        Client certificate and key, for listeners that require one.
    check_hostname
        Verify the server certificate's host name.

    Returns
    -------
    ssl.SSLContext
        The context to pass to ``AE.associate(..., tls_args=(context, hostname))``.

    Raises
    ------
    ConfigError
        A file is missing or unreadable.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_certificates))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    if certificate is not None:
        try:
            context.load_cert_chain(certfile=certificate, keyfile=private_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the client TLS certificate or key: {exc}") from exc
    return context
