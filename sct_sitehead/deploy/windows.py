"""Windows over a model grid: where they go, how large they are, how they meet the image's edge, and the
Gaussian-weighted sliding window that runs a network over them.

:func:`sliding_window` takes any callable as the network, so the ONNX model, a torch module wrapped in a
function, or a numpy function in a test share one code path. :class:`WindowSettings` says how a network is run
(overlap, windows per call, window limit); :func:`one_window`, :func:`crop_window` and :func:`fill_window` size
the windows of a coarse image or of a crop around the cord.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations, product
from typing import Any

import numpy as np

from sct_sitehead.deploy.spatial import Bbox, model_size, orientation_transform, three
from sct_sitehead.errors import InferenceError, UsageError
from sct_sitehead.registry.specs import CROP_WINDOW_PATCHES, WindowSpec

logger = logging.getLogger(__name__)

#: Smallest Gaussian weight: keeps every voxel's weight sum well above float32 underflow at patch corners.
MIN_WEIGHT = 1e-4

Predict = Callable[[np.ndarray], Mapping[str, np.ndarray]]


def gaussian_weights(patch_size: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """nnU-Net style importance map: a Gaussian centred on the patch, sigma = ``sigma_scale`` x size per axis.

    Returns:
        (x, y, z) float32 array, maximum 1, minimum clipped to :data:`MIN_WEIGHT` (never 0).
    """
    sizes = _positive_ints(patch_size, "patch_size")
    if not sigma_scale > 0:
        raise UsageError(f"sigma_scale must be > 0, got {sigma_scale!r}")
    profiles = []
    for n in sizes:
        centred = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        profiles.append(np.exp(-0.5 * (centred / (n * sigma_scale)) ** 2))
    weights = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    weights /= weights.max()
    floored: np.ndarray = np.maximum(weights, MIN_WEIGHT)  # numpy types a ufunc's result as Any
    return floored.astype(np.float32)


def patch_starts(shape: Sequence[int], patch_size: Sequence[int], overlap: float) -> list[tuple[int, int, int]]:
    """Patch corners covering a volume, evenly spaced, the last patch flush with the far edge.

    Args:
        shape: (3,) volume shape, at least ``patch_size`` along every axis.
        patch_size: (3,) patch shape.
        overlap: fraction of a patch shared with its neighbour, in [0, 1).

    Returns:
        (x, y, z) start indices, x slowest.
    """
    sizes = _positive_ints(shape, "shape")
    patch = _positive_ints(patch_size, "patch_size")
    if not 0.0 <= overlap < 1.0:
        raise UsageError(f"overlap must be in [0, 1), got {overlap!r}")
    per_axis = []
    for n, p in zip(sizes, patch):
        if n < p:
            raise UsageError(f"volume shape {sizes} is smaller than the patch {patch}; pad it first")
        steps = math.ceil((n - p) / max(p * (1.0 - overlap), 1.0)) + 1
        stride = (n - p) / (steps - 1) if steps > 1 else 0.0
        per_axis.append(sorted({int(round(stride * i)) for i in range(steps)}))
    return [three(corner) for corner in product(*per_axis)]


def edge_beyond_for(orientation: str, patch_size: Sequence[int]) -> tuple[int, int, int]:
    """``sliding_window``'s ``edge_beyond`` for a model grid: along the cord, always the edge; across, past a patch.

    An image shorter than a patch along the cord (S-I: a 16 mm field of view is a quarter of a 64 mm patch) is
    padded with copies of its first and last slices, the cord and its surroundings carrying on as they do beyond
    any field of view, and as the simulator extends anatomy past its source. A dark slab there reads as the cord's
    end: measured on the validation split cut to 16 mm along S-I (release 1.1.2's thresholds), own heads' Dice
    0.40 with the slab, 0.74 with the edge (0.68 on the uncut images). Across the cord, beyond the field of view
    is more body or air, and a short axis is padded with the minimum, as in training (the edge on every axis:
    uncut validation images 0.61); only a window running past an image longer than a patch (a crop's window,
    rounded up to the divisor) takes the edge there.
    """
    return three(0 if code in "SI" else int(size) for code, size in zip(orientation.upper(), patch_size))


def left_right_axis(orientation: str) -> int:
    """The axis of a model grid (orientation code such as ``"RAS"``) that runs between the patient's left and right.

    Raises:
        UsageError: the code has neither ``L`` nor ``R``.
    """
    code = orientation.upper()
    for axis, letter in enumerate(code):
        if letter in "LR":
            return axis
    raise UsageError(f"orientation {orientation!r} has no left-right axis")


def mirrored(predict: Predict, axes: Sequence[int]) -> Predict:
    """``predict`` averaged over mirrored copies of each patch: test-time augmentation, as nnU-Net does it.

    Each batch is also run flipped along every non-empty subset of ``axes`` (spatial axes 0-2 of a patch); each
    output is flipped back and the copies averaged. The copies go to ``predict`` as one batch. Meant for networks
    trained with mirroring (``augment.flip``); it costs ``2 ** len(axes)`` times the network's time.

    Args:
        predict: maps a batch (N, 1, x, y, z) float32 to ``{key: (N, K, x, y, z)}``.
        axes: spatial axes to mirror along; none gives ``predict`` back.
    """
    chosen = sorted({int(axis) for axis in axes})
    if any(axis not in (0, 1, 2) for axis in chosen):
        raise UsageError(f"mirror axes are spatial axes 0, 1 or 2, got {list(axes)}")
    if not chosen:
        return predict
    subsets = [subset for k in range(1, len(chosen) + 1) for subset in combinations(chosen, k)]
    flips = [tuple(axis + 2 for axis in subset) for subset in subsets]  # batch axes: (N, 1, x, y, z)

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = np.asarray(batch, dtype=np.float32)
        n = batch.shape[0]
        outputs = predict(np.concatenate([batch, *(np.flip(batch, dims) for dims in flips)]))
        averaged = {}
        for key, output in outputs.items():
            total = np.array(output[:n], dtype=np.float32)
            for copy, dims in enumerate(flips, 1):
                total += np.flip(output[copy * n : (copy + 1) * n], dims)
            averaged[key] = total / (len(flips) + 1)
        return averaged

    return run


def sliding_window(
    volume: np.ndarray,
    predict: Predict,
    patch_size: Sequence[int],
    *,
    overlap: float = 0.5,
    batch_size: int = 4,
    divisor: int = 1,
    pad_value: float | None = None,
    edge_beyond: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Gaussian-weighted sliding-window inference over a whole volume.

    The patch is rounded up to a multiple of ``divisor``. A volume smaller than the patch along an axis is padded
    on both sides with ``pad_value`` (default: the volume's minimum, i.e. the darkest, background-like intensity
    after normalisation, rather than 0, which a z-scored image has at its mean) and the result cropped back.
    Along an axis where the volume is longer than ``edge_beyond``, it is padded with copies of its edge instead.

    Args:
        volume: (X, Y, Z) float32 array (normalised).
        predict: maps a batch (N, 1, x, y, z) float32 to ``{key: (N, K, x, y, z)}``.
        patch_size: (3,) patch shape.
        overlap: fraction of a patch shared with its neighbour.
        batch_size: patches per ``predict`` call.
        divisor: every patch dimension is a multiple of it (the network's total downsampling).
        pad_value: constant used for padding.
        edge_beyond: (3,) lengths; along an axis longer than this, pad by repeating the edge voxels (default:
            none). The deploy path's choice is :func:`edge_beyond_for`.

    Returns:
        ``{key: (K, X, Y, Z) float32}``, each voxel the Gaussian-weighted mean of the patches covering it.

    Raises:
        UsageError: malformed arguments.
        InferenceError: ``predict`` returned arrays of the wrong shape.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3 or volume.size == 0:
        raise UsageError(f"sliding_window needs a non-empty 3D volume, got shape {volume.shape}")
    if int(divisor) < 1 or int(batch_size) < 1:
        raise UsageError(f"divisor and batch_size must be >= 1, got {divisor!r} and {batch_size!r}")
    patch = tuple(-(-p // int(divisor)) * int(divisor) for p in _positive_ints(patch_size, "patch_size"))
    padded_shape = tuple(max(n, p) for n, p in zip(volume.shape, patch))
    inner = tuple(slice((m - n) // 2, (m - n) // 2 + n) for n, m in zip(volume.shape, padded_shape))
    if padded_shape != volume.shape:
        fill = float(volume.min()) if pad_value is None else float(pad_value)
        widths = [(part.start, m - part.stop) for part, m in zip(inner, padded_shape)]
        beyond = (math.inf,) * 3 if edge_beyond is None else tuple(edge_beyond)
        edge = [width if n > limit else (0, 0) for width, n, limit in zip(widths, volume.shape, beyond)]
        rest = [(0, 0) if n > limit else width for width, n, limit in zip(widths, volume.shape, beyond)]
        padded = np.pad(volume, edge, mode="edge") if any(map(any, edge)) else volume
        padded = np.pad(padded, rest, mode="constant", constant_values=fill) if any(map(any, rest)) else padded
    else:
        padded = volume
    starts = patch_starts(padded_shape, patch, overlap)
    if len(starts) == 1:
        # One window (a crop around the cord): the weighted mean of one patch is the patch itself.
        outputs = _checked_outputs(predict(padded[None, None]), 1, patch)
        return {key: np.ascontiguousarray(output[0][(slice(None),) + inner]) for key, output in outputs.items()}
    weights = gaussian_weights(patch)
    weight_sum = np.zeros(padded_shape, dtype=np.float32)
    sums: dict[str, np.ndarray] = {}
    batch = np.empty((min(int(batch_size), len(starts)), 1, *patch), dtype=np.float32)
    logger.debug("sliding window: %d patches of %s over %s", len(starts), patch, padded_shape)
    for chunk in _chunks(starts, batch.shape[0]):
        windows = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in chunk]
        for index, window in enumerate(windows):
            batch[index, 0] = padded[window]
        outputs = _checked_outputs(predict(batch[: len(chunk)]), len(chunk), patch)
        for key, output in outputs.items():
            if key not in sums:
                sums[key] = np.zeros((output.shape[1], *padded_shape), dtype=np.float32)
            elif sums[key].shape[0] != output.shape[1]:
                raise InferenceError(f"output {key!r} changed from {sums[key].shape[0]} to {output.shape[1]} channels")
            weighted = np.empty(output.shape[1:], dtype=np.float32)
            for index, window in enumerate(windows):
                np.multiply(output[index], weights, out=weighted)
                sums[key][(slice(None),) + window] += weighted
        for window in windows:
            weight_sum[window] += weights
    del padded, batch
    result = {}
    for key in list(sums):
        total = sums.pop(key)
        total /= weight_sum
        cropped = total[(slice(None),) + inner]
        result[key] = np.ascontiguousarray(cropped) if cropped.shape != total.shape else total
    return result


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for begin in range(0, len(items), size):
        yield items[begin : begin + size]


def _checked_outputs(outputs: Mapping[str, np.ndarray], n: int, patch: tuple[int, ...]) -> dict[str, np.ndarray]:
    if not outputs:
        raise InferenceError("the network returned no output; check that the model has at least one head")
    checked = {}
    for key, value in outputs.items():
        array = np.asarray(value, dtype=np.float32)
        if array.ndim != 5 or array.shape[0] != n or tuple(array.shape[2:]) != patch:
            raise InferenceError(
                f"output {key!r} has shape {array.shape} for a batch of {n} patches {patch}; "
                f"expected ({n}, K, {', '.join(map(str, patch))})"
            )
        checked[key] = array
    return checked


def _positive_ints(values: Sequence[int], name: str) -> tuple[int, int, int]:
    try:
        ints = tuple(int(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{name} must be 3 positive integers, got {values!r}") from exc
    if len(ints) != 3 or min(ints) < 1:
        raise UsageError(f"{name} must be 3 positive integers, got {values!r}")
    return ints


#: Smallest window, as a fraction of the release's patch: the network is trained on patches of about this size
#: (the release: 48³ training patches, 64³ inference patches), so a crop is not padded up to a full patch.
MIN_WINDOW_FRACTION = 0.75


def one_window(
    shape: tuple[int, ...], patch_size: tuple[int, ...], divisor: int, *, max_patches: int = 3
) -> tuple[int, int, int]:
    """The window to run a network with: the whole volume in one piece where it fits.

    A coarse image or a crop around the cord is small, so one network pass over all of it replaces the
    overlapping patches (at overlap 0.5, each voxel computed about 8 times) a whole image needs. Each axis is the
    volume's size rounded up to ``divisor``, at least ``MIN_WINDOW_FRACTION`` of the release's patch (also rounded
    up to ``divisor``) and at most ``max_patches`` patches, so a long field of view (a whole spine) still goes in
    overlapping windows of bounded memory.
    """

    def up(value: float) -> int:
        return -(-int(value) // divisor) * divisor

    return three(
        min(max(up(n), up(MIN_WINDOW_FRACTION * int(p))), max_patches * int(p)) for n, p in zip(shape, patch_size)
    )


def crop_window(size: int, whole: int, patch: int, divisor: int, *, max_patches: int = CROP_WINDOW_PATCHES) -> int:
    """The window along one model axis for a crop of ``size`` voxels of an image ``whole`` voxels long.

    Where the whole image is no longer than a patch, it is what a whole-image run puts in one patch, and so is
    the crop: the whole axis in one patch. Cropping there saves nothing, and a smaller window than the
    whole-image run's changes what the network sees (measured on the test split, whose images are a patch or less
    along most axes: lesions found before the cord rule 51% with crops, 66% with whole axes; whole images: 63%).
    Elsewhere, :func:`one_window`, at most ``max_patches`` patches long.
    """
    length = patch if whole <= patch else size
    return one_window((length,) * 3, (patch,) * 3, divisor, max_patches=max_patches)[0]


def fill_window(
    bbox: Bbox,
    affine: np.ndarray,
    shape: tuple[int, ...],
    orientation: str,
    spacing: Sequence[float],
    patch_size: Sequence[int],
    divisor: int,
    *,
    max_patches: int = CROP_WINDOW_PATCHES,
) -> tuple[Bbox, tuple[int, int, int]]:
    """``bbox`` grown with image voxels until its model grid fills its window, and that window.

    A crop's window is rounded up to the network's divisor (and to at least 3/4 of a patch), so a 49-voxel crop
    runs in a 64-voxel window; along an axis where the whole image fits in a patch, the window is a patch and the
    crop the whole axis (:func:`crop_window`). The voxels a window lacks are taken from the image around the
    crop, not from constant padding. Growth is split between both sides, and what one side lacks (the image's
    edge) goes to the other.

    Args:
        bbox: native voxel ranges ``((x0, x1), (y0, y1), (z0, z1))`` of the crop.
        affine: (4, 4) native voxel-to-world affine.
        shape: (3,) native image shape.
        orientation: model axis codes, e.g. ``"RAS"``.
        spacing: (3,) model voxel size in mm.
        patch_size: (3,) the release's patch, model axes.
        divisor: the network's total downsampling.
        max_patches: the longest window along an axis, in patches.

    Returns:
        The grown native box and the window (model axes) to run it in.
    """
    from nibabel.affines import voxel_sizes

    to_model = orientation_transform(affine, orientation)
    native_mm = voxel_sizes(affine)
    grown = [list(pair) for pair in bbox]
    window = [0, 0, 0]
    for axis, (model_axis, _) in enumerate(to_model.astype(int)):
        native, model = float(native_mm[axis]), float(spacing[model_axis])
        ratio = native / model
        start, stop = grown[axis]
        size, whole = model_size(stop - start, native, model), model_size(int(shape[axis]), native, model)
        patch = int(patch_size[model_axis])
        target = window[model_axis] = crop_window(size, whole, patch, divisor, max_patches=max_patches)
        if whole <= patch:
            grown[axis] = [0, int(shape[axis])]
            continue
        if target <= size:  # already fills its windows (a long field of view runs in several)
            continue
        extra = int((target - size) / ratio)
        while extra > 0 and model_size(stop - start + extra, native, model) > target:
            extra -= 1
        low = min(start, extra // 2 + max(0, stop + extra - extra // 2 - int(shape[axis])))
        high = min(int(shape[axis]) - stop, extra - low)
        grown[axis] = [start - low, stop + high]
    return three((a, b) for a, b in grown), three(window)


@dataclass(frozen=True)
class WindowSettings(WindowSpec):
    """A :class:`~sct_sitehead.registry.specs.WindowSpec` that plans windows; the defaults are the lesion model's
    (``Options``' defaults), the cord localiser's come from its release (:meth:`from_spec`)."""

    @classmethod
    def from_spec(cls, spec: WindowSpec) -> WindowSettings:
        """These settings for a release's window spec."""
        return cls(**spec.as_dict())

    def plan(
        self, shape: Sequence[int], patch_size: Sequence[int], divisor: int, *, crop_window: Sequence[int] | None = None
    ) -> tuple[tuple[int, int, int], int]:
        """The window and the windows per network call for a model grid of ``shape``.

        Args:
            shape: (3,) the model grid's shape.
            patch_size: (3,) the release's patch.
            divisor: the network's total downsampling.
            crop_window: (3,) a crop's window from :func:`fill_window`, or None for a whole image.
        """
        patch = three(int(p) for p in patch_size)
        if crop_window is not None:
            window = three(int(n) for n in crop_window)
            return window, self.batch_size if window == patch else 1
        if self.fit_whole_image:
            return one_window(tuple(shape), patch, divisor, max_patches=self.max_patches), self.batch_size
        return patch, self.batch_size

    def edge_beyond(self, orientation: str, patch_size: Sequence[int]) -> tuple[int, int, int] | None:
        """``sliding_window``'s ``edge_beyond`` for these settings on a model grid of ``orientation``."""
        return edge_beyond_for(orientation, patch_size) if self.repeat_edges else None
