"""Synthesis from label maps: PAM50's grey matter and tracts inside any cord, the simulator's label maps, lesions
placed by tract probability with a wide contrast range, and images drawn from label maps in training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sct_sitehead.simulate import spine_atlas
from sct_sitehead.simulate.cord_atlas import load_cross_sections, map_onto_cord
from sct_sitehead.simulate.labelmap import (
    CSF,
    DISC,
    GREY_MATTER,
    LABEL_MAP,
    LESION,
    VERTEBRA,
    WHITE_MATTER,
    label_map,
)
from sct_sitehead.simulate.lesions import LESION_CONTRAST, insert_lesions_array


@pytest.fixture(scope="module")
def sections(bids_dir: Path):
    pam50 = bids_dir.parent / "pam50"
    if not pam50.is_dir():
        pytest.skip(f"no PAM50 folder at {pam50}")
    return load_cross_sections(pam50)


def _elliptic_cord(spacing: float = 0.8, shape=(60, 60, 40), semi=(5.0, 3.5)) -> tuple[np.ndarray, np.ndarray]:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [-(shape[0] // 2) * spacing, -(shape[1] // 2) * spacing, 0.0]
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    x, y = i * spacing + affine[0, 3], j * spacing + affine[1, 3]
    cord = np.zeros(shape, dtype=np.float32)
    cord[(x / semi[0]) ** 2 + (y / semi[1]) ** 2 <= 1] = 1.0
    return cord, affine


def test_pam50_grey_matter_and_tracts_land_inside_the_cord_on_the_right_side(sections):
    cord, affine = _elliptic_cord()
    maps = map_onto_cord(cord, affine, sections, np.random.default_rng(0))
    y = (np.arange(cord.shape[1]) * affine[1, 1] + affine[1, 3])[None, :, None]
    x = (np.arange(cord.shape[0]) * affine[0, 0] + affine[0, 3])[:, None, None]
    grey = maps["gm"] >= 0.5
    assert not (grey & (cord == 0)).any()
    assert 0.10 <= grey.sum() / cord.sum() <= 0.30  # grey matter is about a fifth of the cord's area
    dorsal = maps["dorsal_columns"] >= 0.5
    lateral = maps["lateral_funiculi"] >= 0.5
    assert np.broadcast_to(y, cord.shape)[dorsal].mean() < -1.0  # posterior (RAS: y grows anteriorly)
    assert (
        np.abs(np.broadcast_to(x, cord.shape)[lateral]).mean() > np.abs(np.broadcast_to(x, cord.shape)[dorsal]).mean()
    )


def test_pam50_vertebrae_and_discs_surround_the_cord_with_discs_in_front(sections):
    cord, affine = _elliptic_cord(spacing=1.0, shape=(70, 70, 110))
    spine = spine_atlas.map_spine(cord, affine, sections.spine, np.random.default_rng(0))
    y = np.broadcast_to((np.arange(cord.shape[1]) * affine[1, 1] + affine[1, 3])[None, :, None], cord.shape)
    vertebra, disc = spine == spine_atlas.VERTEBRA, spine == spine_atlas.DISC
    assert 0.05 < vertebra.mean() < 0.4 and disc.any()
    assert not (cord.astype(bool) & (vertebra | disc)).any()  # the canal is free
    assert y[disc].mean() > 8.0  # discs lie between the vertebral bodies, in front of the cord (RAS: +y)
    # discs come and go along the cord, one every 15 to 25 mm or so (cervical and upper thoracic)
    runs = np.flatnonzero(np.diff(disc.any(axis=(0, 1)).astype(int)) == 1)
    assert 3 <= len(runs) <= 9
    # the same generator, the same spine; a subject of another size and level, another one
    assert np.array_equal(spine, spine_atlas.map_spine(cord, affine, sections.spine, np.random.default_rng(0)))
    assert not np.array_equal(spine, spine_atlas.map_spine(cord, affine, sections.spine, np.random.default_rng(1)))
    # the spine follows the cord: a cord moved 6 mm to the right moves its spine with it
    moved = np.roll(cord, 6, axis=0)
    x = np.arange(cord.shape[0]) * affine[0, 0] + affine[0, 3]
    shifted = spine_atlas.map_spine(moved, affine, sections.spine, np.random.default_rng(0))
    assert abs(x[np.nonzero(shifted)[0]].mean() - x[np.nonzero(spine)[0]].mean() - 6.0) < 1.0
    assert not spine_atlas.map_spine(np.zeros_like(cord), affine, sections.spine, np.random.default_rng(0)).any()


def test_vertebrae_and_discs_replace_background_tissue_only():
    cord, affine = _elliptic_cord()
    image = np.random.default_rng(1).uniform(0.1, 1.0, cord.shape).astype(np.float32)
    image[:, :, :3] = 0.0  # air
    spine = np.zeros(cord.shape, dtype=np.uint8)
    spine[:, 40:, :] = spine_atlas.VERTEBRA  # anterior, some of it air
    spine[:, 40:, 20:24] = spine_atlas.DISC
    spine[28:32, 28:32, :] = spine_atlas.VERTEBRA  # inside the cord: ignored
    plain = label_map(image, cord, np.zeros_like(cord), np.zeros_like(cord), affine, np.random.default_rng(2))
    classes = label_map(image, cord, np.zeros_like(cord), np.zeros_like(cord), affine, np.random.default_rng(2), spine)
    background = (plain >= 1) & (plain < CSF)
    assert (classes[background & (spine == spine_atlas.VERTEBRA)] == VERTEBRA).all()
    assert (classes[background & (spine == spine_atlas.DISC)] == DISC).all()
    assert np.array_equal(classes[~background], plain[~background])  # air, CSF and cord untouched
    assert LABEL_MAP[VERTEBRA] == "vertebra" and LABEL_MAP[DISC] == "disc"


def test_label_map_classes_on_a_cord():
    cord, affine = _elliptic_cord()
    image = np.random.default_rng(1).uniform(0.1, 1.0, cord.shape).astype(np.float32)
    grey = np.zeros_like(cord)
    grey[28:32, 28:32] = cord[28:32, 28:32]
    lesion = np.zeros_like(cord)
    lesion[24:27, 30:32, 10:20] = 1.0
    classes = label_map(image, cord, grey, lesion, affine, np.random.default_rng(2))
    assert set(np.unique(classes)) <= set(LABEL_MAP)
    assert (classes[lesion >= 0.5] == LESION).all()
    assert (classes[(cord >= 0.5) & (lesion < 0.5) & (grey < 0.5)] == WHITE_MATTER).all()
    assert (classes[(grey >= 0.5) & (lesion < 0.5)] == GREY_MATTER).all()
    assert (classes == CSF).sum() > 0 and not ((classes == CSF) & (cord >= 0.5)).any()
    assert len(set(np.unique(classes[(classes < CSF) & (classes > 0)]))) == 5  # five background classes


def test_lesion_centres_follow_the_weights_and_contrasts_span_the_range():
    cord, affine = _elliptic_cord()
    weights = np.zeros_like(cord)
    weights[:, :30] = 1.0  # the posterior half only
    data = np.ones_like(cord)
    _, _, records = insert_lesions_array(
        data, cord, affine, contrast="T2w", n_lesions=40, rng=np.random.default_rng(3), weights=weights
    )
    centres = np.array([r["center_mm"] for r in records])
    assert (centres[:, 1] < 0.5).all()
    contrasts = np.array([r["contrast"] for r in records])
    low, high = LESION_CONTRAST["T2w"]
    assert (contrasts >= low).all() and (contrasts <= high).all()
    assert (contrasts < 0.6).sum() >= 8 and (contrasts > 1.5).sum() >= 8  # log-uniform: faint and bright alike
    _, _, dark = insert_lesions_array(data, cord, affine, contrast="T1w", n_lesions=20, rng=np.random.default_rng(4))
    assert all(LESION_CONTRAST["T1w"][0] <= r["contrast"] <= LESION_CONTRAST["T1w"][1] < 0 for r in dark)


@pytest.mark.slow
def test_simulate_writes_label_maps_with_grey_matter(bids_dir, tmp_path):
    from sct_sitehead.simulate import simulate

    out = simulate(bids_dir, tmp_path / "sim", n_per_site=2, seed=3, sites=["paris", "montreal"])
    meta = json.loads((out / "simulation.json").read_text())
    assert meta["label_map"]["classes"]["9"] == "lesion" and meta["label_map"]["classes"]["11"] == "disc"
    import nibabel as nib

    maps = sorted((out / "derivatives" / "truth").rglob("*_labelmap-truth.nii.gz"))
    assert len(maps) == 4
    for path in maps:
        classes = np.asarray(nib.load(path).dataobj)
        image = nib.load(
            out / path.parent.relative_to(out / "derivatives" / "truth") / path.name.replace("_labelmap-truth", "")
        )
        assert classes.shape == image.shape and classes.dtype == np.uint8
        cord = nib.load(path.with_name(path.name.replace("labelmap", "cord"))).get_fdata() > 0
        inside = classes[cord]
        assert (inside == GREY_MATTER).any() and (inside == WHITE_MATTER).any()
        assert (classes == VERTEBRA).any() and not np.isin(inside, [VERTEBRA, DISC]).any()
        truth = nib.load(path.with_name(path.name.replace("labelmap", "lesion"))).get_fdata() > 0
        assert (classes[truth] == LESION).mean() > 0.5 if truth.any() else not (classes == LESION).any()


# --- training ----------------------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")


def _options(**changes):
    from sct_sitehead.training.config import DEFAULTS

    classes = {**DEFAULTS["augment"]["synth_classes"], "count": len(LABEL_MAP)}
    return {**DEFAULTS["augment"], "synth_classes": classes, **changes}


def test_synthesised_images_vary_in_contrast_keep_the_lesion_visible_and_repeat_by_seed():
    from sct_sitehead.training.synth import synthesize

    classes = np.full((1, 24, 24, 24), 3, dtype=np.uint8)
    classes[0, 6:18, 6:18, :] = WHITE_MATTER
    classes[0, 10:14, 10:14, :] = GREY_MATTER
    classes[0, 8:10, 14:17, 8:16] = LESION
    tensor = torch.from_numpy(classes)
    options = _options()
    low = options["lesion_contrast"][0]
    signs = set()
    for seed in range(20):
        image = synthesize(tensor, torch.Generator().manual_seed(seed), {**options, "synth_blur": [0.0, 0.0]})
        assert abs(float(image.mean())) < 1e-4 and abs(float(image.std()) - 1) < 1e-3  # z-scored
        raw_gap = float(image[classes == LESION].mean() - image[classes == WHITE_MATTER].mean())
        spread = float(image.std())  # z-scoring divides every gap by the same number
        assert abs(raw_gap) > 0  # never iso-intense
        signs.add(np.sign(raw_gap))
        assert spread > 0 and low > 0
    assert signs == {-1.0, 1.0}  # darker and brighter lesions both occur
    a = synthesize(tensor, torch.Generator().manual_seed(7), options)
    b = synthesize(tensor, torch.Generator().manual_seed(7), options)
    assert torch.equal(a, b)


def test_a_csf_gap_keeps_the_csf_away_from_the_lesion_and_zero_draws_as_before():
    from sct_sitehead.training.synth import class_means

    plain, gapped = _options(), _options(lesion_csf_gap=0.2)
    csf, lesion = plain["synth_classes"]["csf"], plain["synth_classes"]["lesion"]
    assert LABEL_MAP[csf] == "csf"
    near = 0
    for seed in range(200):
        before = class_means(torch.Generator().manual_seed(seed), plain)
        after = class_means(torch.Generator().manual_seed(seed), gapped)
        assert abs(float(after[csf] - after[lesion])) >= 0.2
        near += abs(float(before[csf] - before[lesion])) < 0.2
        keep = [k for k in range(len(before)) if k != csf]
        assert torch.equal(before[keep], after[keep])  # only the CSF's mean is drawn again
    assert near > 10  # without the gap the CSF often lies near the lesion
    again = class_means(torch.Generator().manual_seed(3), _options(lesion_csf_gap=0.0))
    assert torch.equal(again, class_means(torch.Generator().manual_seed(3), plain))


def test_augment_synthesises_only_patches_with_a_label_map():
    from sct_sitehead.training.augment import augment_batch
    from sct_sitehead.training.data import NO_CLASSES

    images = torch.randn(2, 1, 16, 16, 16)
    targets = torch.zeros(2, 1, 16, 16, 16)
    classes = torch.full((2, 1, 16, 16, 16), 2, dtype=torch.uint8)
    classes[1] = NO_CLASSES
    off = {k: 0.0 for k in ("flip", "affine", "gamma", "noise", "bias", "resolution")}
    out, _ = augment_batch(images, targets, torch.Generator().manual_seed(0), _options(synth=1.0, **off), classes)
    assert not torch.equal(out[0], images[0])  # synthesised from its label map
    assert torch.equal(out[1], images[1])  # no label map: left as it was
    same, _ = augment_batch(images, targets, torch.Generator().manual_seed(0), _options(synth=0.0, **off), classes)
    assert torch.equal(same, images)


def test_synthesis_draws_the_lesions_the_target_marks_and_only_those():
    from sct_sitehead.training.augment import augment_batch
    from sct_sitehead.training.loop import lesion_targets
    from sct_sitehead.training.synth import draw_lesions_as_labelled

    classes = np.full((1, 16, 16, 16), 3, dtype=np.uint8)
    classes[0, 4:12, 4:12, :] = WHITE_MATTER
    classes[0, 5:7, 5:7, 2:6] = LESION  # placed by the simulator, left out by the site's annotation
    target = np.zeros((1, 16, 16, 16), dtype=np.uint8)
    target[0, 9:11, 9:11, 8:12] = 1  # annotated
    options = _options()
    drawn = draw_lesions_as_labelled(torch.from_numpy(classes), torch.from_numpy(target), options)
    assert torch.equal(drawn == LESION, torch.from_numpy(target) > 0)
    assert (drawn[0, 5:7, 5:7, 2:6] == WHITE_MATTER).all()
    untouched = (classes != LESION) & (target == 0)
    assert torch.equal(drawn[torch.from_numpy(untouched)], torch.from_numpy(classes[untouched]))

    # Through the batch: the unannotated lesion is invisible in the synthesised image, the annotated one visible.
    labels = np.stack([np.concatenate([np.zeros_like(target), target])])  # channel 1 is the lesion channel
    masks = np.array([[True, True]])
    lesions = lesion_targets(labels, masks, (1,), torch.device("cpu"))
    assert lesions[0] is not None and torch.equal(lesions[0], torch.from_numpy(target))
    assert lesion_targets(labels, np.array([[True, False]]), (1,), torch.device("cpu")) == [None]
    off = {k: 0.0 for k in ("flip", "affine", "gamma", "noise", "bias", "resolution")}
    flat = {"synth_texture": 0.0, "synth_blur": [0.0, 0.0]}
    batch = torch.from_numpy(classes)[None]
    images = torch.zeros(1, 1, 16, 16, 16)
    for on in (True, False):
        opts = _options(synth=1.0, synth_lesions_as_labelled=on, **off, **flat)
        out, _ = augment_batch(images, torch.from_numpy(labels), torch.Generator().manual_seed(0), opts, batch, lesions)
        image = out[0, 0].numpy()
        white = image[4:12, 4:12, 12:16].mean()
        assert (abs(image[5:7, 5:7, 2:6] - white) < 1e-5).all() == on  # left out: drawn as white matter
        assert (abs(image[9:11, 9:11, 8:12] - white) > 1e-3).all() == on  # annotated: drawn as a lesion


def test_training_reads_label_maps_into_the_cases_and_names_a_missing_one(bids_dir, tmp_path):
    from sct_sitehead.errors import TrainingError
    from sct_sitehead.evaluation.bids import read_bids
    from sct_sitehead.simulate import simulate
    from sct_sitehead.training.config import load_config
    from sct_sitehead.training.data import prepare_cases
    from sct_sitehead.training.train import label_maps

    out = simulate(bids_dir, tmp_path / "sim", n_per_site=1, seed=5, sites=["paris"])
    config = load_config("tiny")
    samples, _ = read_bids(out, label_suffixes=config["labels"]["suffixes"])
    found = label_maps(out, samples, "labelmap-truth")
    assert len(found) == len(samples) == 1
    (case,) = prepare_cases(samples, config["input"], tmp_path / "cache", found)
    assert case.classes is not None and case.classes.shape == case.image.shape
    assert (np.asarray(case.classes)[np.asarray(case.labels["lesion"]) > 0] == LESION).mean() > 0.5 or not np.asarray(
        case.labels["lesion"]
    ).any()
    next(iter(found.values())).unlink()
    with pytest.raises(TrainingError, match="no label map"):
        label_maps(out, samples, "labelmap-truth")


def test_artefacts_ring_ghost_and_make_rician_noise_positive():
    import torch

    from sct_sitehead.training import augment
    from sct_sitehead.training.config import load_config

    options = dict(load_config("synth")["augment"])
    options.update(gibbs_keep=[0.3, 0.3], ghosting_count=[3, 3], ghosting_intensity=[0.5, 0.5], noise_std=0.3)
    cube = torch.zeros(1, 48, 48, 48)
    cube[0, 20:28, 20:28, 20:28] = 1.0
    ringing = augment._gibbs(cube, torch.Generator().manual_seed(0), options)
    # Truncated k-space overshoots at the edges (Gibbs) and leaves a cube's mean intact.
    assert float(ringing.max()) > 1.05 and float(ringing.min()) < -0.03
    assert abs(float(ringing.mean()) - float(cube.mean())) < 1e-3
    ghosts = augment._ghosting(cube, torch.Generator().manual_seed(0), options)
    outside = torch.ones_like(cube, dtype=torch.bool)
    outside[0, 18:30, 18:30, 18:30] = False
    # Copies of the cube appear away from it, weaker than the cube itself.
    assert 0.05 < float(ghosts[outside].max()) < float(ghosts[~outside].max())
    gaussian = augment._noise(torch.zeros_like(cube), torch.Generator().manual_seed(1), {**options, "rician": 0.0})
    rician = augment._noise(torch.zeros_like(cube), torch.Generator().manual_seed(1), {**options, "rician": 1.0})
    assert float(gaussian.min()) < 0 and float(rician.min()) >= 0 and float(rician.mean()) > 0.01


@pytest.mark.slow
def test_the_spine_changes_the_label_maps_and_nothing_else(bids_dir, tmp_path, monkeypatch):
    """The spine's draws come from a child generator: images, lesions and annotations stay those of before."""
    from dataclasses import replace

    import nibabel as nib

    from sct_sitehead.simulate import simulate, simulator

    real = simulator.load_cross_sections
    with_spine = simulate(bids_dir, tmp_path / "spine", n_per_site=2, seed=4, sites=["toronto"])
    monkeypatch.setattr(simulator, "load_cross_sections", lambda pam50: replace(real(pam50), spine=None))
    without = simulate(bids_dir, tmp_path / "plain", n_per_site=2, seed=4, sites=["toronto"])
    files = sorted(path.relative_to(without) for path in without.rglob("*.nii.gz"))
    assert files == sorted(path.relative_to(with_spine) for path in with_spine.rglob("*.nii.gz"))
    maps = 0
    for name in files:
        a = np.asarray(nib.load(with_spine / name).dataobj)
        b = np.asarray(nib.load(without / name).dataobj)
        if name.name.endswith("_labelmap-truth.nii.gz"):
            maps += 1
            changed = a != b
            assert changed.any() and np.isin(a[changed], [VERTEBRA, DISC]).all()
            assert ((b[changed] >= 1) & (b[changed] < CSF)).all()  # only background tissue became spine
        else:
            assert np.array_equal(a, b), name
    assert maps == 2


