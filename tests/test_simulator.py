"""Multi-site simulator: layout, determinism, lesions in the deformed cord, site label sets and annotation
protocols, the frozen split by person and the holdout split; its parts (deformation, lesion insertion,
annotation, sites file, source selection) on small inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from sct_sitehead.cli import admin as admin_cli
from sct_sitehead.errors import InputImageError, OutputError, UsageError
from sct_sitehead.evaluation.bids import read_bids
from sct_sitehead.evaluation.splits import load_splits, parse_splits
from sct_sitehead.simulate import insert_lesions, load_sites, make_phantom, simulate
from sct_sitehead.simulate.annotation import annotate
from sct_sitehead.simulate.deform import displacement_field, draw_deformation, source_coordinates
from sct_sitehead.simulate.grids import grid_affine
from sct_sitehead.simulate.selection import plan_sites, share_out
from sct_sitehead.simulate.simulator import _sources
from sct_sitehead.simulate.sites import Annotation

SITES = load_sites()
BORROW_SITES = Path(__file__).resolve().parents[1] / "sct_sitehead/simulate/sites_borrow.json"
ALL_SUFFIXES = {"lesion": "lesion-manual", "cord": "seg-manual", "csf": "csf-manual"}
N_PER_SITE = 2


def arr(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def participants(root: Path) -> list[dict[str, str]]:
    with (root / "participants.tsv").open() as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


@pytest.fixture(scope="module")
def dataset(bids_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "ds"
    return simulate(bids_dir, out, n_per_site=N_PER_SITE, seed=5, holdout=["sub-unf01"])


def subject_files(root: Path, participant: str) -> dict[str, Path]:
    image = next((root / participant / "anat").glob("*.nii.gz"))
    stem = image.name[: -len(".nii.gz")]
    files = {"image": image}
    for kind in ("labels", "truth"):
        for path in (root / "derivatives" / kind / participant / "anat").glob(f"{stem}_*.nii.gz"):
            files[path.name[len(stem) + 1 : -len(".nii.gz")]] = path
    return files


def test_default_sites_file():
    assert "montreal" in SITES and len(SITES) >= 5
    label_sets = {frozenset(site.annotation.labels) for site in SITES.values()}
    assert len(label_sets) >= 3
    assert len({(s.acquisition.orientation, s.acquisition.spacing_mm) for s in SITES.values()}) == len(SITES)


def test_layout_and_every_site_label_set(dataset: Path):
    rows = participants(dataset)
    assert list(rows[0]) == ["participant_id", "site", "source", "split"]
    assert len(rows) == N_PER_SITE * len(SITES)
    assert {r["site"] for r in rows} == set(SITES)
    samples, problems = read_bids(dataset, label_suffixes=ALL_SUFFIXES)
    # sites label different sets, but within a site every subject has the same set: nothing is reported
    assert problems == []
    for sample in samples:
        site = SITES[sample.site]
        assert sample.subject.startswith(f"sub-{sample.site}")
        assert set(sample.labels) == set(site.annotation.labels)
        assert sample.contrast in site.contrasts
        image = nib.load(sample.image)
        assert "".join(nib.aff2axcodes(image.affine)) == site.acquisition.orientation
        assert np.allclose(image.header.get_zooms(), site.acquisition.spacing_mm, atol=1e-4)
        assert image.get_data_dtype() == np.dtype(site.acquisition.dtype)
    simulation = json.loads((dataset / "simulation.json").read_text())
    assert set(simulation["subjects"]) == {r["participant_id"] for r in rows}
    assert simulation["seed"] == 5 and simulation["holdout"] == ["sub-unf01"]
    lesion_counts = [len(s["lesions"]) for s in simulation["subjects"].values()]
    assert 0 in lesion_counts and max(lesion_counts) >= 2  # some subjects are lesion-free, some have several
    assert (dataset / "dataset_description.json").is_file()


def test_same_seed_gives_identical_subject_files(bids_dir: Path, dataset: Path, tmp_path: Path):
    """A subject depends only on (seed, site, number): rerunning two of the sites gives the same bytes."""
    again = simulate(
        bids_dir,
        tmp_path / "again",
        n_per_site=N_PER_SITE,
        seed=5,
        sites=["montreal", "bordeaux"],
        holdout=["sub-unf01"],
    )
    files = sorted(p.relative_to(again) for p in again.rglob("sub-*.nii.gz"))
    assert len(files) == N_PER_SITE * (6 + 7)  # image + 3 truths (lesion, cord, label map) + 2 and 3 labels
    assert all((dataset / p).read_bytes() == (again / p).read_bytes() for p in files)
    other = simulate(bids_dir, tmp_path / "other", n_per_site=1, seed=6, sites=["montreal"])
    image = next((other / "sub-montreal001" / "anat").glob("*.nii.gz"))
    assert image.read_bytes() != next((dataset / "sub-montreal001" / "anat").glob("*.nii.gz")).read_bytes()


def test_lesions_lie_inside_the_deformed_cord_with_the_sequence_contrast(dataset: Path):
    brighter, darker = 0, 0
    for row in participants(dataset):
        files = subject_files(dataset, row["participant_id"])
        truth = arr(files["lesion-truth"]) > 0
        cord = arr(files["cord-truth"]) > 0
        assert not (truth & ~cord).any(), row
        if "seg-manual" in files:
            assert np.array_equal(arr(files["seg-manual"]) > 0, cord)
        if truth.sum() < 10:
            continue
        image = arr(files["image"]).astype(float)
        normal = cord & ~ndimage.binary_dilation(truth, iterations=2)
        if normal.sum() < 10:
            continue
        contrast = files["image"].name.rsplit("_", 1)[1].split(".")[0]
        difference = image[truth].mean() - image[normal].mean()
        if contrast == "T1w":
            darker += difference < 0
            assert difference < 0, row
        else:
            brighter += difference > 0
            assert difference > 0, row
    assert brighter >= 3 and darker >= 1  # the checks above really ran


def _protocol_expectation(protocol: Annotation) -> str:
    grows = protocol.dilate_mm > 0 or protocol.lesion_threshold < 0.5
    shrinks = protocol.erode_mm > 0 or protocol.lesion_threshold > 0.5 or protocol.min_lesion_mm3 > 0
    return "grows" if grows and not shrinks else "shrinks" if shrinks and not grows else "same" if not grows else "?"


def test_annotation_protocols_do_what_they_say(dataset: Path):
    seen = set()
    for row in participants(dataset):
        protocol = SITES[row["site"]].annotation
        files = subject_files(dataset, row["participant_id"])
        truth = arr(files["lesion-truth"]) > 0
        drawn = arr(files["lesion-manual"])
        expectation = _protocol_expectation(protocol)
        seen.add(expectation)
        if expectation == "grows":
            assert not (truth & (drawn == 0)).any() and (drawn > 0).sum() >= truth.sum()
        elif expectation == "shrinks":
            assert not ((drawn > 0) & ~truth).any()
        elif expectation == "same":
            assert np.array_equal(drawn > 0, truth)
        zooms = nib.load(files["image"]).header.get_zooms()
        if protocol.min_lesion_mm3 > 0:
            components, count = ndimage.label(drawn > 0, structure=np.ones((3, 3, 3)))
            sizes = np.bincount(components.ravel())[1:] * float(np.prod(zooms))
            assert (sizes >= protocol.min_lesion_mm3).all()
        if protocol.lesion_values == "instances":
            count = ndimage.label(drawn > 0, structure=np.ones((3, 3, 3)))[1]
            assert set(np.unique(drawn)) == set(range(count + 1))
        else:
            assert set(np.unique(drawn)) <= {0, 1}
        if "csf" in protocol.labels:
            csf, cord = arr(files["csf-manual"]) > 0, arr(files["seg-manual"]) > 0
            assert not (csf & cord).any() and csf.any()
            far = ndimage.distance_transform_edt(~cord, sampling=zooms) > protocol.csf_shell_mm
            assert not (csf & far).any()
    assert {"grows", "shrinks", "same"} <= seen


def test_holdout_anatomy_only_in_test(dataset: Path):
    rows = participants(dataset)
    held = [r for r in rows if r["source"].startswith("sub-unf01_")]
    assert held and all(r["split"] == "test" for r in held)
    assert all(r["source"].startswith("sub-unf01_") for r in rows if r["split"] == "test")
    assert {r["split"] for r in rows if not r["source"].startswith("sub-unf01_")} <= {"train", "val"}


# --- the frozen split by person, on the real data ---------------------------------------------------------------
SPLIT_SITES = ("zurich", "montreal", "bordeaux")  # val has T2w anatomy, and no T1w or MTS: it stands in on train's


@pytest.fixture(scope="module")
def split_dataset(bids_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Through the command line: 4 subjects per site, the first the test split, then 2 train and 1 val."""
    out = tmp_path_factory.mktemp("split") / "ds"
    argv = ["simulate", bids_dir, out, "-n", 4, "-test-n", 1, "-seed", 5, "-splits", "-sites", ",".join(SPLIT_SITES)]
    assert admin_cli.main([str(a) for a in [*argv, "-v", "0"]]) == 0
    return out


