"""The host's pip/npm configuration as scripts/containers-test hands it to podman build."""

from __future__ import annotations

from pathlib import Path

from tests.containers.host_config import MOUNT_ROOT, prepare


def _tree(tmp_path: Path) -> dict[str, Path]:
    index = tmp_path / "pypi" / "simple"
    (index / "torch").mkdir(parents=True)
    (tmp_path / "pypi" / "files").mkdir()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    cert = tmp_path / "ca.crt"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch<=2.14.1\n")
    return {"index": index, "wheels": wheels, "cert": cert, "constraints": constraints}


def test_local_paths_are_rewritten_under_the_mount_root_and_mounted(tmp_path: Path) -> None:
    t = _tree(tmp_path)
    items = {
        "global.cert": "/nowhere/ignored.crt",
        "global.constraint": str(t["constraints"]),
        "global.extra-index-url": f"file://{t['index']} https://mirror.example/simple",
        "global.find-links": "/does/not/exist",
        ":env:.cert": str(t["cert"]),
        ":env:.find-links": str(t["wheels"]),
        ":env:.default-timeout": "180",
        "install.no-compile": "1",
    }
    config = prepare(tmp_path / "out", pip_items=items, npm={})
    conf = (tmp_path / "out" / "pip.conf").read_text()
    pypi = t["index"].parent.resolve()
    assert (
        f"extra-index-url = file://{MOUNT_ROOT}/host{pypi}/simple https://mirror.example/simple"
        in conf
    )
    # PIP_* variables win over the files, as in pip.
    assert f"find-links = {MOUNT_ROOT}/host{t['wheels'].resolve()}" in conf
    assert "cert = /mnt/file" in conf and "ca.crt" in conf
    assert "constraint = /mnt/file" in conf
    assert "default-timeout = 180" in conf
    assert "[install]\nno-compile = 1" in conf
    copied = sorted(p.name for p in (tmp_path / "out").glob("file*"))
    assert len(copied) == 2 and (tmp_path / "out" / copied[0]).read_text()
    assert config.build_args == {"PIP_CONFIG_FILE": f"{MOUNT_ROOT}/pip.conf"}
    # The folder first, then each local folder inside it; their mount points already exist
    # in the host folder, so the image layer gets none.
    assert config.mounts[0] == f"{(tmp_path / 'out').resolve()}:{MOUNT_ROOT}:ro"
    assert f"{pypi}:{MOUNT_ROOT}/host{pypi}:ro" in config.mounts
    assert f"{t['wheels'].resolve()}:{MOUNT_ROOT}/host{t['wheels'].resolve()}:ro" in config.mounts
    for mount in config.mounts[1:]:
        inside = mount.split(":")[1].removeprefix(MOUNT_ROOT + "/")
        assert (tmp_path / "out" / inside).is_dir()


def test_npm_cafile_is_copied_and_no_host_configuration_means_no_build_args(
    tmp_path: Path,
) -> None:
    t = _tree(tmp_path)
    config = prepare(
        tmp_path / "out",
        pip_items={},
        npm={"registry": "https://registry.npmjs.org/", "cafile": str(t["cert"])},
    )
    npmrc = (tmp_path / "out" / "npmrc").read_text()
    assert "registry=https://registry.npmjs.org/\n" in npmrc
    assert f"cafile={MOUNT_ROOT}/file0-ca.crt" in npmrc
    assert config.build_args == {"NPM_CONFIG_USERCONFIG": f"{MOUNT_ROOT}/npmrc"}
    assert not (tmp_path / "out" / "pip.conf").exists()

    bare = prepare(tmp_path / "bare", pip_items={}, npm={})
    assert bare.build_args == {}
    assert bare.podman_args() == ["-v", f"{(tmp_path / 'bare').resolve()}:{MOUNT_ROOT}:ro"]
