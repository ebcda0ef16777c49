"""Grey matter and white-matter tracts inside any cord mask, from the PAM50 template's cross-sections.

The PAM50 template (De Leener et al. 2018) ships probabilistic grey-matter and tract maps on a 0.5 mm grid. Its
axial cross-sections from C2 to T3 are stored on a *normalised plane*: each voxel's world left-right and
anterior-posterior position relative to the cord's centroid, divided by the cord's standard deviation along that
axis. A cross-section of another cord (a real cord mask pulled onto the simulator's working grid) is mapped onto the
same plane the same way, so the template's grey matter, dorsal columns and lateral funiculi land inside it with the
right size, aspect and side (both sides use world axes: dorsal stays dorsal). The cord's axial rotation and its tilt
within a slice are ignored: a slice is treated as a cut across the cord.

Used for the grey/white-matter labels of the synthesis label maps and for placing lesions where MS lesions are most
frequent (dorsal columns and lateral funiculi; Eden et al. 2019).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from sct_sitehead.errors import UsageError
from sct_sitehead.simulate.spine_atlas import SpineAtlas, load_spine, read_pam50

logger = logging.getLogger(__name__)

#: PAM50 vertebral levels whose cross-sections are kept (2 = C2 ... 10 = T3): the cord the real images show.
LEVELS = (2, 10)
#: One cross-section every this many template slices (0.5 mm each).
SLICE_STEP = 10
#: The normalised plane spans +-PLANE_RADIUS standard deviations (the cord's edge is at about 2) in PLANE_SIZE steps.
PLANE_RADIUS = 3.0
PLANE_SIZE = 65
#: The maps, in the order of :attr:`CrossSections.maps`: grey matter, dorsal columns, lateral funiculi.
MAPS = ("gm", "dorsal_columns", "lateral_funiculi")
#: PAM50 atlas files of each tract group (info_label.txt: 53 dorsal columns 0:3, 54 lateral funiculi 4:13).
_TRACTS = {"dorsal_columns": range(0, 4), "lateral_funiculi": range(4, 14)}
#: Cross-sections with fewer cord voxels than this are skipped (a cord edge, not a cut across it).
_MIN_VOXELS = 4


@dataclass(frozen=True)
class CrossSections:
    """The template's cross-sections on the normalised plane.

    Attributes:
        maps: (S, 3, P, P) float32 probabilities (:data:`MAPS`), S cross-sections from rostral to caudal, the
            plane's axes world left-right then anterior-posterior (RAS: increasing towards right and anterior).
        spine: the template's vertebrae and discs (:mod:`.spine_atlas`), or None.
    """

    maps: np.ndarray
    spine: SpineAtlas | None = None


@cache
def load_cross_sections(pam50: Path) -> CrossSections:
    """Read the PAM50 template folder (``template/`` and ``atlas/``) into :class:`CrossSections`, its spine
    included.

    Raises:
        UsageError: a file is missing or the template has no cord at the kept levels.
    """
    from scipy import ndimage

    def read(relative: str) -> tuple[np.ndarray, np.ndarray]:
        data, affine = read_pam50(pam50, relative)
        return data.astype(np.float32, copy=False), affine

    cord, affine = read("template/PAM50_cord.nii.gz")
    levels, _ = read("template/PAM50_levels.nii.gz")
    channels = [read("template/PAM50_gm.nii.gz")[0]]
    for indices in _TRACTS.values():
        channels.append(sum((read(f"atlas/PAM50_atlas_{i:02d}.nii.gz")[0] for i in indices), np.zeros_like(cord)))
    level_of_slice = levels.max(axis=(0, 1))
    slices = [z for z in range(0, cord.shape[2], SLICE_STEP) if LEVELS[0] <= level_of_slice[z] <= LEVELS[1]]
    plane = np.linspace(-PLANE_RADIUS, PLANE_RADIUS, PLANE_SIZE)
    sections = []
    for z in sorted(slices, key=lambda z: -_world_z(affine, z)):  # rostral first
        inside = cord[:, :, z] >= 0.5
        if inside.sum() < _MIN_VOXELS:
            continue
        x, y = _slice_world(affine, cord.shape[:2], z)
        centre, spread = _moments(x[inside], y[inside])
        u, v = np.meshgrid(centre[0] + plane * spread[0], centre[1] + plane * spread[1], indexing="ij")
        index = np.linalg.solve(
            affine, np.stack([u.ravel(), v.ravel(), np.full(u.size, _world_z(affine, z)), np.ones(u.size)])
        )
        sections.append(
            [
                ndimage.map_coordinates(c[:, :, z], index[:2], order=1, mode="constant").reshape(u.shape)
                for c in channels
            ]
        )
    if not sections:
        raise UsageError(f"{pam50}: no cord between levels {LEVELS} of PAM50_levels; is it the PAM50 template?")
    return CrossSections(np.clip(np.asarray(sections, dtype=np.float32), 0.0, 1.0), load_spine(pam50))


def map_onto_cord(
    cord: np.ndarray, affine: np.ndarray, sections: CrossSections, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """The template's maps inside a cord on a grid aligned with the world axes (the simulator's working grid).

    The slices along the grid's third axis (world S-I) are cuts across the cord; each takes the template
    cross-section at the same relative position along a randomly drawn stretch of the template (a cord of a
    different length and level each time).

    Args:
        cord: (X, Y, Z) cord fraction 0..1.
        affine: (4, 4) the grid's affine, diagonal up to sign (axes along world x, y, z).
        sections: from :func:`load_cross_sections`.
        rng: draws the stretch of the template.

    Returns:
        ``{name: (X, Y, Z) float32}`` for each of :data:`MAPS`, each a probability times the cord fraction.
    """
    from scipy import ndimage

    out = {name: np.zeros(cord.shape, dtype=np.float32) for name in MAPS}
    present = [z for z in range(cord.shape[2]) if (cord[:, :, z] >= 0.5).sum() >= _MIN_VOXELS]
    if not present:
        return out
    count = len(sections.maps)
    start = int(rng.integers(count))
    stop = int(rng.integers(start, count))
    descending = affine[2, 2] < 0  # the grid's third axis runs caudal: the template runs rostral to caudal
    for rank, z in enumerate(present):
        position = rank / max(len(present) - 1, 1)
        section = sections.maps[start + round((position if descending else 1 - position) * (stop - start))]
        inside = cord[:, :, z] >= 0.5
        x, y = _slice_world(affine, cord.shape[:2], z)
        centre, spread = _moments(x[inside], y[inside])
        scale = (PLANE_SIZE - 1) / (2 * PLANE_RADIUS)
        u = ((x - centre[0]) / spread[0] + PLANE_RADIUS) * scale
        v = ((y - centre[1]) / spread[1] + PLANE_RADIUS) * scale
        for name, channel in zip(MAPS, section):
            values = ndimage.map_coordinates(channel, [u.ravel(), v.ravel()], order=1, mode="constant")
            out[name][:, :, z] = values.reshape(u.shape) * cord[:, :, z]
    return out


def _slice_world(affine: np.ndarray, shape: tuple[int, ...], z: int) -> tuple[np.ndarray, np.ndarray]:
    """World x and y (mm) of every voxel of slice ``z``, (X, Y) each."""
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    world = affine[:3, :3] @ np.stack([i.ravel(), j.ravel(), np.full(i.size, z)]) + affine[:3, 3:4]
    return world[0].reshape(i.shape), world[1].reshape(i.shape)


def _world_z(affine: np.ndarray, z: int) -> float:
    return float(affine[2, 2] * z + affine[2, 3])


def _moments(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid and standard deviation (at least 0.5 mm) along world x and y of a cross-section's voxels."""
    return np.array([x.mean(), y.mean()]), np.maximum(np.array([x.std(), y.std()]), 0.5)
