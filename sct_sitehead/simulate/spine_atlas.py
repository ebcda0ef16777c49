"""Vertebrae and intervertebral discs around any cord, from the PAM50 template's spine mask and disc labels.

PAM50 (De Leener et al. 2018) ships a binary mask of the bony spine (``PAM50_spine``: vertebral bodies, pedicles,
laminae, spinous processes, with gaps at the discs) and a point label at each intervertebral disc
(``PAM50_label_disc``). The disc itself is not labelled: here it is the vertebral bodies' footprint (the spine
anterior to the cord, over the neighbouring slices) on the slices around each disc point where the spine mask has
its gap. The result is one label volume of the template (:data:`VERTEBRA`, :data:`DISC`) and, per template slice,
the cord's centroid.

:func:`map_spine` lays it around a subject's cord on the simulator's working grid: each slice takes the template
slice at the same distance along the cord from a randomly drawn level (cord length scaled by a random factor), and
its in-plane position relative to the template's cord centroid, moved onto the subject's cord centroid and scaled
by the same factor. It follows the cord's course slice by slice; the axial rotation of the spine and the
curvature of the neck are not modelled. Used for the vertebra and disc classes of the synthesis label maps
(:mod:`.labelmap`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from sct_sitehead.errors import UsageError
from sct_sitehead.evaluation.bids import load_spatial_image

#: Values of the template's spine label volume and of :func:`map_spine`'s output.
VERTEBRA, DISC = 1, 2
#: Template slices (0.5 mm) on each side of a disc point that the disc may fill (where the spine mask has its gap).
DISC_HALF_SLICES = 4
#: Template slices on each side of a disc point whose vertebral bodies make the disc's footprint.
BODY_HALF_SLICES = 12
#: The vertebral body lies this many template voxels (0.5 mm) anterior of the cord's centroid or more.
BODY_OFFSET_VOXELS = 8
#: Range of the subject's size relative to the template (cord length and the spine's in-plane size).
SCALE = (0.85, 1.2)


@dataclass(frozen=True)
class SpineAtlas:
    """The template's spine as labels.

    Attributes:
        labels: (X, Y, Z) uint8, 0, :data:`VERTEBRA` or :data:`DISC`, on the template's grid cropped to the spine.
        affine: (4, 4) of ``labels``.
        centres: (Z, 2) world x and y (mm) of the cord's centroid on each slice of ``labels``; NaN without cord.
    """

    labels: np.ndarray
    affine: np.ndarray
    centres: np.ndarray

    def cord_slices(self) -> np.ndarray:
        """Indices of the slices with a cord centroid."""
        return np.flatnonzero(np.isfinite(self.centres[:, 0]))


@cache
def load_spine(pam50: Path) -> SpineAtlas:
    """Read ``template/PAM50_spine``, ``_label_disc`` and ``_cord`` of the PAM50 folder into a :class:`SpineAtlas`.

    Raises:
        UsageError: a file is missing, or the template has no spine around its cord.
    """
    from scipy import ndimage

    spine, affine = read_pam50(pam50, "template/PAM50_spine.nii.gz")
    cord = read_pam50(pam50, "template/PAM50_cord.nii.gz")[0] > 0
    discs = read_pam50(pam50, "template/PAM50_label_disc.nii.gz")[0]
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))):
        raise UsageError(f"{pam50}: PAM50_spine's axes are not the world's; is it the PAM50 template?")
    spine = spine > 0
    if not (spine.any() and cord.any()):
        raise UsageError(f"{pam50}: PAM50_spine or PAM50_cord is empty; is it the PAM50 template?")
    anterior = 1.0 if affine[1, 1] > 0 else -1.0  # the template's second axis along world y (anterior)
    j = np.arange(spine.shape[1])[None, :]
    centre = np.full((spine.shape[2], 2), np.nan)  # the cord's centroid (voxel i, j) per slice
    for slice_index in np.flatnonzero(cord.any(axis=(0, 1))):
        centre[slice_index] = np.mean(np.nonzero(cord[:, :, slice_index]), axis=1)
    centre_j = centre[:, 1]
    labels = spine.astype(np.uint8)
    for point in np.argwhere(discs > 0):
        zd = int(point[2])
        around = [z for z in range(zd - BODY_HALF_SLICES, zd + BODY_HALF_SLICES + 1) if 0 <= z < spine.shape[2]]
        around = [z for z in around if np.isfinite(centre_j[z])]
        if not around:
            continue
        body = np.zeros(spine.shape[:2], dtype=bool)
        for near in around:
            body |= spine[:, :, near] & (anterior * (j - centre_j[near]) >= BODY_OFFSET_VOXELS)
        body = ndimage.binary_fill_holes(ndimage.binary_closing(body, iterations=2))
        for gap in range(max(zd - DISC_HALF_SLICES, 0), min(zd + DISC_HALF_SLICES + 1, spine.shape[2])):
            labels[:, :, gap][body & ~spine[:, :, gap]] = DISC
    # crop to the slices with cord and the spine's in-plane extent there
    kept = np.flatnonzero(np.isfinite(centre_j))
    z0, z1 = int(kept[0]), int(kept[-1]) + 1
    found = np.argwhere(labels[:, :, z0:z1])
    (x0, y0, _), (x1, y1, _) = found.min(0), found.max(0) + 1
    cropped = np.ascontiguousarray(labels[x0:x1, y0:y1, z0:z1])
    shift = np.eye(4)
    shift[:3, 3] = [x0, y0, z0]
    crop_affine = affine @ shift
    voxels = np.column_stack([centre[z0:z1], np.arange(z0, z1)])
    centres = voxels @ affine[:2, :3].T + affine[:2, 3]  # NaN stays NaN where a slice has no cord
    return SpineAtlas(cropped, crop_affine, centres)


def read_pam50(pam50: Path, relative: str) -> tuple[np.ndarray, np.ndarray]:
    """A file of the PAM50 folder: its voxels (as stored) and its affine.

    Raises:
        UsageError: the file is missing.
    """
    path = Path(pam50) / relative
    if not path.is_file():
        raise UsageError(f"{path} is missing; give the PAM50 folder (template/ and atlas/) with -pam50")
    image = load_spatial_image(path)
    return np.asarray(image.dataobj), np.asarray(image.affine, dtype=np.float64)


def map_spine(cord: np.ndarray, affine: np.ndarray, atlas: SpineAtlas, rng: np.random.Generator) -> np.ndarray:
    """The template's vertebrae and discs around a cord on a grid aligned with the world axes.

    Slices along the grid's third axis (world S-I) follow the cord: each is centred on the cord's centroid of that
    slice (interpolated between slices, held beyond the cord's ends), so the spine follows the cord's course.

    Args:
        cord: (X, Y, Z) cord fraction 0..1.
        affine: (4, 4) the grid's affine, diagonal up to sign (axes along world x, y, z).
        atlas: from :func:`load_spine`.
        rng: draws the template level the field of view starts at and the subject's size.

    Returns:
        (X, Y, Z) uint8: 0, :data:`VERTEBRA` or :data:`DISC`; all 0 on a grid without cord.
    """
    from scipy import ndimage

    out = np.zeros(cord.shape, dtype=np.uint8)
    present = np.flatnonzero((cord >= 0.5).any(axis=(0, 1)))
    if not present.size:
        return out
    scale = float(rng.uniform(*SCALE))
    world_z = affine[2, 2] * np.arange(cord.shape[2]) + affine[2, 3]
    centroids = np.array([_centroid(cord[:, :, z] >= 0.5, affine) for z in present])
    order = np.argsort(world_z[present])
    cx = np.interp(world_z, world_z[present][order], centroids[order, 0])
    cy = np.interp(world_z, world_z[present][order], centroids[order, 1])
    # the template's world z of each slice: a random start, the subject's length shrunk by its size
    kept = atlas.cord_slices()
    template_z = atlas.affine[2, 2] * kept + atlas.affine[2, 3]
    low, high = float(template_z.min()), float(template_z.max())
    span = (world_z.max() - world_z.min()) / scale
    start = float(rng.uniform(low, max(low, high - span)))
    wanted = start + (world_z - world_z.min()) / scale
    slices = np.clip(np.round((wanted - atlas.affine[2, 3]) / atlas.affine[2, 2]).astype(int), kept[0], kept[-1])
    # the nearest template slice with a cord centroid, for each slice
    nearest = kept[np.clip(np.searchsorted(kept, slices), 0, len(kept) - 1)]
    i, j = np.meshgrid(np.arange(cord.shape[0]), np.arange(cord.shape[1]), indexing="ij")
    x = affine[0, 0] * i + affine[0, 3]
    y = affine[1, 1] * j + affine[1, 3]
    inverse = np.linalg.inv(atlas.affine)
    template_world_z = atlas.affine[2, 2] * np.arange(atlas.labels.shape[2]) + atlas.affine[2, 3]
    for z in range(cord.shape[2]):
        tx, ty = atlas.centres[nearest[z]]
        u = tx + (x - cx[z]) / scale
        v = ty + (y - cy[z]) / scale
        world = np.stack([u.ravel(), v.ravel(), np.full(u.size, template_world_z[slices[z]])])
        index = (inverse[:3, :3] @ world + inverse[:3, 3:4])[:2]
        values = ndimage.map_coordinates(atlas.labels[:, :, slices[z]], index, order=0, mode="constant", cval=0)
        out[:, :, z] = values.reshape(x.shape)
    return out


def _centroid(inside: np.ndarray, affine: np.ndarray) -> tuple[float, float]:
    i, j = np.nonzero(inside)
    return float(affine[0, 0] * i.mean() + affine[0, 3]), float(affine[1, 1] * j.mean() + affine[1, 3])
