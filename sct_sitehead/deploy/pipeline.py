"""One input image through the deploy path: native grid -> model grid -> sliding window -> native grid -> files.

The command-line tool and the benchmark both call :func:`Segmenter.segment`; the model is loaded once by
:func:`Segmenter.open` and reused for every input.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sct_sitehead import __version__
from sct_sitehead.errors import OutputError, UsageError

if TYPE_CHECKING:
    from sct_sitehead.deploy.spatial import ModelGrid
    from sct_sitehead.registry.cache import Cache
    from sct_sitehead.registry.index import HeadSpec, Release

logger = logging.getLogger(__name__)

LESION = "lesion"
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Options:
    """How to run: thresholds, extra outputs, device."""

    threshold: float | None = None
    min_lesion_mm3: float | None = None
    soft: bool = False
    device: str = "auto"
    threads: int | None = None
    overlap: float = 0.5
    batch_size: int = 4
    qc_dir: Path | None = None
    crop: bool = True
    #: Also run the lesion model on the left-right mirrored image and average (nnU-Net's test-time mirroring).
    mirror: bool = False


@dataclass
class SiteResult:
    """What was written for one site of one input."""

    site: str
    mask: Path
    files: list[Path]
    sidecar: Path
    lesion_count: int
    lesion_volume_mm3: float


@dataclass
class InputResult:
    """What was written for one input image."""

    image: Path
    sites: list[SiteResult] = field(default_factory=list)
    seconds: float = 0.0


def split_nifti_name(path: Path) -> tuple[str, str]:
    """``sub_T2w.nii.gz`` -> (``sub_T2w``, ``.nii.gz``)."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return path.stem, ".nii.gz"


def plan_outputs(
    inputs: list[Path], sites: list[str], output: Path | None, ofolder: Path | None
) -> dict[tuple[Path, str], Path]:
    """Main lesion-mask path for every (input, site) pair, following SCT naming.

    ``-o`` is only valid for one input and one site; ``-ofolder`` puts every output in one folder; by default
    outputs go next to their input as ``<stem>_lesionseg.nii.gz`` (``_<site>`` added for several sites).
    """
    if output is not None and ofolder is not None:
        raise UsageError("-o and -ofolder cannot be used together; pick one")
    if output is not None and (len(inputs) > 1 or len(sites) > 1):
        raise UsageError(
            f"-o names one file but {len(inputs)} input(s) and {len(sites)} site(s) were given; use -ofolder DIR"
        )
    plan: dict[tuple[Path, str], Path] = {}
    for image in inputs:
        stem, _ = split_nifti_name(image)
        for site in sites:
            if output is not None:
                path = output if output.name.endswith(NIFTI_SUFFIXES) else output.with_name(output.name + ".nii.gz")
            else:
                name = f"{stem}_lesionseg" + (f"_{site}" if len(sites) > 1 else "") + ".nii.gz"
                path = (ofolder if ofolder is not None else image.parent) / name
            if path in plan.values():
                raise UsageError(f"two inputs would both write {path}; use distinct file names or -ofolder per run")
            plan[(image, site)] = path
    return plan


def label_path(mask_path: Path, label: str) -> Path:
    """Where a head's non-lesion label goes: ``x_lesionseg.nii.gz`` -> ``x_cordseg.nii.gz``."""
    stem, suffix = split_nifti_name(mask_path)
    if "_lesionseg" in stem:
        return mask_path.with_name(stem.replace("_lesionseg", f"_{label}seg", 1) + suffix)
    return mask_path.with_name(f"{stem}_{label}{suffix}")


def sidecar_path(mask_path: Path) -> Path:
    stem, _ = split_nifti_name(mask_path)
    return mask_path.with_name(stem + ".json")


def soft_path(mask_path: Path) -> Path:
    stem, suffix = split_nifti_name(mask_path)
    return mask_path.with_name(stem + "_soft" + suffix)