def test_the_frozen_split_draws_every_subject_from_its_own_split_persons(split_dataset: Path):
    """No test subject from a train or val person, no train subject from a val or test person; val only from val
    persons, or, where val has no real image of the site's contrast (T1w, MTS), from train persons, said so."""
    splits = load_splits()
    rows = participants(split_dataset)
    assert list(rows[0]) == ["participant_id", "site", "source", "split", "seen_anatomy"]
    assert [r["split"] for r in rows if r["site"] == "montreal"] == ["test", "train", "train", "val"]
    for row in rows:
        person = splits.person(splits.person_of_source(row["source"]))
        if row["split"] == "val" and row["site"] in ("zurich", "bordeaux"):
            assert (person.split, row["seen_anatomy"]) == ("train", "yes"), row
        else:
            assert (person.split, row["seen_anatomy"]) == (row["split"], "no"), row
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    simulation = json.loads((split_dataset / "simulation.json").read_text())
    record = simulation["splits"]
    assert record["persons"]["test"] == [p.name for p in splits.in_split("test")]
    assert {site: record["sites"][site]["seen_anatomy"] for site in SPLIT_SITES} == {
        "zurich": ["T1w"],
        "montreal": [],
        "bordeaux": ["MTS"],
    }
    assert all(record["sites"][site]["subjects"] == {"train": 2, "val": 1, "test": 1} for site in SPLIT_SITES)
    assert record["sites"]["zurich"]["sources"]["test"] == ["sub-unf01_T1w"]
    assert simulation["holdout"] == []
    assert all(
        simulation["subjects"][r["participant_id"]]["seen_anatomy"] == (r["seen_anatomy"] == "yes") for r in rows
    )


