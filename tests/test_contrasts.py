"""Each head's training contrasts: read from an input's file name or sidecar, carried by publish into the registry,
listed by ``-list-sites``, and a one-line warning (the run goes on) for an image of another contrast."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import pytest
from conftest import blob_image, run_deepseg, write_registry
from test_admin_cli import export_folder

import sct_sitehead
from sct_sitehead.deploy.contrasts import (
    ImageContrast,
    contrast_facts,
    contrast_matches,
    image_contrast,
    mismatch_warning,
)
from sct_sitehead.registry.cache import Cache
from sct_sitehead.registry.index import Registry
from sct_sitehead.registry.publish import publish


# --- the image's contrast -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sub-01_T2w.nii.gz", "T2w"),
        ("sub-01_T2star.nii.gz", "T2star"),
        ("sub-01_acq-MTon_MTS.nii.gz", "MTS"),
        ("sub-01_T1w.nii", "T1w"),
        ("sub-01_UNIT1.nii.gz", "UNIT1"),
        ("sub-01_FLAIR.nii.gz", "FLAIR"),
        ("patient_t2w.nii.gz", "T2w"),  # any letter case, spelt back as BIDS does
        ("t2.nii.gz", None),  # no suffix
        ("sub-01_T2w_crop.nii.gz", None),  # the last part is not a contrast: nothing is guessed
        ("sub-01_seg.nii.gz", None),
    ],
)
def test_the_file_names_bids_suffix_is_the_contrast(tmp_path: Path, name: str, expected: str | None) -> None:
    found = image_contrast(tmp_path / name)
    assert (found and found.name) == expected
    assert found is None or found.found_in == "file name"


def test_a_sidecar_names_the_contrast_only_in_its_contrast_field(tmp_path: Path) -> None:
    image = tmp_path / "t2s.nii.gz"
    sidecar = tmp_path / "t2s.json"
    assert image_contrast(image) is None  # no sidecar
    sidecar.write_text(json.dumps({"Contrast": "T2star", "EchoTime": 0.02}))
    assert image_contrast(image) == ImageContrast("T2star", "sidecar t2s.json")
    for unknown in (
        {"Contrast": "T2-weighted"},  # not a BIDS suffix
        {"SeriesDescription": "T2w sag", "ContrastBolusIngredient": "GADOLINIUM"},  # other fields are not read
        {"Contrast": ["T2w"]},
        ["T2w"],
    ):
        sidecar.write_text(json.dumps(unknown))
        assert image_contrast(image) is None, unknown
    sidecar.write_text('{"Contrast": "T2w", "Contrast": "T1w"}')  # ambiguous: refused, so unknown
    assert image_contrast(image) is None
    sidecar.write_bytes(b"\xff not json")
    assert image_contrast(image) is None
    # The file name wins over the sidecar.
    sidecar.write_text(json.dumps({"Contrast": "T1w"}))
    (tmp_path / "sub-01_T2w.json").write_text(json.dumps({"Contrast": "T1w"}))
    assert image_contrast(tmp_path / "sub-01_T2w.nii.gz") == ImageContrast("T2w", "file name")
    assert image_contrast(None) is None


def test_only_a_known_contrast_against_known_head_contrasts_decides() -> None:
    t2star = ImageContrast("T2star", "file name")
    assert contrast_matches(t2star, ["T2w", "T2star"]) is True
    assert contrast_matches(ImageContrast("T2starw", "file name"), ["T2star"]) is True  # BIDS's newer name
    assert contrast_matches(t2star, ["T2w"]) is False
    assert contrast_matches(t2star, None) is None and contrast_matches(None, ["T2w"]) is None
    assert contrast_facts(t2star, ("T2w",)) == {"Contrast": "T2star", "HeadContrasts": ["T2w"], "ContrastMatch": False}
    assert contrast_facts(None, None) == {"Contrast": None, "HeadContrasts": None, "ContrastMatch": None}


def test_the_warning_is_one_line_naming_every_head_not_trained_on_it() -> None:
    t1 = ImageContrast("T1w", "file name")
    heads = {"montreal": ("T2w",), "paris": ("T2w", "T2star"), "universal": ("T1w", "T2w"), "old": None}
    message = mismatch_warning("x_T1w.nii.gz", t1, heads)
    assert message is not None and "\n" not in message
    assert message.startswith("x_T1w.nii.gz: contrast T1w (from its file name) is not one the heads montreal (T2w), ")
    assert "paris (T2w, T2star)" in message and "universal" not in message and "old" not in message
    assert mismatch_warning("x", t1, {"universal": ("T1w",), "old": None}) is None
    assert mismatch_warning("x", None, heads) is None


# --- the command ----------------------------------------------------------------------------------------------------
@pytest.fixture
def registry(tmp_path: Path) -> Path:
    """The tiny release; montreal trained on T2w, universal on T2w and T2star, toronto's contrasts not recorded."""
    return write_registry(tmp_path / "registry", contrasts={"montreal": ["T2w"], "universal": ["T2w", "T2star"]})


