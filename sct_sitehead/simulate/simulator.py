"""Build a labelled multi-site lesion dataset from real anatomy with cord masks.

For each simulated subject of each site: pick a source image of a contrast the site scans (with its cord mask;
train and val subjects may also borrow the anatomy of another contrast, remapped, where the site's profile says so),
place the site's field of view on the cord, pull the anatomy through a random deformation onto a fine working grid,
insert lesions in the cord, acquire it the site's way and annotate it the site's way. Everything random comes from
one generator per subject, seeded by ``(seed, site name, subject number)``, so a seed gives byte-identical files
and a site's subjects do not change when other sites are added.

Output (BIDS)::

    participants.tsv                      participant_id, site, source, split
    dataset_description.json
    simulation.json                       the arguments, every site profile, per-subject parameters
    sub-<site><NNN>/anat/sub-<site><NNN>[_acq-<x>]_<contrast>.nii.gz
    derivatives/labels/sub-.../anat/<stem>_<suffix>.nii.gz      the site's labels (lesion-manual, ...)
    derivatives/truth/sub-.../anat/<stem>_lesion-truth.nii.gz   the unannotated truth (and _cord-truth)
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from sct_sitehead.atomic import move_into_place, write_json_atomic
from sct_sitehead.errors import InputImageError, OutputError, UsageError
from sct_sitehead.evaluation.bids import Sample, load_spatial_image, read_bids
from sct_sitehead.simulate.acquisition import (
    TargetGrid,
    blur_margin_mm,
    plan_grid,
    sample_to_target,
    transfer_intensities,
    working_grid,
)
from sct_sitehead.simulate.annotation import annotate, truth_masks
from sct_sitehead.simulate.deform import draw_deformation, source_coordinates, warp
from sct_sitehead.simulate.grids import world_extent
from sct_sitehead.simulate.lesions import insert_lesions_array
from sct_sitehead.simulate.phantom_sources import write_phantom_sources
from sct_sitehead.simulate.sites import Borrow, Site, load_sites
from sct_sitehead.simulate.staging import staging_folder
from sct_sitehead.version import __version__

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: Working grid spacing bounds (mm): fine enough for the sites' voxels, coarse enough to stay fast.
WORK_SPACING_MM = (0.6, 1.0)
#: Intensity (of the 99.5th percentile) below which a borrowed image is air, kept dark when inverted.
BODY_LEVEL = 0.1


@dataclass(frozen=True)
class Anatomy:
    """A source image ready to be deformed: intensities scaled so the 99.5th percentile is 1."""

    sample: Sample
    data: np.ndarray
    cord: np.ndarray
    affine: np.ndarray
    cord_points: np.ndarray


@dataclass
class SimulatedSubject:
    """One simulated subject on its site's grid."""

    image: np.ndarray
    affine: np.ndarray
    labels: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]
    params: dict[str, Any]


def load_anatomy(sample: Sample, borrow: Borrow | None = None) -> Anatomy:
    """Read a source image and its cord mask (``sample.labels["cord"]``); remap its contrast when borrowed."""
    image = load_spatial_image(sample.image)
    data = np.asarray(image.dataobj, dtype=np.float32).reshape(image.shape[:3])
    cord = np.asarray(load_spatial_image(sample.labels["cord"]).dataobj, dtype=np.float32).reshape(data.shape) >= 0.5
    if not cord.any():
        raise InputImageError(f"{sample.labels['cord']} is empty; give a cord mask with the cord in it")
    scale = float(np.percentile(data, 99.5)) or float(data.max()) or 1.0
    affine = np.asarray(image.affine, dtype=np.float64)
    points = np.argwhere(cord) @ affine[:3, :3].T + affine[:3, 3]
    data = data / np.float32(scale)
    if borrow is not None:
        data = borrowed_intensities(data, borrow)
    return Anatomy(sample, data, cord.astype(np.float32), affine, points)


def borrowed_intensities(data: np.ndarray, borrow: Borrow) -> np.ndarray:
    """Remap a normalised image (99.5th percentile = 1) to another contrast: inverted inside the body, gamma.

    The body is where the image is brighter than a tenth of its 99.5th percentile, smoothed over a voxel, so air
    stays dark when the tissue is inverted. The result is normalised again to a 99.5th percentile of 1.
    """
    from scipy import ndimage

    image = np.clip(data, 0.0, 1.0).astype(np.float32)
    if borrow.invert:
        body = ndimage.gaussian_filter((image > BODY_LEVEL).astype(np.float32), 1.0)
        image = body * (1.0 - image)
    image = np.power(image, np.float32(borrow.gamma), dtype=np.float32)
    scale = float(np.percentile(image, 99.5)) or 1.0
    return image / np.float32(scale)


