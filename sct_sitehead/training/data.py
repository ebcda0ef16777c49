"""Training cases: preprocessed exactly like the deploy path, cached as .npy, sampled into patch batches.

Each image goes through :func:`spatial.to_model_grid` (reorient to the release orientation, resample to its
spacing, linear) and :func:`normalization.normalize`; its label masks through the same grid (linear, then >= 0.5).
The arrays are cached under ``<work>/cache/<key>/`` where the key hashes the files' paths, sizes and mtimes and
the input spec, so a changed file or spec is preprocessed again and an unchanged one is memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sct_sitehead.atomic import move_into_place
from sct_sitehead.deploy.nifti import image_data, load_image
from sct_sitehead.deploy.normalization import normalize
from sct_sitehead.deploy.spatial import to_model_grid
from sct_sitehead.errors import TrainingError

logger = logging.getLogger(__name__)

#: Most foreground voxel coordinates kept per case for lesion-centred sampling.
MAX_FOREGROUND = 20000
#: Labels whose voxels centre the oversampled patches.
LESION_LABELS = ("lesion",)
#: The label-map value of a case that has no label map (never synthesised).
NO_CLASSES = 255


@dataclass
class Case:
    """One preprocessed image on the model grid.

    Attributes:
        name: the image file name (for messages).
        site: its site.
        image: (X, Y, Z) float32 normalised image (memory-mapped).
        labels: ``{label: (X, Y, Z) uint8 mask}`` (memory-mapped).
        foreground: (M, 3) int32 voxel coordinates of lesion voxels (M may be 0).
        minimum: the image's minimum, the padding value.
        classes: (X, Y, Z) uint8 tissue classes of the simulator's label map (memory-mapped), the source of
            synthesised images (:mod:`.synth`); None without one.
    """

    name: str
    site: str
    image: np.ndarray
    labels: dict[str, np.ndarray]
    foreground: np.ndarray
    minimum: float
    classes: np.ndarray | None = None


def _stat(path: Path) -> list[Any]:
    info = Path(path).stat()
    return [str(Path(path).resolve()), info.st_size, info.st_mtime_ns]


def cache_key(sample: Any, spec: Mapping[str, Any], label_map: Path | None = None) -> str:
    """Hash of the sample's files (path, size, mtime), its label map and the input spec: its cache folder's name."""
    parts = {
        "image": _stat(sample.image),
        "labels": {name: _stat(path) for name, path in sorted(sample.labels.items())},
        "spec": {k: spec[k] for k in ("orientation", "spacing", "normalization")},
        "version": 2,
        # Only when there is one, so the cache of a dataset without label maps keeps its keys.
        **({"label_map": _stat(label_map)} if label_map is not None else {}),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def preprocess(sample: Any, spec: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One sample on the model grid, as the deploy path sees it.

    Returns:
        (X, Y, Z) float32 normalised image and ``{label: (X, Y, Z) uint8 mask}`` on the same grid.

    Raises:
        InputImageError: unreadable or unusable image (from :mod:`nifti`).
        TrainingError: a label that is not on the image's grid.
    """
    image = load_image(sample.image)
    volume, grid = to_model_grid(image_data(image), image.affine, spec["orientation"], spec["spacing"])
    volume = normalize(volume, spec["normalization"])
    labels = {}
    for name, path in sorted(sample.labels.items()):
        label = load_image(path)
        if tuple(label.shape) != tuple(image.shape):
            raise TrainingError(
                f"{path}: {name} label shape {label.shape} differs from its image's {image.shape}; resample it"
            )
        mask = (np.asarray(label.dataobj) > 0).astype(np.float32)
        # The image's affine, not the label's: read_bids already checked they agree, and this keeps both on one grid.
        resampled, _ = to_model_grid(mask, image.affine, spec["orientation"], spec["spacing"])
        labels[name] = (resampled >= 0.5).astype(np.uint8)
    return volume, labels


