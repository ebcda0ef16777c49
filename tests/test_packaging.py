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
from conftest import REPO

# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"PIL": "pillow"}


def third_party_imports(paths: list[Path]) -> set[str]:
    """Distributions the modules import, leaving out imports guarded by ``except ImportError`` (install hints)."""
    import ast

    found: set[str] = set()
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        guarded = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.Try)
            and any(
                ast.unparse(handler.type or ast.Name("")) in ("ImportError", "ModuleNotFoundError")
                for handler in node.handlers
            )
            for statement in node.body
            for inner in ast.walk(statement)
        }
        for node in ast.walk(tree):
            if id(node) in guarded:
                continue
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {DISTRIBUTIONS.get(name, name) for name in found if name not in sys.stdlib_module_names} - {"sct_sitehead"}


def requirement_names(requirements: list[str]) -> set[str]:
    """``["onnx>=1.15", ...]`` -> ``{"onnx", ...}``."""
    import re

    return {re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].lower() for requirement in requirements}


def test_dependency_lists_say_what_the_code_imports():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = requirement_names(project["dependencies"])
    extras = {name: requirement_names(requirements) for name, requirements in project["optional-dependencies"].items()}
    package = REPO / "sct_sitehead"
    # The benchmark's MONAI baseline is the one module outside training that needs an extra (test).
    baseline = package / "evaluation" / "baseline.py"
    deploy = [
        path for path in package.rglob("*.py") if "training" not in path.relative_to(package).parts and path != baseline
    ]
    # Every runtime dependency is used outside training, and nothing else is imported there.
    assert {name.lower() for name in third_party_imports(deploy)} == runtime
    training = third_party_imports(list((package / "training").rglob("*.py")))
    assert training <= runtime | extras["train"]
    assert third_party_imports([baseline]) <= runtime | extras["train"] | extras["test"]
    # onnx only builds models: the deploy install does without it (36 MB with protobuf and ml_dtypes).
    assert "onnx" not in runtime and "onnx" in extras["train"] and "onnx" in extras["test"]
    # onnxruntime-gpu cannot be installed beside onnxruntime: the README documents the swap instead of an extra.
    assert "gpu" not in extras


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
