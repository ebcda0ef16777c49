"""The memory budget of a run: every large array it will hold, counted from the header and the release before
any of them is allocated, and the run refused when they pass the limit.

A header is cheap to write and expensive to obey: 128x128x64 voxels of 40 mm (a 0.9 MB file) resample to 67 G
voxels on a 1 mm grid, and a legal 1024x1024x476 header over 954 KB of compressed zeros asks for 2 GB before a
voxel is looked at. So the run is checked twice, each time before the arrays it counts exist:

1. :meth:`Budget.check_native`, from the header as written (before the voxels are read): the file's voxels, their
   float32 copy, the outputs on the input's grid (a mask per label, a soft map, the QC image).
2. :meth:`Budget.check_grid`, in :func:`~sct_sitehead.deploy.prediction.predict_on_grid` before each network's
   model grid is made (the cord localiser's, then the lesion model's on the crop around the cord): the grid, the
   copies normalisation makes, the windows' padding, batch and weights, the network's working memory, and the
   probabilities of every output channel.

Each check adds the arrays alive at its worst moment to what is held throughout (the file's voxels and, before the
lesion model's grid exists, their float32 copy) and to :data:`RUNTIME_BYTES`; past the limit (default
:data:`DEFAULT_MAX_MEMORY`, else ``-max-memory`` or ``SCT_SITEHEAD_MAX_MEMORY``) the run stops with one line that
gives the numbers: an :class:`~sct_sitehead.errors.InputImageError`, exit 3. The figures are upper estimates
(measured on sub-ms01: planned 0.36 GB, peak 0.26 GB; ``-no-crop`` 0.61 / 0.53 GB; ``-tta`` 0.54 / 0.36 GB); they
bound the peak resident memory, not the address space.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from sct_sitehead import env
from sct_sitehead.deploy.spatial import model_size, orientation_transform
from sct_sitehead.deploy.windows import WindowSettings
from sct_sitehead.errors import InputImageError, UsageError
from sct_sitehead.registry.specs import InputSpec

#: Default limit of a run's memory, in bytes: the bound the issue "Hardening" sets for any input under 10 MB.
DEFAULT_MAX_MEMORY = 2_000_000_000
#: Python, numpy, scipy, nibabel, ONNX Runtime and the loaded sessions of a release (sub-ms01's run: 0.26 GB peak,
#: of which 0.11 GB the network's working memory and 0.01 GB arrays).
RUNTIME_BYTES = 160_000_000
#: ONNX Runtime's working memory per voxel of the windows one call runs, lesion@1.1.3 on CPU (measured: mirroring
#: adds one window's worth, +270 bytes per voxel on a whole image, +240 on sub-ms01's crop); rounded up.
NETWORK_BYTES_PER_VOXEL = 300
#: Bytes per coarse-grid voxel while the cord localiser's mask becomes a lesion region and a box: scipy's distance
#: transform (int32 feature transform, indices and differences, float64 squares: about 60), the kept sample (4),
#: the connected pieces' labels (4) and a few masks; rounded up.
LOCALISER_BYTES_PER_VOXEL = 84
#: What :func:`~sct_sitehead.deploy.prediction.predict_on_grid` calls before it makes a model grid: (native box
#: shape, native affine, the model grid, the window settings, a crop's window or None).
GridCheck = Callable[[Sequence[int], np.ndarray, InputSpec, WindowSettings, Sequence[int] | None], None]
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30}
_UNITS["ti"] = 2**40
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kmgt]i?)?b?\s*", re.IGNORECASE)


def parse_size(text: str, name: str = "-max-memory") -> int:
    """``"8G"``, ``"8GB"``, ``"512M"``, ``"1.5GiB"`` or a number of bytes -> bytes (K, M, G, T: powers of 1000;
    KiB, MiB, GiB, TiB: of 1024).

    Raises:
        UsageError: anything else, or zero.
    """
    match = _SIZE.fullmatch(str(text))
    if match is None or float(match.group(1)) <= 0:
        raise UsageError(f"{name} must be a size such as 4G, 1500M or 2GiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def resolve_limit(configured: int | None) -> int:
    """The memory limit: the option's value, else ``SCT_SITEHEAD_MAX_MEMORY``, else :data:`DEFAULT_MAX_MEMORY`."""
    if configured is not None:
        return int(configured)
    text = env.max_memory()
    return parse_size(text, env.MAX_MEMORY) if text else DEFAULT_MAX_MEMORY