def test_borrowed_anatomy_follows_its_person_and_the_test_split_never_borrows(bids_dir: Path):
    """The borrow recipe's pools, every site, 52 subjects with 12 test: planned, nothing simulated."""
    splits = load_splits()
    profiles = list(load_sites(BORROW_SITES).values())
    plans = plan_sites(
        _sources(bids_dir), profiles, splits, n_per_site=52, seed=0, test_per_site=12, fractions=(0.7, 0.15, 0.15)
    )
    borrowed: set[tuple[str, str | None]] = set()
    for site in profiles:
        plan = plans[site.name]
        assert sum(v == "test" for v in plan.split_of.values()) == 12
        assert all(plan.split_of[f"sub-{site.name}{n:03d}"] == "test" for n in range(1, 13))
        for split, pool in plan.pools.items():
            assert pool, (site.name, split)
            for source in pool:
                home = splits.split_of(source.subject)
                assert source.sample.contrast in site.contrasts
                if split == "test":
                    assert home == "test" and source.borrow is None, source.name
                elif split == "train" or home == "val":
                    assert home == split, source.name
                else:  # val on train anatomy: real images of a contrast val has none of
                    assert home == "train" and source.borrow is None, source.name
                    assert source.sample.contrast in plan.report["seen_anatomy"], source.name
                if source.borrow is not None:
                    borrowed.add((split, home))
        assert set(plan.report["seen_anatomy"]) <= {"T1w", "MTS"}
    assert borrowed == {("train", "train"), ("val", "val")}  # the checks above saw borrowed anatomy


# --- without the real data: a phantom dataset as the source ---------------------------------------------------
@pytest.fixture(scope="module")
def phantom_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantom_bids")
    (root / "participants.tsv").write_text("participant_id\tsite\nsub-ph1\tlab\nsub-ph2\tlab\n")
    for number, (subject, contrast) in enumerate([("ph1", "T2w"), ("ph1", "T1w"), ("ph2", "T2w")]):
        ph = make_phantom(
            (40, 40, 50), (1.0, 1.2, 1.5), contrast=contrast, n_lesions=0, seed=number, center=(0, 8, -40 * number)
        )
        nib.save(
            ph.image,
            (root / f"sub-{subject}/anat").mkdir(parents=True, exist_ok=True)
            or root / f"sub-{subject}/anat/sub-{subject}_{contrast}.nii.gz",
        )
        labels = root / f"derivatives/labels/sub-{subject}/anat"
        labels.mkdir(parents=True, exist_ok=True)
        nib.save(ph.cord, labels / f"sub-{subject}_{contrast}_seg-manual.nii.gz")
    return root