def sidecar_of(mask: Path) -> dict:
    return json.loads(mask.with_name(mask.name.replace(".nii.gz", ".json")).read_text())


def test_an_image_of_another_contrast_warns_once_and_is_still_segmented(registry: Path, tmp_path: Path, capsys):
    image = blob_image(tmp_path / "sub-01_T2star.nii.gz")
    code, _, err = run_deepseg(["-i", image, "-site", "montreal", "-registry", registry, "-v", 0], capsys)
    assert code == 0
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "contrast T2star (from its file name)" in lines[0] and "montreal (T2w)" in lines[0]
    mask = tmp_path / "sub-01_T2star_lesionseg.nii.gz"
    assert nib.load(mask).get_fdata().sum() > 0
    facts = sidecar_of(mask)
    assert (facts["Contrast"], facts["HeadContrasts"], facts["ContrastMatch"]) == ("T2star", ["T2w"], False)
    # Several sites: still one line, naming only the head that was not trained on it.
    code, _, err = run_deepseg(
        ["-i", image, "-site", "montreal,universal", "-registry", registry, "-v", 0, "-overwrite"], capsys
    )
    assert code == 0 and len(err.splitlines()) == 1 and "universal" not in err, err


def test_an_image_of_a_trained_contrast_does_not_warn(registry: Path, tmp_path: Path, capsys):
    image = blob_image(tmp_path / "sub-01_T2w.nii.gz")
    code, _, err = run_deepseg(["-i", image, "-site", "montreal", "-registry", registry, "-v", 0], capsys)
    assert code == 0 and err == ""
    facts = sidecar_of(tmp_path / "sub-01_T2w_lesionseg.nii.gz")
    assert (facts["Contrast"], facts["HeadContrasts"], facts["ContrastMatch"]) == ("T2w", ["T2w"], True)


def test_a_release_without_contrasts_never_warns(tiny_registry: Path, tmp_path: Path, capsys):
    image = blob_image(tmp_path / "sub-01_T2star.nii.gz")
    code, _, err = run_deepseg(["-i", image, "-site", "montreal", "-registry", tiny_registry, "-v", 0], capsys)
    assert code == 0 and err == ""
    facts = sidecar_of(tmp_path / "sub-01_T2star_lesionseg.nii.gz")
    assert (facts["Contrast"], facts["HeadContrasts"], facts["ContrastMatch"]) == ("T2star", None, None)


def test_an_unknown_contrast_does_not_warn(registry: Path, tmp_path: Path, capsys):
    image = blob_image(tmp_path / "t2s.nii.gz")
    code, _, err = run_deepseg(["-i", image, "-site", "montreal", "-registry", registry, "-v", 0], capsys)
    assert code == 0 and err == ""
    assert sidecar_of(tmp_path / "t2s_lesionseg.nii.gz")["ContrastMatch"] is None
    # A sidecar that names the contrast makes it known.
    (tmp_path / "t2s.json").write_text(json.dumps({"Contrast": "T2star"}))
    code, _, err = run_deepseg(["-i", image, "-site", "montreal", "-registry", registry, "-v", 0, "-overwrite"], capsys)
    assert code == 0 and "(from its sidecar t2s.json)" in err and len(err.splitlines()) == 1


