"""A site profile: one hospital's own calibration map and decision threshold for one model.

``cxr-validate --fit-site-profile site.toml`` fits it on the site's labelled images
(:mod:`training.validate.profile`); ``cxr-listen`` / ``cxr-worker`` (``[model]
site_profile``), ``cxr-batch --site-profile`` and ``python -m cxr_pipeline --site-profile``
load it. It then decides instead of the model card: the calibrated probability every output
reports comes from its map, the decision from its threshold (on that probability's scale).

The profile belongs to one model: it names the model's name, version and Device UID, and
loading it for any other model is a :class:`~cxr_pipeline.errors.ConfigError` at start-up
(a map fitted to one network's scores means nothing for another's).

The file is TOML, so a person can read what it says::

    [profile]
    site = "st-elsewhere"
    created = "2024-05-02T10:11:12+00:00"
    target_sensitivity = 0.95
    threshold = 0.083            # on the calibrated scale
    [model]
    name = "deep-covid-efficientnet_lite0"
    version = "1.0.0"
    device_uid = "2.25...."
    [data]
    n = 240  ...
    [figures]                    # cross-fitted by patient: honest estimates
    sensitivity = 0.96  ...
    [calibration]
    method = "platt"  ...
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_pipeline.errors import CheckpointError, ConfigError
from cxr_pipeline.model.calibration import Calibration, OperatingPoint
from cxr_pipeline.model.card import ModelCard
from cxr_pipeline.settings import ModelSettings

PROFILE_FORMAT_VERSION = 1
SOURCE = "site profile"
""":attr:`OperatingPoint.source` of a profile's operating point."""


