"""Regression tests for the twelve findings of the issue "Hardening" (release lesion@1.1.3, CPU), one or more per
finding, each named after it (``test_f01_...`` to ``test_f12_...``). Each failed before the fix: a damaged cache
gave an empty mask with exit 0, an output overwrote its input, hostile headers ran for minutes in gigabytes, a
trickling server held a run without end, and so on (docs/RELIABILITY.md). The rules behind them are tested as
properties in ``test_hardening_properties.py``.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import pytest
from conftest import blob_image, default_sigint, run_deepseg, sha256_of, write_registry
from onnx_factory import HEADS, head_model
from test_faults import FaultServer, send, served_file

import sct_sitehead
from sct_sitehead.cli import admin
from sct_sitehead.cohort.plan import read_record
from sct_sitehead.deploy.budget import Budget, Network
from sct_sitehead.deploy.qc import ENTRIES_FILE, read_qc_entries
from sct_sitehead.deploy.windows import WindowSettings
from sct_sitehead.errors import (
    EXIT_TERMINATED,
    DownloadError,
    InferenceError,
    InputImageError,
    IntegrityError,
    OfflineError,
    RegistryError,
    UsageError,
)
from sct_sitehead.registry.cache import Cache
from sct_sitehead.registry.index import Registry
from sct_sitehead.registry.signing import generate_keypair, load_private_key, sign_bytes
from sct_sitehead.registry.specs import Asset, InputSpec, NormalizationSpec

PROG = "sct_deepseg_lesion"
PYTHONPATH = str(Path(sct_sitehead.__file__).resolve().parents[1])
#: Voxels of 0.9 x 0.9 x 1.5 mm: the tiny model's 1 mm grid is a resampling away.
AFFINE = np.diag([0.9, 0.9, 1.5, 1.0])


def mask_of(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def damage(path: Path, offset: int = 0, length: int = 4096) -> None:
    """Flip ``length`` bytes of a file from ``offset`` (clipped to the file), whatever its mode."""
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    start = min(offset, max(0, len(data) - 1))
    for index in range(start, min(len(data), start + length)):
        data[index] ^= 0xFF
    path.write_bytes(bytes(data))


def child_environment(cache: Path, **extra: str) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    environment.update(SCT_SITEHEAD_CACHE=str(cache), NO_PROXY="127.0.0.1,localhost", PYTHONPATH=PYTHONPATH, **extra)
    return environment


def replace_head(index: Path, site: str, model: onnx.ModelProto) -> None:
    """Put another head file in the tiny registry for ``site`` and update its sha256 and size in the index."""
    data = json.loads(index.read_text())
    entry = data["models"]["tiny"]["releases"]["1.0.0"]["heads"][site]
    path = index.parent / entry["url"]
    onnx.save(model, path)
    entry.update(sha256=sha256_of(path), size=path.stat().st_size)
    index.write_text(json.dumps(data, indent=2))


@pytest.fixture
def served(signed_site: tuple[Path, Path]):
    """The tiny registry with a 1 MiB backbone, signed with a fresh key, served over HTTP on 127.0.0.1: ``(server,
    www, index URL, public key, private key)``."""
    www, public = signed_site
    private = public.with_name("k.pem")  # signed_site's private half, beside its public key
    server = FaultServer(www)
    yield server, www, server.url("registry.json"), public, private
    server.close()


# --- 1: a damaged cache file is never run ------------------------------------------------------------------------
def first_run(tmp_path: Path, registry: Path | str, capsys, *extra) -> tuple[list, np.ndarray]:
    """A run that fills the cache; returns its arguments without an output folder (each run gives its own)."""
    image = blob_image(tmp_path / "sub-01_T2w.nii.gz", affine=AFFINE)
    argv = ["-i", image, "-site", "universal", "-registry", registry, "-v", "0", *extra]
    code, _, err = run_deepseg([*argv, "-ofolder", tmp_path / "first"], capsys)
    assert code == 0, err
    return argv, mask_of(tmp_path / "first" / "sub-01_T2w_lesionseg.nii.gz")


def test_f01_damaged_cached_asset_is_fetched_again_not_run(tiny_registry, tmp_path, capsys) -> None:
    """4 KB of the cached backbone overwritten: before, the run used it (an empty mask, exit 0); now the damage is
    found by its sha256, the file fetched again, and the mask is the same as before the damage."""
    argv, reference = first_run(tmp_path, tiny_registry, capsys)
    cache = Cache()
    backbone = cache.asset_path(sha256_of(tiny_registry.parent / "tiny/1.0.0/backbone.onnx"))
    damage(backbone, 100)
    code, _, err = run_deepseg([*argv, "-ofolder", tmp_path / "again"], capsys)
    assert code == 0, err
    assert np.array_equal(mask_of(tmp_path / "again" / "sub-01_T2w_lesionseg.nii.gz"), reference)
    assert sha256_of(backbone) == backbone.name


def test_f01_the_reported_case_sub_ms01_with_4_kb_of_the_backbone_overwritten(bids_dir, tmp_path, capsys) -> None:
    """The embedded release 1.1.3 (whose montreal head marks a lesion there; 2.0.0 marks none) on sub-ms01, 4 KB of
    the cached backbone's weights overwritten (the protobuf still loads): before, exit 0 with no lesion and no cord;
    now the same masks as before the damage."""
    image = bids_dir / "sub-ms01" / "anat" / "sub-ms01_T2w.nii.gz"
    argv = ["-i", image, "-site", "montreal", "-model", "lesion@1.1.3", "-v", "0"]
    code, _, err = run_deepseg([*argv, "-ofolder", tmp_path / "first"], capsys)
    assert code == 0, err
    release = Registry.load(None, cache=Cache(), offline=True).release("lesion", "1.1.3")
    backbone = Cache().asset_path(release.backbone.sha256)
    backbone.chmod(0o644)
    with backbone.open("r+b") as handle:  # 4 KB of NaN patterns in the weights
        handle.seek(1_000_000)
        handle.write(b"\xff" * 4096)
    code, _, err = run_deepseg([*argv, "-ofolder", tmp_path / "again"], capsys)
    assert code == 0, err
    for name in ("sub-ms01_T2w_lesionseg.nii.gz", "sub-ms01_T2w_lesionseg.json"):
        before, after = tmp_path / "first" / name, tmp_path / "again" / name
        if name.endswith(".json"):
            assert json.loads(after.read_text())["LesionCount"] == json.loads(before.read_text())["LesionCount"] > 0
        else:
            assert np.array_equal(mask_of(after), mask_of(before))


def test_f01_damaged_optimised_graph_is_found_and_made_again(tiny_registry, tmp_path, capsys) -> None:
    argv, reference = first_run(tmp_path, tiny_registry, capsys)
    graphs = sorted((Cache().root / "ort").glob("*.onnx"))
    assert graphs
    for graph in graphs:
        damage(graph, graph.stat().st_size // 2)
    code, _, err = run_deepseg([*argv, "-ofolder", tmp_path / "again"], capsys)
    assert code == 0, err
    assert np.array_equal(mask_of(tmp_path / "again" / "sub-01_T2w_lesionseg.nii.gz"), reference)
    for graph in graphs:  # made again, and matching their records
        assert json.loads(graph.with_name(graph.name + ".json").read_text())["sha256"] == sha256_of(graph)


def test_f01_damaged_asset_offline_is_an_integrity_error(served, tmp_path, capsys) -> None:
    _, www, url, public, _ = served
    argv, _ = first_run(tmp_path, url, capsys, "-trust", public)
    head = Cache().asset_path(sha256_of(www / "tiny/1.0.0/heads/universal.onnx"))
    damage(head)
    code, _, err = run_deepseg([*argv, "-ofolder", tmp_path / "offline", "-offline"], capsys)
    assert code == IntegrityError.exit_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "universal head of tiny@1.0.0" in lines[0] and "offline" in lines[0], lines
    assert not head.exists()  # removed: the next online run fetches it again
    code, _, err = run_deepseg([*argv, "-ofolder", tmp_path / "online"], capsys)
    assert code == 0, err


def test_f01_cache_verify_covers_the_optimised_graphs(tiny_registry, tmp_path, capsys) -> None:
    first_run(tmp_path, tiny_registry, capsys)
    graph = sorted((Cache().root / "ort").glob("*.onnx"))[0]
    damage(graph, 50)
    code = admin.main(["cache", "verify"])
    out = capsys.readouterr().out
    assert code == IntegrityError.exit_code and str(graph) in out and "all cached assets verified" not in out
    code = admin.main(["cache", "verify"])
    assert code == 0 and "all cached assets verified" in capsys.readouterr().out


# --- 2: an output never overwrites an input, nor a file the tool did not write ----------------------------------
def run_cli(argv: list, capsys) -> tuple[int, list[str]]:
    code, _, err = run_deepseg([*argv, "-v", "0"], capsys)
    return code, err.strip().splitlines()


def test_f02_output_named_as_the_input_is_refused(tiny_registry, tmp_path, capsys) -> None:
    image = blob_image(tmp_path / "t2.nii.gz", affine=AFFINE)
    before = image.read_bytes()
    code, lines = run_cli(["-i", image, "-o", image, "-site", "montreal", "-registry", tiny_registry], capsys)
    assert code == UsageError.exit_code and len(lines) == 1 and "is the input" in lines[0], lines
    assert image.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry", "t2.nii.gz"]


def test_f02_an_input_named_as_another_inputs_mask_is_refused(tiny_registry, tmp_path, capsys) -> None:
    first = blob_image(tmp_path / "a.nii.gz", affine=AFFINE)
    second = blob_image(tmp_path / "a_lesionseg.nii.gz", affine=AFFINE, shape=(40, 36, 20))
    before = second.read_bytes()
    code, lines = run_cli(["-i", first, second, "-site", "montreal", "-registry", tiny_registry], capsys)
    # The second is skipped as an input (named like a mask), and is then a file this tool did not write.
    assert code == UsageError.exit_code and str(second) in lines[-1] and "not written by" in lines[-1], lines
    assert second.read_bytes() == before
    assert not (tmp_path / "a_lesionseg.json").exists()


def test_f02_links_to_an_input_are_refused(tiny_registry, tmp_path, capsys) -> None:
    image = blob_image(tmp_path / "t2.nii.gz", affine=AFFINE)
    before = image.read_bytes()
    (tmp_path / "soft.nii.gz").symlink_to(image)
    os.link(image, tmp_path / "hard.nii.gz")
    for name, how in [("soft.nii.gz", "by another path"), ("hard.nii.gz", "hard link")]:
        argv = ["-i", image, "-o", tmp_path / name, "-site", "montreal", "-registry", tiny_registry]
        code, lines = run_cli(argv, capsys)
        assert code == UsageError.exit_code and how in lines[0], lines
        code, lines = run_cli([*argv, "-overwrite"], capsys)
        assert code == UsageError.exit_code, lines
    assert image.read_bytes() == before


def test_f02_files_the_tool_did_not_write_are_never_replaced(tiny_registry, tmp_path, capsys) -> None:
    image = blob_image(tmp_path / "t2.nii.gz", affine=AFFINE)
    cord = tmp_path / "t2_cordseg.nii.gz"
    cord.write_bytes(b"someone's manual cord segmentation")
    argv = ["-i", image, "-site", "universal", "-registry", tiny_registry]
    for extra in ([], ["-overwrite"]):
        code, lines = run_cli([*argv, *extra], capsys)
        assert code == UsageError.exit_code and len(lines) == 1 and "not written by" in lines[0], lines
    assert cord.read_bytes() == b"someone's manual cord segmentation"
    assert not (tmp_path / "t2_lesionseg.nii.gz").exists()


def test_f02_own_outputs_are_replaced_only_with_overwrite(tiny_registry, tmp_path, capsys) -> None:
    image = blob_image(tmp_path / "t2.nii.gz", affine=AFFINE)
    argv = ["-i", image, "-site", "universal", "-registry", tiny_registry]
    assert run_cli(argv, capsys)[0] == 0
    mask = tmp_path / "t2_lesionseg.nii.gz"
    stamp = mask.stat().st_mtime_ns
    code, lines = run_cli(argv, capsys)
    assert code == UsageError.exit_code and "-overwrite" in lines[0], lines
    assert mask.stat().st_mtime_ns == stamp
    assert run_cli([*argv, "-overwrite"], capsys)[0] == 0


def test_f02_the_python_api_does_not_write_over_its_input_either(tiny_registry, tmp_path) -> None:
    from sct_sitehead import ModelSource, open_segmenter

    image = blob_image(tmp_path / "t2.nii.gz", affine=AFFINE)
    before = image.read_bytes()
    segmenter = open_segmenter("montreal", source=ModelSource.resolve(tiny_registry))
    result = segmenter.segment(image)
    with pytest.raises(UsageError, match="is the input"):
        segmenter.write(result, image, {"montreal": image})
    assert image.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["registry", "t2.nii.gz"]


# --- 3 and 4: no header makes a run allocate without bound -------------------------------------------------------
#: Runs the command and writes its peak resident memory in KiB: VmHWM, the high-water mark of this process's own
#: memory since exec. (ru_maxrss would also count the pages of the parent it was forked from: a pytest process of
#: 1 GB makes every child report 1 GB.)
MEASURE = """
import re, resource, sys
from pathlib import Path
from sct_sitehead.cli.deepseg_lesion import main
code = main(sys.argv[2:])
status = Path("/proc/self/status")
found = re.search(r"VmHWM:\\s+(\\d+) kB", status.read_text()) if status.exists() else None
peak = found.group(1) if found else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
Path(sys.argv[1]).write_text(str(peak))
sys.exit(code)
"""


def measured_run(argv: list, cache: Path, tmp_path: Path, limit: int = 4 << 30, timeout: float = 120):
    """The command in a child process under an address-space limit: (exit code, stderr lines, seconds, peak RSS
    in bytes)."""
    report = tmp_path / "peak.txt"

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(report), *map(str, argv)],
        capture_output=True,
        text=True,
        env=child_environment(cache),
        preexec_fn=cap,
        timeout=timeout,
    )
    seconds = time.monotonic() - started
    peak = int(report.read_text()) * 1024 if report.exists() else -1
    return done.returncode, done.stderr.strip().splitlines(), seconds, peak


def header_image(path: Path, shape, zooms, *, dtype=np.int16, payload: bytes | None = None) -> Path:
    """A .nii.gz written byte for byte: a valid header, then zeros (or ``payload`` repeated) for every voxel."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_zooms(zooms)
    affine = np.diag([*zooms, 1.0])
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header["vox_offset"] = 352
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    block = payload or bytes(1 << 20)
    with gzip.open(path, "wb", compresslevel=1) as handle:
        handle.write(header.binaryblock + b"\0" * 4)
        while size > 0:
            handle.write(block[: min(size, len(block))])
            size -= len(block)
    return path


