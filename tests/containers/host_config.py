"""The host's pip and npm configuration, handed to a container build.

A machine behind a package mirror, a local index or a TLS-intercepting proxy configures pip
with files (``/etc/pip.conf``, ``/etc/xdg/pip/pip.conf``, ``~/.config/pip/pip.conf``) and
``PIP_*`` variables, and npm with npmrc files. A container build sees none of it.
:func:`prepare` writes one ``pip.conf`` and one ``npmrc`` into a folder, every local path they
name (find-links folders, ``file://`` indexes, constraint files, CA bundles) rewritten to where
the build sees it, and returns the ``podman build -v`` arguments that mount them read-only.
The Dockerfiles read the two files only through the build arguments ``PIP_CONFIG_FILE`` and
``NPM_CONFIG_USERCONFIG``, unset by default (then PyPI and the npm registry, as for anyone).

Everything is mounted inside one mount at :data:`MOUNT_ROOT`, a folder every Debian image
has: ``podman build -v`` leaves an empty file or folder in the image layer for each mount
point it has to create, and the nested mount points are made in the host folder instead.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

MOUNT_ROOT = "/mnt"
"""Where the build sees the prepared folder (it exists, empty, in every Debian image)."""

# pip options whose values are files (copied into the folder) or locations (folders and
# file:// indexes, mounted). Values may hold several, separated by whitespace.
_FILE_KEYS = frozenset({"cert", "client-cert", "constraint", "requirement"})
_LOCATION_KEYS = frozenset({"find-links", "index-url", "extra-index-url"})


@dataclass
class BuildConfig:
    """What :func:`prepare` made: build arguments and ``-v`` mounts for ``podman build``."""

    folder: Path
    build_args: dict[str, str] = field(default_factory=dict)
    mounts: list[str] = field(default_factory=list)
    """``HOST:CONTAINER:ro`` values for ``podman build -v``; the folder's own mount first."""
    notes: list[str] = field(default_factory=list)

    def podman_args(self) -> list[str]:
        """``--build-arg`` and ``-v`` options for ``podman build``."""
        args: list[str] = []
        for mount in self.mounts:
            args += ["-v", mount]
        for key, value in self.build_args.items():
            args += ["--build-arg", f"{key}={value}"]
        return args


class _Mapper:
    """Rewrites host paths to paths under :data:`MOUNT_ROOT` and records the mounts."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.mounts: dict[Path, str] = {}
        self.copied: dict[Path, str] = {}

    def copy_file(self, host: Path) -> str:
        """Copy a small file (CA bundle, constraints) into the folder; its path in the build."""
        host = host.resolve()
        if host not in self.copied:
            name = f"file{len(self.copied)}-{host.name}"
            shutil.copyfile(host, self.folder / name)
            self.copied[host] = f"{MOUNT_ROOT}/{name}"
        return self.copied[host]

    def mount_dir(self, host: Path) -> str:
        """Mount a host folder at ``MOUNT_ROOT/host/<its absolute path>``."""
        host = host.resolve()
        inside = f"{MOUNT_ROOT}/host{host}"
        if host not in self.mounts:
            (self.folder / "host" / str(host).lstrip("/")).mkdir(parents=True, exist_ok=True)
            self.mounts[host] = inside
        return inside

    def location(self, value: str) -> str:
        """A find-links or index value: local folders and file:// URLs are mounted."""
        parts = urlsplit(value)
        if parts.scheme not in ("", "file"):
            return value  # a URL the build reaches itself
        path = Path(unquote(parts.path))
        if not path.exists():
            return value  # pip ignores it on the host too (with a warning)
        if path.is_file() or parts.scheme == "file":
            # A file, or a PEP 503 index (.../simple) whose pages link to their files
            # relative to themselves (../../files/x.whl): the folder above is mounted.
            inside = self.mount_dir(path.parent) + "/" + path.name
        else:
            inside = self.mount_dir(path)
        return f"file://{inside}" if parts.scheme == "file" else inside