@dataclass(frozen=True)
class SiteProfile:
    """What a site fitted for one model.

    Attributes
    ----------
    site
        The site's name (e.g. ``"st-elsewhere-radiology"``); shown as what decided.
    model_name, model_version, device_uid
        The model card it belongs to (``device_uid`` empty: not checked).
    created
        ISO 8601 date and time of the fit.
    calibration
        Raw score -> probability, fitted on the site's images.
    threshold
        Decision threshold on the calibrated scale (probability >= threshold is flagged).
    target_sensitivity
        The sensitivity the threshold was chosen to reach.
    threshold_confidence
        Confidence with which the threshold's sensitivity on new patients of the site
        reaches the target (see :mod:`training.validate.profile`).
    data
        Counts it was fitted on: ``n``, ``n_covid``, ``n_non_covid``, ``n_patients``.
    figures
        Cross-fitted (by patient) estimates of what the profile does on new patients:
        sensitivity, specificity with their intervals, ECE, Brier score, AUC...
    notes
        Free text (what was fitted on, how).
    """

    site: str
    model_name: str
    model_version: str
    calibration: Calibration
    threshold: float
    target_sensitivity: float
    created: str = ""
    device_uid: str = ""
    threshold_confidence: float | None = None
    data: dict[str, int] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self) -> None:
        if not self.site.strip():
            raise ValueError("a site profile needs a site name")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold {self.threshold} outside [0, 1]")
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise ValueError(f"target sensitivity {self.target_sensitivity} outside (0, 1]")

    @property
    def model(self) -> str:
        """``NAME VERSION`` of the model it belongs to."""
        return f"{self.model_name} {self.model_version}"

    def operating_point(self) -> OperatingPoint:
        """Give the profile's operating point: its map and threshold, source ``site profile``."""
        return OperatingPoint(
            calibration=self.calibration,
            threshold=self.threshold,
            source=SOURCE,
            name=self.site,
            target_sensitivity=self.target_sensitivity,
        )

    def check_model(self, card: ModelCard, *, path: Path | str | None = None) -> None:
        """Refuse a model the profile was not fitted for.

        Parameters
        ----------
        card
            The loaded model's card.
        path
            The profile file, for the message.

        Raises
        ------
        ConfigError
            Name, version or (when the profile records one) Device UID differ.
        """
        where = f" {path}" if path is not None else ""
        if (card.name, card.version) != (self.model_name, self.model_version):
            raise ConfigError(
                f"site profile{where} ({self.site!r}) was fitted for model {self.model}, "
                f"but the loaded model is {card.name} {card.version}; fit a new profile "
                f"with cxr-validate --fit-site-profile for this model"
            )
        if self.device_uid and card.device_uid != self.device_uid:
            raise ConfigError(
                f"site profile{where} ({self.site!r}) was fitted for {self.model} with "
                f"Device UID {self.device_uid}, but the loaded weights are "
                f"{card.device_uid}: same name and version, other weights; fit a new profile"
            )

    def to_dict(self) -> dict[str, Any]:
        """TOML-ready form (no ``None``: TOML has no null)."""
        profile: dict[str, Any] = {
            "format_version": PROFILE_FORMAT_VERSION,
            "site": self.site,
            "created": self.created,
            "target_sensitivity": self.target_sensitivity,
            "threshold": self.threshold,
        }
        if self.threshold_confidence is not None:
            profile["threshold_confidence"] = self.threshold_confidence
        if self.notes:
            profile["notes"] = self.notes
        return {
            "profile": profile,
            "model": {
                "name": self.model_name,
                "version": self.model_version,
                "device_uid": self.device_uid,
            },
            "data": dict(self.data),
            "figures": {k: v for k, v in self.figures.items() if not math.isnan(v)},
            "calibration": self.calibration.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SiteProfile:
        """Rebuild from :meth:`to_dict` output (a parsed TOML file).

        Raises
        ------
        ConfigError
            Missing tables or keys, wrong types, an unknown format version.
        """
        try:
            profile = dict(data["profile"])
            model = dict(data["model"])
            version = int(profile.pop("format_version", PROFILE_FORMAT_VERSION))
            if version != PROFILE_FORMAT_VERSION:
                raise ConfigError(f"unsupported site profile format {version}")
            confidence = profile.get("threshold_confidence")
            return cls(
                site=str(profile["site"]),
                created=str(profile.get("created", "")),
                target_sensitivity=float(profile["target_sensitivity"]),
                threshold=float(profile["threshold"]),
                threshold_confidence=None if confidence is None else float(confidence),
                notes=str(profile.get("notes", "")),
                model_name=str(model["name"]),
                model_version=str(model["version"]),
                device_uid=str(model.get("device_uid", "")),
                data={str(k): int(v) for k, v in dict(data.get("data", {})).items()},
                figures={str(k): float(v) for k, v in dict(data.get("figures", {})).items()},
                calibration=Calibration.from_dict(dict(data["calibration"])),
            )
        except ConfigError:
            raise
        except CheckpointError as exc:
            raise ConfigError(f"site profile: {exc.detail}") from exc
        except KeyError as exc:
            raise ConfigError(f"site profile lacks {exc.args[0]!r}") from exc
        except (TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"invalid site profile: {exc}") from exc


def load_site_profile(path: Path | str) -> SiteProfile:
    """Read a site profile TOML file.

    Parameters
    ----------
    path
        The file.

    Returns
    -------
    SiteProfile
        The profile.

    Raises
    ------
    ConfigError
        Missing, unreadable or invalid file (the message names it).
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"site profile {path} does not exist") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read site profile {path}: {exc}") from exc
    try:
        return SiteProfile.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.detail}") from exc


def save_site_profile(profile: SiteProfile, path: Path | str) -> Path:
    """Write a profile as TOML, atomically (temporary file, then rename).

    Parameters
    ----------
    profile
        The profile.
    path
        Destination; parent folders are created.

    Returns
    -------
    Path
        The written file.
    """
    import tomli_w

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# cxr-pipeline site profile for {profile.model}, site {profile.site!r}.\n"
        "# Figures are cross-fitted by patient: each patient's images were scored by a\n"
        "# profile fitted without that patient. The threshold is on the calibrated scale.\n"
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(header + tomli_w.dumps(profile.to_dict()), encoding="utf-8")
    os.replace(tmp, path)
    return path


def profile_for_model(path: Path | str, card: ModelCard) -> SiteProfile:
    """Load a profile and check that it belongs to ``card``'s model.

    Raises
    ------
    ConfigError
        Unreadable profile, or one fitted for another model, version or weights.
    """
    profile = load_site_profile(path)
    profile.check_model(card, path=path)
    return profile


def check_configured_profile(settings: ModelSettings) -> SiteProfile | None:
    """Check the ``[model] site_profile`` setting against the configured checkpoint now.

    For processes that load the model later (a Celery worker loads it in each pool process
    on its first task): a wrong profile is refused at start-up, not on the first image.

    Parameters
    ----------
    settings
        The ``[model]`` settings.

    Returns
    -------
    SiteProfile or None
        The profile, or None when none is configured.

    Raises
    ------
    ConfigError
        Unreadable profile, or one fitted for another model.
    CheckpointError
        The checkpoint cannot be loaded.
    """
    if settings.site_profile is None:
        return None
    from cxr_pipeline.model.architectures import default_checkpoint_path, load_checkpoint

    profile = load_site_profile(settings.site_profile)
    checkpoint = settings.checkpoint or default_checkpoint_path()
    _, card = load_checkpoint(Path(checkpoint), map_location="cpu")
    profile.check_model(card, path=settings.site_profile)
    return profile
