"""Read a BIDS dataset of spinal cord images and their manual labels into a flat list of samples.

Images come from ``sub-*/[ses-*/]anat/*.nii[.gz]``; labels from the ``derivatives/labels`` tree with the same
sub-folders, named ``<image stem>_<suffix>.nii.gz``; the site of each subject from ``participants.tsv``.

Problems (a participant without a site, a label missing where other images of the same site have it, a label on
another grid than its image, an unreadable file, a label with no image) do not stop the reading: each one is
returned as a sentence naming the file, what is wrong and what to do, and logged as a warning. The affected label
or image is left out of the samples, and the sentence says so.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sct_sitehead.errors import InputImageError

if TYPE_CHECKING:
    from nibabel.spatialimages import SpatialImage

logger = logging.getLogger(__name__)

#: Label name -> derivative suffix(es) tried in order; the real data also names cord masks ``_seg``.
DEFAULT_LABEL_SUFFIXES: dict[str, tuple[str, ...]] = {
    "lesion": ("lesion-manual",),
    "cord": ("seg-manual", "seg"),
}
#: Site given to samples whose participant has no site, following the BIDS ``n/a`` convention.
UNKNOWN_SITE = "n/a"

_NIFTI = re.compile(
    r"^(?P<stem>sub-[A-Za-z0-9]+(?:_[A-Za-z0-9]+-[A-Za-z0-9]+)*_(?P<suffix>[A-Za-z0-9]+))\.nii(?:\.gz)?$"
)
#: Affine entries may differ by this fraction of the smallest voxel size (rounding in headers written by tools).
_AFFINE_RTOL = 1e-2


@dataclass(frozen=True)
class Sample:
    """One image of one subject with the labels found for it.

    Attributes:
        subject: participant id with its prefix, e.g. ``"sub-unf01"``.
        session: session id with its prefix (``"ses-01"``) or None.
        site: the participant's site from ``participants.tsv`` (``"n/a"`` when missing).
        contrast: the BIDS suffix, e.g. ``"T2w"``, ``"T1w"``, ``"T2star"``, ``"MTS"``.
        image: path of the image.
        labels: label name (``"lesion"``, ``"cord"``, ...) -> path of the label image on the same grid.
        entities: the file name's other entities, e.g. ``{"acq": "MTon"}``.
    """

    subject: str
    session: str | None
    site: str
    contrast: str
    image: Path
    labels: Mapping[str, Path]
    entities: Mapping[str, str] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        """The image file name without ``.nii[.gz]``, e.g. ``"sub-errsm30_acq-MTon_MTS"``."""
        return _strip_nifti(self.image.name)

    @property
    def acquisition(self) -> str | None:
        """The ``acq-`` entity, e.g. ``"MTon"``, or None."""
        return self.entities.get("acq")


def read_bids(
    root: Path,
    *,
    label_suffixes: Mapping[str, str | Sequence[str]] | None = None,
    site_column: str = "site",
    check_data: bool = True,
    labels_dir: str = "derivatives/labels",
) -> tuple[list[Sample], list[str]]:
    """Find every anatomical image of a BIDS dataset with its labels and site.

    Args:
        root: dataset folder (the one holding ``participants.tsv``).
        label_suffixes: label name -> suffix, or a list of alternative suffixes tried in order; default
            ``{"lesion": "lesion-manual", "cord": ["seg-manual", "seg"]}``.
        site_column: column of ``participants.tsv`` holding the site.
        check_data: read every voxel once so truncated or corrupt files are reported (headers are always read).
        labels_dir: the derivatives tree holding the labels, relative to ``root`` (for example
            ``"derivatives/truth"``, the simulator's ground truth of every subject).

    Returns:
        The samples sorted by subject, session and file name, and the problems found (human-readable sentences).

    Raises:
        InputImageError: ``root`` is not a folder or holds no ``sub-*`` folder at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputImageError(f"BIDS folder {root} does not exist or is not a folder; check the path")
    suffixes = _normalise_suffixes(DEFAULT_LABEL_SUFFIXES if label_suffixes is None else label_suffixes)
    subject_dirs = sorted(p for p in root.glob("sub-*") if p.is_dir())
    if not subject_dirs:
        raise InputImageError(
            f"BIDS folder {root} has no sub-* folder; give the dataset root (the folder with participants.tsv)"
        )
    problems: list[str] = []
    sites = _SiteTable(_read_sites(root, site_column, problems), site_column)
    labels_root = root / labels_dir
    if labels_root.resolve() != root.resolve() and root.resolve() not in labels_root.resolve().parents:
        raise InputImageError(f"labels folder {labels_dir!r} is not inside the dataset {root}; give a path under it")
    samples: list[Sample] = []
    used_labels: set[Path] = set()
    for image in _anat_images(subject_dirs):
        sample = _read_sample(root, image, labels_root, suffixes, sites, check_data, problems, used_labels)
        if sample is not None:
            samples.append(sample)
    _report_missing_labels(samples, suffixes, labels_root, root, problems)
    _report_orphan_labels(labels_root, {s.image.parent / s.stem for s in samples}, used_labels, root, problems)
    for problem in problems:
        logger.warning("%s", problem)
    logger.info(
        "read %d images of %d subjects from %s (%d problems)",
        len(samples),
        len({s.subject for s in samples}),
        root,
        len(problems),
    )
    return samples, problems


def load_spatial_image(path: Path) -> SpatialImage:
    """``nibabel.load`` for an image with voxels: a shape, an affine and ``dataobj`` (NIfTI, MGH, Analyze...).

    Raises:
        InputImageError: ``path`` is another kind of file nibabel reads (a surface, a streamline file...).
    """
    import nibabel as nib
    from nibabel.spatialimages import SpatialImage

    image = nib.load(path)
    if not isinstance(image, SpatialImage):
        raise InputImageError(f"{path} is a {type(image).__name__}, not an image with voxels; give a NIfTI file")
    return image


def _normalise_suffixes(label_suffixes: Mapping[str, str | Sequence[str]]) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for name, value in label_suffixes.items():
        options = (value,) if isinstance(value, str) else tuple(value)
        if not options or not all(isinstance(o, str) and o for o in options):
            raise InputImageError(
                f"label {name!r} has suffixes {value!r}; give a non-empty suffix or list of suffixes, e.g. 'seg-manual'"
            )
        out[name] = options
    return out


def _strip_nifti(name: str) -> str:
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


class _SiteTable:
    """Sites by participant; reports each subject without one once."""

    def __init__(self, sites: dict[str, str] | None, column: str) -> None:
        self.sites = sites
        self.column = column
        self.reported: set[str] = set()

    def site_of(self, subject: str, problems: list[str]) -> str:
        if self.sites is None:  # no usable table: reported once already
            return UNKNOWN_SITE
        site = self.sites.get(subject)
        if site is not None and site not in ("", UNKNOWN_SITE):
            return site
        if subject not in self.reported:
            self.reported.add(subject)
            what = (
                "no row in participants.tsv" if site is None else f"no value in participants.tsv column {self.column!r}"
            )
            problems.append(f"{subject} has images but {what}; its site is {UNKNOWN_SITE!r}; add it")
        return UNKNOWN_SITE


def _read_sites(root: Path, column: str, problems: list[str]) -> dict[str, str] | None:
    """participant_id -> site (possibly empty); None with a problem for a missing or unusable table."""
    table = root / "participants.tsv"
    if not table.is_file():
        problems.append(
            f"{table} is missing, so no subject has a site (all set to {UNKNOWN_SITE!r}); "
            f"add it with columns participant_id and {column}"
        )
        return None
    try:
        with table.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
            header = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        problems.append(f"{table} cannot be read ({exc}); no subject has a site; fix or re-save it as UTF-8 TSV")
        return None
    if "participant_id" not in header or column not in header:
        problems.append(
            f"{table} has columns {sorted(header)}, without 'participant_id' and {column!r}; no subject has a site; "
            f"add the column or pass the right site column name"
        )
        return None
    return {(row.get("participant_id") or "").strip(): (row.get(column) or "").strip() for row in rows}


def _anat_images(subject_dirs: list[Path]) -> list[Path]:
    images: list[Path] = []
    for subject_dir in subject_dirs:
        for anat in [subject_dir / "anat", *sorted(subject_dir.glob("ses-*/anat"))]:
            if anat.is_dir():
                images.extend(sorted(p for p in anat.iterdir() if p.name.endswith((".nii", ".nii.gz"))))
    return images


def _parse_name(name: str) -> tuple[str, dict[str, str]] | None:
    """``sub-01_ses-1_acq-MTon_MTS.nii.gz`` -> (``"MTS"``, ``{"sub": "01", "ses": "1", "acq": "MTon"}``)."""
    match = _NIFTI.match(name)
    if match is None:
        return None
    parts = match.group("stem").split("_")
    entities = dict(part.split("-", 1) for part in parts[:-1])
    return match.group("suffix"), entities


def _read_sample(
    root: Path,
    image: Path,
    labels_root: Path,
    suffixes: dict[str, tuple[str, ...]],
    sites: _SiteTable,
    check_data: bool,
    problems: list[str],
    used_labels: set[Path],
) -> Sample | None:
    parsed = _parse_name(image.name)
    anat = image.parent
    subject = anat.parent.name if not anat.parent.name.startswith("ses-") else anat.parent.parent.name
    session = anat.parent.name if anat.parent.name.startswith("ses-") else None
    if parsed is None or parsed[1].get("sub") != subject.removeprefix("sub-"):
        problems.append(
            f"{_rel(image, root)}: file name is not BIDS '<sub-{subject[4:]}>[_<key>-<value>...]_<suffix>.nii[.gz]' "
            f"in its subject folder; image skipped; rename it"
        )
        return None
    contrast, entities = parsed
    geometry = _read_geometry(image, root, check_data, problems)
    if geometry is None:
        return None
    site = sites.site_of(subject, problems)
    stem = _strip_nifti(image.name)
    label_dir = labels_root / anat.relative_to(root)
    labels: dict[str, Path] = {}
    for name, options in suffixes.items():
        found = [label_dir / f"{stem}_{s}.nii.gz" for s in options if (label_dir / f"{stem}_{s}.nii.gz").is_file()]
        if not found:
            continue
        used_labels.update(found)
        if len(found) > 1:
            logger.debug("%s: several %s labels %s; using %s", stem, name, [p.name for p in found], found[0].name)
        if _label_matches(found[0], geometry, root, check_data, problems, name):
            labels[name] = found[0]
    others = {k: v for k, v in entities.items() if k not in ("sub", "ses")}
    return Sample(subject, session, site, contrast, image, labels, others)


def _read_geometry(
    path: Path, root: Path, check_data: bool, problems: list[str]
) -> tuple[tuple[int, ...], np.ndarray] | None:
    """(shape, affine) of a readable 3D NIfTI file, else None with a problem."""
    try:
        img = load_spatial_image(path)
        shape = tuple(int(n) for n in img.shape)
        if check_data:
            np.asarray(img.dataobj)
    except Exception as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        problems.append(
            f"{_rel(path, root)} cannot be read ({type(exc).__name__}: {detail}); it was left out; "
            f"replace it with a complete NIfTI file"
        )
        return None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        problems.append(f"{_rel(path, root)} has shape {shape}, not 3D; it was left out; extract one 3D volume")
        return None
    return shape, np.asarray(img.affine, dtype=np.float64)


def _label_matches(
    label: Path,
    image_geometry: tuple[tuple[int, ...], np.ndarray],
    root: Path,
    check_data: bool,
    problems: list[str],
    name: str,
) -> bool:
    geometry = _read_geometry(label, root, check_data, problems)
    if geometry is None:
        return False
    shape, affine = geometry
    image_shape, image_affine = image_geometry
    if shape != image_shape:
        problems.append(
            f"{_rel(label, root)}: {name} label has shape {shape} but its image has {image_shape} (misaligned); "
            f"label left out; resample it onto the image grid (e.g. sct_register_multimodal -identity 1)"
        )
        return False
    voxel = float(np.min(np.linalg.norm(image_affine[:3, :3], axis=0)))
    worst = float(np.max(np.abs(affine - image_affine)))
    if worst > _AFFINE_RTOL * voxel:
        problems.append(
            f"{_rel(label, root)}: {name} label affine differs from its image's by up to {worst:.3g} mm "
            f"(tolerance {_AFFINE_RTOL * voxel:.3g}; misaligned); label left out; "
            f"copy the image header if the voxels match (sct_image -copy-header) or resample the label"
        )
        return False
    return True


def _report_missing_labels(
    samples: list[Sample], suffixes: dict[str, tuple[str, ...]], labels_root: Path, root: Path, problems: list[str]
) -> None:
    """A label missing where other images of the same site have it is probably a lost file, not a choice."""
    by_site: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_site[sample.site].append(sample)
    for site, members in sorted(by_site.items()):
        for name, options in suffixes.items():
            have = sum(name in s.labels for s in members)
            if have == 0 or have == len(members):
                continue
            for sample in members:
                if name in sample.labels:
                    continue
                expected = labels_root / sample.image.parent.relative_to(root) / f"{sample.stem}_{options[0]}.nii.gz"
                problems.append(
                    f"{_rel(sample.image, root)} has no usable {name} label while {have} of {len(members)} images of "
                    f"site {site!r} have one; expected {_rel(expected, root)}; add it or check the earlier problems"
                )


def _report_orphan_labels(
    labels_root: Path, image_stems: set[Path], used: set[Path], root: Path, problems: list[str]
) -> None:
    """Labels whose name starts with no image's stem; labels of known images with other suffixes are just unused."""
    if not labels_root.is_dir():
        return
    for path in sorted(labels_root.glob("sub-*/**/anat/*.nii*")):
        if path in used or not path.name.endswith((".nii", ".nii.gz")):
            continue
        raw_folder = root / path.parent.relative_to(labels_root)
        name = _strip_nifti(path.name)
        if any((raw_folder / name[:cut]) in image_stems for cut in range(len(name)) if name[cut] == "_"):
            logger.debug("%s: suffix not among the label suffixes in use; not read", _rel(path, root))
            continue
        problems.append(
            f"{_rel(path, root)} belongs to no image (no {_rel(raw_folder, root)}/<stem>.nii[.gz] that its name "
            f"starts with); it was ignored; rename it after its image or remove it"
        )