def make_folder(folder: Path) -> None:
    """Create an output folder (and its parents) if needed.

    Raises:
        OutputError: it cannot be created: it or a parent is a regular file, no permission, read-only file system.
    """
    for ancestor in (folder, *folder.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise OutputError(
                    f"cannot create the output folder {folder}: {ancestor} is a file, not a folder; "
                    "pick another path with -o/-ofolder/-qc"
                )
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create the output folder {folder}: {exc.strerror or exc}; check that the path is a writable "
            "folder, or pick another with -o/-ofolder"
        ) from None


def write_text_atomic(text: str, path: Path) -> None:
    """Write text through a temp file and a rename (:func:`outputs.write_atomic`): never half a file."""
    from sct_sitehead.deploy.outputs import write_atomic

    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(data: dict, path: Path) -> None:
    write_text_atomic(json.dumps(data, indent=2) + "\n", path)


#: Threads bringing an input's labels back to its grid and writing them: for a whole spine (72 M voxels) each label
#: costs about 0.1 s of resampling and 0.1 s of compression, and a run for 4 sites writes up to 10 of them.
WRITE_THREADS = 2


def grid_window(grid: ModelGrid) -> tuple[slice, slice, slice]:
    """The native voxels a model grid covers, as slices."""
    return tuple(slice(a, b) for a, b in grid.bbox)  # type: ignore[return-value]


def _write_label(
    channel: np.ndarray,
    grid: ModelGrid,
    threshold: float,
    image,
    path: Path,
    soft: Path | None = None,
    min_lesion_mm3: float = 0.0,
) -> np.ndarray:
    """One label's model-grid probabilities back on the input grid, thresholded into a uint8 mask and written
    (with the probabilities themselves at ``soft``, if given). With ``min_lesion_mm3``, the mask's smaller
    connected pieces are dropped (lesions; the soft map keeps them).

    Returns:
        The (x, y, z) bool mask on the native window (``grid.bbox``).
    """
    from sct_sitehead.deploy.outputs import save_like
    from sct_sitehead.deploy.spatial import from_model_grid, mask_from_model_grid

    window = grid_window(grid)
    if soft is None:
        # Only around the voxels at or above the threshold: the same mask, a fraction of the resampling.
        values, inside = None, mask_from_model_grid(channel, grid, threshold)
    else:
        values = from_model_grid(channel, grid, order=1, window_only=True)
        inside = values >= threshold
    # Fortran order is NIfTI's: nibabel then writes the array as it is, without a transposed copy (2x faster).
    mask = np.zeros(image.shape[:3], dtype=np.uint8, order="F")
    if min_lesion_mm3 > 0:
        from nibabel.affines import voxel_sizes

        from sct_sitehead.deploy.lesions import drop_small_lesions

        inside = drop_small_lesions(inside, voxel_sizes(image.affine), min_lesion_mm3)
    mask[window] = inside
    save_like(mask, image, path, dtype=np.uint8)
    del mask
    if soft is not None:
        full = np.zeros(image.shape[:3], dtype=np.float32, order="F")
        full[window] = values
        save_like(full, image, soft, dtype=np.float32)
    return inside


