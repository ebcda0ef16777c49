"""Build a labelled multi-site lesion dataset from real anatomy with cord masks.

For each simulated subject of each site: pick a source image of a contrast the site scans (with its cord mask;
train and val subjects may also borrow the anatomy of another contrast, remapped, where the site's profile says so),
place the site's field of view on the cord, pull the anatomy through a random deformation onto a fine working grid,
insert lesions in the cord, acquire it the site's way and annotate it the site's way. Everything random comes from
one generator per subject, seeded by ``(seed, site name, subject number)``, so a seed gives byte-identical files
and a site's subjects do not change when other sites are added.

Output (BIDS)::

    participants.tsv                      participant_id, site, source, split (and seen_anatomy, with splits)
    dataset_description.json
    simulation.json                       the arguments, every site profile, per-subject parameters
    sub-<site><NNN>/anat/sub-<site><NNN>[_acq-<x>]_<contrast>.nii.gz
    derivatives/labels/sub-.../anat/<stem>_<suffix>.nii.gz      the site's labels (lesion-manual, ...)
    derivatives/truth/sub-.../anat/<stem>_lesion-truth.nii.gz   the unannotated truth (and _cord-truth)
    derivatives/truth/sub-.../anat/<stem>_labelmap-truth.nii.gz the tissue classes for synthesis (:mod:`.labelmap`)
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
from sct_sitehead.evaluation.splits import Splits
from sct_sitehead.simulate.acquisition import (
    TargetGrid,
    blur_margin_mm,
    plan_grid,
    sample_to_target,
    transfer_intensities,
    working_grid,
)
from sct_sitehead.simulate.annotation import annotate, truth_masks
from sct_sitehead.simulate.cord_atlas import MAPS, CrossSections, load_cross_sections, map_onto_cord
from sct_sitehead.simulate.deform import draw_deformation, source_coordinates, warp
from sct_sitehead.simulate.grids import voxel_coordinates, world_extent
from sct_sitehead.simulate.labelmap import LABEL_MAP, label_map, to_target
from sct_sitehead.simulate.lesions import insert_lesions_array
from sct_sitehead.simulate.phantom_sources import write_phantom_sources
from sct_sitehead.simulate.selection import (
    SitePlan,
    Source,
    check_split_covers,
    eligible_sources,
    holdout_pool,
    holdout_splits,
    participant_id,
    plan_sites,
    real_or_phantom,
    split_report,
    split_rng,
)
from sct_sitehead.simulate.sites import Borrow, Site, load_sites
from sct_sitehead.simulate.spine_atlas import map_spine
from sct_sitehead.simulate.staging import staging_folder
from sct_sitehead.version import __version__

logger = logging.getLogger(__name__)

#: Working grid spacing bounds (mm): fine enough for the sites' voxels, coarse enough to stay fast.
WORK_SPACING_MM = (0.6, 1.0)
#: Intensity (of the 99.5th percentile) below which a borrowed image is air, kept dark when inverted.
BODY_LEVEL = 0.1
#: Relative chance of a lesion centre per unit of cord and of each PAM50 tract probability: MS lesions of the cord
#: are most frequent in the dorsal columns and the lateral funiculi (Eden et al. 2019), and occur anywhere.
TRACT_WEIGHTS = {"cord": 0.3, "gm": 0.2, "dorsal_columns": 1.0, "lateral_funiculi": 0.8}
#: The label map's file suffix under derivatives/truth.
LABEL_MAP_SUFFIX = "labelmap-truth"


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


def simulate_subject(
    anatomy: Anatomy, site: Site, rng: np.random.Generator, sections: CrossSections | None = None
) -> SimulatedSubject:
    """Deform one source anatomy, insert lesions, acquire and annotate it as ``site`` would.

    Args:
        anatomy: from :func:`load_anatomy`.
        site: the site profile.
        rng: the subject's random generator.
        sections: the PAM50 cross-sections (:mod:`.cord_atlas`): grey matter in the label map, and lesions placed
            by tract probability (:data:`TRACT_WEIGHTS`), and the spine's vertebrae and discs in the label map; None: no
            grey matter, spine or tract weights, lesions uniform in the cord.

    Returns:
        The subject's image (site dtype), affine, labels (the site's label set), truth (lesion, cord and the
        ``labelmap``, :mod:`.labelmap`) and parameters.
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
    maps = map_onto_cord(cord, work_affine, sections, rng) if sections is not None else None
    weights = None
    if maps is not None:
        weights = cord * (TRACT_WEIGHTS["cord"] + sum(TRACT_WEIGHTS[name] * maps[name] for name in MAPS))
    profile = site.lesions
    free = profile.max_count == 0 or rng.random() < profile.p_lesion_free
    n_lesions = 0 if free else int(rng.integers(1, profile.max_count + 1))
    inside = _target_region(grid, work_shape, work_affine)
    if n_lesions and not (cord[inside] >= 0.5).any():
        logger.warning("no cord inside the field of view of a %s subject; it gets no lesion", site.name)
        n_lesions = 0
    allowed = np.zeros(work_shape, dtype=bool)
    allowed[inside] = True
    clean = image
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
        weights=weights,
    )
    grey = maps["gm"] if maps is not None else np.zeros_like(cord)
    # the spine's draws come from a child generator: the subject's other draws stay those of a map without it
    spine = None
    if sections is not None and sections.spine is not None:
        spine = map_spine(cord, work_affine, sections.spine, rng.spawn(1)[0])
    classes = label_map(clean, cord, grey, lesion, work_affine, rng, spine)
    del clean, grey, maps, weights, spine
    classes_t = to_target(classes, voxel_coordinates(grid.shape, grid.affine, work_affine))
    image_t, cord_t, lesion_t = sample_to_target([image, cord, lesion], work_affine, grid)
    written, intensity_params = transfer_intensities(image_t, grid, acquisition, rng)
    labels, annotation_info = annotate(lesion_t, cord_t, grid.spacing, site.annotation)
    truth = {**truth_masks(lesion_t, cord_t), "labelmap": classes_t}
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
    pam50: Path | None = None,
    splits: Splits | None = None,
    train_rotation_deg: float | None = None,
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
            subjects are then split between train and val only. The older scheme: ``splits`` replaces it.
        sites: names of the sites to simulate (default: all in the config).
        split_fractions: train, val, test fractions for subjects of anatomy not held out (with ``splits``: of
            every subject, or of those after the first ``test_per_site``, between train and val).
        phantoms: procedural phantom anatomies added to the sources (:mod:`.phantom_sources`); they are never
            held out, so the test split keeps only real anatomy when ``holdout`` is given; with ``splits`` they
            are train only.
        test_per_site: with ``holdout`` or ``splits``, the first this many subjects of each site are drawn from
            the held-out (test) anatomy and are the test split, and the others from the rest; None: with
            ``holdout``, every subject is drawn from all sources, so the test split's size per site is left to
            chance; with ``splits``, ``split_fractions`` shares every subject between the three splits.
        phantom_contrasts: the contrasts the phantoms cycle through (default:
            :data:`.phantom_sources.DEFAULT_CONTRASTS`).
        real_share: the share of a site's train and val subjects drawn from real anatomy where the site has both
            real and phantom sources of its contrast (one real T1w scan among 4 phantoms gets about half the
            subjects at 0.5 instead of a fifth). None: every source is equally likely.
        pam50: the PAM50 template folder (``template/``, ``atlas/``) for grey matter and tract-weighted lesion
            placement; None: ``pam50`` beside ``source`` when it is there, else none (a warning).
        splits: the frozen split by person (:func:`sct_sitehead.evaluation.splits.load_splits`): each subject's
            split is planned first and its source drawn from that split's persons (:mod:`.selection`);
            ``participants.tsv`` gets a ``seen_anatomy`` column and ``simulation.json`` a ``splits`` record.
            None: the ``holdout`` scheme.
        train_rotation_deg: with ``splits``, the train subjects' anatomy is rotated by up to this many degrees
            (about a random axis) instead of the site's ``rotation_deg``, so the training cords lie at the tilts
            real scans show (10 to 30 degrees off the scanner's axis near a lesion) and the site's thick slices cut
            them obliquely. Val and test subjects are drawn as without it (the same random draws, the same
            files). None: every subject the site's way.

    Returns:
        ``out``.

    Raises:
        UsageError: bad arguments (unknown site or holdout subject, a site whose contrasts no source has, both
            ``holdout`` and ``splits``, a source subject the split does not know).
        OutputError: ``out`` is not empty or cannot be written.
    """
    source, out = Path(source), Path(out)
    if n_per_site < 1:
        raise UsageError(f"n_per_site is {n_per_site}; use 1 or more")
    if real_share is not None and not 0.0 <= float(real_share) <= 1.0:
        raise UsageError(f"real_share is {real_share}; give a share between 0 and 1")
    if train_rotation_deg is not None:
        if splits is None:
            raise UsageError("train_rotation_deg needs the frozen split (-splits): it changes the train subjects only")
        if not 0.0 <= float(train_rotation_deg) <= 90.0:
            raise UsageError(f"train_rotation_deg is {train_rotation_deg}; give 0 to 90 degrees")
    profiles = _choose_sites(load_sites(sites_config), sites)
    samples = _sources(source)
    holdout = sorted(set(holdout or ()))
    unknown = [h for h in holdout if h not in {s.subject for s in samples}]
    if unknown:
        raise UsageError(
            f"holdout subjects {unknown} have no image with a cord mask in {source}; "
            f"choose among {sorted({s.subject for s in samples})}"
        )
    if splits is not None:
        if holdout:
            raise UsageError(
                f"holdout {holdout} and the frozen split both choose the test anatomy; give one of them (the "
                "split holds its test persons out already)"
            )
        check_split_covers(splits, samples)
    sections = _cross_sections(source, pam50)
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
        plans = None
        if splits is not None:
            plans = plan_sites(
                samples,
                profiles,
                splits,
                n_per_site=n_per_site,
                seed=seed,
                test_per_site=test_per_site,
                fractions=split_fractions,
                phantom_subjects=phantom_subjects,
            )
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
            sections=sections,
            plans=plans,
            train_rotation_deg=train_rotation_deg,
        )
        _write_dataset_files(
            staging,
            source,
            rows,
            subjects,
            profiles,
            n_per_site,
            seed,
            holdout,
            split_fractions,
            real_share,
            split_record=None if splits is None else split_report(splits, plans or {}),
            train_rotation_deg=train_rotation_deg,
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


def _cross_sections(source: Path, pam50: Path | None) -> CrossSections | None:
    """The PAM50 cross-sections from ``pam50``, or from ``pam50`` beside ``source``; None (warned) without one."""
    if pam50 is None:
        pam50 = source.parent / "pam50"
        if not pam50.is_dir():
            logger.warning(
                "no PAM50 folder at %s: the label maps get no grey matter and lesions are placed uniformly in the "
                "cord; give one with -pam50",
                pam50,
            )
            return None
    return load_cross_sections(Path(pam50))


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
    sections: CrossSections | None = None,
    plans: dict[str, SitePlan] | None = None,
    train_rotation_deg: float | None = None,
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    anatomies: dict[tuple[Path, Borrow | None], Anatomy] = {}
    rows: list[dict[str, str]] = []
    subjects: dict[str, Any] = {}
    for site in profiles:
        eligible = eligible_sources(samples, site, holdout)
        plan = None if plans is None else plans[site.name]
        chosen: list[tuple[str, Source]] = []
        for number in range(1, n_per_site + 1):
            participant = participant_id(site.name, number)
            pool = holdout_pool(eligible, holdout, test_per_site, number) if plan is None else plan.pool(participant)
            if not pool:
                continue  # the split planned for it has no anatomy at this site: plan_site reported it
            rng = subject_rng(seed, site.name, number)
            if real_share is not None:
                pool = real_or_phantom(pool, phantom_subjects, float(real_share), rng)
            source = pool[int(rng.integers(len(pool)))]
            key = (source.sample.image, source.borrow)
            if key not in anatomies:
                anatomies[key] = load_anatomy(source.sample, source.borrow)
            started = time.perf_counter()
            profile = site
            if train_rotation_deg is not None and plan is not None and plan.split_of[participant] == "train":
                tilted = replace(site.deformation, rotation_deg=float(train_rotation_deg))
                profile = replace(site, deformation=tilted)
            result = simulate_subject(anatomies[key], profile, rng, sections)
            _write_subject(root, participant, source.sample, site, result)
            chosen.append((participant, source))
            subjects[participant] = {"site": site.name, "source": source.name, **result.params}
            logger.debug("%s from %s in %.2f s", participant, source.name, time.perf_counter() - started)
        if plan is None:
            assigned = holdout_splits(chosen, holdout, split_fractions, split_rng(seed, site.name))
        else:
            assigned = dict(plan.split_of)
        for participant, source in chosen:
            row = {
                "participant_id": participant,
                "site": site.name,
                "source": source.name,
                "split": assigned[participant],
            }
            if plan is not None:
                seen = plan.seen(participant, source)
                row["seen_anatomy"] = "yes" if seen else "no"
                subjects[participant]["seen_anatomy"] = seen
            rows.append(row)
    return rows, subjects


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
    if "labelmap" in result.truth:
        files[truth_dir / f"{stem}_{LABEL_MAP_SUFFIX}.nii.gz"] = result.truth["labelmap"]
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
    *,
    split_record: dict[str, Any] | None = None,
    train_rotation_deg: float | None = None,
) -> None:
    header = ["participant_id", "site", "source", "split"] + (["seen_anatomy"] if split_record is not None else [])
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
            **({"train_rotation_deg": train_rotation_deg} if train_rotation_deg is not None else {}),
            **({"splits": split_record} if split_record is not None else {}),
            "sites": {site.name: site.as_dict() for site in profiles},
            "label_map": {"suffix": LABEL_MAP_SUFFIX, "classes": {str(k): v for k, v in LABEL_MAP.items()}},
            "subjects": subjects,
        },
        root / "simulation.json",
        sort_keys=True,
    )