def gigabytes(size: float) -> str:
    """``1234567890`` -> ``"1.23 GB"``, ``2100000`` -> ``"2.1 MB"`` (powers of 1000, as the limits are given)."""
    if size >= 1e15:
        return f"{size:.3g} bytes"
    return f"{size / 1e9:.3g} GB" if size >= 1e9 else f"{size / 1e6:.3g} MB"


def model_shape(shape: Sequence[int], affine: np.ndarray, spec: InputSpec) -> tuple[int, int, int]:
    """The model grid's shape for a native box of ``shape`` voxels, as :func:`~sct_sitehead.deploy.spatial.
    to_model_grid` will make it, without making it."""
    zooms = np.sqrt(np.sum(np.asarray(affine, dtype=np.float64)[:3, :3] ** 2, axis=0))
    out = [1, 1, 1]
    for axis, (target, _) in enumerate(orientation_transform(affine, spec.orientation).astype(int)):
        out[target] = model_size(int(shape[axis]), float(zooms[axis]), float(spec.spacing[target]))
    return out[0], out[1], out[2]


@dataclass(frozen=True)
class Network:
    """What a network adds per model-grid voxel: its outputs' channels, and what it needs per window voxel.

    Attributes:
        channels: output channels of all its heads together (probabilities kept on the model grid).
        mirror: each batch also runs mirrored (``-tta``): twice the windows per call.
        extra_per_voxel: bytes per model-grid voxel its caller needs afterwards (the localiser's distance map).
        keeps_image: the image's float32 copy stays alive while it runs (the localiser's run; the lesion model's
            grid replaces it).
    """

    channels: int
    mirror: bool = False
    extra_per_voxel: int = 0
    keeps_image: bool = False