def preprocess_classes(path: Path, image_path: Path, spec: Mapping[str, Any]) -> np.ndarray:
    """A label map on the model grid of its image (nearest neighbour: the classes stay classes).

    Raises:
        TrainingError: it is not on its image's grid.
    """
    image, classes = load_image(image_path), load_image(path)
    if tuple(classes.shape) != tuple(image.shape):
        raise TrainingError(f"{path}: label map shape {classes.shape} differs from its image's {image.shape}")
    data = np.asarray(classes.dataobj, dtype=np.float32)
    resampled, _ = to_model_grid(data, image.affine, spec["orientation"], spec["spacing"], order=0)
    return np.rint(resampled).astype(np.uint8)


def _foreground(labels: Mapping[str, np.ndarray], seed: int) -> np.ndarray:
    names = [n for n in labels if n in LESION_LABELS]
    if not names:
        return np.zeros((0, 3), dtype=np.int32)
    mask = np.zeros(labels[names[0]].shape, dtype=bool)
    for name in names:
        mask |= labels[name] > 0
    coords = np.argwhere(mask).astype(np.int32)
    if len(coords) > MAX_FOREGROUND:
        coords = coords[np.random.default_rng(seed).choice(len(coords), MAX_FOREGROUND, replace=False)]
    return coords


def _write_case(
    folder: Path,
    volume: np.ndarray,
    labels: Mapping[str, np.ndarray],
    info: dict[str, Any],
    classes: np.ndarray | None = None,
) -> None:
    tmp = folder.with_name(f".{folder.name}.{secrets.token_hex(6)}.tmp")
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "image.npy", volume)
        if classes is not None:
            np.save(tmp / "classes.npy", classes)
        for name, mask in labels.items():
            np.save(tmp / f"label-{name}.npy", mask)
        np.save(tmp / "foreground.npy", _foreground(labels, seed=0))
        (tmp / "case.json").write_text(json.dumps(info, sort_keys=True), encoding="utf-8")
        try:
            move_into_place(tmp, folder)
        except OSError:
            if not (folder / "case.json").is_file():  # lost a race with another process: theirs is as good
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _read_case(folder: Path) -> Case:
    info = json.loads((folder / "case.json").read_text(encoding="utf-8"))
    labels = {name: np.load(folder / f"label-{name}.npy", mmap_mode="r") for name in info["labels"]}
    return Case(
        name=info["name"],
        site=info["site"],
        image=np.load(folder / "image.npy", mmap_mode="r"),
        labels=labels,
        foreground=np.load(folder / "foreground.npy"),
        minimum=float(info["minimum"]),
        classes=np.load(folder / "classes.npy", mmap_mode="r") if (folder / "classes.npy").is_file() else None,
    )


def prepare_cases(
    samples: Sequence[Any],
    spec: Mapping[str, Any],
    cache_dir: Path,
    label_maps: Mapping[Path, Path] | None = None,
) -> list[Case]:
    """Preprocess (or reuse from the cache) every sample that has at least one label.

    Args:
        samples: :class:`bids.Sample` objects (``site``, ``image``, ``labels``).
        spec: the config's ``input`` section.
        cache_dir: folder of the cached arrays.
        label_maps: image path -> its label map (:attr:`Case.classes`), for the samples that have one.

    Returns:
        The cases, in the samples' order.

    Raises:
        TrainingError: no sample has a label.
    """
    cases = []
    for sample in samples:
        if not sample.labels:
            logger.info("%s has no label; not used for training", sample.image.name)
            continue
        label_map = (label_maps or {}).get(sample.image)
        folder = Path(cache_dir) / cache_key(sample, spec, label_map)
        if not (folder / "case.json").is_file():
            volume, labels = preprocess(sample, spec)
            classes = None if label_map is None else preprocess_classes(label_map, sample.image, spec)
            info = {
                "name": sample.image.name,
                "site": sample.site,
                "labels": sorted(labels),
                "shape": volume.shape,
                "minimum": float(volume.min()),
            }
            _write_case(folder, volume, labels, info, classes)
            logger.debug("cached %s at %s", sample.image.name, folder)
        cases.append(_read_case(folder))
    if not cases:
        raise TrainingError(
            f"none of the {len(samples)} samples has a label mask; check derivatives/labels and the label suffixes"
        )
    return cases