@pytest.mark.slow
def test_f03_huge_voxels_are_refused_before_allocating(tiny_registry, tmp_path) -> None:
    """128x128x64 voxels of 40 mm (a 0.9 MB file): 67 G voxels on the 1 mm grid. Before: 12 GB in 152 s."""
    rng = np.random.default_rng(0)
    image = tmp_path / "huge-voxels.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(100, 10, (128, 128, 64)).astype(np.int16), np.diag([40, 40, 40, 1.0])), image)
    assert image.stat().st_size < 1 << 20
    for registry in (tiny_registry, write_registry(tmp_path / "with-localiser", localiser={})):
        argv = ["-i", image, "-site", "montreal", "-registry", registry, "-ofolder", tmp_path / "out", "-v", "0"]
        code, lines, seconds, peak = measured_run(argv, tmp_path / "cache", tmp_path)
        assert code == 3 and len(lines) == 1 and "memory limit of 2 GB" in lines[0], lines
        assert seconds < 30 and peak < 500e6, (seconds, peak)


def test_f03_a_release_spacing_of_005_mm_is_refused(tmp_path, capsys) -> None:
    """40x36x24 voxels of 0.9x0.9x1.5 mm on a 0.05 mm grid: 720x648x720 model voxels. Before: 164 GiB asked for."""
    registry = write_registry(tmp_path / "fine", spacing=(0.05, 0.05, 0.05))
    image = blob_image(tmp_path / "t2.nii.gz", affine=AFFINE)
    argv = ["-i", image, "-site", "montreal", "-registry", registry, "-ofolder", tmp_path / "out"]
    started = time.monotonic()
    code, lines = run_cli(argv, capsys)
    assert code == 3 and len(lines) == 1, lines
    assert "720x648x720 on the 0.05x0.05x0.05 mm model grid" in lines[0] and "-max-memory" in lines[0], lines
    assert time.monotonic() - started < 10


