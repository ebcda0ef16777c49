"""What a segmentation gives back: the masks in memory (:class:`Segmentation`, the Python API's result) and the
files written for them (:class:`InputResult`, the command line's).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sct_sitehead.deploy.masks import LESION
from sct_sitehead.deploy.outputs import image_like
from sct_sitehead.deploy.spatial import Bbox
from sct_sitehead.errors import UsageError

if TYPE_CHECKING:
    import nibabel

#: Native voxels as slices: the window of the input the lesion model ran on.
Window = tuple[slice, slice, slice]


@dataclass(frozen=True)
class LabelMask:
    """One label of one site back on the input's grid, kept on the window the model ran on (0 elsewhere).

    Attributes:
        name: the label's name (``lesion``, ``cord``, ...).
        value: its value in the head's label map.
        window: the native voxels the model ran on.
        mask: (x, y, z) bool on ``window``.
        probabilities: (x, y, z) float32 on ``window``; only for the lesion label with ``Options.soft``.
    """

    name: str
    value: int
    window: Window
    mask: np.ndarray
    probabilities: np.ndarray | None = None

    def full(self, shape: tuple[int, ...], *, soft: bool = False) -> np.ndarray:
        """The mask (uint8) or, with ``soft``, the probabilities (float32) on the whole (X, Y, Z) native grid.

        Fortran order is NIfTI's: nibabel then writes the array as it is, without a transposed copy (2x faster).
        """
        values = self.probabilities if soft else self.mask
        if values is None:
            raise UsageError(f"no probabilities were kept for the {self.name} label; run with soft=True")
        out = np.zeros(shape[:3], dtype=np.float32 if soft else np.uint8, order="F")
        out[self.window] = values
        return out


@dataclass(frozen=True)
class SiteSegmentation:
    """One site head's result for one image.

    Attributes:
        site: the head.
        labels: ``{label name: LabelMask}`` in the head's label order.
        lesions: lesion count, total and per-lesion volume (:func:`~sct_sitehead.deploy.lesions.lesion_stats`).
        facts: the sidecar's description of the run (model, hashes, threshold, crop, device, ...), without the
            file names.
        image: the input image, whose grid every mask is on.
    """

    site: str
    labels: dict[str, LabelMask]
    lesions: dict[str, Any]
    facts: dict[str, Any]
    image: nibabel.Nifti1Image

    def mask(self, label: str = LESION) -> nibabel.Nifti1Image:
        """A label's mask as a uint8 image with the input's shape, affine and header.

        Raises:
            UsageError: the head has no such label.
        """
        return image_like(self._label(label).full(self.image.shape), self.image, np.uint8)

    def soft(self) -> nibabel.Nifti1Image:
        """The lesion probabilities as a float32 image on the input's grid (the run must keep them: ``soft``).

        Raises:
            UsageError: the probabilities were not kept.
        """
        return image_like(self._label(LESION).full(self.image.shape, soft=True), self.image, np.float32)

    def _label(self, name: str) -> LabelMask:
        try:
            return self.labels[name]
        except KeyError:
            raise UsageError(
                f"head {self.site!r} predicts no {name!r} label; its labels: {', '.join(self.labels)}"
            ) from None


@dataclass(frozen=True)
class Segmentation:
    """Every requested site's result for one image.

    Attributes:
        image: the input image (3D).
        sites: ``{site: SiteSegmentation}`` in the order asked for.
        crop: the native voxel box the lesion model ran on; None: the whole image.
        seconds: wall time from reading the image to the masks in memory.
        cord: the native voxel box of the cord the localiser found; None: no localiser ran or it found none.
    """

    image: nibabel.Nifti1Image
    sites: dict[str, SiteSegmentation]
    crop: Bbox | None
    seconds: float
    cord: Bbox | None = None

    def __getitem__(self, site: str) -> SiteSegmentation:
        return self.sites[site]

    def __iter__(self) -> Iterator[str]:
        return iter(self.sites)


@dataclass
class SiteResult:
    """What was written for one site of one input."""

    site: str
    mask: Path
    files: list[Path]
    sidecar: Path
    lesion_count: int
    lesion_volume_mm3: float


@dataclass
class InputResult:
    """What was written for one input image."""

    image: Path
    sites: list[SiteResult] = field(default_factory=list)
    seconds: float = 0.0
