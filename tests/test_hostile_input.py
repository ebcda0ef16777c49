"""Hostile and broken input images: each ends in a mask on the input's own grid or in one clear line, exit code 3.

Two paths are checked for every case: the library (``nifti.load_image`` then ``image_data``) and the command line
in-process (``cli.main`` with the tiny registry). Random header fields come from hypothesis (NIfTI-1 and NIfTI-2
headers written byte for byte, without nibabel's fix-ups); the rest are fixed cases: data types, scaling, 4D/5D,
single slices, gzip bombs, absurd sizes, links, pipes, permissions. Anything else than success or InputImageError
(a traceback, exit code 1, a second line on stderr, a hang, a large allocation) fails the test.

Decisions recorded here (and in docs/RELIABILITY.md):

- ``scl_slope`` 0, NaN or +-Inf means "no scaling" (NIfTI-1 says 0 does; nibabel, hence SCT, treats the other two
  alike), and ``scl_inter`` is then ignored too. A finite slope that overflows float32 is refused by name.
- A single slice X x Y x 1 is segmented (the sliding window pads it); 2 or more axes of size 1 are refused as 2D.
- 4D/5D files whose extra dimensions are all 1 are segmented; the mask is written 3D on the same spatial grid.
- ``vox_offset`` below the end of the header (nibabel would read the header as voxels) or above 64 MiB is refused.
- float16 has no NIfTI data type code (nibabel cannot write it), so no file can hold it.
"""

from __future__ import annotations

import builtins
import errno
import gzip
import logging
import os
import re
import struct
import time
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sct_sitehead.cli.deepseg_lesion import main
from sct_sitehead.deploy.nifti import MAX_TRAILING_BYTES, image_data, load_image
from sct_sitehead.errors import InputImageError

SHAPE = (12, 10, 8)
ZOOMS = (1.0, 1.2, 2.0)
PROG = "sct_deepseg_lesion"


# --- files written byte for byte ----------------------------------------------------------------------------------
def base_header(klass: type = nib.Nifti1Header, shape=SHAPE, dtype=np.int16, zooms=ZOOMS) -> nib.Nifti1Header:
    """A valid header with distinct qform (code 1) and sform (code 2), units mm/s, data right after the header."""
    header = klass()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_zooms(tuple(zooms) + (1.0,) * (len(shape) - 3))
    affine = np.diag([*zooms[:3], 1.0])
    affine[:3, 3] = (-5.0, 7.0, 3.5)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=2)
    header.set_xyzt_units("mm", "sec")
    header["vox_offset"] = header.sizeof_hdr + 4
    return header


def voxels(shape=SHAPE, dtype=np.int16, endianness: str = "<", seed: int = 0) -> bytes:
    """Noise around 100 with a bright block (the tiny model's lesion), as the file's bytes (Fortran order)."""
    rng = np.random.default_rng(seed)
    data = rng.normal(100, 5, shape)
    block = tuple(slice(n // 3, max(n // 3 + 1, 2 * n // 3)) for n in shape[:3])
    data[block] = 400
    dtype = np.dtype(dtype).newbyteorder(endianness)
    return data.astype(dtype).tobytes(order="F")


def write_nifti(path: Path, header, payload: bytes, *, extension: bytes = b"\0\0\0\0") -> Path:
    """Header bytes as they are, ``extension`` (the 4 flag bytes and any extensions), zeros up to ``vox_offset``
    when it lies a little further on, then ``payload``; gzip-compressed for ``.gz``."""
    body = header.binaryblock + extension
    offset = float(header["vox_offset"])
    if np.isfinite(offset) and len(body) < offset <= len(body) + 4096:
        body += b"\0" * (int(offset) - len(body))
    body += payload
    path.write_bytes(gzip.compress(body, compresslevel=1) if path.name.endswith(".gz") else body)
    return path


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None, **header_fields) -> Path:
    """nibabel's own writer (every data type it supports), with units and both codes set."""
    affine = np.diag([*ZOOMS, 1.0]) if affine is None else affine
    image = nib.Nifti1Image(data, affine, dtype=data.dtype)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=2)
    for name, value in header_fields.items():
        image.header[name] = value
    nib.save(image, path)
    return path