def test_f03_max_memory_and_its_variable_set_the_limit(tiny_registry, tmp_path, capsys, monkeypatch) -> None:
    image = blob_image(tmp_path / "t2.nii.gz", affine=AFFINE)
    argv = ["-i", image, "-site", "montreal", "-registry", tiny_registry, "-ofolder", tmp_path / "out"]
    code, lines = run_cli([*argv, "-max-memory", "100M"], capsys)
    assert code == 3 and "over the memory limit of 100 MB" in lines[0], lines
    monkeypatch.setenv("SCT_SITEHEAD_MAX_MEMORY", "100M")
    assert run_cli(argv, capsys)[0] == 3
    assert run_cli([*argv, "-max-memory", "1G"], capsys)[0] == 0  # the flag before the variable
    code, lines = run_cli([*argv, "-max-memory", "lots", "-overwrite"], capsys)
    assert code == 2 and "-max-memory must be a size" in lines[0], lines


def test_f03_the_line_says_when_the_memory_would_be_needed() -> None:
    """Before this wording: "would need about 219 GB while after it" (the phase's name read as a sentence)."""
    plan = Budget(2_000_000_000, "t2.nii.gz")
    with pytest.raises(InputImageError, match=r"need about 3\.15 GB while holding the float32 image \(1024x1024x476"):
        plan.check_native((1024, 1024, 476), 2, labels=1)
    plan = Budget(2_000_000_000, "t2.nii.gz")
    plan.check_native((64, 64, 32), 2, labels=1)
    spec = InputSpec("RAS", (1.0, 1.0, 1.0), (64, 64, 64), 16, NormalizationSpec("zscore"))
    localiser = Network(channels=1, extra_per_voxel=84, keeps_image=True)  # its distance map outweighs the rest
    with pytest.raises(InputImageError, match=r"while holding the probabilities \(64x64x32 voxels in the file, "):
        plan.check_grid((64, 64, 32), np.diag([40.0, 40.0, 40.0, 1.0]), spec, WindowSettings(), localiser)


