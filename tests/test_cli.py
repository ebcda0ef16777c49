"""sct_deepseg_lesion end to end: in-process and as a real process, on synthetic and real images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, blob_image, run_deepseg, write_registry


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return blob_image(tmp_path / "sub-01_T2w.nii.gz")


def test_segments_blob_with_header_of_input(tiny_registry, image, capsys):
    code, _, err = run_deepseg(["-i", image, "-site", "montreal", "-registry", tiny_registry], capsys)
    assert code == 0, err
    mask_path = image.with_name("sub-01_T2w_lesionseg.nii.gz")
    mask, source = nib.load(mask_path), nib.load(image)
    data = np.asanyarray(mask.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) == {0, 1}
    assert mask.shape == source.shape
    assert np.allclose(mask.affine, source.affine)
    assert mask.header["qform_code"] == source.header["qform_code"]
    assert mask.header["sform_code"] == source.header["sform_code"]
    assert np.allclose(mask.header.get_zooms(), source.header.get_zooms())
    assert mask.header.get_xyzt_units() == source.header.get_xyzt_units()
    assert data[20, 18, 12] == 1 and data[2, 2, 2] == 0
    sidecar = json.loads(image.with_name("sub-01_T2w_lesionseg.json").read_text())
    assert sidecar["Model"] == "tiny@1.0.0" and sidecar["Site"] == "montreal"
    assert sidecar["LesionCount"] == 1
    assert sidecar["LesionVolumeTotalMm3"] == pytest.approx(data.sum(), rel=1e-6)
    assert len(sidecar["BackboneSha256"]) == 64 and len(sidecar["HeadSha256"]) == 64
    assert sidecar["Device"] == "CPUExecutionProvider"


def test_several_sites_write_one_mask_each_and_other_labels(tiny_registry, image, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_deepseg(
        ["-i", image, "-site", "montreal,universal", "-ofolder", out, "-registry", tiny_registry, "-soft"], capsys
    )
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert "sub-01_T2w_lesionseg_montreal.nii.gz" in names
    assert "sub-01_T2w_lesionseg_universal.nii.gz" in names
    assert "sub-01_T2w_cordseg_universal.nii.gz" in names  # the universal head also predicts the cord
    assert "sub-01_T2w_lesionseg_montreal_soft.nii.gz" in names
    soft = np.asanyarray(nib.load(out / "sub-01_T2w_lesionseg_montreal_soft.nii.gz").dataobj)
    assert soft.dtype == np.float32 and 0.0 <= soft.min() and soft.max() <= 1.0


def test_mirroring_is_recorded_and_flips_back_what_it_flipped(tiny_registry, image, tmp_path, capsys, monkeypatch):
    # The tiny network commutes with flips, so mirrored copies flipped back must give the same soft map, voxel for
    # voxel, on this image whose noise is not symmetric; a copy not flipped back would differ from it.
    from sct_sitehead.deploy import windows

    real, axes = windows.mirrored, []

    def spy(predict, chosen):
        axes.append(list(chosen))
        return real(predict, chosen)

    monkeypatch.setattr(windows, "mirrored", spy)
    soft = {}
    for name, extra in (("plain", []), ("tta", ["-tta"])):
        out = tmp_path / name
        code, _, err = run_deepseg(
            ["-i", image, "-site", "montreal,toronto", "-ofolder", out, "-registry", tiny_registry, "-soft", *extra],
            capsys,
        )
        assert code == 0, err
        soft[name] = [
            np.asanyarray(nib.load(out / f"sub-01_T2w_lesionseg_{site}_soft.nii.gz").dataobj)
            for site in ("montreal", "toronto")
        ]
        sidecar = json.loads((out / "sub-01_T2w_lesionseg_montreal.json").read_text())
        assert sidecar["TestTimeMirroring"] == (["left-right"] if extra else [])
    assert axes == [[0]]  # once, for the -tta run, along the model grid's left-right axis (RAS: the first)
    for plain, tta in zip(soft["plain"], soft["tta"]):
        assert np.ptp(plain[plain < 0.5]) > 1e-5  # the background's noise shows in the soft map
        np.testing.assert_allclose(tta, plain, atol=1e-6)


def test_site_from_environment(tiny_registry, image, monkeypatch, capsys):
    monkeypatch.setenv("SCT_SITEHEAD_SITE", "toronto")
    code, _, err = run_deepseg(["-i", image, "-registry", tiny_registry, "-o", image.with_name("x.nii.gz")], capsys)
    assert code == 0, err
    assert json.loads(image.with_name("x.json").read_text())["Site"] == "toronto"


def test_qc_writes_pictures_and_index(tiny_registry, image, tmp_path, capsys):
    qc = tmp_path / "qc"
    code, _, err = run_deepseg(["-i", image, "-site", "montreal", "-registry", tiny_registry, "-qc", qc], capsys)
    assert code == 0, err
    assert (qc / "index.html").is_file()
    pngs = list(qc.glob("*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, code, fragment",
    [
        (["-site", "montrael"], 4, "Did you mean 'montreal'"),
        ([], 2, "montreal"),  # no site: the error lists the sites
        (["-site", "montreal", "-model", "tiny@9.9"], 4, "1.0.0"),
        (["-site", "montreal", "-thr", "1.5"], 2, "-thr"),
        (["-site", "montreal", "-min-lesion", "-1"], 2, "-min-lesion"),
    ],
)
def test_usage_and_lookup_errors_are_one_line(tiny_registry, image, capsys, argv, code, fragment):
    got, _, err = run_deepseg(["-i", image, "-registry", tiny_registry, *argv], capsys)
    assert got == code
    assert fragment in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_lesions_smaller_than_the_release_keeps_are_dropped(tmp_path, capsys):
    """A head's min_lesion_mm3 drops small pieces from its mask (not from its soft map); -min-lesion overrides."""
    path = blob_image(tmp_path / "sub-01_T2w.nii.gz")  # a 512 mm³ blob ...
    source = nib.load(path)
    data = np.asanyarray(source.dataobj).copy()
    data[4:6, 4:6, 4:6] = 400  # ... and an 8 mm³ one
    nib.save(nib.Nifti1Image(data, source.affine, source.header), path)
    registry = write_registry(tmp_path / "registry", min_lesion_mm3={"montreal": 20.0})
    for argv, count, smallest in [([], 1, 20.0), (["-min-lesion", "0"], 2, 0.0), (["-min-lesion", "600"], 0, 600.0)]:
        argv = ["-i", path, "-site", "montreal", "-registry", registry, "-soft", "-overwrite", *argv]
        code, _, err = run_deepseg(argv, capsys)
        assert code == 0, err
        mask = np.asanyarray(nib.load(path.with_name("sub-01_T2w_lesionseg.nii.gz")).dataobj)
        sidecar = json.loads(path.with_name("sub-01_T2w_lesionseg.json").read_text())
        assert (sidecar["LesionCount"], sidecar["MinLesionMm3"]) == (count, smallest)
        assert mask[5, 5, 5] == (count == 2) and mask[20, 18, 12] == (count >= 1)
        soft = np.asanyarray(nib.load(path.with_name("sub-01_T2w_lesionseg_soft.nii.gz")).dataobj)
        assert soft[5, 5, 5] > 0.5


