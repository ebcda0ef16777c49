"""Shared fixtures: where the real data lives, and small registries built on the fly."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests import onnx_factory


def default_sigint() -> None:
    """``preexec_fn`` for a child that a test interrupts with SIGINT: Ctrl-C's default action, whatever the parent has.

    A shell starts background jobs with SIGINT ignored, and a child inherits that; Python then installs no
    KeyboardInterrupt handler, so a test run from ``cmd &`` would see its interrupted child finish normally.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def find_bids() -> Path | None:
    """The shared real BIDS dataset: ``$SCT_SITEHEAD_DATA`` or ``../shared/data/bids`` beside the repository."""
    configured = os.environ.get("SCT_SITEHEAD_DATA")
    candidate = Path(configured) if configured else REPO.parent / "shared" / "data" / "bids"
    return candidate if (candidate / "participants.tsv").is_file() else None


@pytest.fixture(scope="session")
def bids_dir() -> Path:
    path = find_bids()
    if path is None:
        pytest.skip("real data not found: set SCT_SITEHEAD_DATA or place shared/data/bids beside the repository")
    return path


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test reads the user's cache or registry settings, or the network by accident."""
    for name in ("SCT_SITEHEAD_SITE", "SCT_SITEHEAD_REGISTRY", "SCT_SITEHEAD_OFFLINE", "SCT_SITEHEAD_ALLOW_HTTP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SCT_SITEHEAD_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("SCT_SITEHEAD_TRUST_DIR", str(tmp_path_factory.mktemp("trust")))


def save_image(path: Path, data, affine, *, sform_code: int = 1) -> Path:
    """Write ``data`` as a NIfTI image with ``affine`` as qform (code 1) and sform (``sform_code``)."""
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=sform_code)
    nib.save(image, path)
    return path


def sha256_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_registry(
    directory: Path,
    *,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    patch_size: tuple[int, int, int] = (32, 32, 32),
    receptive_field: bool = False,
    localiser: dict | None = None,
    min_lesion_mm3: dict[str, float] | None = None,
) -> Path:
    """A registry folder with the tiny ONNX release of ``onnx_factory`` (model ``tiny``, version 1.0.0).

    ``localiser``: add a cord localiser (the tiny backbone and a head marking voxels brighter than
    ``level`` z-scores as cord) with these fields of the registry's ``localiser`` object overriding the defaults
    (spacing 2 mm, margin_mm 6, cord_margin_mm 3); ``level`` sets the head's brightness level (default 1).
    ``min_lesion_mm3``: per-head smallest lesion kept.
    """
    from onnx_factory import SLOPE, backbone_model, head_model, write_tiny_release

    release_dir = directory / "tiny" / "1.0.0"
    tiny = write_tiny_release(release_dir, receptive_field=receptive_field)

    def asset(path: Path) -> dict:
        return {"url": path.relative_to(directory).as_posix(), "sha256": sha256_of(path), "size": path.stat().st_size}

    heads = {
        site: {
            **asset(path),
            "strategy": "finetune",
            "labels": tiny["labels"][site],
            "threshold": tiny["thresholds"][site],
            **({"min_lesion_mm3": min_lesion_mm3[site]} if site in (min_lesion_mm3 or {}) else {}),
        }
        for site, path in tiny["heads"].items()
    }

    def localiser_entry(fields: dict) -> dict:
        import onnx

        fields = dict(fields)
        level = float(fields.pop("level", 1.0))
        folder = release_dir / "localiser"
        folder.mkdir(parents=True, exist_ok=True)
        onnx.save(backbone_model(), folder / "backbone.onnx")
        onnx.save(head_model(("skip0",), [[SLOPE, 0.0]], [-SLOPE * level]), folder / "cord.onnx")
        spacing = fields.pop("spacing", [2.0, 2.0, 2.0])
        return {
            "input": {
                "orientation": "RAS",
                "spacing": list(spacing),
                "patch_size": [32, 32, 32],
                "divisor": 2,
                "normalization": {"method": "zscore", "clip_percentiles": [0.5, 99.5]},
            },
            "backbone": {**asset(folder / "backbone.onnx"), "outputs": tiny["backbone_outputs"]},
            "head": asset(folder / "cord.onnx"),
            "channel": 0,
            "threshold": 0.5,
            "margin_mm": 6.0,
            "cord_margin_mm": 3.0,
            **fields,
        }

    index = {
        "schema_version": 1,
        "serial": 1,
        "updated": "2026-11-22T00:00:00Z",
        "default_model": "tiny",
        "models": {
            "tiny": {
                "description": "test model: bright-voxel detector",
                "releases": {
                    "1.0.0": {
                        "date": "2026-11-22",
                        "input": {
                            "orientation": "RAS",
                            "spacing": list(spacing),
                            "patch_size": list(patch_size),
                            "divisor": tiny["divisor"],
                            "normalization": {"method": "zscore", "clip_percentiles": [0.5, 99.5]},
                        },
                        "channels": tiny["channels"],
                        "threshold": 0.5,
                        "backbone": {**asset(tiny["backbone"]), "outputs": tiny["backbone_outputs"]},
                        "heads": heads,
                        **({"localiser": localiser_entry(localiser)} if localiser is not None else {}),
                    }
                },
            }
        },
    }
    path = directory / "registry.json"
    path.write_text(json.dumps(index, indent=2))
    return path


@pytest.fixture
def tiny_registry(tmp_path: Path) -> Path:
    return write_registry(tmp_path / "registry")


@pytest.fixture(autouse=True)
def _restore_package_logger():
    """The command-line tools configure the package logger (also from module-scoped fixtures); every test starts
    and ends with the library's own state, no handler and propagating, so caplog sees its records."""
    import logging

    def reset() -> None:
        logger = logging.getLogger("sct_sitehead")
        logger.handlers[:] = []
        logger.setLevel(logging.NOTSET)
        logger.propagate = True

    reset()
    yield
    reset()
