"""Shared fixtures: where the real data lives, small registries, images and BIDS datasets built on the fly, and the
isolation every test runs in."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
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
    """No test reads the user's cache, trusted keys or registry settings, or the network by accident; a proxy
    configured on the test machine never intercepts requests to the local test servers (127.0.0.1 and .2)."""
    for name in ("SCT_SITEHEAD_SITE", "SCT_SITEHEAD_REGISTRY", "SCT_SITEHEAD_OFFLINE", "SCT_SITEHEAD_ALLOW_HTTP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SCT_SITEHEAD_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("SCT_SITEHEAD_TRUST_DIR", str(tmp_path_factory.mktemp("trust")))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,127.0.0.2,localhost,::1")


@pytest.fixture
def one_torch_thread() -> None:
    """torch on one thread: the test machine's cores are shared, and training tests compare runs bit for bit."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)


@pytest.fixture
def seeded_torch(one_torch_thread: None) -> None:
    """:func:`one_torch_thread`, and torch's global generator seeded with 0 (random weights and inputs)."""
    import torch

    torch.manual_seed(0)


def save_image(path: Path, data, affine, *, sform_code: int = 1) -> Path:
    """Write ``data`` as a NIfTI image with ``affine`` as qform (code 1) and sform (``sform_code``)."""
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=sform_code)
    nib.save(image, path)
    return path


def blob_image(
    path: Path, *, affine: np.ndarray | None = None, shape: tuple[int, int, int] = (40, 36, 24), dtype: Any = np.int16
) -> Path:
    """Noise around 100 with one bright (400) 8x8x8 block at the centre: the tiny model's lesion.

    The image has mm/s units, qform code 1 and sform code 2 (``affine``: identity by default).
    """
    import nibabel as nib

    rng = np.random.default_rng(0)
    data = rng.normal(100, 5, shape)
    data[tuple(slice(n // 2 - 4, n // 2 + 4) for n in shape)] = 400
    affine = np.eye(4) if affine is None else affine
    image = nib.Nifti1Image(data.astype(dtype), affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=2)
    nib.save(image, path)
    return path


def run_deepseg(argv: list[Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``sct_deepseg_lesion`` in-process: exit code, stdout and stderr."""
    from sct_sitehead.cli.deepseg_lesion import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


#: Sites of :func:`make_dataset` and the labels each one annotates.
TWO_SITES = {"siteA": ["lesion"], "siteB": ["lesion", "cord"]}


def make_dataset(
    root: Path,
    sites: dict[str, list[str]] = TWO_SITES,
    cases_per_site: int = 2,
    shape: tuple[int, int, int] = (24, 22, 20),
    seed: int = 0,
) -> Path:
    """A BIDS folder of synthetic T2w-like volumes: a bright cord cylinder along Z with brighter lesion balls.

    Images are stored LPS-like (x and y flipped), so the deploy preprocessing must reorient them to RAS.
    """
    import nibabel as nib

    rng = np.random.default_rng(seed)
    rows = ["participant_id\tsite"]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    grid = np.indices(shape).astype(np.float32)
    number = 0
    for site, labels in sites.items():
        for _ in range(cases_per_site):
            number += 1
            subject = f"sub-{site}{number:02d}"
            rows.append(f"{subject}\t{site}")
            cx, cy = shape[0] / 2 + rng.uniform(-2, 2), shape[1] / 2 + rng.uniform(-2, 2)
            cord = np.hypot(grid[0] - cx, grid[1] - cy) < 4
            lesion = np.zeros(shape, bool)
            for _ in range(2):
                centre = np.array([cx + rng.uniform(-2, 2), cy + rng.uniform(-2, 2), rng.uniform(4, shape[2] - 4)])
                lesion |= np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0)) < 2
            lesion &= cord
            image = 100 + 10 * rng.standard_normal(shape) + 200 * cord + 250 * lesion
            anat = root / subject / "anat"
            anat.mkdir(parents=True)
            nib.save(nib.Nifti1Image(image.astype(np.float32), affine), anat / f"{subject}_T2w.nii.gz")
            label_dir = root / "derivatives" / "labels" / subject / "anat"
            label_dir.mkdir(parents=True)
            csf = (np.hypot(grid[0] - cx, grid[1] - cy) < 6) & ~cord
            masks = {"lesion": ("lesion-manual", lesion), "cord": ("seg-manual", cord), "csf": ("csf-manual", csf)}
            for name in labels:
                suffix, mask = masks[name]
                nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), label_dir / f"{subject}_T2w_{suffix}.nii.gz")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (root / "dataset_description.json").write_text('{"Name": "toy", "BIDSVersion": "1.8.0"}', encoding="utf-8")
    return root


def tiny_config(**train: object) -> dict:
    """The ``tiny`` training config with ``train`` settings overridden."""
    from sct_sitehead.training.config import load_config

    config = load_config("tiny")
    config["train"].update(train)
    return config


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
    contrasts: dict[str, list[str]] | None = None,
) -> Path:
    """A registry folder with the tiny ONNX release of ``onnx_factory`` (model ``tiny``, version 1.0.0).

    ``localiser``: add a cord localiser (the tiny backbone and a head marking voxels brighter than
    ``level`` z-scores as cord) with these fields of the registry's ``localiser`` object overriding the defaults
    (spacing 2 mm, margin_mm 6, cord_margin_mm 3); ``level`` sets the head's brightness level (default 1).
    ``min_lesion_mm3``: per-head smallest lesion kept. ``contrasts``: per-head contrasts it was trained on (heads
    not named record none, as in releases published before the field).
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
                        **({"head_contrasts": contrasts} if contrasts else {}),
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


def pad_backbone(index: Path, size: int) -> None:
    """Grow the tiny backbone to about ``size`` bytes with an ONNX metadata entry (ignored when it runs), and update
    the index: a download must span many network reads for a process to be killed in the middle of one."""
    import onnx

    path = index.parent / "tiny" / "1.0.0" / "backbone.onnx"
    model = onnx.load(path)
    onnx.helper.set_model_props(model, {"padding": "x" * size})
    onnx.save(model, path)
    data = json.loads(index.read_text())
    entry = data["models"]["tiny"]["releases"]["1.0.0"]["backbone"]
    entry.update(sha256=sha256_of(path), size=path.stat().st_size)
    index.write_text(json.dumps(data, indent=2))


@pytest.fixture
def signed_site(tmp_path: Path) -> tuple[Path, Path]:
    from sct_sitehead.registry.signing import generate_keypair, sign_index

    """The tiny registry folder with a 1 MiB backbone, signed with a fresh key: ``(folder, public key)``."""
    www = tmp_path / "www"
    index = write_registry(www)
    pad_backbone(index, 1 << 20)
    private, public = tmp_path / "keys" / "k.pem", tmp_path / "keys" / "k.pub"
    private.parent.mkdir()
    generate_keypair(private, public)
    sign_index(index, private)
    return www, public
