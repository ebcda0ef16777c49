"""ONNX Runtime sessions (backbone once, one head per site) and sliding-window inference.

:func:`sliding_window` takes any callable as the network, so the ONNX model, a torch module wrapped in a
function, or a numpy function in a test share one code path. :class:`SiteHeadModel` is that callable for a
release: the backbone runs once per batch of patches and every head reads its features.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations, product
from pathlib import Path
from typing import Any

import numpy as np

from sct_sitehead.errors import InferenceError, InputImageError, RegistryError, UsageError

logger = logging.getLogger(__name__)

#: Smallest Gaussian weight: keeps every voxel's weight sum well above float32 underflow at patch corners.
MIN_WEIGHT = 1e-4
#: Name of the backbone's single input and of every head's output (DESIGN.md, "Model contract").
IMAGE_INPUT = "image"
HEAD_OUTPUT = "probabilities"

Predict = Callable[[np.ndarray], Mapping[str, np.ndarray]]
Provider = str | tuple[str, dict[str, str]]


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
    return np.maximum(weights, MIN_WEIGHT).astype(np.float32)


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
    return [tuple(corner) for corner in product(*per_axis)]  # type: ignore[misc]


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
    return tuple(0 if code in "SI" else int(size) for code, size in zip(orientation.upper(), patch_size))


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
        return {key: np.ascontiguousarray(output[0][(slice(None), *inner)]) for key, output in outputs.items()}
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
                sums[key][(slice(None), *window)] += weighted
        for window in windows:
            weight_sum[window] += weights
    del padded, batch
    result = {}
    for key in list(sums):
        total = sums.pop(key)
        total /= weight_sum
        cropped = total[(slice(None), *inner)]
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
    return ints  # type: ignore[return-value]


def normalize(volume: np.ndarray, spec: Mapping[str, Any] | Any, reference: np.ndarray | None = None) -> np.ndarray:
    """Intensity normalisation of DESIGN.md, on the model grid, in float32.

    ``zscore``: clip to the image's ``clip_percentiles`` (default: no clipping), then ``(x - mean) / std`` of the
    clipped image. Means and variances are accumulated in float64 without a float64 copy of the volume.

    Args:
        volume: (X, Y, Z) array.
        spec: ``{"method": "zscore", "clip_percentiles": [low, high]}`` (a mapping, or an object with those
            attributes).
        reference: where the percentiles, mean and standard deviation are taken (default: ``volume``): for a
            crop, a sample of the whole image (the statistics the model was trained with), not the crop's own.

    Returns:
        (X, Y, Z) float32 array, a new one.

    Raises:
        RegistryError: unknown method or malformed percentiles.
        InputImageError: the clipped image is constant (nothing to normalise).
    """
    method = _field(spec, "method", None)
    if method != "zscore":
        raise RegistryError(
            f"normalization method {method!r} is not supported by this version (supported: 'zscore'); "
            "upgrade sct_sitehead or choose a release that uses zscore"
        )
    clip = _field(spec, "clip_percentiles", None)
    low_q, high_q = (0.0, 100.0) if clip is None else _percentile_pair(clip)
    volume = np.asarray(volume, dtype=np.float32)
    source = volume if reference is None else np.asarray(reference, dtype=np.float32)
    if volume.size == 0 or source.size == 0:
        raise InputImageError("cannot normalise an empty volume; check the input image")
    low, high = (float(v) for v in np.percentile(source, [low_q, high_q]))
    if not high > low:
        raise InputImageError(
            f"image intensities between percentiles {low_q:g} and {high_q:g} are all {low:g}: nothing to segment; "
            "check that the right image was given"
        )
    out = np.clip(volume, low, high, dtype=np.float32)
    if reference is None:
        _, std = _centre(out)
    else:
        mean, std = _centre(np.clip(source, low, high, dtype=np.float32))
        out -= np.float32(mean)
    out *= np.float32(1.0 / std)
    return out


def _centre(values: np.ndarray) -> tuple[float, float]:
    """Subtract its mean from float32 ``values`` in place; the mean and the standard deviation, in float64."""
    mean = values.sum(dtype=np.float64) / values.size
    values -= np.float32(mean)
    return mean, math.sqrt(float(np.square(values).sum(dtype=np.float64)) / values.size)


def _field(spec: Mapping[str, Any] | Any, name: str, default: Any) -> Any:
    if isinstance(spec, Mapping):
        return spec.get(name, default)
    return getattr(spec, name, default)


def _percentile_pair(clip: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in clip)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"clip_percentiles must be two numbers [low, high], got {clip!r}") from exc
    if not 0.0 <= low < high <= 100.0:
        raise RegistryError(f"clip_percentiles must satisfy 0 <= low < high <= 100, got {clip!r}")
    return low, high


def select_providers(device: str) -> list[Provider]:
    """ONNX Runtime execution providers for a device name, CPU always last as the fallback.

    Args:
        device: ``"auto"`` (CUDA when onnxruntime has it, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns:
        Provider names, the CUDA one as ``("CUDAExecutionProvider", {"device_id": "N"})``.

    Raises:
        UsageError: unknown device name.
        InferenceError: CUDA asked for but this onnxruntime has no CUDA provider.
    """
    import onnxruntime as ort

    name = str(device).strip().lower()
    cpu = "CPUExecutionProvider"
    if name == "cpu":
        return [cpu]
    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider"
    if name == "auto":
        return [(cuda, {"device_id": "0"}), cpu] if cuda in available else [cpu]
    device_id = _cuda_index(name, device)
    if cuda not in available:
        raise InferenceError(
            f"device {device!r} asked for, but this onnxruntime has no CUDA provider "
            f"(available: {', '.join(available)}); install the GPU build: pip install 'sct_sitehead[gpu]' "
            "(it replaces onnxruntime by onnxruntime-gpu), or use -device cpu"
        )
    return [(cuda, {"device_id": str(device_id)}), cpu]


def _cuda_index(name: str, device: str) -> int:
    if name == "cuda":
        return 0
    prefix, _, index = name.partition(":")
    if prefix == "cuda" and index.isdigit():
        return int(index)
    raise UsageError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


class SiteHeadModel:
    """A release's backbone and the requested heads as ONNX Runtime sessions, created once.

    Calling the model on a batch runs the backbone once and every head on the backbone features it names, the
    features staying on the device (I/O binding) between the two.
    """

    def __init__(
        self,
        backbone: Path,
        heads: Mapping[str, Path],
        *,
        device: str = "auto",
        threads: int | None = None,
        optimized_dir: Path | None = None,
    ) -> None:
        """Start ONNX Runtime.

        Args:
            backbone: ``backbone.onnx``.
            heads: ``{site: heads/<site>.onnx}``.
            device: see :func:`select_providers`.
            threads: intra-op threads per session (None: ONNX Runtime's default, one per physical core).
            optimized_dir: folder where the optimised graphs are saved and reused (the cache's ``ort/``).

        Raises:
            RegistryError: the models do not follow the contract (input/output names).
            InferenceError: ONNX Runtime cannot load a model, or CUDA was asked for and is not usable.
        """
        if not heads:
            raise UsageError("SiteHeadModel needs at least one head")
        if threads is not None and int(threads) < 1:
            raise UsageError(f"threads must be >= 1, got {threads!r}")
        self._providers = select_providers(device)
        self._threads = threads
        self._optimized_dir = Path(optimized_dir) if optimized_dir is not None else None
        self.backbone_path = Path(backbone)
        self.head_paths = {site: Path(path) for site, path in heads.items()}
        self._backbone = self._open(self.backbone_path)
        # On CPU, several heads run side by side, each on its share of the threads: a head is a few passes over
        # full-resolution tensors, which one thread does almost as fast as two. Measured (2 cores, 4 heads of
        # lesion@1.1.0 on a 48x64x192 window): 190-197 ms one after the other on 2 threads, 146-160 ms two at a
        # time on 1 thread each.
        cpu = self._backbone.get_providers()[0] == "CPUExecutionProvider"
        total = int(threads) if threads else (os.cpu_count() or 1)
        self._head_workers = min(len(heads), total) if cpu else 1
        head_threads = max(1, total // self._head_workers) if self._head_workers > 1 else threads
        names = [node.name for node in self._backbone.get_inputs()]
        if names != [IMAGE_INPUT]:
            raise RegistryError(
                f"{self.backbone_path.name}: the backbone must have one input named {IMAGE_INPUT!r}, has {names}; "
                "re-export the model following DESIGN.md"
            )
        self.backbone_outputs = [node.name for node in self._backbone.get_outputs()]
        self._heads: dict[str, Any] = {}
        self._executor: ThreadPoolExecutor | None = None
        self.head_inputs: dict[str, list[str]] = {}
        for site, path in self.head_paths.items():
            session = self._open(path, head_threads)
            inputs = [node.name for node in session.get_inputs()]
            unknown = [name for name in inputs if name not in self.backbone_outputs]
            if unknown or not inputs:
                raise RegistryError(
                    f"head {site!r} ({path.name}) reads {inputs}, but the backbone only outputs "
                    f"{self.backbone_outputs}; this head belongs to another backbone (check the release)"
                )
            outputs = [node.name for node in session.get_outputs()]
            if HEAD_OUTPUT not in outputs:
                raise RegistryError(
                    f"head {site!r} ({path.name}) has outputs {outputs}, expected one named {HEAD_OUTPUT!r}"
                )
            self._heads[site] = session
            self.head_inputs[site] = inputs
        needed = {name for inputs in self.head_inputs.values() for name in inputs}
        self._features = [name for name in self.backbone_outputs if name in needed]
        self._device_type, self._device_id = self._output_device()
        if str(device).lower().startswith("cuda") and self.provider != "CUDAExecutionProvider":
            raise InferenceError(
                f"device {device!r} asked for, but ONNX Runtime fell back to {self.provider} (CUDA or cuDNN "
                "libraries missing or no GPU visible); check nvidia-smi and the onnxruntime-gpu install, or use "
                "-device cpu"
            )

    @property
    def provider(self) -> str:
        """The execution provider that actually runs the backbone, e.g. ``"CPUExecutionProvider"``."""
        return str(self._backbone.get_providers()[0])

    @property
    def sites(self) -> list[str]:
        return list(self._heads)

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Probabilities of every head for a batch of patches.

        Args:
            batch: (N, 1, x, y, z) float32.

        Returns:
            ``{site: (N, K, x, y, z) float32}``.

        Raises:
            InferenceError: ONNX Runtime failed (shape not divisible by the network's downsampling, out of memory).
        """
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 5 or batch.shape[1] != 1:
            raise InferenceError(f"the backbone takes (N, 1, X, Y, Z) float32, got shape {batch.shape}")
        try:
            binding = self._backbone.io_binding()
            binding.bind_cpu_input(IMAGE_INPUT, batch)
            for name in self._features:
                # Features stay where the backbone computed them (GPU memory on CUDA): heads read them there.
                binding.bind_output(name, self._device_type, self._device_id)
            self._backbone.run_with_iobinding(binding)
            features = dict(zip(self._features, binding.get_outputs()))

            def run_head(site: str) -> np.ndarray:
                session = self._heads[site]
                head_binding = session.io_binding()
                for name in self.head_inputs[site]:
                    head_binding.bind_ortvalue_input(name, features[name])
                head_binding.bind_output(HEAD_OUTPUT, "cpu")
                session.run_with_iobinding(head_binding)
                return head_binding.copy_outputs_to_cpu()[0]

            if self._head_workers > 1:
                results = dict(zip(self._heads, self._pool().map(run_head, self._heads)))
            else:
                results = {site: run_head(site) for site in self._heads}
        except Exception as exc:
            raise InferenceError(
                f"ONNX Runtime failed on a batch of shape {batch.shape} ({self.provider}): {_one_line(exc)}; "
                "each spatial size must be a multiple of the release's divisor; on out-of-memory lower the batch "
                "size or use -device cpu"
            ) from exc
        return results

    def _pool(self) -> ThreadPoolExecutor:
        """Threads running heads side by side (ONNX Runtime releases the GIL while it runs), made on first use."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._head_workers, thread_name_prefix="head")
        return self._executor

    def _output_device(self) -> tuple[str, int]:
        if self.provider == "CUDAExecutionProvider":
            options = self._backbone.get_provider_options().get("CUDAExecutionProvider", {})
            return "cuda", int(options.get("device_id", 0))
        return "cpu", 0

    def _options(self, level: Any = None, threads: int | None = None) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or self._threads or 0)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        # Measured on 2 CPU cores, a 5-conv 3D U-Net stub (16/32 channels) on batches of 4x64^3: peak RSS 343 MiB
        # with the CPU arena, 295 MiB without, same speed (2.0-2.2 s): tensors here are few and large, so the
        # arena only rounds them up and keeps them after the run.
        options.enable_cpu_mem_arena = False
        # Backbone and heads have a thread pool each and run one after the other; a pool spinning after its run
        # steals cores from the next. Measured (backbone + 3 heads, 2 threads, 2 cores): 0.31 s -> 0.245 s per
        # batch and 20 % less CPU time with spinning off.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if level is not None:
            options.graph_optimization_level = level
        return options

    def _open(self, path: Path, threads: int | None = None) -> Any:
        """A session for ``path`` with ``threads`` intra-op threads (None: the model's ``threads``)."""
        import onnxruntime as ort

        if not path.is_file():
            raise RegistryError(f"model file {path} does not exist; fetch the release again (sct_sitehead models)")
        if self._optimized_dir is not None:
            session = self._open_optimized(path, threads)
            if session is not None:
                return session
        try:
            options = self._options(threads=threads)
            return ort.InferenceSession(str(path), sess_options=options, providers=self._providers)
        except Exception as exc:
            raise InferenceError(
                f"ONNX Runtime cannot load {path}: {_one_line(exc)}; the file may be corrupt (verify the cache: "
                "sct_sitehead cache verify) or need a newer onnxruntime"
            ) from exc

    def _open_optimized(self, path: Path, threads: int | None = None) -> Any | None:
        """Session from the saved optimised graph, saving it first if needed; None when that is not possible.

        The graph is saved at the "extended" level, which is provider-specific but not CPU-model-specific (the
        "all" level adds layout changes for this very CPU), and loaded again at the "all" level.
        """
        import onnxruntime as ort

        from sct_sitehead.registry.cache import sha256_file

        first = self._providers[0]
        tag = first if isinstance(first, str) else f"{first[0]}{first[1].get('device_id', '')}"
        name = f"{sha256_file(path)[:32]}-ort{ort.__version__}-{tag}.onnx"
        saved = self._optimized_dir / name  # type: ignore[operator]
        if not saved.is_file():
            self._save_optimized(path, saved)
        if not saved.is_file():
            return None
        try:
            options = self._options(threads=threads)
            return ort.InferenceSession(str(saved), sess_options=options, providers=self._providers)
        except Exception as exc:
            logger.warning("ignoring optimised graph %s (%s); using %s", saved, _one_line(exc), path.name)
            saved.unlink(missing_ok=True)
            return None

    def _save_optimized(self, path: Path, saved: Path) -> None:
        import onnxruntime as ort

        tmp = saved.with_name(f".{saved.stem}.{secrets.token_hex(6)}.tmp.onnx")
        try:
            saved.parent.mkdir(parents=True, exist_ok=True)
            options = self._options(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
            options.optimized_model_filepath = str(tmp)
            ort.InferenceSession(str(path), sess_options=options, providers=self._providers)
            os.replace(tmp, saved)
            logger.debug("saved optimised graph of %s to %s", path.name, saved)
        except Exception as exc:
            logger.warning("cannot save the optimised graph of %s to %s: %s", path.name, saved.parent, _one_line(exc))
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
