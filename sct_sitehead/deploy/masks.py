"""From probabilities to a mask: the one path that `sct_deepseg_lesion`, the Python API, `evaluate`,
`tune-thresholds` and the experiment all take.

A label's mask is its probabilities at or above the head's threshold; for the lesion label, connected pieces
smaller than the head's smallest lesion are then dropped. (The cord rule, which sets lesion probabilities away
from the found cord to 0, acts on the probabilities before this step: see :func:`drop_far_lesions`.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sct_sitehead.deploy.lesions import drop_small_lesions
from sct_sitehead.deploy.spatial import ModelGrid, mask_from_model_grid

#: The label whose small connected pieces are dropped and which the cord rule restricts.
LESION = "lesion"
#: The cord label (a head's own or the cord localiser's): QC pictures zoom on it.
CORD = "cord"


@dataclass(frozen=True)
class MaskRule:
    """How one label's probabilities become its mask.

    Attributes:
        threshold: probability at and above which a voxel is in the mask.
        min_lesion_mm3: connected pieces (26-connectivity) smaller than this are dropped; 0 keeps every piece.
    """

    threshold: float
    min_lesion_mm3: float = 0.0


def threshold_mask(probabilities: np.ndarray, rule: MaskRule, zooms: Sequence[float]) -> np.ndarray:
    """A label's mask from its probabilities on any voxel grid.

    Args:
        probabilities: (X, Y, Z) float probabilities (native grid, or a window of it).
        rule: the head's threshold and smallest lesion for this label.
        zooms: voxel sizes (mm) of that grid, for the lesion volumes.

    Returns:
        (X, Y, Z) bool mask.
    """
    return drop_small_lesions(probabilities >= rule.threshold, zooms, rule.min_lesion_mm3)


def native_mask(
    channel: np.ndarray,
    grid: ModelGrid,
    rule: MaskRule,
    zooms: Sequence[float],
    *,
    native_probabilities: np.ndarray | None = None,
) -> np.ndarray:
    """A label's model-grid probabilities -> its mask on the native window ``grid.bbox``.

    Equal to ``threshold_mask(from_model_grid(channel, grid, order=1, window_only=True), rule, zooms)``; without
    ``native_probabilities`` only the voxels near those at or above the threshold are resampled
    (:func:`~sct_sitehead.deploy.spatial.mask_from_model_grid`), a fraction of the work.

    Args:
        channel: (X', Y', Z') float probabilities on ``grid``.
        grid: the model grid the network ran on.
        rule: the head's threshold and smallest lesion for this label.
        zooms: native voxel sizes (mm).
        native_probabilities: (x, y, z) the same probabilities already brought to the native window, if the
            caller needs them anyway (a soft map): thresholded directly.

    Returns:
        (x, y, z) bool mask of the native window.
    """
    if native_probabilities is not None:
        return threshold_mask(native_probabilities, rule, zooms)
    return drop_small_lesions(mask_from_model_grid(channel, grid, rule.threshold), zooms, rule.min_lesion_mm3)


def drop_far_lesions(channels: np.ndarray, label_names: Sequence[str], far: np.ndarray) -> np.ndarray:
    """The cord rule: lesion probabilities set to 0 where ``far`` (away from the found cord), in place.

    Args:
        channels: (K, X, Y, Z) a head's probabilities, in the order of ``label_names``.
        label_names: the head's label names.
        far: (X, Y, Z) bool, True where a lesion may not be.

    Returns:
        ``channels``.
    """
    for index, name in enumerate(label_names):
        if name == LESION:
            channels[index][far] = 0.0
    return channels