@pytest.mark.slow
def test_f03_sub_ms01_with_8_mm_voxels_is_refused(bids_dir, tmp_path) -> None:
    """sub-ms01 with an 8 mm in-plane header, the embedded release: before, 300 s at 5.5 GB."""
    source = nib.load(bids_dir / "sub-ms01" / "anat" / "sub-ms01_T2w.nii.gz")
    affine = source.affine.copy()
    affine[:3, :2] *= 8 / np.asarray(source.header.get_zooms()[:2])
    image = tmp_path / "sub-ms01_8mm_T2w.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(source.dataobj), affine, source.header), image)
    argv = ["-i", image, "-site", "montreal", "-ofolder", tmp_path / "out", "-v", "0"]
    code, lines, seconds, peak = measured_run(argv, tmp_path / "cache", tmp_path)
    assert code == 3 and len(lines) == 1 and "memory limit" in lines[0], lines
    assert seconds < 60 and peak < 1e9, (seconds, peak)


@pytest.mark.slow
@pytest.mark.parametrize("payload", ["zeros", "repeated-noise"])
def test_f04_a_legal_header_of_a_billion_voxels_is_refused_from_the_header(
    tiny_registry, tmp_path, payload: str
) -> None:
    """1024x1024x476 int16 (under the 2 GB float32 cap). Before: zeros took 23 s and 3.1 GB; noise 8.5 GB, 420 s."""
    noise = np.random.default_rng(0).integers(0, 1000, 256, dtype=np.int16).tobytes() * 2048
    image = header_image(
        tmp_path / f"{payload}.nii.gz",
        (1024, 1024, 476),
        (1.0, 1.0, 1.0),
        payload=noise if payload != "zeros" else None,
    )
    assert image.stat().st_size < 10e6
    argv = ["-i", image, "-site", "montreal", "-registry", tiny_registry, "-ofolder", tmp_path / "out", "-v", "0"]
    code, lines, seconds, peak = measured_run(argv, tmp_path / "cache", tmp_path)
    assert code == 3 and len(lines) == 1 and "1024x1024x476" in lines[0] and "memory limit" in lines[0], lines
    assert seconds < 20 and peak < 500e6, (seconds, peak)


