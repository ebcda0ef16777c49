"""Training: loss masks, schedule, sampling, augmentation, deploy-identical preprocessing, the training loops,
checkpoints and resume, on :func:`conftest.make_dataset`, the tiny multi-site BIDS dataset."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import make_dataset, tiny_config  # noqa: E402

from sct_sitehead.deploy.nifti import image_data, load_image  # noqa: E402
from sct_sitehead.deploy.normalization import normalize  # noqa: E402
from sct_sitehead.deploy.spatial import to_model_grid  # noqa: E402
from sct_sitehead.errors import TrainingError  # noqa: E402
from sct_sitehead.evaluation.bids import read_bids  # noqa: E402
from sct_sitehead.registry.cache import sha256_file as file_sha256  # noqa: E402
from sct_sitehead.training import loop  # noqa: E402
from sct_sitehead.training.augment import augment_batch  # noqa: E402
from sct_sitehead.training.checkpoint import load_checkpoint, weights_digest  # noqa: E402
from sct_sitehead.training.config import load_config  # noqa: E402
from sct_sitehead.training.data import Case, case_weights, prepare_cases, sample_batch  # noqa: E402
from sct_sitehead.training.loop import learning_rate  # noqa: E402
from sct_sitehead.training.losses import blob_dice, masked_dice_bce  # noqa: E402
from sct_sitehead.training.train import (  # noqa: E402
    _samples,
    contrasts_of,
    load_backbone,
    train_backbone,
    train_head,
    universal_meta,
)

pytestmark = [pytest.mark.train, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("bids"))


@pytest.fixture(scope="module")
def trained(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return train_backbone(dataset, tmp_path_factory.mktemp("work"), tiny_config(steps=40))


# --- loss --------------------------------------------------------------------------------------------------------
def test_masked_channels_get_no_loss_and_no_gradient() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    targets = (torch.rand(2, 3, 4, 4, 4) > 0.7).float()
    mask = torch.tensor([[True, False, False], [True, True, False]])
    loss = masked_dice_bce(logits, targets, mask)
    loss.backward()
    assert logits.grad[0, 1:].abs().max() == 0 and logits.grad[1, 2].abs().max() == 0
    assert logits.grad[0, 0].abs().max() > 0 and logits.grad[1, 1].abs().max() > 0
    # Changing what an unannotated channel says changes nothing.
    other = targets.clone()
    other[0, 1:] = 1 - other[0, 1:]
    assert torch.equal(masked_dice_bce(logits, other, mask), loss)


def test_loss_with_everything_annotated_is_dice_plus_bce() -> None:
    torch.manual_seed(1)
    logits, targets = torch.randn(1, 1, 3, 3, 3), (torch.rand(1, 1, 3, 3, 3) > 0.5).float()
    p = torch.sigmoid(logits)
    dice = (2 * (p * targets).sum() + 1) / (p.sum() + targets.sum() + 1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    got = masked_dice_bce(logits, targets, torch.ones(1, 1, dtype=torch.bool))
    assert torch.allclose(got, 1 - dice + bce)
    nothing = masked_dice_bce(logits.requires_grad_(), targets, torch.zeros(1, 1, dtype=torch.bool))
    assert float(nothing.detach()) == 0.0 and nothing.requires_grad
    with pytest.raises(TrainingError, match="do not match"):
        masked_dice_bce(logits, targets[:, :, :2], torch.ones(1, 1, dtype=torch.bool))


def _two_lesions() -> torch.Tensor:
    """(1, 2, 8, 8, 8) targets: channel 0 a 4x4x4 lesion and a 1-voxel one; channel 1 (the cord, say) all set."""
    targets = torch.zeros(1, 2, 8, 8, 8)
    targets[0, 0, :4, :4, :4] = 1
    targets[0, 0, 6, 6, 6] = 1
    targets[0, 1] = 1
    return targets


def test_blob_term_weighs_a_missed_small_lesion_like_a_missed_large_one() -> None:
    targets = _two_lesions()
    mask = torch.ones(1, 2, dtype=torch.bool)
    large_only = torch.full_like(targets, -30.0)
    large_only[0, 0, :4, :4, :4] = 30.0
    large_only[0, 1] = 30.0
    both = large_only.clone()
    both[0, 0, 6, 6, 6] = 30.0
    # The batch Dice barely sees the missed voxel; the blob term scores it as one lesion in two.
    assert float(masked_dice_bce(large_only, targets, mask)) < 0.05
    # Large lesion: Dice (2*64 + 1) / (64 + 64 + 1) = 1; small: (0 + 1) / (0 + 1 + 1) = 0.5.
    assert torch.isclose(blob_dice(large_only, targets, mask, [0]), torch.tensor(0.25), atol=1e-4)
    assert float(blob_dice(both, targets, mask, [0])) < 1e-4
    # Marking both is perfect for each: the 64 voxels marked on the large lesion are not false positives of the
    # small one (they would be for a Dice over the patch). Marking only the small one: large (0 + 1) / (64 + 1),
    # small 1.
    small_only = torch.full_like(targets, -30.0)
    small_only[0, 0, 6, 6, 6] = 30.0
    assert torch.isclose(blob_dice(small_only, targets, mask, [0]), torch.tensor((1 - 1 / 65) / 2), atol=1e-4)
    # A false positive in the background counts against every lesion of the patch.
    extra = both.clone()
    extra[0, 0, 7, 0, 0] = 30.0
    assert float(blob_dice(extra, targets, mask, [0])) > float(blob_dice(both, targets, mask, [0])) + 0.1


def test_blob_term_skips_masked_pairs_and_other_channels() -> None:
    targets = _two_lesions()
    logits = torch.zeros_like(targets, requires_grad=True)
    loss = blob_dice(logits, targets, torch.tensor([[True, True]]), [0])
    loss.backward()
    assert logits.grad[0, 1].abs().max() == 0 and logits.grad[0, 0].abs().max() > 0
    for mask, channels in ((torch.tensor([[False, True]]), [0]), (torch.ones(1, 2, dtype=torch.bool), [])):
        nothing = blob_dice(logits, targets, mask, channels)
        assert float(nothing.detach()) == 0.0 and nothing.requires_grad
    empty = blob_dice(logits, torch.zeros_like(targets), torch.ones(1, 2, dtype=torch.bool), [0])
    assert float(empty.detach()) == 0.0


def test_a_blob_weighted_run_trains_and_does_not_resume_a_plain_state(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="train.blob_weight must be >= 0"):
        load_config({"train": {"blob_weight": -1}})
    plain = train_backbone(dataset, tmp_path / "work", tiny_config(steps=2))
    blob = tiny_config(steps=4, blob_weight=1.0)
    with pytest.raises(TrainingError, match="different run"):
        train_backbone(dataset, tmp_path / "work", blob)
    path = train_backbone(dataset, tmp_path / "blob", blob)
    meta = load_backbone(path)[1]
    assert meta["config"]["train"]["blob_weight"] == 1.0 and np.isfinite(meta["final_loss"])
    assert load_backbone(plain)[1]["rank_digests"] != meta["rank_digests"]


def test_a_lesion_weight_makes_a_missed_lesion_voxel_cost_more_and_leaves_other_channels() -> None:
    targets = torch.zeros(1, 2, 4, 4, 4)
    targets[0, 0, 1, 1, 1] = 1.0
    targets[0, 1, 2, 2, 2] = 1.0
    mask = torch.ones(1, 2, dtype=torch.bool)
    grads = []
    for weight in (None, loop.lesion_positive_weight([0], 2, 5.0)):
        logits = torch.full((1, 2, 4, 4, 4), -3.0, requires_grad=True)
        masked_dice_bce(logits, targets, mask, positive_weight=weight).backward()
        grads.append(logits.grad[0])
    plain, weighted = grads
    assert float(weighted[0, 1, 1, 1]) < float(plain[0, 1, 1, 1]) < 0  # the missed lesion voxel pushed up harder
    assert torch.equal(weighted[1], plain[1]) and torch.equal(weighted[0, 0], plain[0, 0])
    assert loop.lesion_positive_weight([0], 2, 1.0) is None and loop.lesion_positive_weight([], 2, 5.0) is None
    with pytest.raises(TrainingError, match="positive weights"):
        masked_dice_bce(torch.zeros(1, 2, 4, 4, 4), targets, mask, positive_weight=torch.ones(3))
    with pytest.raises(TrainingError, match="train.lesion_weight must be > 0"):
        load_config({"train": {"lesion_weight": 0}})


def test_learning_rate_warms_up_then_decays_to_zero() -> None:
    assert learning_rate(0, 100, 1.0, 10, "poly") == pytest.approx(0.1)
    assert learning_rate(9, 100, 1.0, 10, "poly") == pytest.approx(1.0)
    assert learning_rate(10, 100, 1.0, 10, "poly") == pytest.approx(1.0)
    assert learning_rate(100, 100, 1.0, 10, "poly") == pytest.approx(0.0)
    assert learning_rate(55, 100, 1.0, 10, "cosine") == pytest.approx(0.5)
    values = [learning_rate(s, 100, 1.0, 10, "poly") for s in range(10, 100)]
    assert values == sorted(values, reverse=True)


# --- data ----------------------------------------------------------------------------------------------------------
def test_cases_are_preprocessed_exactly_like_the_deploy_path_and_cached(dataset: Path, tmp_path: Path) -> None:
    samples, problems = read_bids(dataset)
    assert not problems and len(samples) == 4
    spec = load_config("tiny")["input"]
    cases = prepare_cases(samples, spec, tmp_path / "cache")
    image = load_image(samples[0].image)
    volume, _ = to_model_grid(image_data(image), image.affine, spec["orientation"], spec["spacing"])
    assert np.array_equal(cases[0].image, normalize(volume, spec["normalization"]))
    lesion = np.asarray(load_image(samples[0].labels["lesion"]).dataobj) > 0
    assert np.array_equal(cases[0].labels["lesion"], lesion[::-1, ::-1, :])  # LPS-like -> RAS
    assert len(cases[0].foreground) == lesion.sum()
    stamps = sorted(p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.npy"))
    again = prepare_cases(samples, spec, tmp_path / "cache")
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.npy")) == stamps
    assert np.array_equal(again[0].image, cases[0].image)


def _case(shape: tuple[int, int, int] = (20, 20, 20)) -> tuple[Case, tuple[np.ndarray, np.ndarray]]:
    lesion = np.zeros(shape, np.uint8)
    lesion[shape[0] - 5, 3, 10] = 1
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    case = Case("x", "A", image, {"lesion": lesion}, np.argwhere(lesion).astype(np.int32), float(image.min()))
    return case, (lesion[None], np.array([True]))


def test_patch_sampling_is_seeded_and_oversamples_lesions() -> None:
    case, target = _case()
    first = sample_batch([case], [target], (8, 8, 8), 3, np.random.default_rng(5), 0.33)
    second = sample_batch([case], [target], (8, 8, 8), 3, np.random.default_rng(5), 0.33)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    images, labels, masks = sample_batch([case], [target], (8, 8, 8), 4, np.random.default_rng(0), 1.0)
    assert images.shape == (4, 1, 8, 8, 8) and labels.shape == (4, 1, 8, 8, 8) and masks.all()
    assert all(labels[i].sum() == 1 for i in range(4))  # every patch holds the single lesion voxel


def test_site_weights_draw_a_site_that_many_times_as_often() -> None:
    cases, targets = [], []
    for site, value in (("A", 0.0), ("B", 1.0), ("C", 2.0)):
        image = np.full((8, 8, 8), value, np.float32)
        cases.append(
            Case(site, site, image, {"lesion": np.zeros((8, 8, 8), np.uint8)}, np.zeros((0, 3), np.int32), value)
        )
        targets.append((np.zeros((1, 8, 8, 8), np.uint8), np.array([True])))
    assert case_weights(cases, {}) is None  # no weight: the uniform draw of before
    weights = case_weights(cases, {"B": 3})
    assert np.allclose(weights, [0.2, 0.6, 0.2])
    images, _, _ = sample_batch(cases, targets, (8, 8, 8), 5000, np.random.default_rng(0), 0.0, weights)
    drawn = np.bincount(images[:, 0, 0, 0, 0].astype(int), minlength=3) / 5000
    assert abs(drawn[1] - 0.6) < 0.03 and abs(drawn[0] - 0.2) < 0.03 and abs(drawn[2] - 0.2) < 0.03
    images, _, _ = sample_batch(cases, targets, (8, 8, 8), 5000, np.random.default_rng(0), 0.0)
    assert abs(np.mean(images[:, 0, 0, 0, 0] == 1.0) - 1 / 3) < 0.03


@pytest.mark.parametrize("weights", [{"zurich": 0}, {"zurich": -1.0}, {"zurich": "3"}, {"zurich": True}, ["zurich"]])
def test_bad_site_weights_are_refused(weights: object) -> None:
    with pytest.raises(TrainingError, match="train.site_weights must map site names to numbers > 0"):
        load_config({"train": {"site_weights": weights}})


def test_a_site_weight_for_a_site_without_cases_is_refused(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"train.site_weights names \['zurich'\], which have no training case"):
        train_backbone(dataset, tmp_path / "work", tiny_config(steps=1, site_weights={"siteA": 2, "zurich": 3}))
    assert not (tmp_path / "work" / "backbone.safetensors").exists()


def test_small_volumes_are_padded_with_their_minimum() -> None:
    case, target = _case((6, 20, 20))
    images, _, _ = sample_batch([case], [target], (8, 8, 8), 1, np.random.default_rng(0), 0.0)
    assert images[0, 0, 0].max() == case.minimum and images[0, 0, 7].max() == case.minimum


def test_augmentation_is_seeded_and_keeps_targets_binary() -> None:
    options = {
        **load_config("tiny")["augment"],
        "flip": 1.0,
        "affine": 1.0,
        "gamma": 1.0,
        "noise": 1.0,
        "bias": 1.0,
        "resolution": 1.0,
    }
    torch.manual_seed(0)
    images = torch.randn(2, 1, 12, 12, 12)
    targets = (torch.rand(2, 2, 12, 12, 12) > 0.5).to(torch.uint8)
    a = augment_batch(images, targets, torch.Generator().manual_seed(3), options)
    b = augment_batch(images, targets, torch.Generator().manual_seed(3), options)
    c = augment_batch(images, targets, torch.Generator().manual_seed(4), options)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == images.shape and a[1].shape == targets.shape
    assert set(a[1].unique().tolist()) <= {0.0, 1.0}
    off = {
        k: (0.0 if isinstance(v, float) and k in ("flip", "affine", "gamma", "noise", "bias", "resolution") else v)
        for k, v in options.items()
    }
    same = augment_batch(images, targets, torch.Generator().manual_seed(3), off)
    assert torch.equal(same[0], images) and torch.equal(same[1], targets.float())


def test_inversion_negates_the_image_and_is_free_when_off() -> None:
    """invert 1.0 negates every image (targets unchanged); invert 0.0 draws no random number, so the other
    augmentations come out exactly as in a config without the key."""
    options = {**load_config("tiny")["augment"], "flip": 0.5, "gamma": 0.5, "noise": 0.5}
    torch.manual_seed(0)
    images = torch.randn(3, 1, 8, 8, 8)
    targets = (torch.rand(3, 1, 8, 8, 8) > 0.5).to(torch.uint8)
    without = {k: v for k, v in options.items() if k != "invert"}
    zero = augment_batch(images, targets, torch.Generator().manual_seed(5), {**options, "invert": 0.0})
    absent = augment_batch(images, targets, torch.Generator().manual_seed(5), without)
    assert torch.equal(zero[0], absent[0]) and torch.equal(zero[1], absent[1])
    off = {
        k: (0.0 if k in ("flip", "affine", "gamma", "noise", "bias", "resolution") else v) for k, v in options.items()
    }
    inverted = augment_batch(images, targets, torch.Generator().manual_seed(5), {**off, "invert": 1.0})
    assert torch.equal(inverted[0], -images) and torch.equal(inverted[1], targets.float())


def test_intensity_curve_keeps_the_order_of_intensities_and_their_range() -> None:
    """curve 1.0: a lesion brighter than the cord stays brighter, the extremes stay put, contrasts change."""
    off = {
        k: (0.0 if k in ("flip", "affine", "gamma", "noise", "bias", "resolution") else v)
        for k, v in load_config("tiny")["augment"].items()
    }
    ramp = torch.linspace(-2.0, 3.0, 512).reshape(1, 1, 8, 8, 8)
    targets = torch.zeros(1, 1, 8, 8, 8, dtype=torch.uint8)
    curved, kept = augment_batch(ramp, targets, torch.Generator().manual_seed(2), {**off, "curve": 1.0})
    steps = curved.flatten().diff()
    assert (steps >= 0).all() and steps.max() > 1.5 * steps.min()
    assert torch.isclose(curved.min(), ramp.min()) and torch.isclose(curved.max(), ramp.max())
    assert not torch.allclose(curved, ramp) and torch.equal(kept, targets.float())


def test_brightness_scales_then_shifts_within_its_ranges() -> None:
    off = {
        k: (0.0 if k in ("flip", "affine", "gamma", "noise", "bias", "resolution") else v)
        for k, v in load_config("tiny")["augment"].items()
    }
    options = {**off, "brightness": 1.0, "brightness_scale": [0.5, 2.0], "brightness_shift": 1.0}
    images = torch.randn(64, 1, 4, 4, 4)
    moved, _ = augment_batch(images, torch.zeros(64, 1, 4, 4, 4), torch.Generator().manual_seed(3), options)
    scale = moved.flatten(1).std(dim=1) / images.flatten(1).std(dim=1)
    shift = moved.flatten(1)[:, 0] - scale * images.flatten(1)[:, 0]
    assert (scale > 0.5 - 1e-4).all() and (scale < 2.0 + 1e-4).all() and scale.max() / scale.min() > 2.0
    assert shift.abs().max() <= 1.0 + 1e-4 and shift.min() < -0.3 and shift.max() > 0.3


def test_intensity_augmentations_off_draw_no_random_number() -> None:
    """curve and brightness at 0.0 leave every other augmentation exactly as in a config without the keys."""
    options = {**load_config("tiny")["augment"], "flip": 0.5, "gamma": 0.5, "noise": 0.5}
    images = torch.randn(3, 1, 8, 8, 8)
    targets = torch.zeros(3, 1, 8, 8, 8)
    without = {k: v for k, v in options.items() if k not in ("curve", "brightness")}
    off = {**options, "curve": 0.0, "brightness": 0.0}
    zero = augment_batch(images, targets, torch.Generator().manual_seed(5), off)
    absent = augment_batch(images, targets, torch.Generator().manual_seed(5), without)
    assert torch.equal(zero[0], absent[0])


def test_a_config_extending_another_lists_only_what_it_changes(tmp_path: Path) -> None:
    variant = load_config("release_augment")
    base = load_config("release")
    assert {k: v for k, v in variant.items() if k != "augment"} == {k: v for k, v in base.items() if k != "augment"}
    assert variant["augment"] == {
        **base["augment"],
        "curve": 0.3,
        "brightness": 0.5,
        "brightness_scale": [0.6, 1.6],
        "brightness_shift": 1.0,
    }
    looped = tmp_path / "looped.json"
    looped.write_text(json.dumps({"extends": str(looped)}))
    with pytest.raises(TrainingError, match="extends it back"):
        load_config(looped)


def test_every_shipped_config_loads_and_each_variant_of_release_changes_only_its_setting() -> None:
    from sct_sitehead.training.config import CONFIG_DIR

    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    assert {"release", "release_augment", "release_invert", "smoke", "tiny", "localiser"} <= set(names)
    for name in names:
        load_config(name)  # completes and checks it; raises on an unknown key or a bad value
    variant, base = load_config("release_invert"), load_config("release")
    assert base["augment"]["invert"] == 0.0
    assert variant == {**base, "augment": {**base["augment"], "invert": 0.5}}
    weighted = load_config("release_invert_weighted")
    assert base["train"]["site_weights"] == {}
    assert weighted == {**variant, "train": {**variant["train"], "site_weights": {"zurich": 3}}}


@pytest.mark.parametrize(
    "augment, message",
    [
        ({"curve": 1.5}, "augment.curve is a probability"),
        ({"brightness_scale": [1.2, 0.8]}, "brightness_scale"),
        ({"curve_points": 0}, "curve_points"),
    ],
)
def test_bad_intensity_augmentation_settings_are_refused(augment: dict, message: str) -> None:
    with pytest.raises(TrainingError, match=message):
        load_config({"augment": augment})


# --- training loops ------------------------------------------------------------------------------------------------
def test_tiny_backbone_training_decreases_the_loss(trained: Path) -> None:
    log = [json.loads(line) for line in (trained.parent / "backbone.log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(5, 41, 5))
    assert log[-1]["loss"] < 0.85 * log[0]["loss"], log
    _, meta = load_backbone(trained)
    assert meta["label_space"]["channels"] == 2
    assert meta["label_space"]["site_maps"] == {"siteA": {"lesion": 0}, "siteB": {"cord": 0, "lesion": 1}}


def test_only_the_training_split_of_a_dataset_is_used(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "bids")
    header, *rows = (data / "participants.tsv").read_text().splitlines()
    split = ["test"] + ["train"] * (len(rows) - 1)
    (data / "participants.tsv").write_text("\n".join([header + "\tsplit"] + [f"{r}\t{s}" for r, s in zip(rows, split)]))
    subjects = {s.subject for s in _samples(data, tiny_config())}
    assert subjects == {"sub-siteA02", "sub-siteB03", "sub-siteB04"}
    assert len(_samples(data, tiny_config(split=None))) == 4


def test_sites_with_nested_label_sets_share_channels_by_size(tmp_path: Path) -> None:
    sites = {"siteA": ["lesion"], "siteB": ["lesion", "cord"], "siteC": ["lesion", "cord", "csf"]}
    data = make_dataset(tmp_path / "bids", sites, cases_per_site=1)
    config = tiny_config(steps=3)
    config["labels"]["suffixes"] = {"lesion": "lesion-manual", "cord": "seg-manual", "csf": "csf-manual"}
    _, meta = load_backbone(train_backbone(data, tmp_path / "work", config))
    space = meta["label_space"]
    assert space["channels"] == 3
    # csf ring (radius 4 to 6) > cord disc (radius 4) > lesions, in every site that has them.
    assert space["site_maps"] == {
        "siteA": {"lesion": 0},
        "siteB": {"cord": 0, "lesion": 1},
        "siteC": {"csf": 0, "cord": 1, "lesion": 2},
    }
    assert space["universal_site"] == "siteC"
    assert meta["arch"]["channels"] == 3


def test_checkpoints_reload_bit_identically_without_pickle(trained: Path) -> None:
    model, meta = load_backbone(trained)
    state, meta_again, optim = load_checkpoint(trained, kind="backbone")
    assert optim is None and meta_again == meta
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert weights_digest(model.backbone) == meta["backbone_sha256"]
    header_size = int.from_bytes(trained.read_bytes()[:8], "little")
    json.loads(trained.read_bytes()[8 : 8 + header_size])  # safetensors: a JSON header, then raw tensor bytes
    with pytest.raises(TrainingError, match="is a 'backbone' checkpoint, expected a 'head'"):
        load_checkpoint(trained, kind="head")


def test_an_interrupted_run_resumes_to_the_same_weights(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(steps=8, checkpoint_every=3, log_every=2)
    straight = train_backbone(dataset, tmp_path / "straight", config)
    calls = {"n": 0}
    real = loop.sample_batch

    def crash_at_step_5(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "sample_batch", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_backbone(dataset, tmp_path / "resumed", config)
    _, state_meta, optim = load_checkpoint(tmp_path / "resumed" / "backbone.state.safetensors", kind="state")
    assert state_meta["step"] == 3 and optim is not None
    monkeypatch.setattr(loop, "sample_batch", real)
    resumed = train_backbone(dataset, tmp_path / "resumed", config)
    assert load_backbone(resumed)[1]["rank_digests"] == load_backbone(straight)[1]["rank_digests"]
    # A state file from another architecture is refused rather than half-loaded.
    with pytest.raises(TrainingError, match="different run"):
        train_backbone(dataset, tmp_path / "resumed", {**config, "model": {"features": [4, 4]}})


@pytest.mark.parametrize("strategy", ["finetune", "wider", "spatial"])
def test_head_training_leaves_the_backbone_untouched(
    trained: Path, dataset: Path, tmp_path: Path, strategy: str
) -> None:
    before = file_sha256(trained)
    path = train_head(dataset, trained, "siteB", strategy, tmp_path, tiny_config())
    assert file_sha256(trained) == before
    state, meta, _ = load_checkpoint(path, kind="head")
    assert meta["strategy"] == strategy and meta["labels"] == {"cord": 0, "lesion": 1}
    assert meta["backbone_sha256"] == load_backbone(trained)[1]["backbone_sha256"]
    assert not any(k.startswith(("encoder", "backbone")) for k in state)
    assert ("stages.0.blocks.0.conv.weight_new" in state) == (strategy != "finetune")


def test_a_site_the_backbone_never_saw_gets_its_own_label_map(trained: Path, tmp_path: Path) -> None:
    new = make_dataset(tmp_path / "new", {"siteN": ["cord"]}, cases_per_site=1, seed=3)
    path = train_head(new, trained, "siteN", "finetune", tmp_path / "work", tiny_config())
    assert load_checkpoint(path, kind="head")[1]["labels"] == {"cord": 0}
    with pytest.raises(TrainingError, match=r"no sample of site 'siteZ' in the data \(sites: \['siteN'\]\)"):
        train_head(new, trained, "siteZ", "finetune", tmp_path / "work", tiny_config())
    with pytest.raises(TrainingError, match="unknown head strategy"):
        train_head(new, trained, "siteN", "deeper", tmp_path / "work", tiny_config())


def test_each_head_records_the_contrasts_of_its_training_cases(trained: Path, tmp_path: Path) -> None:
    """siteB's second case becomes a T2star image: siteB's head records both contrasts, siteA's only T2w, and the
    universal head (in the backbone checkpoint) every contrast of the backbone's cases."""
    data = make_dataset(tmp_path / "bids")
    for folder in (data / "sub-siteB04" / "anat", data / "derivatives" / "labels" / "sub-siteB04" / "anat"):
        for path in folder.iterdir():
            path.rename(path.with_name(path.name.replace("_T2w", "_T2star")))
    head_b = train_head(data, trained, "siteB", "finetune", tmp_path / "b", tiny_config())
    head_a = train_head(data, trained, "siteA", "finetune", tmp_path / "a", tiny_config())
    assert load_checkpoint(head_b, kind="head")[1]["contrasts"] == ["T2star", "T2w"]
    assert load_checkpoint(head_a, kind="head")[1]["contrasts"] == ["T2w"]
    _, meta = load_backbone(train_backbone(data, tmp_path / "backbone", tiny_config(steps=2)))
    assert meta["contrasts"] == universal_meta(meta)["contrasts"] == ["T2star", "T2w"]
    samples, _ = read_bids(data)
    unlabelled = [replace(sample, labels={}) if sample.contrast == "T2star" else sample for sample in samples]
    assert contrasts_of(unlabelled) == ["T2w"]  # an image without labels is no training case


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_mixed_precision_training_and_export(dataset: Path, tmp_path: Path) -> None:
    from sct_sitehead.training.export import export_release

    backbone = train_backbone(dataset, tmp_path, tiny_config(device="cuda", amp=True, steps=10))
    head = train_head(dataset, backbone, "siteB", "spatial", tmp_path, tiny_config(device="cuda", amp=True))
    _, meta = load_backbone(backbone)
    assert np.isfinite(meta["final_loss"])
    manifest = export_release(backbone, {"siteB": head}, tmp_path / "release", exporter="torchscript")
    assert set(manifest["heads"]) == {"universal", "siteB"}