def test_phantom_source_whole_dataset_is_byte_identical(phantom_source: Path, tmp_path: Path):
    runs = [
        simulate(phantom_source, tmp_path / name, n_per_site=2, seed=0, sites=["montreal", "toronto"])
        for name in ("a", "b")
    ]
    files = sorted(p.relative_to(runs[0]) for p in runs[0].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(runs[1]) for p in runs[1].rglob("*") if p.is_file())
    assert len(files) == 3 + 1 + 1 + 2 * 6 + 2 * 5  # descriptions, participants, simulation.json, subjects
    assert all((runs[0] / p).read_bytes() == (runs[1] / p).read_bytes() for p in files)


def test_phantom_source_and_argument_errors(phantom_source: Path, tmp_path: Path):
    out = simulate(
        phantom_source, tmp_path / "ds", n_per_site=2, seed=0, sites=["montreal", "zurich"], holdout=["sub-ph2"]
    )
    rows = participants(out)
    assert [r["site"] for r in rows] == ["montreal"] * 2 + ["zurich"] * 2
    assert all(r["split"] == "test" for r in rows if r["source"].startswith("sub-ph2"))
    assert all(r["source"] == "sub-ph1_T1w" for r in rows if r["site"] == "zurich")
    with pytest.raises(OutputError, match="not empty"):
        simulate(phantom_source, out, n_per_site=1, seed=0, sites=["montreal"])
    with pytest.raises(UsageError, match=r"holdout subjects \['sub-zz'\].*sub-ph1"):
        simulate(phantom_source, tmp_path / "x", n_per_site=1, seed=0, holdout=["sub-zz"])
    with pytest.raises(UsageError, match=r"site 'paris' scans \['T2star'\].*\['T1w', 'T2w'\]"):
        simulate(phantom_source, tmp_path / "y", n_per_site=1, seed=0, sites=["paris"])
    with pytest.raises(UsageError, match="nowhere.*montreal"):
        simulate(phantom_source, tmp_path / "z", n_per_site=1, seed=0, sites=["nowhere"])
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".*partial"))


def test_phantom_anatomies_and_a_fixed_test_size(phantom_source: Path, tmp_path: Path):
    out = simulate(
        phantom_source,
        tmp_path / "ds",
        n_per_site=6,
        seed=0,
        sites=["montreal", "toronto"],
        holdout=["sub-ph2"],
        phantoms=3,
        test_per_site=2,
    )
    rows = participants(out)
    for site in ("montreal", "toronto"):
        mine = [r for r in rows if r["site"] == site]
        # the first two subjects of each site: the held-out anatomy, the test split; the rest: never it
        assert [r["split"] == "test" for r in mine] == [True, True, False, False, False, False]
        assert all(r["source"].startswith("sub-ph2") for r in mine[:2])
        assert not any(r["source"].startswith("sub-ph2") for r in mine[2:])
    from_phantoms = [r for r in rows if r["source"].startswith("sub-phantom")]
    assert from_phantoms and all(r["split"] in ("train", "val") for r in from_phantoms)
    assert json.loads((out / "simulation.json").read_text())["phantom_subjects"] == len(from_phantoms)
    again = simulate(
        phantom_source,
        tmp_path / "again",
        n_per_site=6,
        seed=0,
        sites=["montreal", "toronto"],
        holdout=["sub-ph2"],
        phantoms=3,
        test_per_site=2,
    )
    assert (again / "participants.tsv").read_bytes() == (out / "participants.tsv").read_bytes()
    first = sorted(p for p in out.rglob("sub-montreal003*.nii.gz"))
    assert first and all(p.read_bytes() == (again / p.relative_to(out)).read_bytes() for p in first)