# --- 5: downloads end, and a wait for another process's download ends too ----------------------------------------
def fetch_in_thread(cache: Cache, asset: Asset, within: float) -> BaseException | None:
    """``cache.fetch`` in a thread that must finish within ``within`` seconds; what it raised (None: success)."""
    outcome: list[BaseException | None] = []

    def work() -> None:
        try:
            cache.fetch(asset, offline=False)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(within)
    assert outcome, f"the download was still running after {within} s"
    return outcome[0]


def trickle_site(served, pace: tuple[int, float]) -> tuple[Asset, FaultServer]:
    server, www, url, public, _ = served
    release = Registry.load(url, cache=Cache(retries=0), offline=False, trust=[public]).release()
    server.throttle = pace
    return release.backbone, server


def test_f05_a_trickling_server_is_stopped_by_the_minimum_rate(served, tmp_path) -> None:
    """One byte at a time keeps any read timeout from firing: before, the run waited as long as the server liked."""
    asset, _ = trickle_site(served, (1, 0.05))
    cache = Cache(tmp_path / "c", retries=3, backoff=0.0, min_rate=(1000, 1.0))
    error = fetch_in_thread(cache, asset, within=15)
    assert isinstance(error, DownloadError) and "below the minimum of 1000 B/s" in str(error), error
    assert not cache.asset_path(asset.sha256).exists()


def test_f05_the_overall_deadline_stops_a_slow_download(served, tmp_path, monkeypatch) -> None:
    asset, _ = trickle_site(served, (256, 0.05))  # 5 KB/s: above the rate floor, about 2 minutes for the file
    monkeypatch.setenv("SCT_SITEHEAD_DOWNLOAD_TIMEOUT", "1.5")
    cache = Cache(tmp_path / "c", retries=3, backoff=0.0)
    started = time.monotonic()
    error = fetch_in_thread(cache, asset, within=15)
    assert isinstance(error, DownloadError) and "SCT_SITEHEAD_DOWNLOAD_TIMEOUT" in str(error), error
    assert time.monotonic() - started < 6


HOLDER = """
import sys, time
from pathlib import Path
from sct_sitehead.registry.cache import Cache
from sct_sitehead.registry.specs import Asset
cache = Cache(Path(sys.argv[1]))
asset = Asset("backbone", sys.argv[2], 1, ("https://example.invalid/backbone.onnx",))
lock = cache._lock(asset.sha256)  # kept: a FileLock is released when it is garbage-collected
cache._acquire(lock, asset)
print("held", flush=True)
time.sleep(60)
"""