def crop(
    volume: np.ndarray, corner: Sequence[int] | np.ndarray, size: Sequence[int] | np.ndarray, fill: float
) -> np.ndarray:
    """The box ``[corner, corner + size)`` of a (..., X, Y, Z) array, out-of-volume voxels set to ``fill``."""
    out = np.full((*volume.shape[:-3], *size), fill, dtype=volume.dtype)
    src, dst = [], []
    for start, length, extent in zip(corner, size, volume.shape[-3:]):
        lo, hi = max(start, 0), min(start + length, extent)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - start, lo - start + max(0, hi - lo)))
    # Concatenated, not starred: mypy reads `a[(..., *b)]` as 3.11-only syntax (it parses with the running Python).
    out[(...,) + tuple(dst)] = volume[(...,) + tuple(src)]
    return out


def case_weights(cases: Sequence[Case], site_weights: Mapping[str, float]) -> np.ndarray | None:
    """Each case's probability of being drawn, from ``train.site_weights`` (a site absent from it weighs 1).

    Returns:
        None when no weight is set (uniform sampling, drawn as before the setting existed).
    """
    if not site_weights:
        return None
    weights = np.array([float(site_weights.get(case.site, 1.0)) for case in cases])
    return weights / weights.sum()


def sample_batch(
    cases: Sequence[Case],
    targets: Sequence[tuple[np.ndarray, np.ndarray]],
    patch_size: Sequence[int],
    batch_size: int,
    rng: np.random.Generator,
    lesion_fraction: float,
    weights: np.ndarray | None = None,
    classes: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``batch_size`` patches; a ``lesion_fraction`` of them is centred on a lesion voxel when one exists.

    Args:
        cases: the cases of this process.
        targets: per case, (K, X, Y, Z) uint8 targets and (K,) bool channel mask (:meth:`LabelSpace.targets`).
        patch_size: (3,) patch shape.
        batch_size: patches to draw.
        rng: the only source of randomness, so a seed fixes the batch.
        lesion_fraction: probability that a patch is centred on a lesion voxel.
        weights: (len(cases),) probabilities of drawing each case (:func:`case_weights`); None: uniform.
        classes: when given, a list the patches' (1, x, y, z) uint8 label-map crops are appended to, in the batch's
            order (:data:`NO_CLASSES` everywhere for a case without a label map).

    Returns:
        (B, 1, x, y, z) float32 images (padded with the case's minimum, as the deploy path pads across the
        cord; along it the deploy path repeats the edge, which training never needs: the release's training
        volumes are all at least a patch long there),
        (B, K, x, y, z) uint8 targets and (B, K) bool channel masks.
    """
    size = np.asarray(patch_size, dtype=np.int64)
    images, labels, masks = [], [], []
    for _ in range(batch_size):
        index = int(rng.integers(len(cases)) if weights is None else rng.choice(len(cases), p=weights))
        case, (target, mask) = cases[index], targets[index]
        shape = np.asarray(case.image.shape)
        if len(case.foreground) and rng.random() < lesion_fraction:
            centre = case.foreground[int(rng.integers(len(case.foreground)))].astype(np.int64)
        else:
            centre = np.array([int(rng.integers(n)) for n in shape], dtype=np.int64)
        corner = centre - size // 2
        # Keep the patch inside the volume where it fits, so padding only appears for small volumes.
        corner = np.where(shape >= size, np.clip(corner, 0, shape - size), (shape - size) // 2)
        images.append(crop(np.asarray(case.image), corner, size, case.minimum)[None])
        labels.append(crop(target, corner, size, 0))
        masks.append(mask)
        if classes is not None:
            source = case.classes if case.classes is not None else np.full(case.image.shape, NO_CLASSES, np.uint8)
            classes.append(crop(np.asarray(source), corner, size, 0)[None])
    return np.stack(images), np.stack(labels), np.stack(masks)