def nibabel_view(path: Path) -> nib.Nifti1Image:
    """What nibabel itself makes of the file (its fix-up messages silenced): the reference for correct results."""
    quiet = logging.getLogger("nibabel.global")
    quiet.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return nib.load(path)
    finally:
        quiet.disabled = False


# --- what counts as a correct outcome -----------------------------------------------------------------------------
def category(message: str) -> str:
    """``/x/y.nii: has voxel sizes pixdim[1:4] = [0.0, 1.0] (must...); fix...`` -> ``has voxel sizes pixdim[#:#]``."""
    what = message.split(": ", 1)[-1].split(";")[0].split(" (")[0]
    return re.sub(r"-?\d[\d.e+-]*|nan|inf", "#", what)[:48]


def assert_clear(error: InputImageError, path: Path) -> None:
    message = str(error)
    assert "\n" not in message and path.name in message and "; " in message, message


def assert_correct_data(path: Path, image: nib.Nifti1Image, data: np.ndarray) -> None:
    """Accepted: 3D float32, finite, non-constant, equal to nibabel's scaled reading; a usable geometry."""
    reference = nibabel_view(path)
    assert data.dtype == np.float32 and data.ndim == 3 and image.shape == data.shape
    assert data.shape == reference.shape[:3] and all(n == 1 for n in reference.shape[3:])
    with np.errstate(all="ignore"):
        expected = np.asarray(reference.dataobj, dtype=np.float64).reshape(data.shape, order="F")
    np.testing.assert_allclose(data, expected.astype(np.float32), rtol=1e-6)
    assert np.all(np.isfinite(data)) and data.min() < data.max()
    affine = image.affine
    assert np.all(np.isfinite(affine)) and abs(np.linalg.det(affine[:3, :3])) > 0
    np.testing.assert_allclose(affine, reference.affine)


GRID_FIELDS = (
    "qform_code",
    "sform_code",
    "quatern_b",
    "quatern_c",
    "quatern_d",
    "qoffset_x",
    "qoffset_y",
    "qoffset_z",
    "srow_x",
    "srow_y",
    "srow_z",
    "xyzt_units",
)


def assert_same_grid(mask_path: Path, source: Path) -> None:
    """The mask overlays its input voxel for voxel: same 3D shape, affine, and the header fields any viewer may use
    (qform and sform codes and parameters, pixdim with qfac, units), compared as stored, not decoded: a qform that
    cannot be decoded next to a valid sform is copied as it is."""
    mask, original = nibabel_view(mask_path), nibabel_view(source)
    assert mask.shape == original.shape[:3]
    values = np.asanyarray(mask.dataobj)
    assert values.dtype == np.uint8 and set(np.unique(values)) <= {0, 1}
    np.testing.assert_allclose(mask.affine, original.affine, atol=1e-6)
    for field in GRID_FIELDS:
        np.testing.assert_array_equal(mask.header[field], original.header[field], err_msg=field)
    np.testing.assert_array_equal(mask.header["pixdim"][:4], original.header["pixdim"][:4])


def library_outcome(path: Path) -> str | None:
    """None when the image is accepted (and checked against nibabel), else the one-line message."""
    try:
        image = load_image(path)
        data = image_data(image)
    except InputImageError as error:
        assert_clear(error, path)
        return str(error)
    assert_correct_data(path, image, data)
    return None


def cli_outcome(path: Path, registry: Path, out: Path, capfd: pytest.CaptureFixture) -> str | None:
    """Run ``sct_deepseg_lesion`` in-process; None on success (mask on the input's grid), else its stderr line."""
    out.mkdir(parents=True, exist_ok=True)
    mask = out / "mask.nii.gz"
    code = main(["-i", str(path), "-site", "montreal", "-registry", str(registry), "-o", str(mask), "-v", "0"])
    captured = capfd.readouterr()  # the file descriptors: nothing nibabel or numpy prints may slip through
    if code == 0:
        assert captured.err == "", captured.err
        assert sorted(p.name for p in out.iterdir()) == ["mask.json", "mask.nii.gz"]
        assert_same_grid(mask, path)
        return None
    lines = captured.err.splitlines()
    assert code == InputImageError.exit_code, captured.err
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: ") and path.name in lines[0], captured.err
    assert list(out.iterdir()) == [], "a refused input left files behind"
    return lines[0]