def test_f05_a_lock_wait_times_out_naming_the_holder(tmp_path) -> None:
    sha = "ab" * 32
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "c"), sha],
        stdout=subprocess.PIPE,
        text=True,
        env=child_environment(tmp_path / "c"),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        cache = Cache(tmp_path / "c", lock_timeout=1.0)
        asset = Asset("backbone", sha, 1, ("https://example.invalid/backbone.onnx",))
        error = fetch_in_thread(cache, asset, within=10)
    finally:
        holder.kill()
        holder.wait()
    assert isinstance(error, DownloadError) and error.exit_code == 6, error
    assert f"process {holder.pid} on " in str(error) and "waited 1 s" in str(error), error


# --- 6: non-finite or degenerate results are errors ---------------------------------------------------------------
@pytest.mark.parametrize("factor", [1e17, 1e-30])
def test_f06_intensities_far_from_unit_scale_give_the_same_mask(tiny_registry, tmp_path, capsys, factor) -> None:
    """Before: x 1e17 overflowed a float32 square (exit 0, a cord of 4 voxels), x 1e-30 divided by zero (exit 1)."""
    plain = blob_image(tmp_path / "plain.nii.gz", affine=AFFINE, dtype=np.float32)
    data = np.asanyarray(nib.load(plain).dataobj).astype(np.float64) * factor
    scaled = tmp_path / "scaled.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), nib.load(plain).affine), scaled)
    for image in (plain, scaled):
        code, lines = run_cli(["-i", image, "-site", "universal", "-registry", tiny_registry], capsys)
        assert code == 0, lines
    for label in ("lesionseg", "cordseg"):
        reference = mask_of(tmp_path / f"plain_{label}.nii.gz")
        assert reference.sum() > 0 and np.array_equal(mask_of(tmp_path / f"scaled_{label}.nii.gz"), reference)


def test_f06_a_head_that_outputs_nan_is_an_inference_error(tmp_path, capsys) -> None:
    registry = write_registry(tmp_path / "registry")
    spec = HEADS["montreal"]
    replace_head(registry, "montreal", head_model(spec["inputs"], spec["weight"], [float("nan")] * 2))
    image = blob_image(tmp_path / "t2.nii.gz", affine=AFFINE)
    code, lines = run_cli(["-i", image, "-site", "montreal", "-registry", registry], capsys)
    assert code == InferenceError.exit_code and len(lines) == 1 and "NaN or infinite" in lines[0], lines
    assert not (tmp_path / "t2_lesionseg.nii.gz").exists()


# --- 7: no asset may be declared larger than a model file can be ---------------------------------------------------
def test_f07_an_asset_declared_at_a_terabyte_is_refused_before_downloading(served, tmp_path) -> None:
    server, www, url, public, private = served
    index = json.loads((www / "registry.json").read_text())
    index["models"]["tiny"]["releases"]["1.0.0"]["backbone"]["size"] = 10**12
    index["serial"] = 2
    (www / "registry.json").write_text(json.dumps(index))
    (www / "registry.json.sig").write_bytes(sign_bytes((www / "registry.json").read_bytes(), load_private_key(private)))
    cache = Cache(tmp_path / "c")
    with pytest.raises(RegistryError, match=r"declares a size of 1000000000000 bytes, over the 2147483648-byte"):
        Registry.load(url, cache=cache, offline=False, trust=[public])
    assert server.ranges("tiny/1.0.0/backbone.onnx") == []
    assert not (cache.root / "tmp").exists()


# --- 8: deeply nested JSON ----------------------------------------------------------------------------------------
DEEP = b"[" * 100_000 + b"]" * 100_000


def test_f08_deeply_nested_local_index_is_a_registry_error(tmp_path, capsys) -> None:
    (tmp_path / "registry.json").write_bytes(b'{"schema_version": 1, "models": ' + DEEP + b"}")
    image = blob_image(tmp_path / "t2.nii.gz", affine=AFFINE)
    code, lines = run_cli(["-i", image, "-site", "montreal", "-registry", tmp_path / "registry.json"], capsys)
    assert code == RegistryError.exit_code and len(lines) == 1 and "levels deep" in lines[0], lines