def test_real_share_draws_train_subjects_from_real_anatomy_and_leaves_the_test_split_alone(
    phantom_source: Path, tmp_path: Path
):
    """real_share 1.0: every train/val subject from the real anatomy, 0.0: from the phantoms; the held-out test
    subjects come out byte for byte as without the option, and simulation.json records the share."""
    common = dict(n_per_site=6, seed=0, sites=["montreal"], holdout=["sub-ph2"], phantoms=3, test_per_site=2)
    plain = simulate(phantom_source, tmp_path / "plain", **common)
    real = simulate(phantom_source, tmp_path / "real", **common, real_share=1.0)
    made = simulate(phantom_source, tmp_path / "made", **common, real_share=0.0)
    assert {r["source"] for r in participants(real)[2:]} == {"sub-ph1_T2w"}
    assert {r["source"] for r in participants(made)[2:]} == {"sub-phantom03_T2w"}
    assert {r["source"] for r in participants(plain)[2:]} == {"sub-ph1_T2w", "sub-phantom03_T2w"}
    for out in (real, made):
        assert [r["split"] for r in participants(out)][:2] == ["test", "test"]
        tested = sorted(p for p in plain.rglob("sub-montreal00[12]*.nii.gz"))
        assert len(tested) >= 4 and all(p.read_bytes() == (out / p.relative_to(plain)).read_bytes() for p in tested)
    assert json.loads((real / "simulation.json").read_text())["real_share"] == 1.0
    assert "real_share" not in json.loads((plain / "simulation.json").read_text())
    with pytest.raises(UsageError, match="real_share is 1.5"):
        simulate(phantom_source, tmp_path / "bad", **common, real_share=1.5)


def test_borrowed_anatomy_takes_the_site_contrast_and_stays_out_of_test(phantom_source: Path, tmp_path: Path):
    """zurich (T1w) borrows T2w anatomy: inverted (cord brighter than CSF, air dark), dark lesions, train/val only."""
    out = simulate(
        phantom_source,
        tmp_path / "ds",
        n_per_site=8,
        seed=1,
        sites=["zurich"],
        holdout=["sub-ph2"],
        test_per_site=2,
        sites_config=BORROW_SITES,
    )
    rows = participants(out)
    borrowed = [r for r in rows if r["source"] == "sub-ph1_T2w as T1w"]
    assert borrowed and {r["split"] for r in borrowed} <= {"train", "val"}
    assert not any(" as " in r["source"] for r in rows if r["split"] == "test")
    for row in borrowed:
        files = subject_files(out, row["participant_id"])
        assert files["image"].name.endswith("_T1w.nii.gz")
        image, cord = arr(files["image"]).astype(float), arr(files["cord-truth"]) > 0.5
        lesion = arr(files["lesion-truth"]) > 0.5
        shell = ndimage.binary_dilation(cord, iterations=2) & ~cord & ~lesion
        healthy = cord & ~ndimage.binary_dilation(lesion, iterations=1)
        # T1w-like: CSF darker than cord, slice by slice (the bias along the cord changes both by up to 2x)
        both = [z for z in range(image.shape[2]) if healthy[:, :, z].any() and shell[:, :, z].any()]
        ratios = [np.median(image[:, :, z][healthy[:, :, z]]) / np.median(image[:, :, z][shell[:, :, z]]) for z in both]
        assert np.median(ratios) > 1.3
        if lesion.any():
            # T1w lesions are dark: against the healthy cord of the same slice (the same bias)
            shared = [z for z in range(image.shape[2]) if lesion[:, :, z].any() and healthy[:, :, z].any()]
            gaps = [
                np.median(image[:, :, z][lesion[:, :, z]]) - np.median(image[:, :, z][healthy[:, :, z]]) for z in shared
            ]
            assert np.median(gaps) < 0


PHANTOM_SPLITS = {
    "description": "ph1 trains, ph2 is held out; no val person",
    "persons": {
        "one": {"split": "train", "participants": {"sub-ph1": ["sub-ph1_T1w", "sub-ph1_T2w"]}},
        "two": {"split": "test", "participants": {"sub-ph2": ["sub-ph2_T2w"]}},
    },
}


def test_the_frozen_split_leaves_out_test_subjects_without_test_anatomy(phantom_source: Path, tmp_path: Path):
    """ph2 (test) has no T1w: zurich gets no test subject, and says so; val (no person) stands in on ph1, never on
    a phantom or ph2; phantoms train only; test subjects do not change when phantoms are added."""
    splits = parse_splits(PHANTOM_SPLITS)
    # real_share 0: every train subject from a phantom where the site has one of its contrast
    common = dict(n_per_site=5, seed=0, sites=["montreal", "zurich"], test_per_site=2, splits=splits, real_share=0.0)
    out = simulate(phantom_source, tmp_path / "ds", phantoms=3, **common)
    rows = participants(out)
    by_id = {r["participant_id"]: r for r in rows}
    assert [p for p in by_id if p.startswith("sub-montreal")] == [f"sub-montreal00{n}" for n in range(1, 6)]
    assert [p for p in by_id if p.startswith("sub-zurich")] == ["sub-zurich003", "sub-zurich004", "sub-zurich005"]
    for row in rows:
        if row["split"] == "test":
            assert row["source"] == "sub-ph2_T2w" and row["seen_anatomy"] == "no"
        elif row["split"] == "val":
            assert row["source"].startswith("sub-ph1_") and row["seen_anatomy"] == "yes"
        else:
            assert row["source"].startswith("sub-phantom") and row["seen_anatomy"] == "no"
    record = json.loads((out / "simulation.json").read_text())["splits"]["sites"]
    assert record["zurich"]["left_out"] == {"train": 0, "val": 0, "test": 2}
    assert record["zurich"]["no_anatomy"]["test"] == ["T1w"] and record["zurich"]["subjects"]["test"] == 0
    assert record["montreal"]["seen_anatomy"] == ["T2w"] and record["montreal"]["left_out"]["test"] == 0
    plain = simulate(phantom_source, tmp_path / "plain", **common)
    tested = sorted(p for p in plain.rglob("sub-montreal00[12]*.nii.gz"))
    assert len(tested) >= 4 and all(p.read_bytes() == (out / p.relative_to(plain)).read_bytes() for p in tested)