def test_bad_inputs(tiny_registry, tmp_path, capsys):
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    for bad in (tmp_path / "missing.nii.gz", text, tmp_path):
        code, _, err = run_deepseg(["-i", bad, "-site", "montreal", "-registry", tiny_registry], capsys)
        assert code == 3, err
        assert "Traceback" not in err and err.strip()


def test_one_bad_input_does_not_stop_the_others(tiny_registry, image, tmp_path, capsys):
    constant = tmp_path / "constant.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4)), constant)
    code, _, err = run_deepseg(["-i", constant, image, "-site", "montreal", "-registry", tiny_registry], capsys)
    assert code == 3
    assert image.with_name("sub-01_T2w_lesionseg.nii.gz").is_file()
    assert not tmp_path.joinpath("constant_lesionseg.nii.gz").exists()


def test_o_with_two_inputs_is_usage_error(tiny_registry, image, tmp_path, capsys):
    other = blob_image(tmp_path / "b.nii.gz")
    code, _, err = run_deepseg(
        ["-i", image, other, "-site", "montreal", "-o", tmp_path / "x.nii.gz", "-registry", tiny_registry], capsys
    )
    assert code == 2 and "-ofolder" in err


def test_offline_with_remote_registry_and_empty_cache(image, capsys):
    code, _, err = run_deepseg(
        ["-i", image, "-site", "montreal", "-offline", "-registry", "https://example.org/r.json"], capsys
    )
    assert code == 8, err


def test_list_sites_and_models(tiny_registry, capsys):
    code, out, _ = run_deepseg(["-list-sites", "-registry", tiny_registry], capsys)
    assert code == 0 and {"montreal", "toronto", "universal"} <= {line.split()[0] for line in out.splitlines()}
    code, out, _ = run_deepseg(["-list-models", "-registry", tiny_registry], capsys)
    assert code == 0 and out.startswith("tiny (default): 1.0.0")


def test_help_imports_nothing_heavy():
    probe = (
        "import sys\n"
        "from sct_sitehead.cli.deepseg_lesion import main\n"
        "try:\n    main(['-h'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'scipy', 'numpy', 'nibabel') if m in sys.modules]\n"
        "print('heavy:' + ','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip().splitlines()[-1] == "heavy:"


def test_subprocess_exit_codes_and_outputs(tiny_registry, image, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "sct_sitehead.cli.deepseg_lesion"]
    ok = subprocess.run(
        [*command, "-i", image, "-site", "toronto", "-registry", tiny_registry], capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0, ok.stderr
    assert image.with_name("sub-01_T2w_lesionseg.nii.gz").is_file()
    unknown = subprocess.run(
        [*command, "-i", image, "-site", "nowhere", "-registry", tiny_registry], capture_output=True, text=True, env=env
    )
    assert unknown.returncode == 4 and "sites:" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    usage = subprocess.run([*command, "-site", "toronto", "-bogus"], capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1


def real_images(bids: Path) -> list[Path]:
    return sorted(p for p in bids.glob("sub-*/anat/*.nii.gz"))


def test_every_real_image_gets_a_mask_on_its_own_grid(tiny_registry, bids_dir, tmp_path, capsys):
    images = real_images(bids_dir)
    assert len(images) == 44
    out = tmp_path / "out"
    code, _, err = run_deepseg(
        ["-i", *images, "-site", "universal", "-ofolder", out, "-registry", tiny_registry], capsys
    )
    assert code == 0, err
    for source_path in images:
        stem = source_path.name[: -len(".nii.gz")]
        mask = nib.load(out / f"{stem}_lesionseg.nii.gz")
        source = nib.load(source_path)
        assert mask.shape == source.shape[:3], stem
        assert np.allclose(mask.affine, source.affine, atol=1e-5), stem
        assert np.allclose(mask.header.get_zooms()[:3], source.header.get_zooms()[:3]), stem
        assert (out / f"{stem}_cordseg.nii.gz").is_file()
