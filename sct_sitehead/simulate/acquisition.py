"""A site's acquisition: its grid (orientation, voxel size, field of view) and its intensity transfer.

The anatomy arrives on a fine working grid aligned with the world axes (RAS). :func:`plan_grid` places the site's
grid on the anatomy, :func:`working_grid` gives the fine grid that covers it, and :func:`acquire` blurs along
each axis to the site's voxel size (the slice profile of thick slices: partial volume), resamples, then applies
the contrast curve (gamma), a smooth multiplicative bias field and Rician or Gaussian noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sct_sitehead.deploy.spatial import three
from sct_sitehead.simulate.grids import grid_affine, voxel_coordinates
from sct_sitehead.simulate.sites import Acquisition

_AXIS_OF = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
_FWHM_PER_SIGMA = 2.3548
#: Largest shift (mm) of the field of view centre away from the cord, in the axial plane.
CENTER_JITTER_MM = 4.0


@dataclass(frozen=True)
class TargetGrid:
    """A site's grid placed in the world.

    Attributes:
        shape: (3,) voxels per axis.
        affine: (4, 4) voxel-to-world affine.
        spacing: (3,) voxel size per voxel axis (mm).
        world_axis: (3,) the world axis (0 x, 1 y, 2 z) each voxel axis runs along.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    spacing: tuple[float, float, float]
    world_axis: tuple[int, int, int]

    def spacing_along_world(self) -> np.ndarray:
        """(3,) voxel size along world x, y, z."""
        out = np.empty(3)
        for axis, world in enumerate(self.world_axis):
            out[world] = self.spacing[axis]
        return out


def plan_grid(
    acquisition: Acquisition,
    source_shape: Sequence[int],
    source_affine: np.ndarray,
    cord_points: np.ndarray,
    rng: np.random.Generator,
) -> tuple[TargetGrid, dict[str, Any]]:
    """Place the site's grid on the source anatomy.

    The centre is a random cord point, jittered in the axial plane. Along each world axis the field of view is the
    site's, shortened to the length of source image that the axis line through the cord point crosses (a thin or
    tilted source slab limits it), and the centre moves so the field of view stays on that stretch.

    Args:
        acquisition: the site's acquisition profile.
        source_shape: (3,) source image shape.
        source_affine: (4, 4) source affine.
        cord_points: (N, 3) world positions of cord voxels of the source.
        rng: random generator.
    """
    world_axis = three(_AXIS_OF[c] for c in acquisition.orientation)
    spacing = np.asarray(acquisition.spacing_mm, dtype=np.float64)
    fov_world = np.empty(3)
    for axis, world in enumerate(world_axis):
        fov_world[world] = acquisition.fov_mm[axis]
    anchor = cord_points[rng.integers(len(cord_points))].astype(np.float64)
    center = anchor.copy()
    center[:2] += rng.uniform(-CENTER_JITTER_MM, CENTER_JITTER_MM, size=2)
    for world in range(3):
        low, high = _line_inside(source_shape, source_affine, anchor, world)
        fov_world[world] = min(fov_world[world], high - low)
        center[world] = np.clip(
            center[world], anchor[world] + low + fov_world[world] / 2, anchor[world] + high - fov_world[world] / 2
        )
    shape = three(max(1, int(round(fov_world[world] / spacing[axis]))) for axis, world in enumerate(world_axis))
    affine = grid_affine(shape, spacing, acquisition.orientation, center)
    grid = TargetGrid(shape, affine, three(float(s) for s in spacing), world_axis)
    return grid, {"shape": list(shape), "center_mm": [round(float(v), 3) for v in center]}


def _line_inside(shape: Sequence[int], affine: np.ndarray, point: np.ndarray, world: int) -> tuple[float, float]:
    """Range of t (mm) for which ``point + t * e_world`` lies inside the image's voxel faces (point is inside)."""
    inverse = np.linalg.inv(affine)
    start = inverse[:3, :3] @ point + inverse[:3, 3]
    step = inverse[:3, world]
    low, high = -np.inf, np.inf
    for axis in range(3):
        edges = np.array([-0.5, shape[axis] - 0.5]) - start[axis]
        if abs(step[axis]) < 1e-12:
            continue
        t = np.sort(edges / step[axis])
        low, high = max(low, t[0]), min(high, t[1])
    return float(min(low, 0.0)), float(max(high, 0.0))


def working_grid(target: TargetGrid, spacing: float, margin_mm: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """A RAS grid at ``spacing`` mm covering the target grid's voxels plus ``margin_mm`` on every side.

    Returns:
        shape (3,) and (4, 4) affine.
    """
    half = target.spacing_along_world() / 2
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in target.shape], indexing="ij")).reshape(3, -1)
    world = target.affine[:3, :3] @ corners + target.affine[:3, 3:4]
    low = world.min(axis=1) - half - margin_mm
    high = world.max(axis=1) + half + margin_mm
    shape = three(int(np.ceil((high - low)[i] / spacing)) + 1 for i in range(3))
    return shape, grid_affine(shape, (spacing,) * 3, "RAS", (low + high) / 2)


def blur_margin_mm(target: TargetGrid, spacing: float) -> float:
    """Margin the working grid needs so the slice-profile blur sees real anatomy at the target's edges."""
    return float(3 * _slice_sigma_mm(target, spacing).max() + 2 * spacing)


