"""Download a public dataset archive, verify its SHA-256, extract it safely.

Only for machines with internet access; nothing in the pipeline or the tests downloads
(the tests exercise :func:`verify_archive` and :func:`extract_archive` on a local
archive). Checksums are mandatory before extraction: a preset without a pinned checksum
is downloaded, its SHA-256 printed, and extraction refused until the caller passes the
checksum they have verified (``--sha256``), so an archive that changed upstream is never
used silently.

Presets (checksums not pinned here: the upstream files are mutable links):

* ``covid-xray-5k``: the authors' COVID-Xray-5k archive (Dropbox link from the
  DeepCovid repository), layout ``train/{covid,non}``, ``test/{covid,non}``; read it
  with ``cxr-split --covid-xray-5k DIR --keep-test``.
* ``ieee8023``: Cohen et al.'s covid-chestxray-dataset repository snapshot (images and
  ``metadata.csv``); build a manifest from its metadata before ``cxr-split``.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tarfile
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


class FetchError(RuntimeError):
    """Download, checksum or extraction failure (message says which)."""


@dataclass(frozen=True)
class ArchiveSpec:
    """A downloadable archive."""

    name: str
    url: str
    sha256: str | None
    filename: str


PRESETS: dict[str, ArchiveSpec] = {
    "covid-xray-5k": ArchiveSpec(
        name="covid-xray-5k",
        url="https://www.dropbox.com/s/09b5nutjxotmftm/data_upload_v2.zip?dl=1",
        sha256=None,
        filename="data_upload_v2.zip",
    ),
    "ieee8023": ArchiveSpec(
        name="ieee8023",
        url="https://github.com/ieee8023/covid-chestxray-dataset/archive/refs/heads/master.zip",
        sha256=None,
        filename="covid-chestxray-dataset-master.zip",
    ),
}


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_archive(path: Path, expected_sha256: str) -> None:
    """Raise :class:`FetchError` unless ``path`` has the expected SHA-256."""
    expected = expected_sha256.strip().lower()
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise FetchError(f"not a SHA-256 hex digest: {expected_sha256!r}")
    actual = sha256_of(path)
    if actual != expected:
        raise FetchError(f"checksum mismatch for {path.name}: expected {expected}, got {actual}")


def _safe_member(name: str, dest: Path) -> Path:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts:
        raise FetchError(f"unsafe path in archive: {name!r}")
    target = (dest / Path(*pure.parts)).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise FetchError(f"unsafe path in archive: {name!r}")
    return target


def extract_archive(path: Path, dest: Path) -> list[Path]:
    """Extract a ``.zip`` or ``.tar[.gz|.bz2|.xz]`` archive, refusing unsafe paths.

    Members with absolute paths or ``..`` components are rejected before anything is
    written (zip slip); tar links and devices are rejected by the ``data`` filter.

    Returns
    -------
    list of Path
        The extracted regular files.
    """
    dest.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            targets = [_safe_member(i.filename, dest) for i in infos]
            for info, target in zip(infos, targets, strict=True):
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out)
                files.append(target)
        return files
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as archive:
            members = archive.getmembers()
            for m in members:
                _safe_member(m.name, dest)
            try:
                archive.extractall(dest, filter="data")
            except tarfile.FilterError as exc:
                raise FetchError(f"unsafe member in {path.name}: {exc}") from exc
            files = [dest / m.name for m in members if m.isfile()]
        return files
    raise FetchError(f"{path.name} is neither a zip nor a tar archive")


def download(url: str, target: Path, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``target`` (temporary name, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, tmp.open("wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as exc:
        raise FetchError(f"download of {url} failed: {exc}") from exc
    tmp.replace(target)
    return target


def fetch(spec: ArchiveSpec, dest: Path, *, sha256: str | None = None) -> Path:
    """Download (unless present), verify and extract one archive.

    Parameters
    ----------
    spec
        What to fetch.
    dest
        Folder for the archive and its extracted content (``dest/<name>``).
    sha256
        Expected checksum; overrides the preset's. Required when the preset has none.

    Returns
    -------
    Path
        The extraction folder.

    Raises
    ------
    FetchError
        Download failed, no checksum to verify against, mismatch, or unsafe archive.
    """
    archive = dest / spec.filename
    if not archive.is_file():
        download(spec.url, archive)
    expected = sha256 or spec.sha256
    if expected is None:
        raise FetchError(
            f"{archive} downloaded, SHA-256 {sha256_of(archive)}; no pinned checksum for "
            f"{spec.name}: verify the file, then re-run with --sha256 <digest> to extract"
        )
    verify_archive(archive, expected)
    out = dest / spec.name
    extract_archive(archive, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m training.fetch PRESET --dest DIR [--sha256 HEX]``."""
    p = argparse.ArgumentParser(prog="python -m training.fetch",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("--dest", type=Path, required=True)
    p.add_argument("--sha256", help="expected SHA-256 of the archive")
    p.add_argument("--url", help="override the preset's URL (a mirror)")
    args = p.parse_args(argv)
    spec = PRESETS[args.preset]
    if args.url:
        spec = ArchiveSpec(spec.name, args.url, spec.sha256, spec.filename)
    try:
        out = fetch(spec, args.dest, sha256=args.sha256)
    except FetchError as exc:
        print(f"fetch: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
