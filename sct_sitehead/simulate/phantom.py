"""A procedural spinal cord phantom: anatomy fixed in world millimetres, sampled on any grid.

The spine runs along the world S axis, centred near x = y = 0. Along z (mm) the cord follows a gently curved
centreline and changes size as a real cord does (cervical enlargement at z = 0, about 12 x 8 mm; thoracic cord
about 9 x 7 mm; lumbar enlargement near z = -400 and the conus below). Around it: CSF in the dural sac, epidural
fat, vertebral bodies and discs in front (+y, anterior), laminae behind, muscle and a fat layer out to the skin.

Every structure is an analytic shape, so a grid only samples it: the same ``seed`` and world field of view give the
same anatomy and lesions at any resolution, orientation or tilt. The masks are "voxel centre inside the shape";
the image uses soft partial-volume edges one voxel wide. The volume is built slab by slab along the grid axis
closest to S, in float32, so a whole spine of 300 x 300 x 800 voxels fits in well under 2 GB.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sct_sitehead.errors import OutputError, UsageError
from sct_sitehead.simulate.grids import check_orientation, grid_affine, rotation_about, world_extent

if TYPE_CHECKING:
    import nibabel

logger = logging.getLogger(__name__)

#: Tissue intensities per contrast, relative to the brightest tissue (x 1000 in the written image).
INTENSITIES: dict[str, dict[str, float]] = {
    "T2w": {
        "air": 0.0,
        "fat": 0.55,
        "muscle": 0.2,
        "bone": 0.3,
        "disc": 0.65,
        "csf": 1.0,
        "cord": 0.38,
        "lesion": 0.75,
    },
    "T2star": {
        "air": 0.0,
        "fat": 0.35,
        "muscle": 0.25,
        "bone": 0.15,
        "disc": 0.5,
        "csf": 0.85,
        "cord": 0.5,
        "lesion": 0.72,
    },
    "T1w": {
        "air": 0.0,
        "fat": 0.95,
        "muscle": 0.4,
        "bone": 0.55,
        "disc": 0.35,
        "csf": 0.12,
        "cord": 0.55,
        "lesion": 0.32,
    },
    # magnetisation transfer (MT on): low contrast, the cord a little darker than the CSF, lesions brighter
    "MTS": {"air": 0.0, "fat": 0.4, "muscle": 0.3, "bone": 0.2, "disc": 0.45, "csf": 0.5, "cord": 0.42, "lesion": 0.62},
}
NOISE_SIGMA = 0.02
_SCALE = 1000.0
_SLAB_VOXELS = 2_000_000
_TABLE_Z = np.arange(-1200.0, 1200.0, 0.5)


@dataclass
class Phantom:
    """A phantom image with its ground truth, all on one grid.

    Attributes:
        image: the MR-like image (dtype as asked).
        cord: uint8 cord mask (lesions included).
        lesion: uint8 lesion mask, inside the cord.
        csf: uint8 mask of the CSF in the dural sac around the cord.
        contrast: ``"T2w"``, ``"T2star"`` or ``"T1w"``.
        lesions: one dict per lesion: ``center_mm`` (world RAS), ``axis`` (unit vector along the cord),
            ``semi_axes_mm`` (along the cord, then across).
    """

    image: nibabel.Nifti1Image
    cord: nibabel.Nifti1Image
    lesion: nibabel.Nifti1Image
    csf: nibabel.Nifti1Image
    contrast: str
    lesions: list[dict[str, Any]] = field(default_factory=list)


def _bump(z: np.ndarray, at: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((z - at) / width) ** 2)


def _anatomy_tables() -> dict[str, np.ndarray]:
    """Everything that depends on z only, tabulated every 0.5 mm (interpolated per voxel)."""
    z = _TABLE_Z
    conus = np.clip((z + 470.0) / 40.0, 0.0, 1.0)  # cord tapers to nothing between z = -430 and -470
    caudal = np.clip(-z / 500.0, 0.0, 1.0)  # 0 in the neck, 1 in the low back
    a = (4.6 + 1.6 * _bump(z, 0, 40) + 1.3 * _bump(z, -400, 30) + 0.2 * np.sin(2 * np.pi * z / 90)) * conus
    b = (3.6 + 0.5 * _bump(z, 0, 40) + 0.7 * _bump(z, -400, 30) + 0.15 * np.sin(2 * np.pi * z / 70 + 1)) * conus
    level_height = 18.0 + 12.0 * caudal
    body_b = 7.0 + 8.0 * caudal
    tables = {
        "xc": 1.5 * np.sin(2 * np.pi * z / 350 + 0.4),
        "yc": 9.0 * np.sin(2 * np.pi * (z + 150) / 700),
        "a": np.maximum(a, 1e-3),
        "b": np.maximum(b, 1e-3),
        "sac_a": 8.1 + 1.5 * _bump(z, 0, 40) + 0.4 * np.sin(2 * np.pi * z / 110),
        "sac_b": 6.2 + 0.5 * _bump(z, 0, 40) + 0.3 * np.sin(2 * np.pi * z / 130 + 2),
        "body_a": 1.3 * body_b,
        "body_b": body_b,
        "level_height": level_height,
        "phase": np.cumsum(0.5 / level_height),
    }
    return tables


@dataclass(frozen=True)
class _Lesion:
    center: np.ndarray
    axis: np.ndarray
    across: np.ndarray
    across2: np.ndarray
    semi_axes: tuple[float, float, float]

    def as_dict(self) -> dict[str, Any]:
        return {
            "center_mm": [round(float(v), 3) for v in self.center],
            "axis": [round(float(v), 4) for v in self.axis],
            "semi_axes_mm": [round(float(v), 3) for v in self.semi_axes],
        }


def _place_lesions(rng: np.random.Generator, n: int, z_low: float, z_high: float, tables: dict) -> list[_Lesion]:
    lesions = []
    for _ in range(n):
        length = rng.uniform(3.0, 9.0)
        lo, hi = z_low + length, z_high - length
        zc = rng.uniform(lo, hi) if hi > lo else 0.5 * (z_low + z_high)
        at = {k: float(np.interp(zc, _TABLE_Z, v)) for k, v in tables.items()}
        rho, theta = rng.uniform(0.0, 0.45), rng.uniform(0.0, 2 * np.pi)
        center = np.array([at["xc"] + rho * at["a"] * np.cos(theta), at["yc"] + rho * at["b"] * np.sin(theta), zc])
        ends = [zc - 1.0, zc + 1.0]
        slope = [float(np.diff(np.interp(ends, _TABLE_Z, tables[k]))[0]) / 2.0 for k in ("xc", "yc")]
        axis = np.array([*slope, 1.0])
        axis /= np.linalg.norm(axis)
        across = np.cross(axis, [0.0, 1.0, 0.0])
        across /= np.linalg.norm(across)
        limit = 0.55 * min(at["a"], at["b"])
        radii = rng.uniform(1.0, 2.2, size=2).clip(max=max(limit, 0.5))
        lesions.append(_Lesion(center, axis, across, np.cross(axis, across), (length, *radii)))
    return lesions


def _soft(distance_mm: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume fraction from a signed distance (negative inside): 0.5 on the surface."""
    return np.clip(0.5 - distance_mm / width, 0.0, 1.0, dtype=np.float32)


