"""One input image through the deploy path: native grid -> model grid -> sliding window -> native grid -> masks.

:class:`Segmenter` holds a release's networks, loaded once by :meth:`Segmenter.open`;
:meth:`Segmenter.segment` gives one image's masks in memory (the Python API's result) and
:meth:`Segmenter.write` writes them as `sct_deepseg_lesion` does. Both command-line tools, the Python API, the
evaluation and the benchmark go through these two.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from nibabel.affines import voxel_sizes

from sct_sitehead.atomic import staged_outputs, write_json_atomic
from sct_sitehead.deploy import localise, nifti, session, windows
from sct_sitehead.deploy.budget import LOCALISER_BYTES_PER_VOXEL, Budget, Network, resolve_limit
from sct_sitehead.deploy.contrasts import ImageContrast, contrast_facts, image_contrast, mismatch_warning
from sct_sitehead.deploy.lesions import lesion_stats
from sct_sitehead.deploy.masks import CORD, LESION, MaskRule, drop_far_lesions, native_mask
from sct_sitehead.deploy.naming import label_path, make_folder, sidecar_path, soft_path
from sct_sitehead.deploy.nifti import image_data
from sct_sitehead.deploy.options import Options
from sct_sitehead.deploy.output_check import planned_files, refuse_input
from sct_sitehead.deploy.outputs import save_like
from sct_sitehead.deploy.prediction import GridPrediction, NativeImage, predict_on_grid
from sct_sitehead.deploy.qc import qc_box, qc_picture_path, subject_of, write_qc
from sct_sitehead.deploy.results import (
    InputResult,
    LabelMask,
    Segmentation,
    SiteResult,
    SiteSegmentation,
    Window,
)
from sct_sitehead.deploy.spatial import Bbox, ModelGrid, from_model_grid, three
from sct_sitehead.deploy.windows import Predict, WindowSettings
from sct_sitehead.errors import RegistryError
from sct_sitehead.registry.cache import Cache
from sct_sitehead.registry.specs import HeadSpec, LabelSpec, Release
from sct_sitehead.version import __version__

if TYPE_CHECKING:
    import nibabel

logger = logging.getLogger(__name__)


#: Threads bringing an input's labels back to its grid, and writing them: for a whole spine (72 M voxels) each label
#: costs about 0.1 s of resampling and 0.1 s of compression, and a run for 4 sites writes up to 10 of them.
WRITE_THREADS = 2


def grid_window(grid: ModelGrid) -> Window:
    """The native voxels a model grid covers, as slices."""
    return three(slice(a, b) for a, b in grid.bbox)


class Segmenter:
    """A release's backbone and the requested site heads, loaded once, applied to many images."""

    def __init__(
        self,
        release: Release,
        sites: list[str],
        paths: dict[str, Path],
        model: session.SiteHeadModel,
        options: Options,
        localiser: session.SiteHeadModel | None = None,
    ) -> None:
        self.release = release
        self.sites = sites
        self.paths = paths
        self.model = model
        self.options = options
        #: What the lesion model's sliding window calls: the model, or with ``Options.mirror`` the model averaged
        #: with itself on left-right mirrored patches.
        self.network: Predict = model
        if options.mirror:
            self.network = windows.mirrored(model, [windows.left_right_axis(release.input.orientation)])
        #: How the lesion model's windows run: the release's patch, ``Options``' overlap and batch size.
        self.windows = WindowSettings(overlap=options.overlap, batch_size=options.batch_size)
        self.localiser = localiser
        self.heads: dict[str, HeadSpec] = {site: release.head(site) for site in sites}

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
        heads = {site: release.head(site) for site in sites}
        fetch = dict(offline=offline, progress=progress, allow_http=allow_http)
        paths = {"backbone": cache.fetch(release.backbone, **fetch)}
        for site, head in heads.items():
            paths[site] = cache.fetch(head.asset, **fetch)
        # The registry's sha256 of each file goes with it: ONNX Runtime reads nothing that does not match it.
        sha256 = {paths["backbone"]: release.backbone.sha256}
        sha256.update({paths[site]: heads[site].asset.sha256 for site in sites})
        model = session.SiteHeadModel(
            paths["backbone"],
            {site: paths[site] for site in sites},
            device=options.device,
            threads=options.threads,
            optimized_dir=cache.ort_dir(),
            sha256=sha256,
        )
        for site in sites:
            check_channels(site, model.output_channels(site), heads[site].labels)
        localiser = None
        if release.localiser is not None and options.crop:
            paths["localiser backbone"] = cache.fetch(release.localiser.backbone, **fetch)
            paths["localiser head"] = cache.fetch(release.localiser.head, **fetch)
            localiser = session.SiteHeadModel(
                paths["localiser backbone"],
                {"cord": paths["localiser head"]},
                device=options.device,
                threads=options.threads,
                optimized_dir=cache.ort_dir(),
                sha256={
                    paths["localiser backbone"]: release.localiser.backbone.sha256,
                    paths["localiser head"]: release.localiser.head.sha256,
                },
            )
            channel = release.localiser.channel
            check_channels("cord localiser", localiser.output_channels("cord"), [LabelSpec("cord", 1, channel)])
        logger.info(
            "%s@%s on %s, sites: %s%s",
            release.model,
            release.version,
            model.provider,
            ", ".join(sites),
            " (cord localiser on)" if localiser is not None else "",
        )
        return cls(release, sites, paths, model, options, localiser)

    def rule(self, site: str, label: str = LESION) -> MaskRule:
        """How ``site``'s ``label`` probabilities become its mask: the threshold (``Options.threshold``, else the
        head's) and, for lesions, the smallest lesion kept (``Options.min_lesion_mm3``, else the head's)."""
        head = self.heads[site]
        threshold = self.options.threshold if self.options.threshold is not None else head.threshold
        if label != LESION:
            return MaskRule(threshold)
        chosen = self.options.min_lesion_mm3
        return MaskRule(threshold, chosen if chosen is not None else head.min_lesion_mm3)

    def predict(self, image_path: Path) -> tuple[nibabel.Nifti1Image, dict[str, np.ndarray]]:
        """Probabilities on the native grid for every site.

        Returns:
            The input nibabel image and ``{site: (K, X, Y, Z) float32}`` with K the site's label count, in the
            order of the head's ``labels``; 0 outside the box the lesion model ran on.
        """
        image, window, probabilities = self.predict_window(image_path)
        native: dict[str, np.ndarray] = {}
        for site, values in probabilities.items():
            full = np.zeros((values.shape[0], *image.shape[:3]), dtype=np.float32)
            full[(slice(None),) + window] = values
            native[site] = full
        return image, native

    def predict_window(self, image_path: Path) -> tuple[nibabel.Nifti1Image, Window, dict[str, np.ndarray]]:
        """Probabilities for every site on the native voxels the lesion model ran on.

        With a cord localiser (and ``Options.crop``), the lesion model runs only on the box around the found cord,
        and lesion probabilities away from the cord are set to 0; without one, on the whole image.

        Returns:
            The input nibabel image, the native window (3 slices) and ``{site: (K, x, y, z) float32}`` on it.
        """
        image, prediction = self.predict_model_grid(image_path)
        grid = prediction.grid
        native = {
            site: from_model_grid(channels, grid, order=1, window_only=True)
            for site, channels in prediction.probabilities.items()
        }
        return image, grid_window(grid), native

    def predict_model_grid(self, image: str | Path | nibabel.Nifti1Image) -> tuple[nibabel.Nifti1Image, GridPrediction]:
        """Every site's probabilities on the model grid: what :meth:`predict_window` returns before resampling.

        With a cord localiser (and ``Options.crop``), the lesion model runs only on the box around the found cord
        (``GridPrediction.crop``), normalised with the whole image's statistics as in training, and lesion
        probabilities away from the cord are set to 0; without one, on the whole image.

        Args:
            image: a NIfTI path, or a nibabel image (checked as a file would be).

        Returns:
            The input nibabel image and the prediction, whose ``probabilities`` are ``{site: (K, x', y', z')
            float32}``, channels in the order of the head's ``labels``.
        """
        plan = Budget(resolve_limit(self.options.max_memory), describe_input(image))

        def check_native(header: nibabel.Nifti1Header) -> None:
            plan.check_native(
                header.get_data_shape(),
                np.dtype(header.get_data_dtype()).itemsize,
                labels=sum(len(head.labels) for head in self.heads.values()),
                soft=self.options.soft,
                qc=self.options.qc_dir is not None,
            )

        if isinstance(image, (str, Path)):
            image = nifti.load_image(image, before_reading=check_native)
        else:
            image = nifti.check_image(image, describe_input(image))
            check_native(image.header)
        native = NativeImage(nifti.image_data(image), image.affine, hand_over=True)
        found, seconds = None, {}
        if self.localiser is not None and self.release.localiser is not None:
            assert native.data is not None  # handed over only in predict_on_grid, below
            start = time.perf_counter()
            found = localise.localise(
                native.data,
                native.affine,
                self.release.localiser,
                self.localiser,
                budget=plan.for_network(self.localiser_network()),
            )
            seconds["localise"] = time.perf_counter() - start
        prediction = predict_on_grid(
            native,
            self.release.input,
            self.network,
            self.windows,
            crop=None if found is None else found.bbox,
            reference=None if found is None else found.sample,
            budget=plan.for_network(self.lesion_network()),
        )
        logger.debug("memory planned for %s: %s", plan.source, plan.planned)
        probabilities = prediction.probabilities
        far = None if found is None else ~found.near_on(prediction.grid)
        for site in self.sites:
            labels = self.heads[site].labels
            channels = probabilities.pop(site)
            check_channels(site, channels.shape[0], labels)
            channels = channels[[label.channel for label in labels]]
            if far is not None:
                drop_far_lesions(channels, [label.name for label in labels], far)
            probabilities[site] = channels
        cord = None if found is None else found.cord_bbox
        return image, replace(prediction, seconds={**seconds, **prediction.seconds}, cord=cord)

    def lesion_network(self) -> Network:
        """What the lesion model holds per model-grid voxel (its heads' channels), for the memory budget."""
        channels = sum(self.model.output_channels(site) or self.release.channels for site in self.sites)
        return Network(channels=channels, mirror=self.options.mirror)

    def localiser_network(self) -> Network:
        """What the cord localiser holds per voxel of its coarse grid, for the memory budget."""
        assert self.localiser is not None
        channels = self.localiser.output_channels("cord") or self.release.channels
        return Network(channels=channels, extra_per_voxel=LOCALISER_BYTES_PER_VOXEL, keeps_image=True)

    def segment(self, image: str | Path | nibabel.Nifti1Image) -> Segmentation:
        """Segment one image, in memory: every site's masks on the input's grid, lesion counts and volumes.

        The image's contrast (:mod:`~sct_sitehead.deploy.contrasts`) goes into each site's facts; a warning is
        logged, one line, when a head was not trained on it.

        Args:
            image: a NIfTI path, or a nibabel image (checked as a file would be).

        Raises:
            InputImageError: the image cannot be segmented (see :func:`~sct_sitehead.deploy.nifti.load_image`).
            InferenceError: the network failed.
        """
        started = time.perf_counter()
        source = describe_input(image)
        given = image
        image, prediction = self.predict_model_grid(image)
        # After the image passed its checks: a file that cannot be segmented gets its error alone.
        contrast = self.check_contrast(given, source)
        grid, crop, cord = prediction.grid, prediction.crop, prediction.cord
        # Volumes follow the affine actually used for the geometry, even where pixdim disagrees with it.
        zooms = tuple(float(z) for z in voxel_sizes(image.affine))
        jobs = [
            (site, label, channel)
            for site in self.sites
            for label, channel in zip(self.heads[site].labels, prediction.probabilities[site])
        ]

        def label_mask(job: tuple[str, LabelSpec, np.ndarray]) -> LabelMask:
            return self._label_mask(*job, grid, zooms)

        # scipy's resampling releases the GIL: the labels come back to the native grid side by side.
        with ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="labels") as pool:
            masks = list(pool.map(label_mask, jobs))
        del prediction
        found: dict[str, dict[str, LabelMask]] = {site: {} for site in self.sites}
        for (site, label, _), mask in zip(jobs, masks):
            found[site][label.name] = mask
        seconds = time.perf_counter() - started
        window = grid_window(grid)
        sites = {}
        for site, labels in found.items():
            lesion = labels.get(LESION)
            # Outside the window the mask is 0: counting there would only cost time (a whole spine: 72 M voxels).
            stats = lesion_stats(
                lesion.mask if lesion else np.zeros([s.stop - s.start for s in window], dtype=bool),
                zooms,
                affine=image.affine,
                offset=[s.start for s in (lesion.window if lesion else window)],
            )
            facts = self.sidecar(site, source, stats, crop, seconds, contrast)
            sites[site] = SiteSegmentation(site, labels, stats, facts, image)
        return Segmentation(image, sites, crop, seconds, cord)

    def check_contrast(self, image: str | Path | nibabel.Nifti1Image, source: str) -> ImageContrast | None:
        """The image's contrast (from its file's name or sidecar; None when unknown or in memory), with a warning
        logged when one of the heads was not trained on it (unless ``Options.warn_contrast`` is off)."""
        path = image if isinstance(image, (str, Path)) else getattr(image, "get_filename", lambda: None)()
        contrast = image_contrast(path)
        warning = mismatch_warning(source, contrast, {site: self.heads[site].contrasts for site in self.sites})
        if warning is not None and self.options.warn_contrast:
            logger.warning("%s", warning)
        return contrast

    def _label_mask(
        self, site: str, label: LabelSpec, channel: np.ndarray, grid: ModelGrid, zooms: tuple[float, ...]
    ) -> LabelMask:
        """One label's model-grid probabilities -> its mask (and, for a soft map, probabilities) on the window."""
        soft = None
        if label.name == LESION and self.options.soft:
            soft = from_model_grid(channel, grid, order=1, window_only=True)
        mask = native_mask(channel, grid, self.rule(site, label.name), zooms, native_probabilities=soft)
        return LabelMask(label.name, label.value, grid_window(grid), mask, soft)

    def write(
        self,
        segmentation: Segmentation,
        image_path: Path,
        outputs: dict[str, Path],
        *,
        qc_subject: str | None = None,
    ) -> InputResult:
        """Write a segmentation's files: per site the label masks, the soft map (``Options.soft``), the sidecar
        and the QC picture (``Options.qc_dir``).

        Every file of the input is renamed into place together at the end: a failure part-way (full disk, Ctrl-C)
        leaves the previous outputs as they were and no temp file. Labels are written in :data:`WRITE_THREADS`
        threads (gzip and the CRC release the GIL); a thread builds its full-size array just before writing it, so
        memory holds at most that many at once.

        Args:
            segmentation: from :meth:`segment`.
            image_path: the input's path (for the sidecar and QC).
            outputs: ``{site: main lesion mask path}``.
            qc_subject: the subject the QC picture is filed under; default: the file name's ``sub-`` entity.

        Raises:
            UsageError: an output is the input itself (by path, link or hard link); nothing is written.
            OutputError: a file cannot be written.
        """
        for site, found in segmentation.sites.items():
            for path in planned_files(outputs[site], list(found.labels), soft=self.options.soft):
                refuse_input(path, [image_path])
        started = time.perf_counter() - segmentation.seconds
        image = segmentation.image
        result = InputResult(image=image_path)
        with staged_outputs(), ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="write") as pool:
            # The threads must see this input's stage (a context variable): each job runs in a copy of the context.
            jobs = []
            for site, found in segmentation.sites.items():
                mask_path = outputs[site]
                make_folder(mask_path.parent)
                written: list[Path] = []
                for label in found.labels.values():
                    path = mask_path if label.name == LESION else label_path(mask_path, label.name)
                    soft = soft_path(mask_path) if label.probabilities is not None else None
                    written += [path] if soft is None else [path, soft]
                    context = contextvars.copy_context()
                    jobs.append(pool.submit(context.run, write_label, label, image, path, soft))
                sidecar = sidecar_path(mask_path)
                if self.options.qc_dir is not None:
                    subject = qc_subject or subject_of(image_path)
                    written.append(self._qc(found, image_path, subject, segmentation, self.options.qc_dir))
                facts = {**found.facts, "Seconds": round(time.perf_counter() - started, 3)}
                write_json_atomic(with_files(facts, written), sidecar)
                result.sites.append(
                    SiteResult(
                        site,
                        mask_path,
                        written,
                        sidecar,
                        int(found.lesions["count"]),
                        float(found.lesions["total_volume_mm3"]),
                    )
                )
            for job in jobs:
                job.result()
        result.seconds = time.perf_counter() - started
        return result

    def _qc(
        self, found: SiteSegmentation, image_path: Path, subject: str, segmentation: Segmentation, qc_dir: Path
    ) -> Path:
        """The QC picture of one site's lesion mask, in ``qc_dir``: zoomed on the cord (the localiser's and a cord
        label's) and the lesions, each axial tile centred on the cord label (the head's own, else another
        head's of this run); on the box the lesion model ran on when no cord was found."""
        release = f"{self.release.model}@{self.release.version}"
        make_folder(qc_dir)
        shape = found.image.shape[:3]
        lesion = found.labels.get(LESION)
        full = lesion.full(shape).astype(bool) if lesion else np.zeros(shape, dtype=bool)
        with_cord = [found] + [other for other in segmentation.sites.values() if other is not found]
        cord_label = next((other.labels[CORD] for other in with_cord if CORD in other.labels), None)
        cord = None if cord_label is None else cord_label.full(shape).astype(bool)
        masks = [full] + ([] if cord is None else [cord])
        box = qc_box(masks, [segmentation.cord], voxel_sizes(found.image.affine), segmentation.crop)
        return write_qc(
            image_data(found.image),
            full,
            found.image.affine,
            qc_picture_path(qc_dir, subject, image_path, found.site, release),
            f"{subject} | {image_path.name} | {release} | site {found.site}",
            box=box,
            cord=cord,
        )

    def sidecar(
        self,
        site: str,
        source: str,
        stats: dict[str, Any],
        crop: Bbox | None,
        seconds: float,
        contrast: ImageContrast | None = None,
    ) -> dict[str, Any]:
        """BIDS-derivatives style description of one site's outputs (the file names are added when written).

        ``contrast``: the image's (None: unknown), recorded with the head's contrasts and whether they match.
        """
        head = self.heads[site]
        rule = self.rule(site)
        return {
            "GeneratedBy": [{"Name": "sct_sitehead", "Version": __version__, "Description": "sct_deepseg_lesion"}],
            "Source": source,
            "Model": f"{self.release.model}@{self.release.version}",
            "Site": site,
            "HeadStrategy": head.strategy,
            "BackboneSha256": self.release.backbone.sha256,
            "HeadSha256": head.asset.sha256,
            "Threshold": rule.threshold,
            "MinLesionMm3": rule.min_lesion_mm3,
            "CordCrop": None if crop is None else {"Bbox": [list(pair) for pair in crop]},
            "TestTimeMirroring": ["left-right"] if self.options.mirror else [],
            "Device": self.model.provider,
            "Seconds": round(seconds, 3),
            "Labels": [{"name": label.name, "value": label.value} for label in head.labels],
            **contrast_facts(contrast, head.contrasts),
            "LesionCount": int(stats["count"]),
            "LesionVolumeTotalMm3": round(float(stats["total_volume_mm3"]), 3),
            # Where each lesion is: native voxel indices (as a viewer shows them) and scanner coordinates (mm).
            "Lesions": [
                {
                    "id": int(lesion["id"]),
                    "volume_mm3": round(float(lesion["volume_mm3"]), 3),
                    "centroid_voxel": [round(float(c), 1) for c in lesion["centroid_voxel"]],
                    "centroid_mm": [round(float(c), 1) for c in lesion["centroid_mm"]],
                    "voxel_range": lesion["voxel_range"],
                }
                for lesion in stats["lesions"]
            ],
        }