def _slice_sigma_mm(target: TargetGrid, spacing: float) -> np.ndarray:
    wanted = target.spacing_along_world()
    return np.sqrt(np.maximum(wanted**2 - spacing**2, 0.0)) / _FWHM_PER_SIGMA


def sample_to_target(volumes: Sequence[np.ndarray], work_affine: np.ndarray, target: TargetGrid) -> list[np.ndarray]:
    """Blur working-grid volumes to the target voxel size along each world axis, then resample them.

    Args:
        volumes: (X, Y, Z) arrays on the RAS working grid (images or partial-volume fractions).
        work_affine: (4, 4) working grid affine.
        target: the site's grid.

    Returns:
        float32 arrays of the target shape; fractions stay in [0, 1] and keep their order (a <= b voxel-wise on
        the working grid stays a <= b), since blurring and linear interpolation are positive averages.
    """
    from scipy import ndimage

    spacing = float(np.linalg.norm(work_affine[:3, 0]))
    sigma_vox = _slice_sigma_mm(target, spacing) / spacing
    coords = voxel_coordinates(target.shape, target.affine, work_affine)
    out = []
    for volume in volumes:
        blurred = ndimage.gaussian_filter(np.asarray(volume, dtype=np.float32), sigma_vox, mode="nearest")
        out.append(ndimage.map_coordinates(blurred, coords, order=1, mode="nearest", prefilter=False))
    return out


def transfer_intensities(
    image: np.ndarray, target: TargetGrid, acquisition: Acquisition, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, Any]]:
    """Contrast curve, bias fields (a smooth random one and one along the cord), noise, then the site's data type.

    Args:
        image: (X, Y, Z) float32 image on the target grid, normalised so the bright tissue is about 1.
        target: the grid (its shape sets the bias field's coordinates).
        acquisition: the site's profile.
        rng: random generator.

    Returns:
        The image in the site's dtype, and the drawn bias coefficients.
    """
    signal = np.power(np.maximum(image, 0.0), np.float32(acquisition.gamma), dtype=np.float32)
    coefficients = rng.normal(size=9)
    signal *= _bias_field(target.shape, coefficients, acquisition.bias)
    along = float(rng.uniform(*ALONG_CORD_BIAS))
    slope, bend = rng.uniform(-1.0, 1.0, size=2)
    signal *= _along_cord_field(target, along, float(slope), float(bend))
    sigma = np.float32(acquisition.noise_sigma)
    if sigma > 0:
        real = signal + rng.standard_normal(signal.shape, dtype=np.float32) * sigma
        if acquisition.noise == "rician":
            imaginary = rng.standard_normal(signal.shape, dtype=np.float32) * sigma
            signal = np.sqrt(real * real + imaginary * imaginary)
        else:
            signal = np.maximum(real, 0.0)
    signal *= np.float32(acquisition.intensity_scale)
    dtype = np.dtype(acquisition.dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        signal = np.clip(np.rint(signal), info.min, info.max)
    return signal.astype(dtype), {
        "bias_coefficients": [round(float(c), 4) for c in coefficients],
        "along_cord_bias": [round(along, 4), round(float(slope), 4), round(float(bend), 4)],
    }


def _along_cord_field(target: TargetGrid, strength: float, slope: float, bend: float) -> np.ndarray:
    """exp(strength * p(s)), p a linear plus quadratic profile along the grid's world S-I axis, |p| <= 1.

    A surface coil's sensitivity falls along the cord: on real scans the CSF-to-cord ratio and the brightness of
    the whole cord change by a factor of 2 or more from one end of a field of view to the other.
    """
    axis = list(target.world_axis).index(2)
    n = target.shape[axis]
    s = np.linspace(-1.0, 1.0, n, dtype=np.float32)
    profile = slope * s + bend * (s**2 - np.float32(1 / 3))
    peak = float(np.abs(profile).max())
    if peak > 0:
        profile /= peak
    return np.exp(np.float32(strength) * profile).reshape([n if i == axis else 1 for i in range(3)])


#: Strength range of the bias along the cord (:func:`_along_cord_field`): up to exp(0.7), about 2x, at an end.
ALONG_CORD_BIAS = (0.0, 0.7)


def _bias_field(shape: Sequence[int], coefficients: np.ndarray, strength: float) -> np.ndarray:
    """exp(strength * p) with p a random quadratic polynomial of the grid coordinates scaled to [-1, 1]."""
    u = [
        np.linspace(-1.0, 1.0, n, dtype=np.float32).reshape([n if i == a else 1 for i in range(3)])
        for a, n in enumerate(shape)
    ]
    terms = [u[0], u[1], u[2], u[0] ** 2 - 0.5, u[1] ** 2 - 0.5, u[2] ** 2 - 0.5, u[0] * u[1], u[1] * u[2], u[0] * u[2]]
    poly = np.zeros(tuple(shape), dtype=np.float32)
    for c, term in zip(coefficients, terms):
        poly += np.float32(c) * term
    peak = float(np.abs(poly).max())
    if peak > 0:
        poly /= peak
    return np.exp(np.float32(strength) * poly)
