"""One scan of a cohort: segment it, write its files atomically, and return its record (the cohort table's rows).

The record is written by the process that runs the cohort (:func:`write_record`), never by a worker: Dask may run a
task twice (a worker that dies after finishing has its result recomputed), and a late copy must not replace it.

A Dask worker runs :func:`run_scan`, which keeps one :class:`~sct_sitehead.deploy.pipeline.Segmenter` per process
(:func:`segmenter_for`): the ONNX sessions are loaded once per worker and kept across its scans.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sct_sitehead.api import open_segmenter
from sct_sitehead.atomic import write_json_atomic
from sct_sitehead.cohort.plan import Unit, sha256_file
from sct_sitehead.deploy.naming import make_folder
from sct_sitehead.deploy.options import Options
from sct_sitehead.errors import SiteHeadError
from sct_sitehead.settings import ModelSource

if TYPE_CHECKING:
    from sct_sitehead.deploy.pipeline import Segmenter
    from sct_sitehead.deploy.results import InputResult, Segmentation

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmenterSpec:
    """What a worker needs to open the cohort's segmenter: small and picklable, sent with every task."""

    sites: tuple[str, ...]
    model: str | None
    options: Options
    source: ModelSource


#: This process's open segmenters, by spec: a worker loads the models on its first scan and keeps them.
_OPEN: dict[SegmenterSpec, Segmenter] = {}
#: A Dask worker started with several threads (``dask worker --nthreads 4``) runs several first scans at once:
#: without the lock each would load the models.
_OPENING = threading.Lock()


def segmenter_for(spec: SegmenterSpec) -> Segmenter:
    """The process's segmenter for ``spec``, opened on first use (once, whatever the threads asking)."""
    with _OPENING:
        if spec not in _OPEN:
            _OPEN[spec] = open_segmenter(list(spec.sites), model=spec.model, options=spec.options, source=spec.source)
        return _OPEN[spec]


def run_scan(spec: SegmenterSpec, unit: Unit, out_dir: Path, print_: dict[str, Any]) -> dict[str, Any]:
    """A Dask task: :func:`run_unit` with this worker's segmenter."""
    return run_unit(segmenter_for(spec), unit, out_dir, print_)


def run_unit(segmenter: Segmenter, unit: Unit, out_dir: Path, print_: dict[str, Any]) -> dict[str, Any]:
    """Segment one scan and write its outputs; a failure is recorded, not raised.

    Returns:
        The record (for :func:`write_record`): ``Status`` ``done`` or ``failed``, the input's sha256, the
        fingerprint, the files and their sizes, a table row per site, QC rows, and for a failure ``Error`` (the
        message, naming the file) and ``ExitCode``.
    """
    scan = unit.scan
    started = time.perf_counter()
    record: dict[str, Any] = {
        "Image": str(scan.image),
        "Subject": scan.subject,
        "Session": scan.session,
        "Contrast": scan.contrast,
        "Entities": dict(scan.entities),
        "ParticipantSite": scan.site,
        "Fingerprint": print_,
    }
    try:
        record["InputSha256"] = sha256_file(scan.image)
        segmentation = segmenter.segment(scan.image)
        result = segmenter.write(segmentation, scan.image, unit.outputs, qc_subject=scan.subject)
    except (SiteHeadError, OSError) as exc:
        message = str(exc) if str(scan.image) in str(exc) else f"{scan.image}: {exc}"
        code = exc.exit_code if isinstance(exc, SiteHeadError) else 3
        record.update(Status="failed", Error=message, ExitCode=code, Seconds=round(time.perf_counter() - started, 3))
        logger.debug("failed (exit %d): %s", code, message)  # listed once, at the end of the run
    else:
        seconds = round(time.perf_counter() - started, 3)
        record.update(
            Status="done", Seconds=seconds, **_outcome(segmentation, result, out_dir, segmenter, seconds, scan.subject)
        )
    return record


def write_record(unit: Unit, record: dict[str, Any]) -> None:
    """Write a scan's record, the last file of the scan: the skip rule trusts the outputs it lists.

    Raises:
        OutputError: the record cannot be written.
    """
    make_folder(unit.record.parent)
    write_json_atomic(record, unit.record)


def _outcome(
    segmentation: Segmentation,
    result: InputResult,
    out_dir: Path,
    segmenter: Segmenter,
    seconds: float,
    subject: str,
) -> dict[str, Any]:
    """The record's files, table rows and QC rows of a finished scan."""
    import numpy as np
    from nibabel.affines import voxel_sizes

    voxel_mm3 = float(np.prod(voxel_sizes(segmentation.image.affine)))
    release = f"{segmenter.release.model}@{segmenter.release.version}"
    files: dict[str, int] = {}
    rows, qc = [], []
    for site_result in result.sites:
        found = segmentation.sites[site_result.site]
        for path in [*site_result.files, site_result.sidecar]:
            files[_relative(path, out_dir)] = path.stat().st_size
        cord = found.labels.get("cord")
        rows.append(
            {
                "head": site_result.site,
                "lesion_count": site_result.lesion_count,
                "lesion_volume_mm3": round(site_result.lesion_volume_mm3, 3),
                "lesion_volumes_mm3": [round(float(les["volume_mm3"]), 3) for les in found.lesions["lesions"]],
                "cord_volume_mm3": None if cord is None else round(float(cord.mask.sum()) * voxel_mm3, 1),
                "seconds": seconds,
                "mask": _relative(site_result.mask, out_dir),
            }
        )
        pngs = [path for path in site_result.files if path.suffix == ".png"]
        if pngs:
            qc.append(
                {
                    "subject": subject,
                    "image": str(result.image),
                    "site": site_result.site,
                    "release": release,
                    "png": str(pngs[-1]),
                    "lesions": site_result.lesion_count,
                    "volume_mm3": site_result.lesion_volume_mm3,
                }
            )
    return {"Files": files, "Rows": rows, "Qc": qc}


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(Path(path).resolve())
