"""DICOMweb client side: authenticated sessions and STOW-RS of results (dicomweb-client).

Results go out by STOW-RS (PS3.18 10.5) to a ``send.destinations`` entry of kind
``dicomweb`` or to ``cxr-batch --send-stow URL``; ``cxr-batch --from-dicomweb`` searches
and retrieves through the same client (:mod:`cxr_pipeline.batch.web_source`). The HTTP
work is the ``dicomweb-client`` library's (the highdicom authors'); this module adds our
credentials, TLS and error policy:

- Credentials come from a file or an environment variable named in the destination's
  ``auth`` table, read when a client is made; never from the command line.
- ``https`` certificates are verified unless the destination's ``tls.verify`` is false;
  ``tls.ca_certificates`` replaces the system trust store, ``tls.certificate`` /
  ``private_key`` is a client certificate.
- The library's own HTTP retries are off: retries and backoff belong to the caller, as for
  C-STORE (:func:`cxr_pipeline.service.delivery.send_with_retries`).
- Any failure (unreachable, HTTP error, an instance in the response's FailedSOPSequence
  or missing from its ReferencedSOPSequence) raises :class:`SendError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from requests import PreparedRequest, Response
from requests.adapters import HTTPAdapter

from cxr_pipeline.dicom import codes
from cxr_pipeline.dicom.codes import AuditAction, AuditOutcome
from cxr_pipeline.errors import ConfigError, SendError
from cxr_pipeline.service.audit import AuditTrail, Participant, studies_of
from cxr_pipeline.settings import Destination, HttpAuthSettings

log = logging.getLogger(__name__)


def read_secret(path: Path | None, env: str | None, what: str) -> str | None:
    """Read a credential from a file (its first line) or an environment variable.

    Parameters
    ----------
    path
        File holding the secret; wins over ``env``.
    env
        Name of the environment variable holding it.
    what
        What the secret is, for the error message (never the secret itself).

    Returns
    -------
    str or None
        The secret without surrounding white space; None when neither source is named.

    Raises
    ------
    ConfigError
        The file cannot be read, the variable is unset, or the secret is empty.
    """
    if path is not None:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read the {what} file {path}: {exc.strerror}") from exc
        secret = lines[0].strip() if lines else ""
        if not secret:
            raise ConfigError(f"the {what} file {path} is empty")
        return secret
    if env is not None:
        secret = os.environ.get(env, "").strip()
        if not secret:
            raise ConfigError(f"environment variable {env} (the {what}) is unset or empty")
        return secret
    return None


class _PinnedVerify(HTTPAdapter):
    """An adapter that keeps the destination's own certificate check.

    ``requests`` lets ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` in the environment
    override a session's ``verify`` (psf/requests#3829), so a configured CA bundle (or
    ``verify = false`` for a lab peer) would silently give way to whatever the host sets.
    """

    def __init__(self, verify: bool | str) -> None:
        super().__init__()
        self._verify = verify

    def send(
        self,
        request: PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float | None, float | None] | None = None,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
        proxies: dict[str, str] | None = None,
    ) -> Response:
        """Send with our ``verify``, whatever the environment merged in."""
        return super().send(
            request, stream=stream, timeout=timeout, verify=self._verify, cert=cert, proxies=proxies
        )


def session_for(destination: Destination) -> requests.Session:
    """Build a ``requests`` session with the destination's credentials and TLS.

    Parameters
    ----------
    destination
        A ``dicomweb`` destination.

    Returns
    -------
    requests.Session
        Bearer token or basic authentication set; certificate verification on unless the
        destination's ``tls.verify`` is false.

    Raises
    ------
    ConfigError
        A named credential or TLS file cannot be read.
    """
    auth: HttpAuthSettings = destination.auth
    session = requests.Session()
    token = read_secret(auth.bearer_token_file, auth.bearer_token_env, "bearer token")
    if token is not None:
        session.headers["Authorization"] = f"Bearer {token}"
    password = read_secret(auth.password_file, auth.password_env, "password")
    if auth.username is not None and password is not None:
        session.auth = (auth.username, password)
    tls = destination.tls
    if not tls.verify:
        session.verify = False
    elif tls.ca_certificates is not None:
        if not tls.ca_certificates.is_file():
            raise ConfigError(f"DICOMweb tls.ca_certificates {tls.ca_certificates} not found")
        session.verify = str(tls.ca_certificates)
    if session.verify is not True:
        session.mount("https://", _PinnedVerify(session.verify))
    if tls.certificate is not None:
        key = None if tls.private_key is None else str(tls.private_key)
        session.cert = (str(tls.certificate), key) if key else str(tls.certificate)
    return session


@contextmanager
def open_client(destination: Destination, *, timeout_s: float) -> Iterator[DICOMwebClient]:
    """Open a DICOMweb client for a ``dicomweb`` destination (or query source).

    Parameters
    ----------
    destination
        Its ``url``, ``auth`` and ``tls``.
    timeout_s
        Connect and read timeout of each HTTP request.

    Yields
    ------
    DICOMwebClient
        With the library's HTTP retries turned off (ours apply); its session (our
        credentials and TLS) is closed when the block ends.

    Raises
    ------
    ConfigError
        Not a ``dicomweb`` destination, or a credential or TLS file cannot be read.
    """
    if destination.kind != "dicomweb" or destination.url is None:
        raise ConfigError(f"{destination.label} is not a DICOMweb destination")
    session = session_for(destination)
    try:
        client = DICOMwebClient(destination.url, session=session, timeout=(timeout_s, timeout_s))
        client.set_http_retry_params(retry=False)
        yield client
    finally:
        session.close()


def describe_http_error(exc: requests.RequestException) -> str:
    """Say in a few words why an HTTP request failed (status and reason, or the error type)."""
    response = exc.response
    if response is not None:
        return f"HTTP {response.status_code} {response.reason}"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _outcome(response: Dataset, datasets: Sequence[Dataset], url: str) -> None:
    """Raise SendError when the STOW-RS response refused or left out an instance."""
    failed = list(response.get("FailedSOPSequence", []))
    if failed:
        reasons = ", ".join(
            f"{item.get('ReferencedSOPInstanceUID', '?')} "
            f"(failure reason 0x{int(item.get('FailureReason', 0)):04X})"
            for item in failed[:5]
        )
        raise SendError(f"STOW-RS to {url} refused {len(failed)} instance(s): {reasons}")
    if "ReferencedSOPSequence" not in response:
        return  # nothing said about the instances; the HTTP status said success
    stored = {
        str(item.get("ReferencedSOPInstanceUID", "")) for item in response.ReferencedSOPSequence
    }
    missing = [str(ds.SOPInstanceUID) for ds in datasets if str(ds.SOPInstanceUID) not in stored]
    if missing:
        raise SendError(
            f"STOW-RS to {url} did not confirm {len(missing)} instance(s): {', '.join(missing[:5])}"
        )


def stow_datasets(
    datasets: Sequence[Dataset],
    destination: Destination,
    *,
    calling_ae_title: str,
    timeout_s: float,
    audit: AuditTrail | None = None,
) -> None:
    """STOW-RS every dataset to a DICOMweb service in one request.

    Parameters
    ----------
    datasets
        Complete DICOM objects (e.g. the SR and SC of one analysis).
    destination
        A ``dicomweb`` destination (URL, auth, TLS).
    calling_ae_title
        Our AE title, naming us in the audit trail.
    timeout_s
        Connect and read timeout of the request.
    audit
        Where to record the transfer; None: not audited.

    Raises
    ------
    SendError
        Unreachable, TLS failure, an HTTP error status (409 when nothing was stored), or an
        instance refused or not confirmed by the response. Retryable.
    ConfigError
        A credential or TLS file named by the destination cannot be read.
    """
    if not datasets:
        return
    url = str(destination.url)
    participants = (
        Participant(calling_ae_title, "", True, codes.AUDIT_ROLE_SOURCE),
        Participant(url, urlsplit(url).hostname or "", False, codes.AUDIT_ROLE_DESTINATION),
    )
    studies = studies_of(datasets)
    failure: str | None = None
    try:
        with open_client(destination, timeout_s=timeout_s) as client:
            response = client.store_instances(list(datasets))
        _outcome(response, datasets, url)
    except (SendError, ConfigError) as exc:
        failure = exc.detail
        raise
    except requests.RequestException as exc:
        failure = f"STOW-RS to {url} failed: {describe_http_error(exc)}"
        raise SendError(failure) from exc
    except (ValueError, OSError) as exc:  # an unparsable response, an unencodable dataset
        failure = f"STOW-RS to {url} failed: {type(exc).__name__}: {str(exc)[:200]}"
        raise SendError(failure) from exc
    finally:
        if audit is not None:
            audit.record(
                "instances transferred (sent, STOW-RS)",
                codes.AUDIT_INSTANCES_TRANSFERRED,
                action=AuditAction.READ,
                outcome=AuditOutcome.SUCCESS if failure is None else AuditOutcome.MINOR_FAILURE,
                participants=participants,
                studies=studies,
                description=failure,
            )
    log.info("stored %d instance(s) at %s by STOW-RS", len(datasets), url)
