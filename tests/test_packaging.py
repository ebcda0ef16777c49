"""The wheel carries the embedded registry: build it, install it in a fresh virtual environment, run the job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
        text=True,
    )
    (found,) = out.glob("sct_sitehead-*.whl")
    return found


def test_wheel_lists_the_embedded_registry_and_its_models(wheel: Path):
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "sct_sitehead/models/registry.json" in names
    index = json.loads(zipfile.ZipFile(wheel).read("sct_sitehead/models/registry.json"))
    for model in index["models"].values():
        for release in model["releases"].values():
            assets = [release["backbone"], *release["heads"].values()]
            if "localiser" in release:
                assets += [release["localiser"]["backbone"], release["localiser"]["head"]]
            for asset in assets:
                assert f"sct_sitehead/models/{asset['url']}" in names
    assert not [n for n in names if "torch" in n.lower()]


@pytest.mark.slow
def test_main_job_runs_from_a_wheel_in_a_fresh_environment(wheel: Path, tmp_path: Path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    # Dependencies come from this environment (no download); the package itself only from the wheel.
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["SCT_SITEHEAD_CACHE"] = str(tmp_path / "cache")
    work = tmp_path / "work"
    work.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import sct_sitehead; print(sct_sitehead.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
    ).stdout.strip()
    assert Path(where).is_relative_to(env_dir), where
    bindir = env_dir / "bin"
    subprocess.run(
        [str(bindir / "sct_sitehead"), "phantom", "-o", "example_T2w.nii.gz", "-shape", "48", "48", "64"],
        check=True,
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
    )
    done = subprocess.run(
        [str(bindir / "sct_deepseg_lesion"), "-i", "example_T2w.nii.gz", "-site", "montreal", "-offline"],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert (work / "example_T2w_lesionseg.nii.gz").is_file()
    sidecar = json.loads((work / "example_T2w_lesionseg.json").read_text())
    assert sidecar["Site"] == "montreal"