def test_f08_deeply_nested_signed_remote_index_and_signature(served, tmp_path) -> None:
    server, www, url, public, private = served
    (www / "registry.json").write_bytes(DEEP)
    (www / "registry.json.sig").write_bytes(sign_bytes(DEEP, load_private_key(private)))
    with pytest.raises(RegistryError, match="levels deep"):
        Registry.load(url, cache=Cache(tmp_path / "c"), offline=False, trust=[public])
    (www / "registry.json.sig").write_bytes(b"[" * 2000 + b"]" * 2000)  # 4 KB, under the signature's size cap
    with pytest.raises(RegistryError, match="levels deep"):
        Registry.load(url, cache=Cache(tmp_path / "c"), offline=False, trust=[public])


def test_f08_registry_sign_on_a_deep_index_is_one_line(tmp_path, capsys) -> None:
    private, public = tmp_path / "k.pem", tmp_path / "k.pub"
    generate_keypair(private, public)
    (tmp_path / "registry.json").write_bytes(DEEP)
    code = admin.main(["registry", "sign", str(tmp_path / "registry.json"), "-key", str(private)])
    err = capsys.readouterr().err
    assert code == RegistryError.exit_code and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "content", [b'{"entries": ' + DEEP + b"}", b'{"entries": [], "entries": []}', b'{"entries": [{"v": NaN}]}']
)
def test_f08_qc_rows_and_cohort_records_are_read_with_the_one_parser(tiny_registry, tmp_path, capsys, content) -> None:
    """JSON the tool wrote and reads back is untrusted too. Before: a deeply nested QC rows file made
    `sct_deepseg_lesion -qc` exit 1 (RecursionError) after writing the masks; a cohort record, the same in
    `sct_sitehead bids`."""
    qc = tmp_path / "qc"
    qc.mkdir()
    (qc / ENTRIES_FILE).write_bytes(content)
    assert read_qc_entries(qc) == []
    (tmp_path / "record.json").write_bytes(content)
    assert read_record(tmp_path / "record.json") is None
    image = blob_image(tmp_path / "t2.nii.gz", affine=AFFINE)
    code, _, err = run_deepseg(["-i", image, "-site", "universal", "-registry", tiny_registry, "-qc", qc], capsys)
    assert code == 0 and "the report starts again from this run's rows" in err, err
    assert [row["image"] for row in json.loads((qc / ENTRIES_FILE).read_text())["entries"]] == [str(image)]


# --- 9: a head whose outputs do not match its labels -------------------------------------------------------------
def test_f09_a_head_with_fewer_channels_than_its_labels_use(tmp_path, capsys) -> None:
    registry = write_registry(tmp_path / "registry")
    spec = HEADS["universal"]  # its labels use channels 0 (cord) and 1 (lesion)
    replace_head(registry, "universal", head_model(spec["inputs"], [spec["weight"][0]], [spec["bias"][0]]))
    image = blob_image(tmp_path / "t2.nii.gz", affine=AFFINE)
    code, lines = run_cli(["-i", image, "-site", "universal", "-registry", registry], capsys)
    assert code == RegistryError.exit_code and len(lines) == 1, lines
    assert "outputs 1 channel(s)" in lines[0] and "lesion -> channel 1" in lines[0], lines


# --- 10: SIGTERM is handled like Ctrl-C --------------------------------------------------------------------------
TERMINATED_WHILE_WRITING = """
import os, signal, sys
import sct_sitehead.deploy.outputs as outputs
from sct_sitehead.cli.deepseg_lesion import main

real_save, saves = outputs._save, []

def save(img, filename):
    saves.append(filename)
    if len(saves) == 2:  # in a writer thread, as `timeout` or Slurm would: the signal goes to the process
        os.kill(os.getpid(), signal.SIGTERM)
    return real_save(img, filename)

outputs._save = save
sys.exit(main(sys.argv[1:]))
"""