def test_a_train_rotation_tilts_train_subjects_only(phantom_source: Path, tmp_path: Path):
    splits = parse_splits(PHANTOM_SPLITS)
    common = dict(n_per_site=5, seed=0, sites=["montreal"], test_per_site=2, splits=splits)
    plain = simulate(phantom_source, tmp_path / "plain", **common)
    tilted = simulate(phantom_source, tmp_path / "tilted", train_rotation_deg=40.0, **common)
    before = json.loads((plain / "simulation.json").read_text())
    after = json.loads((tilted / "simulation.json").read_text())
    assert "train_rotation_deg" not in before and after["train_rotation_deg"] == 40.0
    split = {r["participant_id"]: r["split"] for r in participants(tilted)}
    assert {"train", "test"} <= set(split.values())
    for participant, which in split.items():
        files = sorted(p.relative_to(plain) for p in plain.rglob(f"{participant}_*.nii.gz"))
        assert files
        same = all((plain / f).read_bytes() == (tilted / f).read_bytes() for f in files)
        angle = after["subjects"][participant]["deformation"]["rotation_deg"]
        if which == "train":
            assert not same
            # the same uniform draw, stretched from the site's 5 degrees to 40
            assert angle == pytest.approx(before["subjects"][participant]["deformation"]["rotation_deg"] * 8, abs=0.01)
        else:
            assert same and before["subjects"][participant] == after["subjects"][participant]
    with pytest.raises(UsageError, match="needs the frozen split"):
        simulate(phantom_source, tmp_path / "a", n_per_site=1, seed=0, train_rotation_deg=20.0)


def test_the_frozen_split_refuses_unknown_sources_and_a_holdout_beside_it(phantom_source: Path, tmp_path: Path):
    with pytest.raises(UsageError, match=r"source subjects \['sub-ph1', 'sub-ph2'\] belong to no person"):
        simulate(phantom_source, tmp_path / "a", n_per_site=1, seed=0, splits=load_splits())
    with pytest.raises(UsageError, match="give one of them"):
        simulate(
            phantom_source,
            tmp_path / "b",
            n_per_site=1,
            seed=0,
            holdout=["sub-ph2"],
            splits=parse_splits(PHANTOM_SPLITS),
        )
    code = admin_cli.main(["simulate", str(phantom_source), str(tmp_path / "c"), "-n", "1", "-splits", "-v", "0"])
    assert code == UsageError.exit_code
    assert not list(tmp_path.iterdir())


def test_share_out_keeps_the_fractions():
    rng = np.random.default_rng(0)
    shared = list(share_out([f"s{k}" for k in range(20)], (0.7, 0.15, 0.15), rng).values())
    assert (shared.count("train"), shared.count("val"), shared.count("test")) == (14, 3, 3)
    two = share_out(list(range(10)), (0.7, 0.15, 0.15), np.random.default_rng(1), with_test=False)
    assert set(two.values()) == {"train", "val"} and list(two.values()).count("train") == 8
    with pytest.raises(UsageError, match="sum to 0"):
        share_out([1], (0.0, 0.0, 0.0), rng)


def test_the_borrow_recipe_differs_from_the_default_sites_only_by_borrowing():
    default, borrow = load_sites(), load_sites(BORROW_SITES)
    assert list(default) == list(borrow) and not any(site.borrow for site in default.values())
    assert {name for name, site in borrow.items() if site.borrow} == {"zurich", "bordeaux", "paris"}
    for name, site in borrow.items():
        assert site.as_dict() | {"borrow": {}} == default[name].as_dict() | {"borrow": {}}