@dataclass
class Budget:
    """The memory plan of one image's run.

    Attributes:
        limit: bytes the run may plan to use.
        source: the image, for messages.
        native: (X, Y, Z) the image's shape, once :meth:`check_native` has seen its header.
        itemsize: bytes per voxel in the file.
        planned: the bytes planned at each check's worst moment, by its name (for logs and tests).
    """

    limit: int
    source: str
    native: tuple[int, int, int] = (0, 0, 0)
    itemsize: int = 0
    planned: dict[str, int] = field(default_factory=dict)

    @property
    def voxels(self) -> int:
        return math.prod(self.native)

    def check_native(
        self, shape: Sequence[int], itemsize: int, *, labels: int, soft: bool = False, qc: bool = False
    ) -> None:
        """From the header: the file's voxels and what the run makes on the input's grid.

        Args:
            shape: the header's shape (its first 3 sizes are used).
            itemsize: bytes per voxel of the file's data type.
            labels: masks written per image (all sites' labels).
            soft: soft maps are written (float32 on the input's grid).
            qc: QC pictures are drawn (the image again as float32, the mask as bool).

        Raises:
            InputImageError: over the limit.
        """
        self.native = (int(shape[0]), int(shape[1]), int(shape[2]))
        self.itemsize = int(itemsize)
        n = self.voxels
        raw = n * self.itemsize
        # Compressed voxels are read into a growing buffer: old and new allocation may both exist for a moment.
        load = {"file voxels": 2 * raw}
        native = {"file voxels": raw, "float32 copy": 4 * n}
        # The writer threads build one full-size array each at a time; a soft map is float32.
        per_thread = 4 if soft else 1
        outputs = {"file voxels": raw, f"{labels} mask(s)": labels * n, "masks being written": 2 * per_thread * n}
        if qc:
            outputs["QC image"] = 5 * n
        self.refuse_over(
            {"reading the file": load, "holding the float32 image": native, "writing the outputs": outputs}, grid=None
        )

    def check_grid(
        self,
        box: Sequence[int],
        affine: np.ndarray,
        spec: InputSpec,
        settings: WindowSettings,
        network: Network,
        *,
        crop_window: Sequence[int] | None = None,
    ) -> None:
        """Before a network's model grid is made: the grid and everything the run on it holds.

        Args:
            box: (3,) native voxels the grid covers (the crop, or the whole image).
            affine: (4, 4) native affine.
            spec: the network's model grid.
            settings: how its windows run.
            network: its outputs and working memory.
            crop_window: (3,) a crop's window (:func:`~sct_sitehead.deploy.windows.fill_window`), if a crop.

        Raises:
            InputImageError: over the limit, or a model grid smaller than 2 voxels along 2 or more axes (voxel
                sizes far too small: metres written as millimetres).
        """
        shape = model_shape(box, affine, spec)
        self.refuse_degenerate(shape, affine, spec)
        m = math.prod(shape)
        patch = tuple(int(p) for p in spec.patch_size)
        window, batch = settings.plan(shape, patch, spec.divisor, crop_window=crop_window)
        padded = math.prod(max(n, w) for n, w in zip(shape, window))
        window_voxels = math.prod(window) * batch * (2 if network.mirror else 1)
        held = {"file voxels": self.voxels * self.itemsize}
        image = {"float32 image": 4 * self.voxels} if network.keeps_image else {}
        grid = {"float32 image": 4 * self.voxels, "model grid": 4 * m}
        normalise = {**image, "model grid, sorted copy and normalised": 12 * m}
        run = {
            **image,
            "normalised and padded grid": 4 * (m + padded),
            f"{network.channels} output channel(s) and weights": 4 * padded * (network.channels + 1),
            f"windows of {window_voxels} voxels per call": (4 + NETWORK_BYTES_PER_VOXEL) * window_voxels,
        }
        after = {
            **image,
            "probabilities": 4 * m * network.channels,
            "distance map": network.extra_per_voxel * m,
        }
        phases = {
            "resampling": grid,
            "normalising": normalise,
            "running the network": run,
            "holding the probabilities": after,
        }
        self.refuse_over({name: {**held, **arrays} for name, arrays in phases.items()}, grid=(shape, spec))

    def for_network(self, network: Network) -> GridCheck:
        """:meth:`check_grid` for one network, as :func:`~sct_sitehead.deploy.prediction.predict_on_grid` calls it."""

        def check(
            box: Sequence[int],
            affine: np.ndarray,
            spec: InputSpec,
            settings: WindowSettings,
            crop_window: Sequence[int] | None,
        ) -> None:
            self.check_grid(box, affine, spec, settings, network, crop_window=crop_window)

        return check

    def refuse_over(
        self, phases: dict[str, dict[str, int]], grid: tuple[tuple[int, int, int], InputSpec] | None
    ) -> None:
        """Raise InputImageError when the largest phase, with the runtime, passes the limit."""
        name, arrays = max(phases.items(), key=lambda item: sum(item[1].values()))
        total = RUNTIME_BYTES + sum(arrays.values())
        self.planned[name] = total
        if total <= self.limit:
            return
        shown = "x".join(map(str, self.native))
        where = f"{shown} voxels in the file"
        if grid is not None:
            shape, spec = grid
            spacing = "x".join(f"{s:g}" for s in spec.spacing)
            where += f", {'x'.join(map(str, shape))} on the {spacing} mm model grid"
        parts = ", ".join(f"{what} {gigabytes(size)}" for what, size in arrays.items() if size)
        raise InputImageError(
            f"{self.source}: this run would need about {gigabytes(total)} while {name} ({where}: {parts}, runtime "
            f"{gigabytes(RUNTIME_BYTES)}), over the memory limit of {gigabytes(self.limit)}; check the image's "
            "voxel sizes and dimensions in its header, crop it, or raise the limit with -max-memory (or "
            "SCT_SITEHEAD_MAX_MEMORY)"
        )

    def refuse_degenerate(self, shape: tuple[int, int, int], affine: np.ndarray, spec: InputSpec) -> None:
        """A field of view under 2 model voxels along 2 or more axes is no image to segment."""
        if sum(n < 2 for n in shape) < 2:
            return
        zooms = np.sqrt(np.sum(np.asarray(affine, dtype=np.float64)[:3, :3] ** 2, axis=0))
        sizes = "x".join(f"{z:.3g}" for z in zooms)
        field_mm = "x".join(f"{n * z:.3g}" for n, z in zip(self.native, zooms))
        raise InputImageError(
            f"{self.source}: its field of view is {field_mm} mm (voxels of {sizes} mm), under 2 voxels of the "
            f"{'x'.join(f'{s:g}' for s in spec.spacing)} mm model grid along 2 or more axes; the voxel sizes in the "
            "header are probably in another unit than mm (metres?): fix pixdim and the qform/sform"
        )
