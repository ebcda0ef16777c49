"""The Python API: what ``sct_deepseg_lesion`` does, from Python, with the package's typed errors.

    import sct_sitehead

    result = sct_sitehead.segment("t2.nii.gz", "montreal")        # a path or a nibabel image
    result["montreal"].mask().to_filename("t2_lesionseg.nii.gz")  # uint8, on the input's grid
    print(result["montreal"].lesions["count"])

    segmenter = sct_sitehead.open_segmenter(["montreal", "toronto"])  # models loaded once
    for path in paths:
        masks = segmenter.segment(path)

Settings come in two small objects: :class:`~sct_sitehead.deploy.pipeline.Options` (threshold, smallest lesion,
soft map, device, threads, crop, mirroring) and :class:`~sct_sitehead.settings.ModelSource` (registry, cache,
offline, trust); flags not given fall back to the ``SCT_SITEHEAD_*`` environment variables as on the command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sct_sitehead.deploy.options import Options
from sct_sitehead.errors import UsageError
from sct_sitehead.settings import ModelSource, resolve_sites

#: ``sites=ALL_SITES``: every head of the release (evaluation, probes).
ALL_SITES = "*"

if TYPE_CHECKING:
    import nibabel

    from sct_sitehead.deploy.pipeline import Segmenter
    from sct_sitehead.deploy.results import Segmentation


def open_segmenter(
    sites: str | Sequence[str] | None = None,
    *,
    model: str | None = None,
    options: Options | None = None,
    source: ModelSource | None = None,
    progress: bool = False,
) -> Segmenter:
    """Fetch (or find in the cache), verify and load a release's backbone and site heads, once.

    Args:
        sites: site head(s), e.g. ``"montreal"`` or ``["montreal", "universal"]``, or :data:`ALL_SITES` for
            every head of the release; default ``$SCT_SITEHEAD_SITE``.
        model: ``NAME[@VERSION]``; default: the registry's default model, latest release.
        options: how to run (:class:`~sct_sitehead.deploy.pipeline.Options`); default: the release's settings.
        source: where the models come from; default: the embedded registry, or what the environment names.
        progress: show download progress bars.

    Returns:
        A :class:`~sct_sitehead.deploy.pipeline.Segmenter`; call its ``segment(image)`` for each image.

    Raises:
        UsageError: no site given.
        UnknownModelError: unknown model, version or site.
        RegistryError, DownloadError, IntegrityError, OfflineError: the models cannot be had.
    """
    # The deploy path brings numpy, nibabel and ONNX Runtime: loaded only when a segmenter is asked for.
    from sct_sitehead.deploy.pipeline import Segmenter
    from sct_sitehead.registry.index import parse_model_spec

    source = source if source is not None else ModelSource.resolve()
    registry, cache = source.open()
    release = registry.release(*parse_model_spec(model))
    chosen = sorted(release.heads) if sites == ALL_SITES else resolve_sites(sites)
    if not chosen:
        raise UsageError(f"no site given; pass sites= with one of: {', '.join(sorted(release.heads))}")
    return Segmenter.open(
        release,
        chosen,
        cache,
        options if options is not None else Options(),
        offline=source.offline,
        progress=progress,
        allow_http=source.allow_http,
    )


def segment(
    image: str | Path | nibabel.Nifti1Image,
    sites: str | Sequence[str] | None = None,
    *,
    model: str | None = None,
    options: Options | None = None,
    source: ModelSource | None = None,
) -> Segmentation:
    """Segment spinal cord lesions in one image with each site's head.

    Args:
        image: a NIfTI path, or a nibabel image (3D; any orientation, voxel size and data type).
        sites, model, options, source: as :func:`open_segmenter`.

    Returns:
        A :class:`~sct_sitehead.deploy.results.Segmentation`: ``result[site].mask()`` is the lesion mask (uint8
        nibabel image on the input's grid), ``result[site].mask("cord")`` another label's, ``result[site].soft()``
        the probabilities (with ``Options(soft=True)``), ``result[site].lesions`` the count and volumes and
        ``result[site].facts`` what the command line's JSON sidecar says.

    Raises:
        InputImageError: the image cannot be segmented.
        the errors of :func:`open_segmenter`.
    """
    return open_segmenter(sites, model=model, options=options, source=source).segment(image)