def test_borrowed_intensities_invert_inside_the_body_only():
    from sct_sitehead.simulate.simulator import borrowed_intensities
    from sct_sitehead.simulate.sites import Borrow

    image = np.zeros((20, 20, 4), np.float32)  # air around a body of tissue 0.5 with CSF 1.0 and a cord of 0.3
    image[4:16, 4:16] = 0.5
    image[8:12, 8:12] = 1.0
    image[9:11, 9:11] = 0.3
    inverted = borrowed_intensities(image, Borrow(invert=True, gamma=1.0))
    assert inverted[0, 0, 0] < 1e-3 and inverted[10, 10, 2] > inverted[5, 5, 2] > inverted[8, 8, 2]
    assert np.isclose(np.percentile(inverted, 99.5), 1.0)
    same = borrowed_intensities(image, Borrow(invert=False, gamma=1.0))
    assert np.allclose(same, image / np.percentile(image, 99.5))


def test_sites_file_is_checked(tmp_path: Path):
    document = json.loads((Path(__file__).resolve().parents[1] / "sct_sitehead/simulate/sites.json").read_text())
    document["sites"]["montreal"]["annotation"]["labels"] = {"cord": "seg-manual"}
    bad = tmp_path / "sites.json"
    bad.write_text(json.dumps(document))
    with pytest.raises(UsageError, match="site 'montreal': labels are \\['cord'\\]; every site labels 'lesion'"):
        load_sites(bad)
    document["sites"]["montreal"]["annotation"]["labels"] = {"lesion": "lesion-manual"}
    document["sites"]["montreal"]["acquisition"]["orientation"] = "XYZ"
    bad.write_text(json.dumps(document))
    with pytest.raises(UsageError, match="orientation 'XYZ'"):
        load_sites(bad)
    with pytest.raises(UsageError, match="cannot be read"):
        load_sites(tmp_path / "missing.json")
    document["sites"]["montreal"]["acquisition"]["orientation"] = "LAS"
    for borrow, message in [
        ({"T2w": {"invert": True}}, "another contrast than the site's own"),
        ({"T1w": {"gamma": 0}}, "'gamma' \\(> 0\\)"),
        ([1], "give an object"),
    ]:
        document["sites"]["montreal"]["borrow"] = borrow
        bad.write_text(json.dumps(document))
        with pytest.raises(UsageError, match=message):
            load_sites(bad)


# --- parts ----------------------------------------------------------------------------------------------------
def test_deformation_is_identity_when_drawn_with_zero_sizes():
    rng = np.random.default_rng(0)
    affine = grid_affine((10, 12, 14), (1.0, 0.8, 2.0), "LAS")
    zero = draw_deformation(
        rng, (10, 12, 14), affine, rotation_deg=0, scale=0, translation_mm=0, elastic_mm=0, elastic_spacing_mm=10
    )
    coords = source_coordinates(zero, (10, 12, 14), affine, affine)
    assert np.allclose(coords, np.indices((10, 12, 14)), atol=1e-4)


def test_elastic_field_is_smooth_and_bounded():
    affine = grid_affine((40, 40, 40), (1.0, 1.0, 1.0))
    deformation = draw_deformation(
        np.random.default_rng(1),
        (40, 40, 40),
        affine,
        rotation_deg=0,
        scale=0,
        translation_mm=0,
        elastic_mm=2.0,
        elastic_spacing_mm=20,
    )
    field = displacement_field(deformation, (40, 40, 40))
    assert field.shape == (3, 40, 40, 40)
    assert 0.3 < field.std() < 3.0
    assert np.abs(np.diff(field, axis=1)).max() < 0.5  # under 0.5 mm change per mm: smooth, no folding
    constant = deformation.control * 0 + 1.5
    object.__setattr__(deformation, "control", constant)
    assert np.allclose(displacement_field(deformation, (40, 40, 40)), 1.5, atol=1e-4)  # B-splines sum to one


