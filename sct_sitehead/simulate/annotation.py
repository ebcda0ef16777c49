"""A site's annotation protocol: what its raters would have drawn, given the true partial-volume maps.

The truth is the lesion partial-volume fraction on the site's grid thresholded at 0.5. A protocol changes it in the
ways raters differ: a higher or lower threshold (core-only or permissive tracing), dilation (generous tracing),
erosion, leaving out lesions below a volume, one value per lesion instead of a binary mask, and which other
structures are labelled (the cord; the CSF as a shell around the cord).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sct_sitehead.simulate.sites import Annotation

TRUTH_THRESHOLD = 0.5


def truth_masks(lesion_fraction: np.ndarray, cord_fraction: np.ndarray) -> dict[str, np.ndarray]:
    """Unannotated truth: ``{"lesion": uint8 mask, "cord": uint8 mask}`` from (X, Y, Z) fractions."""
    return {
        "lesion": (lesion_fraction >= TRUTH_THRESHOLD).astype(np.uint8),
        "cord": (cord_fraction >= TRUTH_THRESHOLD).astype(np.uint8),
    }


def annotate(
    lesion_fraction: np.ndarray,
    cord_fraction: np.ndarray,
    zooms: Sequence[float],
    protocol: Annotation,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Apply a site's annotation protocol.

    Args:
        lesion_fraction: (X, Y, Z) true lesion partial-volume fraction on the site's grid, 0..1.
        cord_fraction: (X, Y, Z) true cord fraction.
        zooms: (3,) voxel size in mm.
        protocol: the site's annotation profile.

    Returns:
        Label name -> (X, Y, Z) uint8 array for each label the site draws (``lesion`` holds 1..n per lesion with
        ``lesion_values="instances"``, uint16 past 255 lesions; else 0/1), and facts about what the protocol did.
    """
    from scipy import ndimage

    zooms = tuple(float(z) for z in zooms)
    lesion = lesion_fraction >= protocol.lesion_threshold
    if protocol.dilate_mm > 0:
        lesion = _distance_outside(lesion, zooms) <= protocol.dilate_mm
    if protocol.erode_mm > 0:
        # keeps voxels farther than erode_mm (centre to centre) from every voxel outside the lesion
        lesion = ndimage.distance_transform_edt(np.pad(lesion, 1), sampling=zooms)[1:-1, 1:-1, 1:-1] > protocol.erode_mm
    structure = ndimage.generate_binary_structure(3, 3)
    components, count = ndimage.label(lesion, structure=structure)
    voxel_mm3 = float(np.prod(zooms))
    left_out = 0
    if protocol.min_lesion_mm3 > 0 and count:
        sizes = np.bincount(components.ravel(), minlength=count + 1) * voxel_mm3
        small = np.nonzero(sizes < protocol.min_lesion_mm3)[0]
        small = small[small > 0]
        left_out = int(small.size)
        lesion &= ~np.isin(components, small)
        components, count = ndimage.label(lesion, structure=structure)
    if protocol.lesion_values == "instances":
        lesion_out = components.astype(np.uint8 if count <= np.iinfo(np.uint8).max else np.uint16)
    else:
        lesion_out = lesion.astype(np.uint8)
    labels: dict[str, np.ndarray] = {"lesion": lesion_out}
    cord = cord_fraction >= TRUTH_THRESHOLD
    if "cord" in protocol.labels:
        labels["cord"] = cord.astype(np.uint8)
    if "csf" in protocol.labels:
        shell = (_distance_outside(cord, zooms) <= protocol.csf_shell_mm) & ~cord
        labels["csf"] = shell.astype(np.uint8)
    info = {
        "annotated_lesions": int(count),
        "left_out_small": left_out,
        "annotated_volume_mm3": round(float(lesion.sum()) * voxel_mm3, 2),
    }
    return labels, info


def _distance_outside(mask: np.ndarray, zooms: Sequence[float]) -> np.ndarray:
    """Distance in mm from each voxel to the nearest voxel of ``mask`` (0 inside; inf if the mask is empty)."""
    from scipy import ndimage

    if not mask.any():
        return np.full(mask.shape, np.inf, dtype=np.float32)
    return ndimage.distance_transform_edt(~mask, sampling=zooms).astype(np.float32)