def test_list_sites_shows_each_heads_contrasts(registry: Path, capsys):
    code, out, _ = run_deepseg(["-list-sites", "-registry", registry], capsys)
    rows = {line.split("\t")[0]: line.split("\t") for line in out.splitlines()}
    assert code == 0
    assert rows["montreal"][-1] == "trained on T2w"
    assert rows["universal"][-1] == "trained on T2w, T2star"
    assert rows["toronto"][-1] == "contrasts not recorded"


def test_the_help_says_how_the_contrast_is_found(capsys):
    with pytest.raises(SystemExit):
        run_deepseg(["-h"], capsys)
    out, _ = capsys.readouterr()
    assert "BIDS suffix" in out and '"Contrast" field of its JSON sidecar' in out


# --- the Python API --------------------------------------------------------------------------------------------------
def test_the_api_returns_the_contrast_in_its_facts_and_logs_the_warning(registry: Path, tmp_path: Path, caplog):
    segmenter = sct_sitehead.open_segmenter("montreal", source=sct_sitehead.ModelSource.resolve(str(registry)))
    path = blob_image(tmp_path / "sub-01_T2star.nii.gz")
    with caplog.at_level("WARNING", logger="sct_sitehead"):
        facts = segmenter.segment(path)["montreal"].facts
    assert facts["ContrastMatch"] is False and len(caplog.records) == 1
    assert segmenter.segment(nib.load(path))["montreal"].facts["Contrast"] == "T2star"  # the file it came from
    loaded = nib.load(path)
    in_memory = nib.Nifti1Image(loaded.get_fdata(), loaded.affine)
    assert segmenter.segment(in_memory)["montreal"].facts["Contrast"] is None


def test_the_warning_can_be_turned_off_where_every_head_runs_on_every_image(registry: Path, tmp_path: Path, caplog):
    """`evaluate` and `tune-thresholds` run every head on every case by design: no warning per case, same facts."""
    options = sct_sitehead.Options(warn_contrast=False)
    source = sct_sitehead.ModelSource.resolve(str(registry))
    segmenter = sct_sitehead.open_segmenter("montreal", options=options, source=source)
    path = blob_image(tmp_path / "sub-01_T2star.nii.gz")
    with caplog.at_level("WARNING", logger="sct_sitehead"):
        facts = segmenter.segment(path)["montreal"].facts
    assert facts["ContrastMatch"] is False and facts["Contrast"] == "T2star" and not caplog.records


# --- publish ---------------------------------------------------------------------------------------------------------
def test_publish_carries_each_heads_contrasts_into_the_registry(tmp_path: Path):
    folder = export_folder(tmp_path)
    manifest = json.loads((folder / "export.json").read_text())
    manifest["heads"]["montreal"]["contrasts"] = ["T2w", "T2star"]
    (folder / "export.json").write_text(json.dumps(manifest))
    index = publish(folder, tmp_path / "registry", model="tiny", version="2.0.0")
    entry = json.loads(index.read_text())["models"]["tiny"]["releases"]["2.0.0"]
    # At the release level (descriptive: schema_version 1 clients accept it), never inside a head.
    assert entry["head_contrasts"] == {"montreal": ["T2w", "T2star"]}  # an export without them publishes none
    assert all("contrasts" not in head for head in entry["heads"].values())
    release = Registry.load(str(index), cache=Cache(tmp_path / "cache"), offline=True).release("tiny", "2.0.0")
    assert release.head("montreal").contrasts == ("T2w", "T2star") and release.head("toronto").contrasts is None