def _ellipse_distance(dx: np.ndarray, dy: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Signed distance (mm, first order) to an ellipse boundary; exact sign, so ``<= 0`` is inside."""
    r = np.sqrt((dx / a) ** 2 + (dy / b) ** 2)
    grad = np.sqrt((dx / a**2) ** 2 + (dy / b**2) ** 2) / np.maximum(r, 1e-6)
    return np.where(r < 0.5, -np.minimum(a, b) * 0.5, (r - 1.0) / np.maximum(grad, 1e-6))


def _ellipsoid_distance(p: tuple, lesion: _Lesion) -> np.ndarray:
    d = [p[i] - lesion.center[i] for i in range(3)]
    s = [sum(d[i] * vec[i] for i in range(3)) for vec in (lesion.axis, lesion.across, lesion.across2)]
    terms = [(s[i] / lesion.semi_axes[i]) for i in range(3)]
    r = np.sqrt(terms[0] ** 2 + terms[1] ** 2 + terms[2] ** 2)
    grad = np.sqrt(sum((s[i] / lesion.semi_axes[i] ** 2) ** 2 for i in range(3))) / np.maximum(r, 1e-6)
    return np.where(r < 0.5, -0.5 * min(lesion.semi_axes), (r - 1.0) / np.maximum(grad, 1e-6))


def _world_coordinates(affine: np.ndarray, index: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """x, y, z of voxel centres, each broadcast only over the voxel axes it depends on (cheap for straight grids)."""
    out = []
    for row in range(3):
        value: np.ndarray | float = affine[row, 3]
        for axis in range(3):
            if abs(affine[row, axis]) > 1e-9:
                value = value + np.float32(affine[row, axis]) * index[axis]
        out.append(np.asarray(value, dtype=np.float32))
    return tuple(out)


def _render_slab(
    p: tuple[np.ndarray, ...],
    shape: tuple[int, ...],
    tables: dict[str, np.ndarray],
    lesions: list[_Lesion],
    waves: np.ndarray,
    intensity: dict[str, float],
    width: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Noise-free image and cord/lesion/csf masks of one slab."""
    x, y, z = p
    at = {k: np.interp(z, _TABLE_Z, v).astype(np.float32) for k, v in tables.items()}
    dx, dy = x - at["xc"], y - at["yc"]
    # Outside in: skin, subcutaneous fat, muscle; then bone, epidural fat, sac, cord, lesion, each painted over.
    skin = _ellipse_distance(x, y - 15.0, np.float32(65.0), np.float32(55.0))
    texture = 1.0 + 0.08 * np.mean([np.cos(w[0] * x + w[1] * y + w[2] * z + w[3]) for w in waves], axis=0)
    image = intensity["fat"] * _soft(skin, width) + (intensity["muscle"] - intensity["fat"]) * _soft(skin + 6, width)
    image = np.broadcast_to(image * texture, shape).astype(np.float32)

    def paint(fraction: np.ndarray, value: float) -> None:
        image[...] = image + fraction * (value - image)

    body_center = at["yc"] + at["sac_b"] + 2.5 + at["body_b"]
    in_plane = _soft(_ellipse_distance(dx, y - body_center, at["body_a"], at["body_b"]), width)
    # Position within the vertebral level: discs take the first 22% of each level.
    fraction_of_level = np.mod(at["phase"], 1.0)
    into_body = np.minimum(fraction_of_level - 0.22, 1.0 - fraction_of_level) * at["level_height"]
    body_along = _soft(-into_body, width)
    paint(in_plane * body_along, intensity["bone"])
    paint(in_plane * (1 - body_along), intensity["disc"])
    lamina = _soft(_ellipse_distance(dx, dy + 1.0, at["sac_a"] + 6.0, at["sac_b"] + 6.0), width)
    paint(lamina * (y < at["yc"]) * body_along, intensity["bone"])
    paint(_soft(_ellipse_distance(dx, dy, at["sac_a"] + 1.5, at["sac_b"] + 1.5), width), intensity["fat"])
    sac_distance = _ellipse_distance(dx, dy + 0.5, at["sac_a"], at["sac_b"])
    paint(_soft(sac_distance, width), intensity["csf"])
    cord_distance = _ellipse_distance(dx, dy, at["a"], at["b"])
    cord_fraction = _soft(cord_distance, width)
    paint(cord_fraction, intensity["cord"])
    lesion_mask = np.zeros(shape, dtype=bool)
    lesion_fraction = np.zeros(shape, dtype=np.float32)
    for lesion in lesions:
        distance = _ellipsoid_distance(p, lesion)
        lesion_fraction = np.maximum(lesion_fraction, _soft(distance, width))
        lesion_mask |= distance <= 0
    paint(np.minimum(lesion_fraction, cord_fraction), intensity["lesion"])
    cord_mask = np.broadcast_to(cord_distance <= 0, shape)
    csf_mask = np.broadcast_to(sac_distance <= 0, shape) & ~cord_mask
    return image, cord_mask, lesion_mask & cord_mask, csf_mask


def make_phantom(
    shape: Sequence[int],
    spacing: Sequence[float],
    *,
    orientation: str = "RAS",
    contrast: str = "T2w",
    n_lesions: int = 3,
    seed: int = 0,
    oblique_deg: float = 0.0,
    center: Sequence[float] = (0.0, 0.0, 0.0),
    noise: float = NOISE_SIGMA,
    dtype: Any = np.int16,
) -> Phantom:
    """Sample the phantom anatomy on a grid.

    Args:
        shape: (3,) voxels per axis.
        spacing: (3,) voxel size in mm per axis.
        orientation: voxel axis directions, e.g. ``"RAS"``, ``"LAS"``, ``"PSR"`` (sagittal slices).
        contrast: ``"T2w"`` (CSF bright, lesions bright), ``"T2star"`` or ``"T1w"`` (CSF and lesions dark).
        n_lesions: lesions placed in the cord within the grid's superior-inferior extent.
        seed: seeds lesions, texture and noise; the same seed and field of view give the same phantom.
        oblique_deg: tilt of the grid about the left-right axis, as for slices angled to the cord.
        center: (3,) world position (RAS mm) of the grid centre; z = 0 is the cervical enlargement.
        noise: Rician noise sigma relative to the brightest tissue (0 for none).
        dtype: data type of the image (``np.int16``, ``np.float32``, ...); values run to about 1000.

    Returns:
        The :class:`Phantom`.
    """
    import nibabel as nib

    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(f"phantom shape {shape} is not three positive sizes; e.g. (64, 64, 64)")
    if contrast not in INTENSITIES:
        raise UsageError(f"contrast {contrast!r} is not one of {sorted(INTENSITIES)}; pick one of those")
    if n_lesions < 0:
        raise UsageError(f"n_lesions is {n_lesions}; use 0 or more")
    orientation = check_orientation(orientation)
    rotation = rotation_about((1.0, 0.0, 0.0), oblique_deg) if oblique_deg else None
    affine = grid_affine(shape, spacing, orientation, center, rotation)
    rng = np.random.default_rng([seed, 0])
    tables = _anatomy_tables()
    low, high = world_extent(shape, affine, edges=True)
    lesions = _place_lesions(rng, n_lesions, float(low[2]), float(high[2]), tables)
    wavelength = rng.uniform(12.0, 40.0, size=(4, 1))
    direction = rng.normal(size=(4, 3))
    waves = np.hstack(
        [
            2 * np.pi * direction / np.linalg.norm(direction, axis=1, keepdims=True) / wavelength,
            rng.uniform(0, 2 * np.pi, size=(4, 1)),
        ]
    ).astype(np.float32)
    width = float(np.mean(np.linalg.norm(affine[:3, :3], axis=0)))
    long_axis = int(np.argmax(np.abs(affine[2, :3]) / np.linalg.norm(affine[:3, :3], axis=0)))
    outputs = _render(
        shape, affine, long_axis, tables, lesions, waves, INTENSITIES[contrast], width, noise, seed, np.dtype(dtype)
    )
    images = [nib.Nifti1Image(data, affine) for data in outputs]
    for img in images:
        img.header.set_xyzt_units("mm", "sec")
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    logger.debug("phantom %s at %s mm %s: %d lesions", shape, tuple(spacing), orientation, n_lesions)
    image, cord, lesion, csf = images
    return Phantom(image, cord, lesion, csf, contrast=contrast, lesions=[les.as_dict() for les in lesions])


def _render(
    shape: tuple[int, ...],
    affine: np.ndarray,
    long_axis: int,
    tables: dict,
    lesions: list[_Lesion],
    waves: np.ndarray,
    intensity: dict[str, float],
    width: float,
    noise: float,
    seed: int,
    dtype: np.dtype,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    image = np.empty(shape, dtype=dtype)
    cord, lesion, csf = (np.zeros(shape, dtype=np.uint8) for _ in range(3))
    plane = int(np.prod(shape)) // shape[long_axis]
    step = max(1, _SLAB_VOXELS // max(plane, 1))
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    for number, start in enumerate(range(0, shape[long_axis], step)):
        stop = min(start + step, shape[long_axis])
        index = []
        for axis in range(3):
            values = np.arange(start, stop) if axis == long_axis else np.arange(shape[axis])
            view = [1, 1, 1]
            view[axis] = values.size
            index.append(values.astype(np.float32).reshape(view))
        slab_shape = tuple(v.size for v in index)
        p = _world_coordinates(affine, index)
        clean, cord_s, lesion_s, csf_s = _render_slab(p, slab_shape, tables, lesions, waves, intensity, width)
        if noise > 0:
            rng = np.random.default_rng([seed, 1, number])
            real = clean + rng.standard_normal(slab_shape, dtype=np.float32) * np.float32(noise)
            imag = rng.standard_normal(slab_shape, dtype=np.float32) * np.float32(noise)
            clean = np.sqrt(real * real + imag * imag)
        clean *= _SCALE
        if info is not None:
            clean = np.clip(np.rint(clean), info.min, info.max)
        where = [slice(None)] * 3
        where[long_axis] = slice(start, stop)
        image[tuple(where)] = clean
        cord[tuple(where)] = cord_s
        lesion[tuple(where)] = lesion_s
        csf[tuple(where)] = csf_s
    return image, cord, lesion, csf


def truth_paths(out: Path) -> dict[str, Path]:
    """Where :func:`write_phantom` puts the ground truth of an image written to ``out``."""
    out = Path(out)
    name = out.name
    stem, ext = (name[:-7], ".nii.gz") if name.endswith(".nii.gz") else (out.stem, out.suffix or ".nii.gz")
    # "-truth", not "seg": sct_deepseg_lesion writes its prediction as <stem>_lesionseg next to the input.
    return {label: out.with_name(f"{stem}_{label}-truth{ext}") for label in ("cord", "lesion", "csf")}


def write_phantom(phantom: Phantom, out: Path) -> dict[str, Path]:
    """Write the image to ``out`` and its ground truth next to it.

    ``out = x_T2w.nii.gz`` gives ``x_T2w_cord-truth.nii.gz``, ``x_T2w_lesion-truth.nii.gz`` and
    ``x_T2w_csf-truth.nii.gz``.

    Returns:
        ``{"image": out, "cord": ..., "lesion": ..., "csf": ...}``.

    Raises:
        OutputError: a file cannot be written.
    """
    import nibabel as nib

    out = Path(out)
    paths = {"image": out, **truth_paths(out)}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for key, path in paths.items():
            nib.save(getattr(phantom, key), path)
    except OSError as exc:
        raise OutputError(f"cannot write phantom file in {out.parent}: {exc}; check the folder is writable") from exc
    return paths
