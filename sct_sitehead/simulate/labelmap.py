"""The label map of a simulated subject: every voxel a tissue class, for synthesis (SynthSeg-style) in training.

Training may replace a case's image by one drawn from its label map, each class a random intensity (Billot et al.
2023; ``augment.synth`` in the training config, :mod:`sct_sitehead.training.synth`), so the network learns the
shapes of the cord, its grey matter and its lesions rather than one contrast. The classes:

===== =====================================================================================================
value class
===== =====================================================================================================
0     air (outside the body: darker than :data:`AIR_LEVEL` of the source's 99.5th percentile)
1-5   background tissue, the source image's body voxels outside cord and CSF split into intensity quintiles
      (bone, discs, muscle and fat fall into different classes on every contrast, in shapes of real anatomy)
6     CSF: a shell around the cord, 1 to 3.5 mm thick (drawn per subject), thicker dorsally or ventrally
7     cord white matter
8     cord grey matter (PAM50's, :mod:`.cord_atlas`)
9     lesion
10    vertebra (PAM50's spine laid around the cord, :mod:`.spine_atlas`), over background classes only
11    intervertebral disc (likewise)
===== =====================================================================================================

The table is written into ``simulation.json`` (``label_map``) so that a training config can name the classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sct_sitehead.simulate import spine_atlas

#: The classes of the label map, value -> name.
LABEL_MAP: dict[int, str] = {
    0: "air",
    1: "background-1",
    2: "background-2",
    3: "background-3",
    4: "background-4",
    5: "background-5",
    6: "csf",
    7: "white-matter",
    8: "grey-matter",
    9: "lesion",
    10: "vertebra",
    11: "disc",
}
CSF, WHITE_MATTER, GREY_MATTER, LESION, VERTEBRA, DISC = 6, 7, 8, 9, 10, 11
#: Background tissue classes (intensity quintiles).
BACKGROUND_CLASSES = 5
#: Intensity (of the source's 99.5th percentile) below which a voxel is air.
AIR_LEVEL = 0.04
#: Range of the CSF shell's thickness (mm).
CSF_MM = (1.0, 3.5)


def label_map(
    image: np.ndarray,
    cord: np.ndarray,
    grey_matter: np.ndarray,
    lesion: np.ndarray,
    affine: np.ndarray,
    rng: np.random.Generator,
    spine: np.ndarray | None = None,
) -> np.ndarray:
    """A subject's label map on the simulator's working grid.

    Args:
        image: (X, Y, Z) the deformed source image, 99.5th percentile about 1, without lesions.
        cord: (X, Y, Z) cord fraction 0..1.
        grey_matter: (X, Y, Z) grey-matter probability (times the cord fraction).
        lesion: (X, Y, Z) lesion fraction 0..1.
        affine: (4, 4) the grid's affine (aligned with the world axes).
        rng: draws the CSF shell.
        spine: (X, Y, Z) vertebrae and discs (:func:`.spine_atlas.map_spine`), or None for none; they replace the
            background classes where they fall on body tissue, never air, CSF or cord.

    Returns:
        (X, Y, Z) uint8 classes (:data:`LABEL_MAP`).
    """
    from scipy import ndimage

    spacing = np.abs(np.diag(affine)[:3])
    inside = cord >= 0.5
    out = np.zeros(image.shape, dtype=np.uint8)
    # smoothed first, so the tissue classes are regions rather than noise speckle
    smooth = ndimage.gaussian_filter(np.asarray(image, dtype=np.float32), 0.8)
    body = smooth > AIR_LEVEL
    if inside.any():
        outside_mm = ndimage.distance_transform_edt(~inside, sampling=spacing)
        csf = (outside_mm > 0) & (outside_mm <= _csf_thickness(inside, affine, rng))
    else:
        csf = np.zeros(image.shape, dtype=bool)
    tissue = body & ~inside & ~csf
    if tissue.any():
        edges = np.quantile(smooth[tissue], np.linspace(0, 1, BACKGROUND_CLASSES + 1)[1:-1])
        out[tissue] = 1 + np.searchsorted(edges, smooth[tissue]).astype(np.uint8)
    if spine is not None:
        out[tissue & (spine == spine_atlas.VERTEBRA)] = VERTEBRA
        out[tissue & (spine == spine_atlas.DISC)] = DISC
    out[csf] = CSF
    out[inside] = WHITE_MATTER
    out[inside & (grey_matter >= 0.5 * np.maximum(cord, 1e-6))] = GREY_MATTER
    out[lesion >= 0.5] = LESION
    return out


def _csf_thickness(inside: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> np.ndarray | float:
    """The shell's thickness (mm): a base drawn from :data:`CSF_MM`, grown or shrunk along world y (dorsal)."""
    base = float(rng.uniform(*CSF_MM))
    tilt = float(rng.uniform(-0.5, 0.5))
    y = np.arange(inside.shape[1]) * affine[1, 1] + affine[1, 3]
    centre = float(np.mean(y[np.nonzero(inside)[1]]))
    # a ventral-dorsal gradient: up to half the base thicker on one side, over about 10 mm
    return np.clip(base * (1 + tilt * np.tanh((y - centre) / 5.0)), 0.5, None)[None, :, None]


def to_target(labels: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resampling of a label map at voxel coordinates ((3, X', Y', Z') of the source grid)."""
    from scipy import ndimage

    return ndimage.map_coordinates(labels, coords, order=0, mode="nearest", prefilter=False).astype(np.uint8)


def class_fractions(labels: np.ndarray, classes: Sequence[int]) -> dict[int, float]:
    """Share of the voxels in each class (for the simulation's parameters)."""
    total = max(labels.size, 1)
    return {int(c): round(float((labels == c).sum()) / total, 4) for c in classes}