def simulate_subject(anatomy: Anatomy, site: Site, rng: np.random.Generator) -> SimulatedSubject:
    """Deform one source anatomy, insert lesions, acquire and annotate it as ``site`` would.

    Args:
        anatomy: from :func:`load_anatomy`.
        site: the site profile.
        rng: the subject's random generator.

    Returns:
        The subject's image (site dtype), affine, labels (the site's label set), truth and parameters.
    """
    acquisition = site.acquisition
    grid, grid_params = plan_grid(acquisition, anatomy.data.shape, anatomy.affine, anatomy.cord_points, rng)
    spacing = float(np.clip(min(acquisition.spacing_mm), *WORK_SPACING_MM))
    work_shape, work_affine = working_grid(grid, spacing, blur_margin_mm(grid, spacing))
    deformation = draw_deformation(rng, work_shape, work_affine, **asdict(site.deformation))
    coords = source_coordinates(deformation, work_shape, work_affine, anatomy.affine)
    image = warp(anatomy.data, coords)
    cord = np.clip(warp(anatomy.cord, coords), 0.0, 1.0)
    del coords
    profile = site.lesions
    free = profile.max_count == 0 or rng.random() < profile.p_lesion_free
    n_lesions = 0 if free else int(rng.integers(1, profile.max_count + 1))
    inside = _target_region(grid, work_shape, work_affine)
    if n_lesions and not (cord[inside] >= 0.5).any():
        logger.warning("no cord inside the field of view of a %s subject; it gets no lesion", site.name)
        n_lesions = 0
    allowed = np.zeros(work_shape, dtype=bool)
    allowed[inside] = True
    image, lesion, records = insert_lesions_array(
        image,
        cord,
        work_affine,
        contrast=anatomy.sample.contrast,
        n_lesions=n_lesions,
        rng=rng,
        volume_mm3=profile.volume_mm3,
        elongation=profile.elongation,
        allowed=allowed,
    )
    image_t, cord_t, lesion_t = sample_to_target([image, cord, lesion], work_affine, grid)
    written, intensity_params = transfer_intensities(image_t, grid, acquisition, rng)
    labels, annotation_info = annotate(lesion_t, cord_t, grid.spacing, site.annotation)
    truth = truth_masks(lesion_t, cord_t)
    voxel_mm3 = float(np.prod(grid.spacing))
    params = {
        "grid": {**grid_params, "orientation": acquisition.orientation, "spacing_mm": list(grid.spacing)},
        "working_spacing_mm": spacing,
        "deformation": deformation.params,
        "lesions": records,
        "truth_volume_mm3": round(float(truth["lesion"].sum()) * voxel_mm3, 2),
        # lesions much smaller than a thick slice can vanish on the site's grid; this counts what is left
        "truth_lesions": _count_components(truth["lesion"]),
        "annotation": annotation_info,
        "intensity": intensity_params,
    }
    return SimulatedSubject(written, grid.affine, labels, truth, params)


def _count_components(mask: np.ndarray) -> int:
    from scipy import ndimage

    return int(ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))[1])


