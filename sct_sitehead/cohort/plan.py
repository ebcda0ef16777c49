"""The work plan of a cohort: each scan's outputs in a BIDS-derivatives folder, and whether it needs running.

A scan's outputs are SCT's names under the scan's own sub-folder (``OUT/sub-01/anat/sub-01_T2w_lesionseg.nii.gz``,
``_cordseg``, the JSON sidecar). When they are all written, a record ``OUT/.cohort/<stem>.json`` is written last:
it holds the input's sha256, the release and settings (the *fingerprint*), the files with their sizes, and the
row of the cohort table. One small pure function decides from it (:func:`scan_action`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sct_sitehead.atomic import write_json_atomic
from sct_sitehead.cohort.scans import Scan
from sct_sitehead.deploy.naming import plan_outputs
from sct_sitehead.deploy.options import Options
from sct_sitehead.errors import RegistryError
from sct_sitehead.registry import untrusted_json
from sct_sitehead.registry.specs import Release
from sct_sitehead.version import __version__

#: Hidden from BIDS validators: the per-scan records the skip rule and the group level read.
RECORDS = ".cohort"
RUN, SKIP = "run", "skip"


@dataclass(frozen=True)
class Unit:
    """One scan's work: where its outputs go and where its record goes."""

    scan: Scan
    outputs: dict[str, Path]
    record: Path


def fingerprint(release: Release, sites: Sequence[str], options: Options) -> dict[str, Any]:
    """What makes two runs' outputs the same: the release's files and the settings that change a mask."""
    heads = {site: release.head(site).asset.sha256 for site in sites}
    return {
        "Model": f"{release.model}@{release.version}",
        "BackboneSha256": release.backbone.sha256,
        "HeadSha256": heads,
        "Threshold": options.threshold,
        "MinLesionMm3": options.min_lesion_mm3,
        "Crop": options.crop,
        "Mirror": options.mirror,
        "Soft": options.soft,
    }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def scan_action(record: dict[str, Any] | None, input_sha256: str, print_: dict[str, Any], root: Path) -> str:
    """:data:`SKIP` when a previous run finished this scan from the same input and release, else :data:`RUN`.

    Args:
        record: the scan's record, or None when there is none (or it is unreadable).
        input_sha256: the input's sha256 now.
        print_: the fingerprint of this run (:func:`fingerprint`).
        root: the output folder, which the record's file names are relative to.
    """
    if record is None or record.get("Status") != "done":
        return RUN
    if record.get("InputSha256") != input_sha256 or record.get("Fingerprint") != print_:
        return RUN
    files = record.get("Files") or {}
    if not files:
        return RUN
    for name, size in files.items():
        path = root / name
        if not path.is_file() or path.stat().st_size != size:
            return RUN
    return SKIP


def plan_units(scans: Sequence[Scan], out_dir: Path, sites: list[str]) -> list[Unit]:
    """Each scan's outputs (SCT names, ``_<site>`` added for several sites) and record path."""
    units = []
    for scan in scans:
        plan = plan_outputs([scan.image], sites, None, out_dir / scan.folder)
        outputs = {site: plan[(scan.image, site)] for site in sites}
        units.append(Unit(scan, outputs, out_dir / RECORDS / f"{scan.stem}.json"))
    return units


def read_record(path: Path) -> dict[str, Any] | None:
    """The record a run wrote, read with the parser for untrusted JSON; None when missing or unreadable (the scan
    is then run again)."""
    try:
        data = untrusted_json.loads(path.read_bytes(), f"cohort record {path}")
    except (OSError, RegistryError):
        return None
    return data if isinstance(data, dict) else None


def split_work(
    units: Sequence[Unit], out_dir: Path, print_: dict[str, Any], *, force: bool
) -> tuple[list[Unit], list[Unit]]:
    """(to run, to skip). ``force`` runs every unit."""
    todo: list[Unit] = []
    skipped: list[Unit] = []
    for unit in units:
        if force:
            todo.append(unit)
            continue
        try:
            digest = sha256_file(unit.scan.image)
        except OSError:
            todo.append(unit)  # the run reports the unreadable file, naming it
            continue
        action = scan_action(read_record(unit.record), digest, print_, out_dir)
        (skipped if action == SKIP else todo).append(unit)
    return todo, skipped


def write_dataset_description(out_dir: Path, source: Path, print_: dict[str, Any]) -> Path:
    """``dataset_description.json`` of the derivatives folder (BIDS 1.8, ``DatasetType: derivative``)."""
    path = out_dir / "dataset_description.json"
    write_json_atomic(
        {
            "Name": "sct_sitehead lesion segmentation",
            "BIDSVersion": "1.8.0",
            "DatasetType": "derivative",
            "GeneratedBy": [
                {
                    "Name": "sct_sitehead",
                    "Version": __version__,
                    "Description": f"sct_sitehead bids, {print_['Model']}",
                }
            ],
            "SourceDatasets": [{"URL": Path(source).resolve().as_uri()}],
        },
        path,
    )
    return path