class Segmenter:
    """A release's backbone and the requested site heads, loaded once, applied to many images."""

    def __init__(
        self, release: Release, sites: list[str], paths: dict[str, Path], model, options: Options, localiser=None
    ):
        self.release = release
        self.sites = sites
        self.paths = paths
        self.model = model
        self.options = options
        #: What the lesion model's sliding window calls: the model, or with ``Options.mirror`` the model averaged
        #: with itself on left-right mirrored patches.
        self.network = model
        if options.mirror:
            from sct_sitehead.deploy.inference import left_right_axis, mirrored

            self.network = mirrored(model, [left_right_axis(release.input.orientation)])
        self.localiser = localiser
        self.heads: dict[str, HeadSpec] = {site: release.head(site) for site in sites}
        #: What the localiser found on the last image (None: not run or no cord): for the sidecar.
        self.last_crop: dict | None = None

    @classmethod
    def open(
        cls,
        release: Release,
        sites: list[str],
        cache: Cache,
        options: Options,
        *,
        offline: bool,
        progress: bool,
        allow_http: bool = False,
    ) -> Segmenter:
        """Fetch (or find in the cache) the backbone and the heads, then start ONNX Runtime once.

        Raises:
            UnknownModelError: a site is not in the release.
            DownloadError, IntegrityError, OfflineError: an asset cannot be had.
        """
        from sct_sitehead.deploy.inference import SiteHeadModel

        heads = {site: release.head(site) for site in sites}
        fetch = dict(offline=offline, progress=progress, allow_http=allow_http)
        paths = {"backbone": cache.fetch(release.backbone, **fetch)}
        for site, head in heads.items():
            paths[site] = cache.fetch(head.asset, **fetch)
        model = SiteHeadModel(
            paths["backbone"],
            {site: paths[site] for site in sites},
            device=options.device,
            threads=options.threads,
            optimized_dir=cache.ort_dir(),
        )
        localiser = None
        if release.localiser is not None and options.crop:
            paths["localiser backbone"] = cache.fetch(release.localiser.backbone, **fetch)
            paths["localiser head"] = cache.fetch(release.localiser.head, **fetch)
            localiser = SiteHeadModel(
                paths["localiser backbone"],
                {"cord": paths["localiser head"]},
                device=options.device,
                threads=options.threads,
                optimized_dir=cache.ort_dir(),
            )
        logger.info(
            "%s@%s on %s, sites: %s%s",
            release.model,
            release.version,
            model.provider,
            ", ".join(sites),
            " (cord localiser on)" if localiser is not None else "",
        )
        return cls(release, sites, paths, model, options, localiser)

    def threshold(self, site: str) -> float:
        return self.options.threshold if self.options.threshold is not None else self.heads[site].threshold

    def min_lesion_mm3(self, site: str) -> float:
        """The smallest lesion ``site``'s masks keep (mm³): ``Options.min_lesion_mm3``, else the release's."""
        chosen = self.options.min_lesion_mm3
        return chosen if chosen is not None else self.heads[site].min_lesion_mm3

    def lesion_mask(self, site: str, probabilities: np.ndarray, zooms) -> np.ndarray:
        """``site``'s lesion probabilities (native grid) -> its lesion mask: threshold, then smallest lesion."""
        from sct_sitehead.deploy.lesions import drop_small_lesions

        return drop_small_lesions(probabilities >= self.threshold(site), zooms, self.min_lesion_mm3(site))

    def predict(self, image_path: Path) -> tuple[object, dict[str, np.ndarray]]:
        """Probabilities on the native grid for every site.

        Returns:
            The input nibabel image and ``{site: (K, X, Y, Z) float32}`` with K the site's label count, in the
            order of the head's ``labels``; 0 outside the box the lesion model ran on.
        """
        import numpy as np

        image, window, probabilities = self.predict_window(image_path)
        native: dict[str, np.ndarray] = {}
        for site, values in probabilities.items():
            full = np.zeros((values.shape[0], *image.shape[:3]), dtype=np.float32)
            full[(slice(None), *window)] = values
            native[site] = full
        return image, native

    def predict_window(self, image_path: Path) -> tuple[object, tuple[slice, ...], dict[str, np.ndarray]]:
        """Probabilities for every site on the native voxels the lesion model ran on.

        With a cord localiser (and ``Options.crop``), the lesion model runs only on the box around the found cord,
        and lesion probabilities away from the cord are set to 0; without one, on the whole image.

        Returns:
            The input nibabel image, the native window (3 slices) and ``{site: (K, x, y, z) float32}`` on it.
        """
        from sct_sitehead.deploy.spatial import from_model_grid

        image, grid, outputs = self.predict_model_grid(image_path)
        native = {
            site: from_model_grid(channels, grid, order=1, window_only=True) for site, channels in outputs.items()
        }
        return image, grid_window(grid), native

    def predict_model_grid(self, image_path: Path) -> tuple[object, ModelGrid, dict[str, np.ndarray]]:
        """What :meth:`predict_window` returns, still on the model grid: the image, the grid and
        ``{site: (K, x', y', z') float32}``, channels in the order of the head's ``labels``.
        """
        from sct_sitehead.deploy.inference import edge_beyond_for, normalize, sliding_window
        from sct_sitehead.deploy.localise import fill_window, localise
        from sct_sitehead.deploy.nifti import image_data, load_image
        from sct_sitehead.deploy.spatial import to_model_grid

        spec = self.release.input
        image = load_image(image_path)
        data = image_data(image)
        found = None
        if self.localiser is not None:
            found = localise(data, image.affine, self.release.localiser, self.localiser)
        bbox, patch = None, tuple(spec.patch_size)
        if found is not None:
            bbox, patch = fill_window(
                found.bbox, image.affine, data.shape, spec.orientation, spec.spacing, spec.patch_size, spec.divisor
            )
        self.last_crop = None if bbox is None else {"Bbox": [list(pair) for pair in bbox]}
        volume, grid = to_model_grid(data, image.affine, spec.orientation, spec.spacing, bbox=bbox)
        del data
        # A crop is normalised with the whole image's statistics, as in training, not with its own.
        volume = normalize(volume, spec.normalization, reference=None if found is None else found.sample)
        probabilities = sliding_window(
            volume,
            self.network,
            patch,
            overlap=self.options.overlap,
            batch_size=self.options.batch_size if patch == tuple(spec.patch_size) else 1,
            divisor=spec.divisor,
            edge_beyond=edge_beyond_for(spec.orientation, spec.patch_size),
        )
        del volume
        far = None if found is None else ~found.near_on(grid)
        outputs: dict[str, np.ndarray] = {}
        for site in self.sites:
            labels = self.heads[site].labels
            channels = probabilities.pop(site)[[label.channel for label in labels]]
            if far is not None:
                for index, label in enumerate(labels):
                    if label.name == LESION:
                        channels[index][far] = 0.0
            outputs[site] = channels
        return image, grid, outputs

    def segment(self, image_path: Path, outputs: dict[str, Path]) -> InputResult:
        """Segment one image and write every site's masks, sidecar and (optionally) soft map and QC picture.

        Each label of each site goes back to the native grid and into its file in one of :data:`WRITE_THREADS`
        threads (scipy's resampling, gzip and the CRC release the GIL); a thread builds its full-size mask just
        before writing it, so memory holds at most that many full-size masks at once.

        Args:
            image_path: input NIfTI.
            outputs: ``{site: main lesion mask path}``.
        """
        import contextvars
        from concurrent.futures import ThreadPoolExecutor

        from sct_sitehead.deploy.lesions import lesion_stats
        from sct_sitehead.deploy.outputs import staged_outputs

        started = time.perf_counter()
        image, grid, outputs_on_grid = self.predict_model_grid(image_path)
        window = grid_window(grid)
        from nibabel.affines import voxel_sizes

        # Volumes follow the affine actually used for the geometry, even where pixdim disagrees with it.
        zooms = tuple(float(z) for z in voxel_sizes(image.affine))
        result = InputResult(image=image_path)
        # Every file of this input is renamed into place together at the end: a failure part-way (full disk,
        # Ctrl-C) leaves the previous outputs as they were and no temp file.
        with staged_outputs(), ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="write") as pool:
            # Every label of every site is one job: back to the native grid, threshold, write. The threads must see
            # this input's stage (a context variable), so each job runs in a copy of the context.
            plans = []
            for site in self.sites:
                threshold = self.threshold(site)
                mask_path = outputs[site]
                make_folder(mask_path.parent)
                written: list[Path] = []
                jobs = []
                for index, label in enumerate(self.heads[site].labels):
                    lesion = label.name == LESION
                    path = mask_path if lesion else label_path(mask_path, label.name)
                    written.append(path)
                    soft = soft_path(mask_path) if lesion and self.options.soft else None
                    if soft is not None:
                        written.append(soft)
                    job = pool.submit(
                        contextvars.copy_context().run,
                        _write_label,
                        outputs_on_grid[site][index],
                        grid,
                        threshold,
                        image,
                        path,
                        soft,
                        self.min_lesion_mm3(site) if lesion else 0.0,
                    )
                    jobs.append((lesion, job))
                plans.append((site, threshold, mask_path, written, jobs))
            del outputs_on_grid
            for site, threshold, mask_path, written, jobs in plans:
                found = [job.result() for lesion, job in jobs if lesion]
                # A head without a lesion label (none in the releases so far) has no lesion to count.
                lesions = found[0] if found else np.zeros([s.stop - s.start for s in window], dtype=bool)
                # Outside the window the mask is 0: counting there would only cost time (a whole spine: 72 M voxels).
                stats = lesion_stats(lesions, zooms)
                seconds = time.perf_counter() - started
                sidecar = sidecar_path(mask_path)
                write_json_atomic(self.sidecar(site, image_path, written, threshold, stats, seconds), sidecar)
                if self.options.qc_dir is not None:
                    written.append(self._qc(image, image_path, lesions, window, site, mask_path))
                result.sites.append(
                    SiteResult(site, mask_path, written, sidecar, int(stats["count"]), float(stats["total_volume_mm3"]))
                )
                for _, job in jobs:
                    job.result()
        result.seconds = time.perf_counter() - started
        return result

    def _qc(self, image, image_path: Path, lesions: np.ndarray, window, site: str, mask_path: Path) -> Path:
        """The QC picture of one site's lesion mask (``lesions``: the window's part of it)."""
        from sct_sitehead.deploy.nifti import image_data
        from sct_sitehead.deploy.qc import write_qc

        stem, _ = split_nifti_name(mask_path)
        make_folder(self.options.qc_dir)
        full = np.zeros(image.shape[:3], dtype=bool)
        full[window] = lesions
        return write_qc(
            image_data(image),
            full,
            image.affine,
            self.options.qc_dir / f"{stem}.png",
            f"{image_path.name} | {self.release.model}@{self.release.version} | site {site}",
        )

    def sidecar(
        self, site: str, image_path: Path, files: list[Path], threshold: float, stats: dict, seconds: float
    ) -> dict:
        """BIDS-derivatives style description of one site's outputs."""
        head = self.heads[site]
        return {
            "GeneratedBy": [{"Name": "sct_sitehead", "Version": __version__, "Description": "sct_deepseg_lesion"}],
            "Source": str(image_path),
            "Model": f"{self.release.model}@{self.release.version}",
            "Site": site,
            "HeadStrategy": head.strategy,
            "BackboneSha256": self.release.backbone.sha256,
            "HeadSha256": head.asset.sha256,
            "Threshold": threshold,
            "MinLesionMm3": self.min_lesion_mm3(site),
            "CordCrop": self.last_crop,
            "TestTimeMirroring": ["left-right"] if self.options.mirror else [],
            "Device": self.model.provider,
            "Seconds": round(seconds, 3),
            "Labels": [{"name": label.name, "value": label.value} for label in head.labels],
            "Files": [path.name for path in files],
            "LesionCount": int(stats["count"]),
            "LesionVolumeTotalMm3": round(float(stats["total_volume_mm3"]), 3),
            "Lesions": [
                {"id": int(lesion["id"]), "volume_mm3": round(float(lesion["volume_mm3"]), 3)}
                for lesion in stats["lesions"]
            ],
        }