def test_f10_sigterm_while_writing_exits_143_and_leaves_nothing(tiny_registry, tmp_path) -> None:
    image = blob_image(tmp_path / "t2.nii.gz", affine=AFFINE)
    out = tmp_path / "out"
    argv = ["-i", image, "-site", "universal", "-soft", "-registry", tiny_registry, "-ofolder", out, "-v", "0"]
    done = subprocess.run(
        [sys.executable, "-c", TERMINATED_WHILE_WRITING, *map(str, argv)],
        capture_output=True,
        text=True,
        env=child_environment(tmp_path / "cache"),
        timeout=300,
    )
    assert done.returncode == EXIT_TERMINATED, done.stderr
    assert done.stderr.strip().splitlines() == [f"{PROG}: terminated (SIGTERM); no partial output was left"]
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_f10_sigterm_mid_inference_exits_143(tmp_path) -> None:
    registry = write_registry(tmp_path / "www", patch_size=(8, 8, 8))
    image = blob_image(tmp_path / "big.nii.gz", affine=AFFINE, shape=(128, 128, 64))
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-m", "sct_sitehead.cli.deepseg_lesion", "-i", str(image), "-site", "montreal"]
    command += ["-registry", str(registry), "-o", str(out / "mask.nii.gz"), "-v", "2", "-threads", "1"]
    worker = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env=child_environment(tmp_path / "cache"), preexec_fn=default_sigint
    )
    try:
        for line in worker.stderr:
            if "sliding window:" in line:
                worker.send_signal(signal.SIGTERM)
                break
        rest = worker.stderr.read()
        worker.wait(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == EXIT_TERMINATED, rest
    assert rest.splitlines() == [f"{PROG}: terminated (SIGTERM); no partial output was left"], rest
    assert list(out.iterdir()) == []


# --- 11: rollback protection does not depend on how the URL is spelled ------------------------------------------
def test_f11_an_older_index_is_refused_under_any_spelling_of_its_url(served, tmp_path) -> None:
    server, www, url, public, private = served
    index = json.loads((www / "registry.json").read_text())

    def publish(serial: int) -> None:
        index["serial"] = serial
        (www / "registry.json").write_text(json.dumps(index))
        (www / "registry.json.sig").write_bytes(
            sign_bytes((www / "registry.json").read_bytes(), load_private_key(private))
        )

    cache = Cache(tmp_path / "c", retries=0)
    publish(5)
    Registry.load(url, cache=cache, offline=False, trust=[public])
    publish(4)
    port = server.server.server_address[1]
    for spelling in [
        f"http://localhost:{port}/registry.json",
        f"{url}?",
        f"http://127.0.0.1:{port}//registry.json",
        f"http://127.0.0.1:{port}/./registry.json",
    ]:
        with pytest.raises(RegistryError, match="lower than serial 5"):
            Registry.load(spelling, cache=cache, offline=False, trust=[public])


# --- 12: duplicate keys, absurd -threads, voxels in metres, a compressed signature ------------------------------
def test_f12_duplicate_keys_in_a_signed_index_are_refused(served, tmp_path) -> None:
    """A decoy sha256 before the real one: the last would have won."""
    server, www, url, public, private = served
    text = (www / "registry.json").read_text()
    decoy = text.replace('"sha256": "', '"sha256": "' + "0" * 64 + '", "sha256": "', 1)
    (www / "registry.json").write_text(decoy)
    (www / "registry.json.sig").write_bytes(sign_bytes(decoy.encode(), load_private_key(private)))
    with pytest.raises(RegistryError, match="gives the key 'sha256' more than once"):
        Registry.load(url, cache=Cache(tmp_path / "c"), offline=False, trust=[public])


@pytest.mark.parametrize("threads", ["100000", str(2**40)])
def test_f12_threads_beyond_the_machine_are_a_usage_error(tiny_registry, tmp_path, capsys, threads) -> None:
    image = blob_image(tmp_path / "t2.nii.gz", affine=AFFINE)
    started = time.monotonic()
    code, lines = run_cli(["-i", image, "-site", "montreal", "-registry", tiny_registry, "-threads", threads], capsys)
    assert code == UsageError.exit_code and len(lines) == 1, lines
    assert f"between 1 and {os.cpu_count()}" in lines[0] and threads in lines[0], lines
    assert time.monotonic() - started < 10


def test_f12_voxels_in_metres_are_named(tiny_registry, tmp_path, capsys) -> None:
    image = blob_image(tmp_path / "t2.nii.gz", affine=np.diag([0.0008, 0.0008, 0.0015, 1.0]))
    code, lines = run_cli(["-i", image, "-site", "montreal", "-registry", tiny_registry], capsys)
    assert code == 3 and len(lines) == 1 and "field of view" in lines[0] and "metres" in lines[0], lines
    assert "are all" not in lines[0]


def test_f12_a_signature_sent_gzip_compressed_is_one_clear_error(served, tmp_path) -> None:
    server, _, url, public, _ = served

    def gzipped(handler) -> None:
        body = gzip.compress(served_file(handler))
        send(handler, 200, {"Content-Length": str(len(body)), "Content-Encoding": "gzip"}, body)

    server.inject("registry.json.sig", *[gzipped] * 5)
    with pytest.raises(DownloadError, match="Content-Encoding: gzip"):
        Registry.load(url, cache=Cache(tmp_path / "c", backoff=0.0), offline=False, trust=[public])
    assert len(server.ranges("registry.json.sig")) == 1  # not tried again


def test_offline_and_missing_is_still_an_offline_error(served, tmp_path) -> None:
    """The damage check does not change what a plain miss is (exit 8)."""
    _, _, url, public, _ = served
    cache = Cache(tmp_path / "c")
    release = Registry.load(url, cache=cache, offline=False, trust=[public]).release()
    with pytest.raises(OfflineError):
        cache.fetch(release.backbone, offline=True)
