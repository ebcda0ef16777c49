"""What a registry index says about a release, as typed, immutable specs.

The index (JSON, checked by :mod:`schema`) is parsed into these once, in :mod:`index`; everything downstream (the
deploy path, evaluation, training's publishing) reads attributes, never the raw dictionaries.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from sct_sitehead.errors import RegistryError, UnknownModelError


@dataclass(frozen=True)
class NormalizationSpec:
    """How intensities are normalised on the model grid (DESIGN.md, "Model contract").

    Attributes:
        method: ``"zscore"`` (the only one this version runs; another is refused when an image is normalised,
            so an index may list releases that need a newer sct_sitehead).
        clip_percentiles: ``(low, high)`` percentiles of the image to clip to before normalising; None: no clipping.

    Raises:
        RegistryError: ``clip_percentiles`` is not two numbers with ``0 <= low < high <= 100``.
    """

    method: str
    clip_percentiles: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.clip_percentiles is not None:
            object.__setattr__(self, "clip_percentiles", _percentile_pair(self.clip_percentiles))

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> NormalizationSpec:
        """The spec of an index's (or a training config's) ``normalization`` object; other keys are ignored."""
        return cls(method=raw.get("method"), clip_percentiles=raw.get("clip_percentiles"))  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, Any]:
        """The ``normalization`` object of an index: ``{"method": ..., "clip_percentiles": [low, high]}``."""
        raw: dict[str, Any] = {"method": self.method}
        if self.clip_percentiles is not None:
            raw["clip_percentiles"] = list(self.clip_percentiles)
        return raw


@dataclass(frozen=True)
class InputSpec:
    """The model grid: orientation (e.g. ``"RAS"``), spacing (mm), patch size (voxels) and normalisation."""

    orientation: str
    spacing: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    divisor: int
    normalization: NormalizationSpec


#: Longest crop window along an axis, in patches. A crop runs in windows of up to this length overlapping by half,
#: so a crop a little longer than one window is computed nearly twice: 256 voxels of cord ran as two 192-voxel
#: windows (384 voxels of network) with 3 patches, one 256-voxel window with 4.
CROP_WINDOW_PATCHES = 4


@dataclass(frozen=True)
class WindowSpec:
    """How a network runs over its model grid; the defaults are the lesion model's.

    Attributes:
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        batch_size: windows per network call. A crop's window, unless it is the release's patch, runs alone: it
            may be up to ``max_patches`` patches a side, and memory stays bounded.
        max_patches: window limit: the longest window along an axis, in the release's patches; a longer volume
            (a whole spine) runs in several overlapping windows.
        fit_whole_image: a whole image runs in one window fitted to it, not in windows of the release's patch.
        repeat_edges: past the image, windows repeat its edge along the cord; False: they are padded with the
            image's minimum on every axis.
    """

    overlap: float = 0.5
    batch_size: int = 4
    max_patches: int = CROP_WINDOW_PATCHES
    fit_whole_image: bool = False
    repeat_edges: bool = True

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> WindowSpec:
        """The spec of an index's window object (``windows.localiser``; its types and ranges checked by the
        index's schema)."""
        return cls(**{field.name: raw[field.name] for field in fields(cls)})

    def as_dict(self) -> dict[str, Any]:
        """The index's window object."""
        return asdict(self)


#: The cord localiser's windows, written into each release that has a localiser (``windows.localiser``) and used
#: for releases published before the field: a coarse image (3 mm) in one window of up to 2 patches a side, whole or
#: in windows overlapping by a quarter, padded with its minimum. Its windows padded along the cord like the lesion
#: model's were tried (release 1.1.3): validation identical, a lower lesion-wise F1 on the test split.
LOCALISER_WINDOWS = WindowSpec(overlap=0.25, batch_size=2, max_patches=2, fit_whole_image=True, repeat_edges=False)


@dataclass(frozen=True)
class LabelSpec:
    """One output label of a head: its name, the site's label value, and its channel in the shared space."""

    name: str
    value: int
    channel: int


@dataclass(frozen=True)
class Asset:
    """A file to fetch: candidate URLs in order (index location first, then mirrors), size and sha256.

    ``release`` (``"lesion@1.0.0"``) and ``site`` only feed error messages (the command to pre-fetch it).
    """

    name: str
    sha256: str
    size: int
    urls: tuple[str, ...]
    release: str = ""
    site: str | None = None


@dataclass(frozen=True)
class HeadSpec:
    """A site's head: its ONNX file, training strategy, labels, effective threshold, the smallest lesion (mm³)
    its masks keep, and the contrasts (BIDS suffixes, e.g. ``("T2w", "T2star")``) of the cases it was trained on
    (None: not recorded, as in releases published before the field)."""

    site: str
    asset: Asset
    strategy: str
    labels: tuple[LabelSpec, ...]
    threshold: float
    min_lesion_mm3: float = 0.0
    contrasts: tuple[str, ...] | None = None


@dataclass(frozen=True)
class LocaliserSpec:
    """The cord localiser of a release: a small backbone + head on a coarse grid that finds the cord.

    The lesion model then runs only on a box that spans the whole image along the cord and, across it, the cord
    grown by ``margin_mm``; lesion probabilities further than ``cord_margin_mm`` from the found cord are set to 0
    (see :mod:`sct_sitehead.deploy.localise`). ``windows``: how it runs over its grid (the index's
    ``windows.localiser``; :data:`LOCALISER_WINDOWS` where a release does not say).
    """

    input: InputSpec
    backbone: Asset
    head: Asset
    channel: int
    threshold: float
    margin_mm: float
    cord_margin_mm: float
    windows: WindowSpec = LOCALISER_WINDOWS


@dataclass(frozen=True)
class Release:
    """One version of a model: the input grid, the shared output space, the backbone and the site heads."""

    model: str
    version: str
    input: InputSpec
    channels: int
    threshold: float
    backbone: Asset
    backbone_outputs: tuple[str, ...]
    heads: dict[str, HeadSpec]
    localiser: LocaliserSpec | None = None

    @property
    def spec(self) -> str:
        """``"lesion@1.0.0"``."""
        return f"{self.model}@{self.version}"

    def head(self, site: str) -> HeadSpec:
        """The head of ``site``.

        Raises:
            UnknownModelError: no such site; the message lists the sites and the nearest name.
        """
        try:
            return self.heads[site]
        except KeyError:
            raise UnknownModelError(
                f"unknown site {site!r} for {self.spec}; sites: {', '.join(sorted(self.heads))}."
                f"{suggest(site, self.heads)}"
            ) from None


def input_spec(raw: Mapping[str, Any]) -> InputSpec:
    """An index's ``input`` object (already schema-checked) as an :class:`InputSpec`.

    Raises:
        RegistryError: malformed ``clip_percentiles`` (the schema does not check their order).
    """
    sx, sy, sz = (float(v) for v in raw["spacing"])  # the schema checks there are three
    px, py, pz = (int(v) for v in raw["patch_size"])
    return InputSpec(
        orientation=raw["orientation"],
        spacing=(sx, sy, sz),
        patch_size=(px, py, pz),
        divisor=int(raw["divisor"]),
        normalization=NormalizationSpec.from_mapping(raw["normalization"]),
    )


def suggest(name: str, choices: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the nearest choice, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _percentile_pair(clip: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in clip)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"clip_percentiles must be two numbers [low, high], got {clip!r}") from exc
    if not 0.0 <= low < high <= 100.0:
        raise RegistryError(f"clip_percentiles must satisfy 0 <= low < high <= 100, got {clip!r}")
    return low, high
