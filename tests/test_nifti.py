"""nifti.py: reading and validating inputs, writing outputs atomically with the input's header."""

from __future__ import annotations

import errno
import gzip
import os
import time
import tracemalloc
from itertools import permutations, product
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sct_sitehead.deploy import outputs as outputs
from sct_sitehead.deploy.nifti import image_data, load_image
from sct_sitehead.deploy.outputs import save_like
from sct_sitehead.errors import InputImageError, OutputError

AXIS_CODES = [
    "".join(p) for pair_order in permutations([("R", "L"), ("A", "P"), ("S", "I")]) for p in product(*pair_order)
]
DTYPES = [np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64]


def oriented_affine(codes: str, spacing, rotation_deg=(0.0, 0.0, 0.0), origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    """Voxel-to-world affine whose axes point along ``codes`` (then rotated obliquely), voxel sizes ``spacing``."""
    ornt = nib.orientations.axcodes2ornt(tuple(codes))
    directions = np.zeros((3, 3))
    for voxel_axis, (world_axis, flip) in enumerate(ornt):
        directions[int(world_axis), voxel_axis] = flip
    ax, ay, az = np.deg2rad(rotation_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rx @ ry @ rz @ directions @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def write_raw(path: Path, header: nib.Nifti1Header, payload: bytes) -> Path:
    """Write header bytes as they are (no nibabel fix-ups) followed by ``payload`` at the data offset."""
    offset = int(header.sizeof_hdr) + 4
    header["vox_offset"] = offset
    body = header.binaryblock + b"\x00" * 4 + payload
    if path.name.endswith(".gz"):
        body = gzip.compress(body)
    path.write_bytes(body)
    return path


def small_image(shape=(6, 7, 5), dtype=np.int16) -> nib.Nifti1Image:
    data = (np.arange(np.prod(shape)) % 50).reshape(shape).astype(dtype)
    img = nib.Nifti1Image(data, oriented_affine("LAS", (0.5, 0.6, 2.0)))
    img.header.set_xyzt_units("mm", "sec")
    return img


# --- reading -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_load_image_reads_every_dtype_as_float32(tmp_path, dtype, suffix):
    img = small_image(dtype=dtype)
    path = tmp_path / f"img{suffix}"
    nib.save(img, path)
    loaded = load_image(path)
    data = image_data(loaded)
    assert loaded.shape == (6, 7, 5)
    assert data.dtype == np.float32 and data.shape == (6, 7, 5)
    np.testing.assert_array_equal(data, np.asarray(img.dataobj, dtype=np.float32))
    np.testing.assert_allclose(loaded.affine, img.affine)


def test_scaling_is_honoured_and_data_read_once(tmp_path):
    img = small_image()
    img.header.set_slope_inter(2.0, 10.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, path)
    raw = np.asarray(nib.load(path).dataobj.get_unscaled())
    loaded = load_image(path)
    path.unlink()  # the data must already be in memory
    data = image_data(loaded)
    np.testing.assert_allclose(data, raw.astype(np.float32) * 2 + 10)
    np.testing.assert_allclose(loaded.get_fdata(), raw * 2.0 + 10)
    assert loaded.get_data_dtype() == np.int16


def test_big_endian_and_nifti2_files_are_read(tmp_path):
    data = np.arange(6 * 7 * 5, dtype=np.int16).reshape(6, 7, 5)
    big = nib.Nifti1Image(data.astype(">i2"), np.diag([1.0, 2.0, 3.0, 1.0]), nib.Nifti1Header(endianness=">"))
    nib.save(big, tmp_path / "big.nii.gz")
    nib.save(nib.Nifti2Image(data, np.eye(4)), tmp_path / "two.nii")
    assert nib.load(tmp_path / "big.nii.gz").header.endianness == ">"
    np.testing.assert_array_equal(image_data(load_image(tmp_path / "big.nii.gz")), data)
    two = load_image(tmp_path / "two.nii")
    assert isinstance(two, nib.Nifti2Image)
    np.testing.assert_array_equal(image_data(two), data)
    save_like(data > 100, two, tmp_path / "mask.nii")
    assert isinstance(nib.load(tmp_path / "mask.nii"), nib.Nifti2Image)


def test_image_data_returns_a_new_array(tmp_path):
    path = tmp_path / "f.nii"
    nib.save(small_image(dtype=np.float32), path)
    loaded = load_image(path)
    first = image_data(loaded)
    first[:] = -1
    assert image_data(loaded).max() > 0


@pytest.mark.parametrize("extra", [(1,), (1, 1)])
def test_4d_and_5d_with_singleton_extra_dims_are_squeezed(tmp_path, extra):
    data = np.random.default_rng(0).integers(0, 100, (5, 6, 7)).astype(np.int16)
    affine = oriented_affine("PSR", (1.0, 1.0, 1.2))
    img = nib.Nifti1Image(data.reshape(*data.shape, *extra), affine)
    img.header.set_xyzt_units("mm", "sec")
    path = tmp_path / "x.nii.gz"
    nib.save(img, path)
    loaded = load_image(path)
    assert loaded.shape == (5, 6, 7)
    assert int(loaded.header["dim"][0]) == 3
    np.testing.assert_allclose(loaded.affine, affine)
    np.testing.assert_array_equal(image_data(loaded), data)
    assert loaded.header.get_xyzt_units() == ("mm", "sec")


def test_single_slice_is_accepted(tmp_path):
    path = tmp_path / "slice.nii.gz"
    img = nib.Nifti1Image(np.random.default_rng(0).random((16, 12, 1)).astype(np.float32), np.diag([0.5, 0.5, 5, 1]))
    nib.save(img, path)
    assert load_image(path).shape == (16, 12, 1)


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Each bad input and a word its message must contain."""
    cases: dict[str, tuple[Path, str]] = {}
    cases["missing"] = (tmp_path / "nope.nii.gz", "no such file")
    folder = tmp_path / "folder.nii.gz"
    folder.mkdir()
    cases["folder"] = (folder, "folder")
    text = tmp_path / "text.nii.gz"
    text.write_text("this is not an image\n")
    cases["text"] = (text, "cannot be read as NIfTI")
    good = tmp_path / "good.nii.gz"
    nib.save(small_image(shape=(30, 30, 30)), good)
    blob = good.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(blob[: len(blob) // 2])
    cases["truncated gzip"] = (truncated, "truncated or corrupt")
    corrupt = tmp_path / "corrupt.nii.gz"
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(flipped))
    cases["corrupt gzip"] = (corrupt, "corrupt")
    plain = tmp_path / "short.nii"
    nib.save(small_image(shape=(30, 30, 30)), plain)
    plain.write_bytes(plain.read_bytes()[:1000])
    cases["truncated nii"] = (plain, "truncated or corrupt")
    two_d = tmp_path / "2d.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8), np.int16), np.eye(4)), two_d)
    cases["2D"] = (two_d, "2D image")
    line = tmp_path / "line.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(8, dtype=np.int16).reshape(8, 1, 1), np.eye(4)), line)
    cases["line"] = (line, "2D or smaller")
    series = tmp_path / "t3.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 3), np.int16), np.eye(4)), series)
    cases["time series"] = (series, "time series of 3 volumes")
    vector = tmp_path / "vec.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 1, 3), np.float32), np.eye(4)), vector)
    cases["5D vector"] = (vector, "5 dimensions")
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((5000, 10, 10))
    cases["axis over 4096"] = (write_raw(tmp_path / "wide.nii", header, b"\x00" * 64), "header claims shape")
    header = small_image().header.copy()
    header["pixdim"][1:4] = [0.5, 0.0, 2.0]
    cases["zero pixdim"] = (write_raw(tmp_path / "zero.nii.gz", header, b"\x00" * 420), "pixdim")
    header = small_image().header.copy()
    header["pixdim"][1:4] = [0.5, -0.6, 2.0]
    cases["negative pixdim"] = (write_raw(tmp_path / "neg.nii", header, b"\x00" * 420), "pixdim")
    header = small_image().header.copy()
    header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=2)
    cases["singular affine"] = (write_raw(tmp_path / "sing.nii", header, b"\x00" * 420), "singular affine")
    header = small_image().header.copy()
    header["srow_x"][0] = np.nan
    header["sform_code"] = 1
    cases["non-finite affine"] = (write_raw(tmp_path / "nan.nii", header, b"\x00" * 420), "non-finite affine")
    return cases


def test_bad_inputs_fail_with_one_line_messages(tmp_path):
    for name, (path, words) in _bad_files(tmp_path).items():
        with pytest.raises(InputImageError) as caught:
            load_image(path)
        message = str(caught.value)
        assert "\n" not in message, name
        assert words in message, (name, message)
        assert path.name in message, (name, message)
        assert "; " in message, (name, message)  # what happened; the fix


@pytest.mark.parametrize(
    "data, words",
    [
        (np.where(np.arange(60).reshape(3, 4, 5) == 7, np.nan, 1.0).astype(np.float32), "NaN or Inf"),
        (np.where(np.arange(60).reshape(3, 4, 5) == 7, np.inf, 1.0).astype(np.float32), "NaN or Inf"),
        (np.full((3, 4, 5), 7, np.int16), "constant image"),
    ],
)
def test_image_data_rejects_non_finite_and_constant_images(tmp_path, data, words):
    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(InputImageError, match=words) as caught:
        image_data(load_image(path))
    assert "\n" not in str(caught.value) and "x.nii.gz" in str(caught.value)


@pytest.mark.parametrize("klass, size", [(nib.Nifti1Header, 30000), (nib.Nifti2Header, 50000)])
def test_absurd_header_is_refused_before_any_allocation(tmp_path, klass, size):
    header = klass()
    header.set_data_dtype(np.float32)
    header.set_data_shape((size, size, size))
    path = write_raw(tmp_path / "huge.nii", header, b"\x00" * 1024)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(InputImageError, match="header claims shape"):
            load_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 2.0
    assert peak < 5_000_000, f"{peak} bytes allocated while refusing the header"


# --- writing -------------------------------------------------------------------------------------------------------


def _raw_header(path: Path) -> nib.Nifti1Header:
    """The header exactly as written (nibabel's loader hides scl_slope/scl_inter)."""
    with nib.openers.ImageOpener(str(path)) as handle:
        return nib.Nifti1Header.from_fileobj(handle, check=False)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    codes=st.sampled_from(AXIS_CODES),
    spacing=st.tuples(*[st.floats(0.3, 8.0)] * 3),
    rotation=st.tuples(*[st.floats(-40, 40)] * 3),
    dtype=st.sampled_from(DTYPES),
    qform_code=st.sampled_from([0, 1, 2, 4]),
    sform_code=st.sampled_from([0, 1, 2, 3]),
    units=st.sampled_from([("mm", "sec"), ("mm", "unknown"), ("unknown", "unknown"), ("micron", "msec")]),
    suffix=st.sampled_from([".nii", ".nii.gz"]),
    scaled=st.booleans(),
)
def test_save_like_round_trip_keeps_the_header(
    tmp_path, codes, spacing, rotation, dtype, qform_code, sform_code, units, suffix, scaled
):
    shape = (5, 4, 3)
    rng = np.random.default_rng(0)
    data = rng.integers(1, 100, shape).astype(dtype)
    affine = oriented_affine(codes, spacing, rotation)
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=qform_code)
    img.header.set_sform(affine @ np.diag([1, 1, 1, 1.0]), code=sform_code)
    img.header.set_xyzt_units(*units)
    if scaled and np.dtype(dtype).kind in "iu":
        img.header.set_slope_inter(0.5, -3.0)
    # One folder per example (hypothesis reuses tmp_path): the suffix too, or a .nii example finds a .nii.gz one.
    case = tmp_path / f"{codes}{dtype.__name__}{qform_code}{sform_code}{int(scaled)}{suffix}"
    case.mkdir(exist_ok=True)
    source = case / f"in{suffix}"
    nib.save(img, source)
    reference = load_image(source)
    mask = image_data(reference) > 50
    out = case / f"mask{suffix}"
    save_like(mask.astype(np.uint8), reference, out)
    written, original = nib.load(out), nib.load(source)
    assert written.shape == original.shape
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-6)
    for field in ("qform_code", "sform_code"):
        assert int(written.header[field]) == int(original.header[field])
    np.testing.assert_allclose(written.header.get_qform(), original.header.get_qform(), atol=1e-6)
    np.testing.assert_allclose(written.header.get_sform(), original.header.get_sform(), atol=1e-6)
    np.testing.assert_allclose(written.header["pixdim"][:4], original.header["pixdim"][:4])
    assert written.header.get_xyzt_units() == original.header.get_xyzt_units()
    assert written.get_data_dtype() == np.uint8
    raw = _raw_header(out)
    assert (float(raw["scl_slope"]), float(raw["scl_inter"])) == (1.0, 0.0)
    np.testing.assert_array_equal(np.asarray(written.dataobj), mask)
    assert sorted(p.name for p in case.iterdir()) == sorted([source.name, out.name])