def _target_region(grid: TargetGrid, work_shape: Sequence[int], work_affine: np.ndarray) -> tuple[slice, ...]:
    """Working-grid box covering the target grid (both are aligned with the world axes)."""
    low, high = world_extent(grid.shape, grid.affine)
    corners = np.linalg.solve(work_affine, np.array([[*low, 1.0], [*high, 1.0]]).T)[:3]
    start = np.clip(np.floor(corners.min(axis=1)).astype(int), 0, np.asarray(work_shape))
    stop = np.clip(np.ceil(corners.max(axis=1)).astype(int) + 1, 0, np.asarray(work_shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def subject_rng(seed: int, site: str, number: int) -> np.random.Generator:
    """The random generator of one simulated subject."""
    return np.random.default_rng([int(seed), zlib.crc32(site.encode()), int(number)])


def simulate(
    source: Path,
    out: Path,
    *,
    sites_config: Path | None = None,
    n_per_site: int,
    seed: int,
    holdout: Sequence[str] | None = None,
    sites: Sequence[str] | None = None,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    phantoms: int = 0,
    test_per_site: int | None = None,
    phantom_contrasts: Sequence[str] | None = None,
    real_share: float | None = None,
) -> Path:
    """Write a simulated multi-site lesion dataset.

    Args:
        source: BIDS dataset with cord masks (read with :func:`sct_sitehead.evaluation.bids.read_bids`, cord suffix
            ``seg-manual`` or ``seg``); only images with a cord mask are used.
        out: new folder to create (it must not exist, or be empty).
        sites_config: sites JSON; None for the packaged ``sites.json``.
        n_per_site: subjects per site.
        seed: random seed; the same arguments give byte-identical files.
        holdout: source subjects (e.g. ``["sub-unf01"]``) whose anatomy appears only in the test split; the other
            subjects are then split between train and val only.
        sites: names of the sites to simulate (default: all in the config).
        split_fractions: train, val, test fractions for subjects of anatomy not held out.
        phantoms: procedural phantom anatomies added to the sources (:mod:`.phantom_sources`); they are never
            held out, so the test split keeps only real anatomy when ``holdout`` is given.
        test_per_site: with ``holdout``, the first this many subjects of each site are drawn from the held-out
            anatomy (the test split) and the others from the rest; None draws every subject from all sources, so
            the test split's size per site is left to chance.
        phantom_contrasts: the contrasts the phantoms cycle through (default:
            :data:`.phantom_sources.DEFAULT_CONTRASTS`).
        real_share: the share of a site's train and val subjects drawn from real anatomy where the site has both
            real and phantom sources of its contrast (one real T1w scan among 4 phantoms gets about half the
            subjects at 0.5 instead of a fifth). None: every source is equally likely.

    Returns:
        ``out``.

    Raises:
        UsageError: bad arguments (unknown site or holdout subject, a site whose contrasts no source has).
        OutputError: ``out`` is not empty or cannot be written.
    """
    source, out = Path(source), Path(out)
    if n_per_site < 1:
        raise UsageError(f"n_per_site is {n_per_site}; use 1 or more")
    if real_share is not None and not 0.0 <= float(real_share) <= 1.0:
        raise UsageError(f"real_share is {real_share}; give a share between 0 and 1")
    profiles = _choose_sites(load_sites(sites_config), sites)
    samples = _sources(source)
    holdout = sorted(set(holdout or ()))
    unknown = [h for h in holdout if h not in {s.subject for s in samples}]
    if unknown:
        raise UsageError(
            f"holdout subjects {unknown} have no image with a cord mask in {source}; "
            f"choose among {sorted({s.subject for s in samples})}"
        )
    staging = staging_folder(out)
    started = time.perf_counter()
    extra = tempfile.TemporaryDirectory(prefix="sct_sitehead-phantoms-") if phantoms else None
    phantom_subjects: set[str] = set()
    try:
        if extra is not None:
            written = write_phantom_sources(
                Path(extra.name) / "phantoms", phantoms, seed=seed, contrasts=phantom_contrasts
            )
            made = _sources(written)
            phantom_subjects = {s.subject for s in made}
            samples = samples + made
        rows, subjects = _simulate_all(
            samples,
            profiles,
            staging,
            n_per_site,
            seed,
            holdout,
            split_fractions,
            test_per_site,
            real_share=real_share,
            phantom_subjects=phantom_subjects,
        )
        _write_dataset_files(
            staging, source, rows, subjects, profiles, n_per_site, seed, holdout, split_fractions, real_share
        )
        move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if extra is not None:
            extra.cleanup()
    logger.info(
        "simulated %d subjects at %d sites into %s in %.1f s",
        len(rows),
        len(profiles),
        out,
        time.perf_counter() - started,
    )
    return out


def _choose_sites(profiles: dict[str, Site], names: Sequence[str] | None) -> list[Site]:
    if names is None:
        return list(profiles.values())
    missing = [n for n in names if n not in profiles]
    if missing:
        raise UsageError(f"sites {missing} are not in the sites config; choose among {sorted(profiles)}")
    return [profiles[n] for n in names]


def _sources(source: Path) -> list[Sample]:
    samples, problems = read_bids(source, label_suffixes={"cord": ["seg-manual", "seg"]})
    with_cord = [s for s in samples if "cord" in s.labels]
    if not with_cord:
        raise UsageError(
            f"{source} has no image with a cord mask (derivatives/labels/.../<stem>_seg-manual.nii.gz); "
            f"problems found: {problems or 'none'}"
        )
    logger.info("%d source images with a cord mask in %s", len(with_cord), source)
    return with_cord


def _simulate_all(
    samples: list[Sample],
    profiles: list[Site],
    root: Path,
    n_per_site: int,
    seed: int,
    holdout: list[str],
    split_fractions: tuple[float, float, float],
    test_per_site: int | None = None,
    *,
    real_share: float | None = None,
    phantom_subjects: set[str] | frozenset[str] = frozenset(),
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    anatomies: dict[tuple[Path, Borrow | None], Anatomy] = {}
    rows: list[dict[str, str]] = []
    subjects: dict[str, Any] = {}
    for site in profiles:
        eligible = _eligible(samples, site, holdout)
        chosen = []
        for number in range(1, n_per_site + 1):
            rng = subject_rng(seed, site.name, number)
            pool = _pool(eligible, holdout, test_per_site, number)
            if real_share is not None:
                pool = _real_or_phantom(pool, phantom_subjects, float(real_share), rng)
            source = pool[int(rng.integers(len(pool)))]
            key = (source.sample.image, source.borrow)
            if key not in anatomies:
                anatomies[key] = load_anatomy(source.sample, source.borrow)
            started = time.perf_counter()
            result = simulate_subject(anatomies[key], site, rng)
            participant = f"sub-{site.name}{number:03d}"
            _write_subject(root, participant, source.sample, site, result)
            chosen.append((participant, source))
            subjects[participant] = {"site": site.name, "source": source.name, **result.params}
            logger.debug("%s from %s in %.2f s", participant, source.name, time.perf_counter() - started)
        split_rng = np.random.default_rng([int(seed), zlib.crc32(site.name.encode()), 0])
        splits = _splits(chosen, holdout, split_fractions, split_rng)
        rows.extend({"participant_id": p, "site": site.name, "source": s.name, "split": splits[p]} for p, s in chosen)
    return rows, subjects


@dataclass(frozen=True)
class _Source:
    """A source image as one site uses it: in its own contrast, or borrowed (written as the site's contrast)."""

    sample: Sample
    borrow: Borrow | None = None

    @property
    def subject(self) -> str:
        return self.sample.subject

    @property
    def name(self) -> str:
        """``sub-errsm30_T2w``, or ``sub-errsm30_T2w as T1w`` when borrowed."""
        return f"{self.sample.stem} as {self.sample.contrast}" if self.borrow else self.sample.stem


def _eligible(samples: list[Sample], site: Site, holdout: list[str]) -> list[_Source]:
    """The site's own contrasts, then the contrasts it borrows (never from held-out anatomy)."""
    own = [_Source(s) for s in samples if s.contrast in site.contrasts]
    if not own:
        raise UsageError(
            f"site {site.name!r} scans {list(site.contrasts)} but the source has cord-labelled images of "
            f"{sorted({s.contrast for s in samples})} only; leave the site out (sites=...) or add such images"
        )
    borrowed = [
        _Source(replace(s, contrast=site.contrasts[0], entities={}), site.borrow[s.contrast])
        for s in samples
        if s.contrast in site.borrow and s.subject not in holdout
    ]
    return own + borrowed


def _pool(eligible: list[_Source], holdout: list[str], test_per_site: int | None, number: int) -> list[_Source]:
    """The sources subject ``number`` (1-based) of a site may come from."""
    if not holdout or test_per_site is None:
        return eligible
    held = [s for s in eligible if s.subject in holdout]
    rest = [s for s in eligible if s.subject not in holdout]
    wanted = held if number <= test_per_site else rest
    return wanted or eligible


def _real_or_phantom(
    pool: list[_Source], phantom_subjects: set[str] | frozenset[str], real_share: float, rng: np.random.Generator
) -> list[_Source]:
    """The real sources of ``pool`` with probability ``real_share``, else its phantoms (the whole pool when it
    lacks either kind)."""
    real = [s for s in pool if s.subject not in phantom_subjects]
    made = [s for s in pool if s.subject in phantom_subjects]
    if not real or not made:
        return pool
    return real if rng.random() < real_share else made


def _splits(
    chosen: list[tuple[str, _Source]],
    holdout: list[str],
    fractions: tuple[float, float, float],
    rng: np.random.Generator,
) -> dict[str, str]:
    """Holdout anatomy -> test; the rest shuffled into train/val/test by the fractions (train/val with a holdout)."""
    train, val, test = (max(float(f), 0.0) for f in fractions)
    if holdout:
        test = 0.0
    total = train + val + test
    if total <= 0:
        raise UsageError(f"split fractions {fractions} sum to 0; use e.g. (0.7, 0.15, 0.15)")
    splits = {p: "test" for p, s in chosen if s.subject in holdout}
    rest = [p for p, s in chosen if s.subject not in holdout]
    order = [rest[i] for i in rng.permutation(len(rest))]
    n_train = int(round(len(rest) * train / total))
    n_val = int(round(len(rest) * val / total)) if test > 0 else len(rest) - n_train
    for index, participant in enumerate(order):
        splits[participant] = "train" if index < n_train else "val" if index < n_train + n_val else "test"
    return splits


def _output_stem(participant: str, sample: Sample) -> str:
    acq = f"_acq-{sample.acquisition}" if sample.acquisition else ""
    return f"{participant}{acq}_{sample.contrast}"


def _nifti(data: np.ndarray, affine: np.ndarray):
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def _write_subject(root: Path, participant: str, sample: Sample, site: Site, result: SimulatedSubject) -> None:
    import nibabel as nib

    stem = _output_stem(participant, sample)
    files = {root / participant / "anat" / f"{stem}.nii.gz": result.image}
    labels_dir = root / "derivatives" / "labels" / participant / "anat"
    for name, suffix in site.annotation.labels.items():
        files[labels_dir / f"{stem}_{suffix}.nii.gz"] = result.labels[name]
    truth_dir = root / "derivatives" / "truth" / participant / "anat"
    files[truth_dir / f"{stem}_lesion-truth.nii.gz"] = result.truth["lesion"]
    files[truth_dir / f"{stem}_cord-truth.nii.gz"] = result.truth["cord"]
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(_nifti(data, result.affine), path)
    except OSError as exc:
        raise OutputError(f"cannot write {participant} under {root}: {exc}; check free space and permissions") from exc


def _write_dataset_files(
    root: Path,
    source: Path,
    rows: list[dict[str, str]],
    subjects: dict[str, Any],
    profiles: list[Site],
    n_per_site: int,
    seed: int,
    holdout: list[str],
    split_fractions: tuple[float, float, float],
    real_share: float | None = None,
) -> None:
    header = ["participant_id", "site", "source", "split"]
    ordered = sorted(rows, key=lambda r: r["participant_id"])
    lines = ["\t".join(header)] + ["\t".join(row[k] for k in header) for row in ordered]
    (root / "participants.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    generated = [{"Name": "sct_sitehead simulate", "Version": __version__}]
    write_json_atomic(
        {
            "Name": "sct_sitehead simulated multi-site spinal cord lesions",
            "BIDSVersion": "1.8.0",
            "DatasetType": "raw",
            "GeneratedBy": generated,
            "SourceDatasets": [{"Name": source.name}],
        },
        root / "dataset_description.json",
        sort_keys=True,
    )
    for name, description in (("labels", "site annotations"), ("truth", "unannotated lesion and cord truth")):
        derivative = root / "derivatives" / name
        derivative.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            {
                "Name": f"sct_sitehead simulated {description}",
                "BIDSVersion": "1.8.0",
                "DatasetType": "derivative",
                "GeneratedBy": generated,
            },
            derivative / "dataset_description.json",
            sort_keys=True,
        )
    write_json_atomic(
        {
            "generator": {"name": "sct_sitehead.simulate", "version": __version__},
            "source": source.name,
            "phantom_subjects": sum(1 for s in subjects.values() if s["source"].startswith("sub-phantom")),
            "seed": seed,
            "n_per_site": n_per_site,
            "holdout": holdout,
            "split_fractions": list(split_fractions),
            # Written only when set, so a default run writes the same file as before the option existed.
            **({"real_share": real_share} if real_share is not None else {}),
            "sites": {site.name: site.as_dict() for site in profiles},
            "subjects": subjects,
        },
        root / "simulation.json",
        sort_keys=True,
    )