# --- hypothesis: random header fields -----------------------------------------------------------------------------
FIELDS = (
    "dim",
    "pixdim",
    "datatype",
    "vox_offset",
    "scaling",
    "xform_codes",
    "quaternion",
    "srow",
    "magic",
    "sizeof_hdr",
    "extension",
    "payload",
)
FLOATS = st.one_of(
    st.floats(width=32),  # any float32, NaN and +-Inf included
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-30, 1e30, float("nan"), float("inf"), -float("inf")]),
)
DIM_SIZES = st.one_of(st.integers(-3, 20), st.sampled_from([0, 1, 4096, 4097, 30000, 32767, -32768]))


@st.composite
def hostile_files(draw: st.DrawFn) -> tuple[object, bytes, bytes, str, frozenset[str]]:
    """(header, extension bytes, payload, suffix, fields changed) starting from a valid image."""
    klass = draw(st.sampled_from([nib.Nifti1Header, nib.Nifti2Header]))
    header = base_header(klass)
    fields = draw(st.sets(st.sampled_from(FIELDS), max_size=3))
    if "dim" in fields:
        header["dim"] = [draw(st.integers(-1, 8)), *draw(st.lists(DIM_SIZES, min_size=7, max_size=7))]
    if "pixdim" in fields:
        header["pixdim"] = draw(st.lists(FLOATS, min_size=8, max_size=8))
    if "datatype" in fields:
        header["datatype"] = draw(
            st.one_of(st.sampled_from(sorted(nib.nifti1.data_type_codes.value_set())), st.integers(-32768, 32767))
        )
    if "vox_offset" in fields:
        usual = st.sampled_from([0, 351, 353, 368, 544, 560, 10**9])
        if klass is nib.Nifti2Header:  # an int64 there
            header["vox_offset"] = draw(st.one_of(usual, st.integers(-(2**63), 2**63 - 1)))
        else:
            header["vox_offset"] = draw(st.one_of(usual.map(float), FLOATS))
    if "scaling" in fields:
        header["scl_slope"], header["scl_inter"] = draw(FLOATS), draw(FLOATS)
    if "xform_codes" in fields:
        header["qform_code"], header["sform_code"] = draw(st.integers(-32768, 32767)), draw(st.integers(-5, 5))
    if "quaternion" in fields:
        for name in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"):
            header[name] = draw(FLOATS)
        if draw(st.booleans()):
            header["sform_code"] = 0  # the qform decides
    if "srow" in fields:
        for name in ("srow_x", "srow_y", "srow_z"):
            header[name] = draw(st.lists(FLOATS, min_size=4, max_size=4))
    if "magic" in fields:
        header["magic"] = draw(st.sampled_from([b"", b"ni1", b"n+1", b"n+2", b"ni2", b"xyz", b"\xff\xff\xff"]))
    if "sizeof_hdr" in fields:
        header["sizeof_hdr"] = draw(st.sampled_from([0, -1, 347, 348, 349, 540, 1 << 30]))
    extension = b"\0\0\0\0"
    if "extension" in fields:
        esize = draw(st.sampled_from([-16, 0, 8, 16, 17, 32, 1 << 20, 2**31 - 1]))
        extension = b"\x01\0\0\0" + struct.pack("<ii", esize, 6) + b"\0" * 8
        header["vox_offset"] = draw(st.sampled_from([header.sizeof_hdr + 4, header.sizeof_hdr + 20, 1024]))
    payload = voxels()
    if "payload" in fields:
        payload = payload[: draw(st.sampled_from([0, 1, len(payload) // 2, len(payload) - 1]))]
    elif fields & {"dim", "datatype"}:
        # Raw bytes for the declared size, when it is small; else a few bytes (a truncated file).
        try:
            size = int(np.prod(header.get_data_shape(), dtype=np.int64)) * np.dtype(header.get_data_dtype()).itemsize
        except Exception:
            size = 64
        seed = draw(st.integers(0, 2**32 - 1))
        payload = np.random.default_rng(seed).bytes(size if 0 < size <= 1 << 20 else 64)
    suffix = draw(st.sampled_from([".nii", ".nii.gz"]))
    return header, extension, payload, suffix, frozenset(fields)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=hostile_files())
def test_random_header_fields_give_a_correct_image_or_one_clear_error(tmp_path: Path, case) -> None:
    header, extension, payload, suffix, fields = case
    path = write_nifti(tmp_path / f"random{suffix}", header, payload, extension=extension)
    message = library_outcome(path)
    event(f"library: {'accepted' if message is None else 'refused: ' + category(message)}")
    event(f"fields changed: {len(fields)}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=hostile_files())
def test_random_header_fields_through_the_command_line(tiny_registry: Path, tmp_path: Path, capfd, case) -> None:
    header, extension, payload, suffix, _ = case
    example = tmp_path / f"ex{len(list(tmp_path.glob('ex*')))}"
    example.mkdir()
    path = write_nifti(example / f"random{suffix}", header, payload, extension=extension)
    library = library_outcome(path)
    line = cli_outcome(path, tiny_registry, example / "out", capfd)
    if library is not None:
        assert line == f"{PROG}: error: {library}"  # the command line says exactly what the library found
    event(f"command line: {'mask written' if line is None else 'exit 3: ' + category(line.split('error: ', 1)[1])}")


# --- fixed cases ------------------------------------------------------------------------------------------------
Builder = Callable[[Path], Path]


def _raw(
    name: str,
    change: Callable[[nib.Nifti1Header], object] = lambda header: None,
    *,
    shape=SHAPE,
    dtype=np.int16,
    payload: bytes | None = None,
    extension: bytes = b"\0\0\0\0",
    klass: type = nib.Nifti1Header,
) -> Builder:
    def build(folder: Path) -> Path:
        header = base_header(klass, shape=shape, dtype=dtype)
        change(header)
        data = voxels(shape, dtype) if payload is None else payload
        return write_nifti(folder / name, header, data, extension=extension)

    return build


def _saved(name: str, data: Callable[[], np.ndarray], **fields) -> Builder:
    return lambda folder: save(folder / name, data(), **fields)


def _set(**values) -> Callable[[nib.Nifti1Header], None]:
    def change(header: nib.Nifti1Header) -> None:
        for key, value in values.items():
            header[key] = value

    return change


def _gzip_bomb(name: str, change: Callable[[nib.Nifti1Header], object], *, inflated: int = 4 << 30) -> Builder:
    """A few MB that inflate to ``inflated`` bytes: the header and its voxels, then gzip members of zeros."""

    def build(folder: Path) -> Path:
        header = base_header()
        change(header)
        zeros = gzip.compress(bytes(16 << 20), compresslevel=9)  # 16 MiB in about 16 KB
        head = gzip.compress(header.binaryblock + b"\0\0\0\0" + voxels())
        path = folder / name
        with path.open("wb") as out:
            out.write(head)
            for _ in range(inflated // (16 << 20)):
                out.write(zeros)
        return path

    return build


def _blob(shape=SHAPE, dtype=np.int16) -> Callable[[], np.ndarray]:
    return lambda: np.frombuffer(voxels(shape, dtype), np.dtype(dtype).newbyteorder("<")).reshape(shape, order="F")


def _with(value: float, dtype=np.float32) -> Callable[[], np.ndarray]:
    def make() -> np.ndarray:
        data = _blob(dtype=dtype)().copy()
        data[0, 0, 0] = value
        return data

    return make


def _rgb(fields: str) -> Callable[[], np.ndarray]:
    def make() -> np.ndarray:
        data = np.zeros(SHAPE, dtype=[(name, "u1") for name in fields])
        data[fields[0]] = _blob(dtype=np.uint8)()
        return data

    return make


def _symlink_loop(folder: Path) -> Path:
    path = folder / "loop.nii.gz"
    path.symlink_to(path)
    return path


def _dangling(folder: Path) -> Path:
    path = folder / "dangling.nii.gz"
    path.symlink_to(folder / "gone.nii.gz")
    return path


def _good_link(folder: Path) -> Path:
    target = save(folder / "target.nii.gz", _blob()())
    path = folder / "link.nii.gz"
    path.symlink_to(target)
    return path


def _folder(folder: Path) -> Path:
    path = folder / "folder.nii.gz"
    path.mkdir()
    return path


def _fifo(folder: Path) -> Path:
    path = folder / "pipe.nii"
    os.mkfifo(path)  # opening it would block until a writer comes: it must be refused without opening it
    return path


def _bytes(name: str, content: bytes) -> Builder:
    def build(folder: Path) -> Path:
        (folder / name).write_bytes(content)
        return folder / name

    return build


def _cut(name: str, fraction: float) -> Builder:
    def build(folder: Path) -> Path:
        path = save(folder / name, _blob(shape=(40, 40, 30))())
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * fraction)])
        return path

    return build


def _singular(header: nib.Nifti1Header) -> None:
    header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=2)


def _nan_qform_only(header: nib.Nifti1Header) -> None:
    header["quatern_b"] = np.nan
    header["sform_code"] = 0


def _invalid_sform_code_and_nan_qform(header: nib.Nifti1Header) -> None:
    header["sform_code"] = 7  # nibabel drops it on load and falls back to the (NaN) qform
    header["quatern_b"] = np.nan


def _quaternion_out_of_range(header: nib.Nifti1Header) -> None:
    header["quatern_b"] = 2.0
    header["sform_code"] = 0


def _extension(esize: int) -> bytes:
    return b"\x01\0\0\0" + struct.pack("<ii", esize, 6) + b"\0" * 8


#: name -> (builder, None when a mask must be written, else a fragment of the one-line error)
CASES: dict[str, tuple[Builder, str | None]] = {
    # data types nibabel reads
    **{
        f"dtype-{np.dtype(dtype).name}": (_saved(f"{np.dtype(dtype).name}.nii.gz", _blob(dtype=dtype)), None)
        for dtype in (
            np.uint8,
            np.int8,
            np.int16,
            np.uint16,
            np.int32,
            np.uint32,
            np.int64,
            np.uint64,
            np.float32,
            np.float64,
        )
    },
    "dtype-big-endian-int16": (
        _raw("big.nii", lambda h: None, payload=voxels(endianness=">"), klass=lambda: nib.Nifti1Header(endianness=">")),
        None,
    ),
    "dtype-complex64": (_saved("c64.nii.gz", lambda: _blob(dtype=np.float32)().astype(np.complex64)), "complex"),
    "dtype-complex128": (_saved("c128.nii.gz", lambda: _blob(dtype=np.float64)().astype(np.complex128)), "complex"),
    "dtype-rgb24": (_saved("rgb.nii.gz", _rgb("RGB")), "RGB colour image"),
    "dtype-rgba32": (_saved("rgba.nii.gz", _rgb("RGBA")), "RGB colour image"),
    **{
        f"dtype-code-{code}": (_raw(f"code{code}.nii", _set(datatype=code)), "not a supported numeric")
        for code in (0, 1, 255, 1536, 2048, 12345)
    },
    # voxel values and scaling
    "nan-voxel": (_saved("nan.nii.gz", _with(np.nan)), "NaN or Inf"),
    "inf-voxel": (_saved("inf.nii.gz", _with(np.inf, np.float64)), "NaN or Inf"),
    "constant": (_saved("constant.nii.gz", lambda: np.full(SHAPE, 7, np.int16)), "constant image"),
    "scl-slope-0-means-unscaled": (_raw("slope0.nii", _set(scl_slope=0.0, scl_inter=5.0)), None),
    "scl-slope-nan-means-unscaled": (_raw("slopenan.nii", _set(scl_slope=np.nan, scl_inter=5.0)), None),
    "scl-slope-inf-means-unscaled": (_raw("slopeinf.nii", _set(scl_slope=np.inf, scl_inter=5.0)), None),
    "scl-slope-negative": (_raw("slopeneg.nii", _set(scl_slope=-2.0, scl_inter=1000.0)), None),
    "scl-slope-overflows-float32": (_raw("slopebig.nii", _set(scl_slope=1e38)), "overflow float32"),
    "scl-inter-inf": (_raw("interinf.nii", _set(scl_slope=2.0, scl_inter=np.inf)), "invalid intercept"),
    # dimensions
    "4d-one-volume": (_saved("one.nii.gz", lambda: _blob()()[..., None]), None),
    "5d-singleton": (_saved("five1.nii.gz", lambda: _blob()()[..., None, None]), None),
    "4d-time-series": (_saved("series.nii.gz", lambda: np.stack([_blob()()] * 3, axis=-1)), "time series of 3"),
    "5d-vector": (
        _saved("vector.nii.gz", lambda: np.stack([_blob()()] * 3, axis=-1)[:, :, :, None, :]),
        "5 dimensions",
    ),
    "single-slice-64x64x1": (_saved("slice.nii.gz", _blob(shape=(64, 64, 1))), None),
    "single-slice-64x64x1-5mm": (
        lambda folder: save(folder / "thick.nii.gz", _blob(shape=(64, 64, 1))(), np.diag([0.5, 0.5, 5.0, 1.0])),
        None,
    ),
    "single-slice-1x64x64": (_saved("sagittal.nii.gz", _blob(shape=(1, 64, 64))), None),
    "line-64x1x1": (_saved("line.nii.gz", _blob(shape=(64, 1, 1))), "2D or smaller"),
    "2d-file": (_raw("flat.nii", _set(dim=[2, 12, 10, 1, 1, 1, 1, 1])), "2D image"),
    "empty-dimension": (_raw("zero.nii", _set(dim=[3, 12, 0, 8, 1, 1, 1, 1])), "empty dimension"),
    # dim[0] outside 1..7 makes nibabel read the header with the other byte order: garbage sizes, refused
    "dim0-out-of-range": (_raw("dim9.nii", _set(dim=[9, 12, 10, 8, 1, 1, 1, 1])), "dimensions"),
    "axis-over-4096": (_raw("wide.nii", _set(dim=[3, 5000, 10, 8, 1, 1, 1, 1])), "header claims shape"),
    "1e9-voxels": (_raw("giga.nii", _set(dim=[3, 1000, 1000, 1000, 1, 1, 1, 1])), "header claims shape"),
    "nifti2-1e12-voxels": (
        _raw("tera.nii", _set(dim=[3, 10**4, 10**4, 10**4, 1, 1, 1, 1]), klass=nib.Nifti2Header),
        "header claims shape",
    ),
    # voxel sizes and geometry
    "pixdim-zero": (_raw("pz.nii", lambda h: h["pixdim"].__setitem__(2, 0.0)), "pixdim"),
    "pixdim-negative": (_raw("pn.nii.gz", lambda h: h["pixdim"].__setitem__(1, -1.0)), "pixdim"),
    "pixdim-nan": (_raw("pnan.nii", lambda h: h["pixdim"].__setitem__(3, np.nan)), "pixdim"),
    "pixdim-inf": (_raw("pinf.nii", lambda h: h["pixdim"].__setitem__(3, np.inf)), "pixdim"),
    "singular-sform": (_raw("sing.nii", _singular), "singular affine"),
    "nan-srow": (_raw("nansrow.nii", lambda h: h["srow_x"].__setitem__(0, np.nan)), "non-finite affine"),
    "nan-qform-only": (_raw("nanq.nii", _nan_qform_only), "non-finite affine"),
    "invalid-sform-code-nan-qform": (_raw("code7.nii", _invalid_sform_code_and_nan_qform), "non-finite affine"),
    "quaternion-out-of-range": (_raw("quat.nii", _quaternion_out_of_range), "malformed qform"),
    "no-qform-no-sform": (_raw("nocodes.nii", _set(qform_code=0, sform_code=0)), None),
    # header bytes
    "wrong-magic": (_raw("magic.nii", _set(magic=b"xyz")), "NIfTI"),
    "sizeof-hdr-wrong-magic-right": (_raw("sizeof.nii", _set(sizeof_hdr=1234)), None),  # nibabel fixes it, as SCT
    "vox-offset-0": (_raw("vox0.nii", _set(vox_offset=0.0)), "vox_offset"),
    "vox-offset-nan": (_raw("voxnan.nii", _set(vox_offset=np.nan)), "vox_offset"),
    "vox-offset-beyond-the-file": (_raw("voxend.nii", _set(vox_offset=1e6)), "truncated"),
    "vox-offset-3e9-gzip": (_raw("voxfar.nii.gz", _set(vox_offset=3e9)), "vox_offset"),
    "vox-offset-368-aligned": (_raw("vox368.nii.gz", _set(vox_offset=368.0)), None),
    "extension-valid": (_raw("ext.nii.gz", _set(vox_offset=368.0), extension=_extension(16)), None),
    "extension-esize-0": (_raw("ext0.nii", _set(vox_offset=1024.0), extension=_extension(0)), "header extension"),
    "extension-esize-negative": (
        _raw("extneg.nii.gz", _set(vox_offset=1024.0), extension=_extension(-64)),
        "header extension",
    ),
    "extension-esize-2GB": (
        _raw("extbig.nii.gz", _set(vox_offset=1024.0), extension=_extension(2**31 - 1)),
        "header extension",
    ),
    # truncated, corrupt, not NIfTI at all
    "truncated-data-nii": (_cut("cut.nii", 0.5), "truncated or corrupt"),
    "truncated-gzip": (_cut("cut.nii.gz", 0.5), "truncated or corrupt"),
    "header-only": (_raw("headonly.nii", payload=b""), "truncated or corrupt"),
    "empty-file": (_bytes("empty.nii", b""), "is empty"),
    "empty-gzip-file": (_bytes("empty.nii.gz", b""), "is empty"),
    "gzip-of-nothing": (_bytes("nothing.nii.gz", gzip.compress(b"")), "is empty"),
    "text-file": (_bytes("notes.nii", b"subject 1 notes\n" * 40), "not a NIfTI-1/2 image"),
    "gzip-named-nii": (
        lambda folder: _bytes("packed.nii", gzip.compress(save(folder / "src.nii", _blob()()).read_bytes()))(folder),
        "rename it to .nii.gz",
    ),
    "plain-named-nii-gz": (
        lambda folder: _bytes("plain.nii.gz", save(folder / "src.nii", _blob()()).read_bytes())(folder),
        "cannot be read as NIfTI",
    ),
    "gzip-bomb-huge-header": (
        _gzip_bomb("bomb.nii.gz", _set(dim=[3, 2048, 2048, 1024, 1, 1, 1, 1])),
        "header claims shape",
    ),
    "gzip-bomb-trailing": (_gzip_bomb("trail.nii.gz", lambda h: None), "gzip bomb"),
    # the file system
    "folder": (_folder, "is a folder"),
    "missing": (lambda folder: folder / "missing.nii.gz", "no such file"),
    "symlink-loop": (_symlink_loop, "symbolic link loop"),
    "dangling-symlink": (_dangling, "broken symbolic link"),
    "symlink-to-good-file": (_good_link, None),
    "fifo": (_fifo, "not a regular file"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fixed_case_through_the_library(name: str, tmp_path: Path) -> None:
    build, expected = CASES[name]
    path = build(tmp_path)
    message = library_outcome(path)
    if expected is None:
        assert message is None, message
    else:
        assert message is not None and expected in message, message


@pytest.mark.parametrize("name", list(CASES))
def test_fixed_case_through_the_command_line(name: str, tiny_registry: Path, tmp_path: Path, capfd) -> None:
    build, expected = CASES[name]
    folder = tmp_path / "in"
    folder.mkdir()
    path = build(folder)
    started = time.perf_counter()
    line = cli_outcome(path, tiny_registry, tmp_path / "out", capfd)
    assert time.perf_counter() - started < 20
    if expected is None:
        assert line is None, line
    else:
        assert line is not None and expected in line, line


# --- no allocation, no full inflation -----------------------------------------------------------------------------
def _refusal_cost(path: Path) -> tuple[str, float, int]:
    """(message, seconds, peak bytes traced) of refusing ``path``."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(InputImageError) as caught:
            image_data(load_image(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return str(caught.value), time.perf_counter() - started, peak


@pytest.mark.parametrize(
    "name, seconds, peak",
    [
        ("1e9-voxels", 1.0, 2 << 20),
        ("nifti2-1e12-voxels", 1.0, 2 << 20),
        ("gzip-bomb-huge-header", 1.0, 2 << 20),  # 4 GiB inflated: refused from the header alone
        ("vox-offset-3e9-gzip", 1.0, 2 << 20),
        ("extension-esize-2GB", 1.0, 2 << 20),
        # the header is fine and small: the voxels are read, then at most MAX_TRAILING_BYTES more are inflated
        ("gzip-bomb-trailing", 10.0, 8 << 20),
    ],
)
def test_absurd_sizes_and_bombs_are_refused_without_allocating(
    name: str, seconds: float, peak: int, tmp_path: Path
) -> None:
    path = CASES[name][0](tmp_path)
    message, took, allocated = _refusal_cost(path)
    assert CASES[name][1] in message
    assert took < seconds, f"{took:.2f} s to refuse {name}"
    assert allocated < peak, f"{allocated} bytes allocated to refuse {name}"


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_header_claiming_a_large_image_in_a_tiny_file_allocates_nothing(tmp_path: Path, suffix: str) -> None:
    """4096 x 4096 x 29 int16 is within the limits (1.9 GB as float32) but the file holds 480 bytes: the read must
    fail on what the file holds, not after reserving the 0.97 GB the header claims."""
    path = _raw(f"liar{suffix}", _set(dim=[3, 4096, 4096, 29, 1, 1, 1, 1]), payload=voxels()[:480])(tmp_path)
    message, took, allocated = _refusal_cost(path)
    assert "truncated or corrupt" in message and took < 2.0
    assert allocated < 40 << 20, f"{allocated} bytes allocated"  # one 16 MiB decompression chunk at most


def test_trailing_data_cap_is_what_the_bomb_hits(tmp_path: Path) -> None:
    """A .gz with less than the cap after its voxels is still read to its end (CRC checked) and accepted."""
    path = tmp_path / "padded.nii.gz"
    header = base_header()
    path.write_bytes(gzip.compress(header.binaryblock + b"\0\0\0\0" + voxels() + bytes(MAX_TRAILING_BYTES // 64)))
    assert library_outcome(path) is None


# --- permissions ------------------------------------------------------------------------------------------------
@pytest.fixture
def unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An image every open() of which fails with EACCES (root ignores permission bits, so it is injected)."""
    (tmp_path / "in").mkdir()
    path = save(tmp_path / "in" / "locked.nii.gz", _blob()())
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).resolve() == path.resolve():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    return path


def test_unreadable_file_through_the_library(unreadable: Path) -> None:
    message = library_outcome(unreadable)
    assert message is not None and "cannot be opened (Permission denied)" in message


def test_unreadable_file_through_the_command_line(unreadable: Path, tiny_registry: Path, tmp_path: Path, capfd) -> None:
    line = cli_outcome(unreadable, tiny_registry, tmp_path / "out", capfd)
    assert line is not None and "Permission denied" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_file_without_read_permission(tmp_path: Path) -> None:
    path = save(tmp_path / "locked.nii.gz", _blob()())
    path.chmod(0)
    try:
        message = library_outcome(path)
    finally:
        path.chmod(0o600)
    assert message is not None and "Permission denied" in message


def test_several_inputs_each_bad_one_reported_on_its_own_line(tiny_registry: Path, tmp_path: Path, capfd) -> None:
    """A batch goes on past bad images: one line each, exit 3, and the good ones get their masks."""
    names = ["nan-voxel", "dtype-complex64", "truncated-gzip", "dtype-int16", "gzip-bomb-trailing", "pixdim-zero"]
    folder = tmp_path / "in"
    folder.mkdir()
    paths = [CASES[name][0](folder) for name in names]
    out = tmp_path / "out"
    code = main(
        ["-i", *map(str, paths), "-site", "montreal", "-registry", str(tiny_registry), "-ofolder", str(out), "-v", "0"]
    )
    lines = capfd.readouterr().err.splitlines()
    assert code == InputImageError.exit_code
    assert len(lines) == len(names) - 1 and all(line.startswith(f"{PROG}: error: ") for line in lines)
    for path, name in zip(paths, names):
        if CASES[name][1] is None:
            assert_same_grid(out / (path.name.split(".")[0] + "_lesionseg.nii.gz"), path)
        else:
            assert any(path.name in line and CASES[name][1] in line for line in lines), (name, lines)
    assert sorted(p.name for p in out.iterdir()) == ["int16_lesionseg.json", "int16_lesionseg.nii.gz"]