def test_save_like_writes_float32_soft_maps_and_checks_values(tmp_path):
    path = tmp_path / "in.nii.gz"
    nib.save(small_image(), path)
    reference = load_image(path)
    soft = np.random.default_rng(0).random(reference.shape).astype(np.float32)
    save_like(soft, reference, tmp_path / "soft.nii.gz", dtype=np.float32)
    np.testing.assert_array_equal(nib.load(tmp_path / "soft.nii.gz").get_fdata(dtype=np.float32), soft)
    with pytest.raises(OutputError, match="not integers"):
        save_like(soft, reference, tmp_path / "bad.nii.gz", dtype=np.uint8)
    with pytest.raises(OutputError, match="differs from the reference"):
        save_like(soft[:-1], reference, tmp_path / "bad.nii.gz")
    assert not (tmp_path / "bad.nii.gz").exists()


def test_save_like_file_mode_follows_umask(tmp_path):
    path = tmp_path / "in.nii"
    nib.save(small_image(), path)
    reference = load_image(path)
    save_like(np.zeros(reference.shape, np.uint8), reference, tmp_path / "out.nii")
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert (tmp_path / "out.nii").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_save_like_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, failure):
    path = tmp_path / "in.nii.gz"
    nib.save(small_image(), path)
    reference = load_image(path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    previous = out_dir / "mask.nii.gz"
    previous.write_bytes(b"previous result")

    def half_write(image, filename):
        Path(filename).write_bytes(b"\x1f\x8b half a file")
        raise failure

    monkeypatch.setattr(outputs, "_save", half_write)
    expected = OutputError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as caught:
        save_like(np.zeros(reference.shape, np.uint8), reference, previous)
    if expected is OutputError:
        message = str(caught.value)
        assert str(previous) in message and "No space left" in message and "free disk space" in message
    assert [p.name for p in out_dir.iterdir()] == ["mask.nii.gz"]
    assert previous.read_bytes() == b"previous result"


@pytest.mark.parametrize("isal", [True, False], ids=["isal", "without-isal"])
def test_compressed_masks_are_plain_gzip_nifti_with_or_without_isal(tmp_path, monkeypatch, isal):
    """A .nii.gz output is one ordinary gzip stream (Python's gzip reads it), holding the same header and voxels
    as nibabel's own writer gives; without isal, nibabel's writer is used."""
    import gzip
    import sys

    path = tmp_path / "in.nii.gz"
    nib.save(small_image(shape=(30, 20, 10)), path)
    reference = load_image(path)
    mask = np.zeros(reference.shape, np.uint8, order="F")
    mask[5:9, 3:7, 2:4] = 1
    if not isal:
        monkeypatch.setitem(sys.modules, "isal", None)  # import isal -> ImportError
    ours = tmp_path / "ours.nii.gz"
    save_like(mask, reference, ours)
    monkeypatch.undo()
    plain = tmp_path / "plain.nii"
    save_like(mask, reference, plain)
    with gzip.open(ours) as handle:
        assert handle.read() == plain.read_bytes()
    again = tmp_path / "again.nii.gz"
    if not isal:
        monkeypatch.setitem(sys.modules, "isal", None)
    save_like(mask, reference, again)
    assert again.read_bytes() == ours.read_bytes()  # mtime 0: the same mask gives the same file
    np.testing.assert_array_equal(np.asarray(nib.load(ours).dataobj), mask)


def test_save_like_into_a_missing_folder_is_an_output_error(tmp_path):
    path = tmp_path / "in.nii.gz"
    nib.save(small_image(), path)
    reference = load_image(path)
    with pytest.raises(OutputError, match="exists and is writable"):
        save_like(np.zeros(reference.shape, np.uint8), reference, tmp_path / "missing" / "mask.nii.gz")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_save_like_into_a_read_only_folder_is_an_output_error(tmp_path):
    path = tmp_path / "in.nii.gz"
    nib.save(small_image(), path)
    reference = load_image(path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="writable"):
            save_like(np.zeros(reference.shape, np.uint8), reference, locked / "mask.nii.gz")
    finally:
        locked.chmod(0o700)


def test_real_images_load_and_round_trip_their_header(bids_dir, tmp_path):
    images = sorted(bids_dir.glob("sub-*/anat/*.nii.gz"))
    assert len(images) >= 10
    for path in images:
        reference = load_image(path)
        data = image_data(reference)
        assert data.ndim == 3 and data.dtype == np.float32
        out = tmp_path / path.name
        save_like((data > np.median(data)).astype(np.uint8), reference, out)
        written, original = nib.load(out), nib.load(path)
        assert written.shape == original.shape
        np.testing.assert_allclose(written.affine, original.affine, atol=1e-5)
        assert int(written.header["qform_code"]) == int(original.header["qform_code"])
        assert int(written.header["sform_code"]) == int(original.header["sform_code"])
        np.testing.assert_allclose(written.header.get_zooms(), original.header.get_zooms())