def pip_config_items(python: str = sys.executable) -> dict[str, str]:
    """The host's pip configuration as ``pip config list`` reports it (files and ``PIP_*``).

    Parameters
    ----------
    python
        Interpreter whose pip is asked (the project's virtual environment).

    Returns
    -------
    dict[str, str]
        ``section.key`` to value; ``:env:.key`` entries are the ``PIP_*`` variables.
    """
    out = subprocess.run(
        [python, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    items: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, raw = line.partition("=")
        if not sep:
            continue
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        items[key.strip()] = str(value)
    return items


def pip_conf(items: Mapping[str, str], mapper: _Mapper) -> str:
    """One pip.conf equivalent to ``items``, with local paths rewritten for the build.

    ``PIP_*`` variables override the files' ``[global]`` values, as in pip.
    """
    sections: dict[str, dict[str, str]] = {}
    env: dict[str, str] = {}
    for dotted, value in items.items():
        section, _, key = dotted.rpartition(".")
        if section == ":env:":
            env[key] = value
        elif section:
            sections.setdefault(section, {})[key] = value
    sections.setdefault("global", {}).update(env)
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if key in _FILE_KEYS:
                paths = [p for p in value.split() if Path(p).is_file()]
                value = " ".join(mapper.copy_file(Path(p)) for p in paths)
            elif key in _LOCATION_KEYS:
                value = " ".join(mapper.location(v) for v in value.split())
            if value:
                lines.append(f"{key} = {value}")
        lines.append("")
    return "\n".join(lines)


def npm_settings(
    keys: Iterable[str] = ("registry", "cafile", "proxy", "https-proxy"),
) -> dict[str, str]:
    """The host's npm settings that decide where packages come from (empty without npm)."""
    npm = shutil.which("npm")
    settings: dict[str, str] = {}
    if npm is None:
        return settings
    for key in keys:
        result = subprocess.run(
            [npm, "config", "get", key], capture_output=True, text=True, timeout=60, check=False
        )
        value = result.stdout.strip()
        if result.returncode == 0 and value not in ("", "null", "undefined"):
            settings[key] = value
    return settings


def prepare(
    folder: Path,
    *,
    python: str = sys.executable,
    npm: Mapping[str, str] | None = None,
    pip_items: Mapping[str, str] | None = None,
) -> BuildConfig:
    """Write the build's pip.conf and npmrc into ``folder``; the podman arguments that use them.

    Parameters
    ----------
    folder
        Emptied and filled; mounted read-only at :data:`MOUNT_ROOT` during the build.
    python
        Interpreter whose pip configuration is taken.
    npm
        npm settings (default: :func:`npm_settings`).
    pip_items
        pip settings (default: :func:`pip_config_items` of ``python``).

    Returns
    -------
    BuildConfig
        Without any pip or npm configuration on the host: no build arguments (the
        Dockerfiles' defaults, PyPI and registry.npmjs.org).
    """
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    mapper = _Mapper(folder)
    config = BuildConfig(folder=folder)
    items = dict(pip_config_items(python) if pip_items is None else pip_items)
    if items:
        (folder / "pip.conf").write_text(pip_conf(items, mapper))
        config.build_args["PIP_CONFIG_FILE"] = f"{MOUNT_ROOT}/pip.conf"
        config.notes.append("pip: the host's configuration (" + ", ".join(sorted(items)) + ")")
    npm_values = dict(npm_settings() if npm is None else npm)
    if npm_values:
        lines = []
        for key, value in npm_values.items():
            if key == "cafile" and Path(value).is_file():
                value = mapper.copy_file(Path(value))
            lines.append(f"{key}={value}")
        (folder / "npmrc").write_text("\n".join(lines) + "\n")
        config.build_args["NPM_CONFIG_USERCONFIG"] = f"{MOUNT_ROOT}/npmrc"
        config.notes.append("npm: " + ", ".join(f"{k}={v}" for k, v in npm_values.items()))
    config.mounts.append(f"{folder.resolve()}:{MOUNT_ROOT}:ro")
    for host, inside in sorted(mapper.mounts.items(), key=lambda item: item[1]):
        config.mounts.append(f"{host}:{inside}:ro")
    os.chmod(folder, 0o755)
    return config