@pytest.mark.parametrize(("contrast", "sign"), [("T2w", 1), ("T1w", -1)])
def test_insert_lesions_into_a_healthy_image(contrast: str, sign: int):
    healthy = make_phantom((40, 40, 40), (0.8, 0.8, 3.0), contrast=contrast, n_lesions=0, noise=0, seed=2)
    out = insert_lesions(
        healthy.image, healthy.cord, contrast=contrast, n_lesions=3, seed=4, volume_mm3=(60, 120), elongation=(3, 3)
    )
    lesion = np.asarray(out.lesion.dataobj) > 0
    cord = np.asarray(healthy.cord.dataobj) > 0
    assert lesion.any() and not (lesion & ~cord).any()
    assert len(out.lesions) == 3 and all(r["axis"][2] > 0.9 for r in out.lesions)
    for record in out.lesions:  # elongation 3: the length is 3 times the (geometric mean) width
        along, *across = record["semi_axes_mm"]
        assert along == pytest.approx(3 * (across[0] * across[1]) ** 0.5, rel=1e-2)
    # 3 mm slices: edges are partial volumes, not a binary step
    assert ((out.fraction > 0.05) & (out.fraction < 0.95)).any()
    before = np.asarray(healthy.image.dataobj, dtype=float)
    after = np.asarray(out.image.dataobj, dtype=float)
    assert np.array_equal(before[out.fraction == 0], after[out.fraction == 0])
    assert sign * (after[lesion] - before[lesion]).min() > 0
    assert out.image.header.get_data_dtype() == np.float32 and np.allclose(out.image.affine, healthy.image.affine)


def test_insert_lesions_errors():
    healthy = make_phantom((16, 16, 16), (1, 1, 1), n_lesions=0)
    empty = nib.Nifti1Image(np.zeros((16, 16, 16), np.uint8), healthy.image.affine)
    with pytest.raises(InputImageError, match="cord mask is empty"):
        insert_lesions(healthy.image, empty, contrast="T2w")
    with pytest.raises(InputImageError, match="differs from image shape"):
        insert_lesions(healthy.image, nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), np.eye(4)), contrast="T2w")
    with pytest.raises(UsageError, match="no lesion contrast known for 'FLAIR'"):
        insert_lesions(healthy.image, healthy.cord, contrast="FLAIR")
    out = insert_lesions(healthy.image, healthy.cord, contrast="FLAIR", lesion_contrast=(0.5, 0.5), n_lesions=1)
    assert len(out.lesions) == 1 and out.lesions[0]["contrast"] == 0.5


def _protocol(**changes) -> Annotation:
    base = dict(
        labels={"lesion": "lesion-manual"},
        lesion_threshold=0.5,
        dilate_mm=0.0,
        erode_mm=0.0,
        min_lesion_mm3=0.0,
        lesion_values="binary",
        csf_shell_mm=2.0,
    )
    return Annotation(**{**base, **changes})


def test_annotate_on_hand_made_fractions():
    fraction = np.zeros((20, 20, 20), np.float32)
    fraction[5:10, 5:10, 5:10] = 1.0  # a 125-voxel lesion
    fraction[4, 5:10, 5:10] = 0.6  # a partial-volume face
    fraction[15, 15, 15] = 0.9  # a one-voxel lesion
    cord = np.zeros_like(fraction)
    cord[3:12, 3:12, :] = 1.0
    zooms = (1.0, 1.0, 1.0)
    plain, _ = annotate(fraction, cord, zooms, _protocol())
    assert plain["lesion"].sum() == 125 + 25 + 1
    core, _ = annotate(fraction, cord, zooms, _protocol(lesion_threshold=0.75))
    assert core["lesion"].sum() == 125 + 1
    generous, _ = annotate(fraction, cord, zooms, _protocol(dilate_mm=1.0))
    # the 6 x 5 x 5 lesion (with its 0.6 face) gains one voxel layer on each face; the single voxel gains 6
    assert generous["lesion"].sum() == 8 * 5 * 5 + 6 * 2 * 5 + 6 * 5 * 2 + 7
    eroded, _ = annotate(fraction, cord, zooms, _protocol(erode_mm=1.0, lesion_threshold=0.75))
    assert eroded["lesion"].sum() == 3 * 3 * 3  # the boundary layer goes; the one-voxel lesion disappears
    big_only, info = annotate(fraction, cord, zooms, _protocol(min_lesion_mm3=2.0))
    assert big_only["lesion"].sum() == 150 and info["left_out_small"] == 1
    instances, info = annotate(fraction, cord, zooms, _protocol(lesion_values="instances"))
    assert set(np.unique(instances["lesion"])) == {0, 1, 2} and info["annotated_lesions"] == 2
    everything, _ = annotate(fraction, cord, zooms, _protocol(labels=ALL_SUFFIXES, csf_shell_mm=1.0))
    assert set(everything) == {"lesion", "cord", "csf"}
    assert everything["csf"].sum() == 4 * 9 * 20  # within 1 mm of the 9 x 9 cord: its 4 faces, not the corners