def test_synthesis_counts_the_dataset_classes_and_refuses_a_class_without_intensity(tmp_path):
    from sct_sitehead.errors import TrainingError
    from sct_sitehead.training.config import load_config
    from sct_sitehead.training.synth import synthesize
    from sct_sitehead.training.train import with_class_count

    config = load_config("synth")
    (tmp_path / "simulation.json").write_text(json.dumps({"label_map": {"classes": {"0": "air", "9": "lesion"}}}))
    assert with_class_count(config, tmp_path)["augment"]["synth_classes"]["count"] == 10
    (tmp_path / "simulation.json").write_text(
        json.dumps({"label_map": {"classes": {str(k): v for k, v in LABEL_MAP.items()}}})
    )
    assert with_class_count(load_config("synth"), tmp_path)["augment"]["synth_classes"]["count"] == 12
    fixed = load_config({"extends": "synth", "augment": {"synth_classes": {"count": 10}}})
    assert with_class_count(fixed, tmp_path)["augment"]["synth_classes"]["count"] == 10  # a set count is kept
    with pytest.raises(TrainingError, match="no label map table"):
        with_class_count(load_config("synth"), tmp_path / "elsewhere")
    spine = torch.full((1, 8, 8, 8), DISC, dtype=torch.uint8)
    with pytest.raises(TrainingError, match="class 11 but augment.synth_classes.count is 10"):
        synthesize(spine, torch.Generator().manual_seed(0), fixed["augment"])
    assert torch.isfinite(synthesize(spine, torch.Generator().manual_seed(0), _options())).all()
