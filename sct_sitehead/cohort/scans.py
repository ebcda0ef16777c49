"""Find the scans of a cohort: the anatomical images of a BIDS dataset, or the NIfTI files of folders given to
``-i``, never the tool's own outputs (masks, soft maps) nor a ``derivatives/`` tree.

Light on purpose: ``sct_deepseg_lesion`` expands its ``-i`` folders with it before anything heavy is imported.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sct_sitehead.deploy.naming import NIFTI_SUFFIXES, split_nifti_name
from sct_sitehead.errors import InputImageError

logger = logging.getLogger(__name__)

#: BIDS suffixes of the contrasts the releases are trained on (docs/TRAINING.md: T1w, T2*w, T2w and MTS phantoms
#: and real scans); a release's index does not list them, so the BIDS App takes them from here or ``-contrast``.
SUPPORTED_CONTRASTS = ("T2w", "T2star", "T1w", "MTS")
#: What this tool and SCT write beside an image: ``<stem>_lesionseg[_<site>][_soft]``, ``<stem>_<label>seg``
#: (``_cordseg``, ``_csfseg``, SCT's ``_seg``), BIDS derivative masks (``_desc-…_mask``, ``_dseg``).
_OUTPUT_STEM = re.compile(r"(_[a-z]*seg(_[A-Za-z0-9-]+)?(_soft)?|_desc-[A-Za-z0-9]+_(mask|dseg|probseg)|_dseg)$")
_BIDS_NAME = re.compile(
    r"^sub-(?P<sub>[A-Za-z0-9]+)(?P<entities>(?:_[A-Za-z0-9]+-[A-Za-z0-9]+)*)_(?P<suffix>[A-Za-z0-9]+)$"
)


@dataclass(frozen=True)
class Scan:
    """One image of a cohort.

    Attributes:
        image: the NIfTI file.
        subject: ``sub-…`` (or the file's stem outside BIDS).
        session: ``ses-…`` or None.
        contrast: the BIDS suffix (``T2w``), or ``""`` outside BIDS.
        entities: the file name's other entities, e.g. ``{"acq": "MTon", "run": "1"}``.
        site: the participant's site from ``participants.tsv``, or ``"n/a"``.
        folder: where the outputs go, relative to the output folder (``sub-01/ses-1/anat``).
    """

    image: Path
    subject: str
    session: str | None = None
    contrast: str = ""
    entities: dict[str, str] = field(default_factory=dict)
    site: str = "n/a"
    folder: Path = Path(".")

    @property
    def stem(self) -> str:
        """The file name without ``.nii[.gz]``: unique within a BIDS dataset."""
        return split_nifti_name(self.image)[0]


def is_own_output(path: Path) -> bool:
    """Whether a file's name is one this tool (or SCT) gives a mask or a soft map, not an image to segment."""
    return bool(_OUTPUT_STEM.search(split_nifti_name(path)[0]))


def expand_inputs(paths: Sequence[Path]) -> list[Path]:
    """``-i`` as given, with each folder replaced by the NIfTI images in it (sorted), its masks left out.

    A file named like an output (``*_lesionseg.nii.gz``, ``*_cordseg.nii.gz``...) given explicitly, for example
    by a shell glob over a folder already processed, is left out with a warning that names it.

    Raises:
        InputImageError: a folder holds no NIfTI image; it is named.
    """
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith("."))
            kept = [p for p in images if not is_own_output(p)]
            if not kept:
                raise InputImageError(
                    f"{path} is a folder with no NIfTI image to segment ({len(images)} mask(s) skipped); "
                    "give a folder of .nii/.nii.gz images or the files themselves"
                )
            found.extend(kept)
        elif path.name.endswith(NIFTI_SUFFIXES) and is_own_output(path):
            logger.warning(
                "%s is named like a segmentation output (mask or soft map); skipped. Rename it to segment it", path
            )
        else:
            found.append(path)
    return list(dict.fromkeys(found))


def find_bids_scans(
    root: Path,
    *,
    participants: Iterable[str] = (),
    sessions: Iterable[str] = (),
    contrasts: Sequence[str] = SUPPORTED_CONTRASTS,
    exclude: Sequence[Path] = (),
) -> list[Scan]:
    """The anatomical images of a BIDS dataset: ``sub-*/[ses-*/]anat/sub-*_<contrast>.nii[.gz]``.

    ``derivatives/``, the folders in ``exclude`` (the output folder, when inside the dataset), files named like
    masks and contrasts not asked for are never taken.

    Args:
        root: the dataset folder.
        participants: labels to keep, with or without ``sub-``; none: every participant.
        sessions: session labels to keep, with or without ``ses-``; none: every session.
        contrasts: BIDS suffixes to take.
        exclude: folders whose images are never taken.

    Returns:
        The scans, sorted by subject, session and file name.

    Raises:
        InputImageError: ``root`` is not a BIDS folder, or a participant asked for is not in it.
    """
    root = Path(root)
    if not root.is_dir() or not any(root.glob("sub-*")):
        raise InputImageError(f"{root} is not a BIDS dataset (no sub-* folder); give the dataset's root folder")
    wanted = {p if p.startswith("sub-") else f"sub-{p}" for p in participants}
    wanted_sessions = {s if s.startswith("ses-") else f"ses-{s}" for s in sessions}
    subjects = sorted(p for p in root.glob("sub-*") if p.is_dir() and (not wanted or p.name in wanted))
    missing = wanted - {p.name for p in subjects}
    if missing:
        raise InputImageError(f"participant(s) {', '.join(sorted(missing))} not in {root}; check -participant-label")
    sites = read_participant_sites(root)
    excluded = [Path(p).resolve() for p in exclude]
    scans = []
    for subject in subjects:
        folders = [subject / "anat", *sorted(subject.glob("ses-*/anat"))]
        for anat in folders:
            session = anat.parent.name if anat.parent.name.startswith("ses-") else None
            if not anat.is_dir() or (wanted_sessions and session not in wanted_sessions):
                continue
            if any(anat.resolve() == e or e in anat.resolve().parents for e in excluded):
                continue
            for image in sorted(anat.iterdir()):
                scan = _bids_scan(image, root, subject.name, session, contrasts, sites)
                if scan is not None:
                    scans.append(scan)
    return scans


def _bids_scan(
    image: Path, root: Path, subject: str, session: str | None, contrasts: Sequence[str], sites: dict[str, str]
) -> Scan | None:
    if not image.name.endswith(NIFTI_SUFFIXES) or image.name.startswith(".") or is_own_output(image):
        return None
    match = _BIDS_NAME.match(split_nifti_name(image)[0])
    if match is None or f"sub-{match.group('sub')}" != subject or match.group("suffix") not in contrasts:
        return None
    entities = dict(part.split("-", 1) for part in match.group("entities").split("_") if part)
    entities.pop("ses", None)
    return Scan(
        image=image,
        subject=subject,
        session=session,
        contrast=match.group("suffix"),
        entities=entities,
        site=sites.get(subject, "n/a") or "n/a",
        folder=image.parent.relative_to(root),
    )


def read_participant_sites(root: Path, column: str = "site") -> dict[str, str]:
    """``participant_id`` -> site from ``participants.tsv`` (empty when there is no such file or column)."""
    table = root / "participants.tsv"
    try:
        with table.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    return {(row.get("participant_id") or "").strip(): (row.get(column) or "").strip() for row in rows}
