"""Site profiles of the simulator, read from JSON (``sites.json`` beside this module by default) and checked.

A profile says how a site scans (:class:`Acquisition`), how its raters label (:class:`Annotation`), how many
and how large its lesions are (:class:`LesionProfile`) and which other contrasts' anatomy its training subjects may
borrow (:class:`Borrow`). Sections a site leaves out come from ``defaults``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sct_sitehead.errors import UsageError
from sct_sitehead.simulate.grids import check_orientation

DEFAULT_SITES = Path(__file__).with_name("sites.json")
KNOWN_LABELS = ("lesion", "cord", "csf")
NOISE_KINDS = ("rician", "gaussian")
DTYPES = ("int16", "uint16", "float32")
_NAME = re.compile(r"^[a-z0-9]+$")


@dataclass(frozen=True)
class Acquisition:
    """How a site scans: grid, field of view and intensity transfer."""

    orientation: str
    spacing_mm: tuple[float, float, float]
    fov_mm: tuple[float, float, float]
    noise: str
    noise_sigma: float
    bias: float
    gamma: float
    dtype: str
    intensity_scale: float


@dataclass(frozen=True)
class Annotation:
    """How a site's raters label: which labels (name -> file suffix) and how lesions are traced."""

    labels: Mapping[str, str]
    lesion_threshold: float
    dilate_mm: float
    erode_mm: float
    min_lesion_mm3: float
    lesion_values: str
    csf_shell_mm: float


@dataclass(frozen=True)
class LesionProfile:
    """How many lesions a subject gets and how large they are."""

    max_count: int
    p_lesion_free: float
    volume_mm3: tuple[float, float]
    elongation: tuple[float, float]


@dataclass(frozen=True)
class Deformation:
    """Size of the random spatial deformation applied to each source anatomy."""

    rotation_deg: float
    scale: float
    translation_mm: float
    elastic_mm: float
    elastic_spacing_mm: float


@dataclass(frozen=True)
class Borrow:
    """A source contrast a site's train and val subjects may be made from, remapped to look like the site's own.

    The source's intensities (99.5th percentile = 1) are inverted inside the body when ``invert`` (T2w -> T1w:
    CSF goes dark, cord bright; air stays dark), then raised to ``gamma``. Lesions are inserted afterwards with the
    site's contrast, so a borrowed T2w anatomy at a T1w site gets dark lesions. Held-out anatomy is never
    borrowed: the test split keeps it in its own contrast.
    """

    invert: bool
    gamma: float


