"""Checksum and safe extraction of dataset archives, on archives built here (no network)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from training.datasets import COVID, scan_covid_xray_5k
from training.fetch import ArchiveSpec, FetchError, extract_archive, fetch, verify_archive


@pytest.fixture()
def five_k_zip(tmp_path: Path, nih_png_paths: list[Path]) -> Path:
    """A COVID-Xray-5k-shaped zip holding four real NIH PNGs."""
    if len(nih_png_paths) < 4:
        pytest.skip("NIH images absent")
    path = tmp_path / "data_upload_v2.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for i, png in enumerate(nih_png_paths[:4]):
            split = "train" if i < 2 else "test"
            folder = "covid" if i % 2 == 0 else "non"
            archive.write(png, f"data_upload_v2/{split}/{folder}/{png.name}")
    return path


def test_verified_zip_extracts_to_the_5k_layout(five_k_zip: Path, tmp_path: Path) -> None:
    digest = hashlib.sha256(five_k_zip.read_bytes()).hexdigest()
    verify_archive(five_k_zip, digest.upper())
    files = extract_archive(five_k_zip, tmp_path / "out")
    assert len(files) == 4 and all(f.stat().st_size > 1000 for f in files)
    samples = scan_covid_xray_5k(tmp_path / "out")
    assert sorted((s.split, s.label) for s in samples) == sorted(
        [("train", COVID), ("train", "non_covid"), ("test", COVID), ("test", "non_covid")])


def test_checksum_mismatch_and_bad_digest(five_k_zip: Path) -> None:
    with pytest.raises(FetchError, match="checksum mismatch"):
        verify_archive(five_k_zip, "0" * 64)
    with pytest.raises(FetchError, match="not a SHA-256"):
        verify_archive(five_k_zip, "abc")


def test_fetch_uses_a_present_archive_and_requires_a_checksum(five_k_zip: Path) -> None:
    dest = five_k_zip.parent
    spec = ArchiveSpec("covid-xray-5k", "https://invalid.example/never-used", None,
                       five_k_zip.name)
    with pytest.raises(FetchError, match="no pinned checksum"):
        fetch(spec, dest)
    digest = hashlib.sha256(five_k_zip.read_bytes()).hexdigest()
    out = fetch(spec, dest, sha256=digest)
    assert len(scan_covid_xray_5k(out)) == 4


def test_zip_slip_and_tar_traversal_are_refused(tmp_path: Path) -> None:
    evil_zip = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil_zip, "w") as archive:
        archive.writestr("../escape.txt", "x")
    with pytest.raises(FetchError, match="unsafe path"):
        extract_archive(evil_zip, tmp_path / "z")
    assert not (tmp_path / "escape.txt").exists()

    evil_tar = tmp_path / "evil.tar.gz"
    with tarfile.open(evil_tar, "w:gz") as archive:
        info = tarfile.TarInfo("/etc/evil.txt")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(FetchError, match="unsafe path"):
        extract_archive(evil_tar, tmp_path / "t")

    not_archive = tmp_path / "x.bin"
    not_archive.write_bytes(b"hello")
    with pytest.raises(FetchError, match="neither"):
        extract_archive(not_archive, tmp_path / "n")