def check_channels(site: str, channels: int | None, labels: Sequence[LabelSpec]) -> None:
    """A head must output every channel its labels name in the registry.

    Raises:
        RegistryError: it outputs fewer (the head file and the registry index belong to different releases).
    """
    needed = max(label.channel for label in labels) + 1
    if channels is not None and channels < needed:
        names = ", ".join(f"{label.name} -> channel {label.channel}" for label in labels)
        raise RegistryError(
            f"head {site!r} outputs {channels} channel(s), but the registry maps its labels to channels up to "
            f"{needed - 1} ({names}); the head file and the registry index do not belong together. Fix the index, "
            "or publish the release again"
        )


def describe_input(image: str | Path | nibabel.Nifti1Image) -> str:
    """How the sidecar names an input: its path as given, or the file a nibabel image was loaded from."""
    if isinstance(image, (str, Path)):
        return str(image)
    name = getattr(image, "get_filename", lambda: None)()
    return str(name) if name else "<in-memory image>"


def with_files(facts: dict[str, Any], files: list[Path]) -> dict[str, Any]:
    """A sidecar's facts with the names of the files written, in the sidecar's field order (before the lesions)."""
    out: dict[str, Any] = {}
    for key, value in facts.items():
        if key == "LesionCount":
            out["Files"] = [path.name for path in files]
        out[key] = value
    return out


def write_label(label: LabelMask, image: nibabel.Nifti1Image, path: Path, soft: Path | None) -> None:
    """One label's mask (uint8) and, at ``soft``, its probabilities (float32), on the input's whole grid."""
    save_like(label.full(image.shape), image, path, dtype=np.uint8)
    if soft is not None:
        save_like(label.full(image.shape, soft=True), image, soft, dtype=np.float32)