@dataclass(frozen=True)
class Site:
    """One simulated site."""

    name: str
    description: str
    contrasts: tuple[str, ...]
    acquisition: Acquisition
    annotation: Annotation
    lesions: LesionProfile
    deformation: Deformation
    borrow: Mapping[str, Borrow] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready copy (for ``simulation.json``)."""
        return asdict(self)


def load_sites(path: Path | None = None) -> dict[str, Site]:
    """Read and check a sites file.

    Args:
        path: JSON file; None for the packaged ``sites.json``.

    Returns:
        Site name -> :class:`Site`, in file order.

    Raises:
        UsageError: the file is missing, not JSON, or a value is out of range (the message names it).
    """
    path = DEFAULT_SITES if path is None else Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"sites file {path} cannot be read ({exc.strerror}); check the path") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"sites file {path} is not valid JSON ({exc}); fix it, see {DEFAULT_SITES}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("sites"), dict) or not document["sites"]:
        raise UsageError(f"sites file {path} has no 'sites' object; see {DEFAULT_SITES} for the layout")
    defaults = document.get("defaults", {})
    return {name: _site(path, name, body, defaults) for name, body in document["sites"].items()}


def _merged(defaults: Mapping[str, Any], body: Mapping[str, Any], section: str) -> dict[str, Any]:
    return {**defaults.get(section, {}), **body.get(section, {})}


def _site(path: Path, name: str, body: Any, defaults: Mapping[str, Any]) -> Site:
    where = f"sites file {path}, site {name!r}"
    if not _NAME.match(name):
        raise UsageError(f"{where}: the name must be lower-case letters and digits (it becomes sub-{name}001)")
    if not isinstance(body, dict):
        raise UsageError(f"{where}: expected an object, got {type(body).__name__}")
    try:
        contrasts = tuple(str(c) for c in body["contrasts"])
        acquisition = _acquisition(where, _merged(defaults, body, "acquisition"))
        annotation = _annotation(where, _merged(defaults, body, "annotation"))
        lesions = _lesions(where, _merged(defaults, body, "lesions"))
        deformation = Deformation(**{k: float(v) for k, v in _merged(defaults, body, "deformation").items()})
        borrow = _borrow(where, body.get("borrow", {}), contrasts)
    except KeyError as exc:
        raise UsageError(f"{where}: missing key {exc}; see {DEFAULT_SITES} for every key") from exc
    except TypeError as exc:
        raise UsageError(f"{where}: {exc}; see {DEFAULT_SITES} for every key") from exc
    if not contrasts:
        raise UsageError(f"{where}: 'contrasts' is empty; list the BIDS suffixes it scans, e.g. ['T2w']")
    return Site(
        name, str(body.get("description", "")), contrasts, acquisition, annotation, lesions, deformation, borrow
    )


def _borrow(where: str, raw: Any, contrasts: tuple[str, ...]) -> dict[str, Borrow]:
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: borrow is {raw!r}; give an object such as {{'T2w': {{'invert': true}}}}")
    borrow = {}
    for contrast, options in raw.items():
        if contrast in contrasts or not isinstance(options, dict):
            raise UsageError(
                f"{where}: borrow {contrast!r}: {options!r}; name another contrast than the site's own "
                f"{list(contrasts)}, with {{'invert': true|false, 'gamma': number > 0}}"
            )
        unknown = sorted(set(options) - {"invert", "gamma"})
        gamma = options.get("gamma", 1.0)
        if unknown or not isinstance(gamma, (int, float)) or gamma <= 0:
            raise UsageError(f"{where}: borrow {contrast!r}: {options!r}; the keys are 'invert' and 'gamma' (> 0)")
        borrow[str(contrast)] = Borrow(invert=bool(options.get("invert", False)), gamma=float(gamma))
    return borrow


def _triple(where: str, key: str, value: Any) -> tuple[float, float, float]:
    numbers = tuple(float(v) for v in value)
    if len(numbers) != 3 or min(numbers) <= 0:
        raise UsageError(f"{where}: {key} is {value!r}; give three positive numbers in mm")
    return numbers


def _acquisition(where: str, raw: dict[str, Any]) -> Acquisition:
    acquisition = Acquisition(
        orientation=check_orientation(raw["orientation"]),
        spacing_mm=_triple(where, "spacing_mm", raw["spacing_mm"]),
        fov_mm=_triple(where, "fov_mm", raw["fov_mm"]),
        noise=str(raw["noise"]),
        noise_sigma=float(raw["noise_sigma"]),
        bias=float(raw["bias"]),
        gamma=float(raw["gamma"]),
        dtype=str(raw["dtype"]),
        intensity_scale=float(raw["intensity_scale"]),
    )
    if acquisition.noise not in NOISE_KINDS:
        raise UsageError(f"{where}: noise is {acquisition.noise!r}; use one of {NOISE_KINDS}")
    if acquisition.dtype not in DTYPES:
        raise UsageError(f"{where}: dtype is {acquisition.dtype!r}; use one of {DTYPES}")
    if min(acquisition.noise_sigma, acquisition.bias) < 0 or min(acquisition.gamma, acquisition.intensity_scale) <= 0:
        raise UsageError(f"{where}: noise_sigma and bias must be >= 0, gamma and intensity_scale > 0; got {raw}")
    return acquisition


def _annotation(where: str, raw: dict[str, Any]) -> Annotation:
    labels = {str(k): str(v) for k, v in dict(raw["labels"]).items()}
    unknown = sorted(set(labels) - set(KNOWN_LABELS))
    if "lesion" not in labels or unknown:
        raise UsageError(
            f"{where}: labels are {sorted(labels)}; every site labels 'lesion' and may add {KNOWN_LABELS[1:]}"
        )
    annotation = Annotation(
        labels=labels,
        lesion_threshold=float(raw["lesion_threshold"]),
        dilate_mm=float(raw["dilate_mm"]),
        erode_mm=float(raw["erode_mm"]),
        min_lesion_mm3=float(raw["min_lesion_mm3"]),
        lesion_values=str(raw["lesion_values"]),
        csf_shell_mm=float(raw["csf_shell_mm"]),
    )
    if not 0 < annotation.lesion_threshold <= 1:
        raise UsageError(f"{where}: lesion_threshold is {annotation.lesion_threshold}; use a value in (0, 1]")
    if min(annotation.dilate_mm, annotation.erode_mm, annotation.min_lesion_mm3, annotation.csf_shell_mm) < 0:
        raise UsageError(f"{where}: dilate_mm, erode_mm, min_lesion_mm3 and csf_shell_mm must be >= 0")
    if annotation.lesion_values not in ("binary", "instances"):
        raise UsageError(f"{where}: lesion_values is {annotation.lesion_values!r}; use 'binary' or 'instances'")
    return annotation


def _lesions(where: str, raw: dict[str, Any]) -> LesionProfile:
    max_count, p_lesion_free = int(raw["max_count"]), float(raw["p_lesion_free"])
    volume = tuple(float(v) for v in raw["volume_mm3"])
    elongation = tuple(float(v) for v in raw["elongation"])
    ranges_ok = all(len(r) == 2 and 0 < r[0] <= r[1] for r in (volume, elongation))
    if max_count < 0 or not 0 <= p_lesion_free <= 1 or not ranges_ok:
        raise UsageError(
            f"{where}: lesions {raw} out of range; max_count >= 0, p_lesion_free in [0, 1], "
            "volume_mm3 and elongation as [low, high] with 0 < low <= high"
        )
    return LesionProfile(
        max_count=max_count,
        p_lesion_free=p_lesion_free,
        volume_mm3=(volume[0], volume[1]),
        elongation=(elongation[0], elongation[1]),
    )
