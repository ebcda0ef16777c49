"""Read and validate input images (outputs are written by :mod:`sct_sitehead.deploy.outputs`).

:func:`load_image` checks the header before any voxel is read (so a corrupt header claiming a billion voxels never
allocates), then reads the data once to detect truncated or corrupt files. :func:`save_like` writes a mask that a
viewer overlays voxel for voxel on its input: same shape, affine, qform/sform, pixdim and units.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from sct_sitehead.errors import InputImageError

if TYPE_CHECKING:
    import nibabel
    from nibabel.arrayproxy import ArrayProxy

logger = logging.getLogger(__name__)

#: Largest size accepted along one axis; clinical spinal cord images stay below 1024.
MAX_AXIS_VOXELS = 4096
#: Largest image accepted, in bytes once converted to float32 (the pipeline works in float32).
MAX_FLOAT32_BYTES = 2_000_000_000
#: Largest header plus extensions (vox_offset) accepted: real extensions (DICOM, AFNI, JSON) stay far below it, and
#: a larger offset in a .gz file would have to be decompressed just to reach the voxels.
MAX_VOX_OFFSET = 64 * 1024 * 1024
#: Most decompressed bytes accepted after the voxel data of a .gz file (read only to check its CRC): a file that
#: inflates far beyond what its header declares is a gzip bomb or has a wrong header.
MAX_TRAILING_BYTES = 64 * 1024 * 1024
#: Relative size of the smallest singular value of the affine's 3x3 part below which it counts as singular.
_SINGULAR_RTOL = 1e-6
#: Read size for compressed voxel data: memory grows with what the file really holds, not with what it claims.
_CHUNK = 16 * 1024 * 1024


def _fail(path: Path, what: str, fix: str) -> InputImageError:
    return InputImageError(f"{path}: {what}; {fix}")


def load_image(
    path: str | Path, *, before_reading: Callable[[nibabel.Nifti1Header], None] | None = None
) -> nibabel.Nifti1Image:
    """Read a NIfTI image (``.nii`` or ``.nii.gz``) and check that it is a 3D volume the model can segment.

    4D and 5D images whose extra dimensions are all 1 are squeezed to 3D (header dims updated). A 3D image with one
    axis of size 1 (a single slice stored as X x Y x 1) is accepted; a file declaring fewer than 3 dimensions, or
    with fewer than 2 voxels along 2 or more axes, is rejected as 2D.

    The header is checked as written in the file, before nibabel's silent fixes and before any voxel is read. The
    voxel data are then read once, to the end of the file, so that truncated files and gzip CRC errors fail now;
    the returned image keeps the file's raw array in memory with its scaling (``scl_slope``/``scl_inter``), like
    nibabel's own array proxy, and :func:`image_data` converts it to float32.

    Args:
        path: the file.
        before_reading: called with the checked header before any voxel is read (the memory budget); it raises to
            refuse the image.

    Returns:
        The image, 3D, with ``img.dataobj`` already in memory.

    Raises:
        InputImageError: missing file, broken symbolic link, a folder, unreadable, not NIfTI, corrupt or truncated,
            2D, a time series, absurd size or header offset, complex or RGB data, non-finite or singular affine,
            zero or negative voxel size.
    """
    import nibabel as nib

    path = Path(path)
    check_input_path(path)
    header = _read_raw_header(path)
    _check_header(path, header)
    _check_extensions(path, header)
    if before_reading is not None:
        before_reading(header)
    try:
        with _quiet_nibabel():
            img = nib.load(path)
    except Exception as exc:
        raise _fail(
            path,
            f"cannot be read as NIfTI ({type(exc).__name__}: {_one_line(exc)})",
            "check that it is a .nii or .nii.gz image and that the copy is complete",
        ) from exc
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise _fail(
            path,
            f"is a {type(img).__name__}, not a single-file NIfTI image",
            "convert it to .nii.gz (e.g. with sct_image or dcm2niix)",
        )
    # nibabel drops invalid qform/sform codes on load and may fall back to another affine than the one checked.
    _check_affine(path, img.affine)
    return _with_data_in_memory(path, img)


def check_input_path(path: Path) -> None:
    """Fail with a precise message unless ``path`` is (a symbolic link to) an existing regular file.

    Raises:
        InputImageError: missing, a broken symbolic link or a link loop, a folder, or not a regular file (a FIFO
            or a device would block or never end).
    """
    try:
        info = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _fail(path, "is a symbolic link loop", "point the link at the real image") from None
        if path.is_symlink():
            raise _fail(
                path, f"is a broken symbolic link (to {os.readlink(path)})", "point the link at an existing image"
            ) from None
        if exc.errno == errno.ENOENT:
            raise _fail(path, "no such file", "check the path and the file name") from None
        raise _fail(path, f"cannot be opened ({exc.strerror or exc})", "check the path and its permissions") from None
    if stat.S_ISDIR(info.st_mode):
        raise _fail(path, "is a folder, not a NIfTI file", "give the .nii or .nii.gz file inside it")
    if not stat.S_ISREG(info.st_mode):
        raise _fail(path, "is not a regular file (a pipe, socket or device)", "give a .nii or .nii.gz file")


@contextlib.contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """nibabel prints the header fixes it makes on load to stderr, and warns; our checks already ran on the raw
    header, so these go to the debug log instead of cluttering the one-line error the user sees."""
    import nibabel as nib

    def to_debug(record: logging.LogRecord) -> bool:
        logger.debug("nibabel: %s", record.getMessage())
        return False

    chatty = nib.imageglobals.logger
    chatty.addFilter(to_debug)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        chatty.removeFilter(to_debug)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or "no detail"


def _read_raw_header(path: Path) -> nibabel.Nifti1Header:
    """The NIfTI-1 or NIfTI-2 header exactly as written (nibabel's loader would fix pixdim and codes silently)."""
    import nibabel as nib

    try:
        handle = _open(path)
    except OSError as exc:
        raise _fail(
            path, f"cannot be opened ({exc.strerror or _one_line(exc)})", "check that you may read the file"
        ) from None
    try:
        with handle:
            block = handle.read(nib.Nifti2Header.sizeof_hdr)
    except Exception as exc:
        raise _fail(
            path,
            f"cannot be read as NIfTI ({type(exc).__name__}: {_one_line(exc)})",
            "check that it is a .nii or .nii.gz image and that the copy is complete",
        ) from exc
    if not block:
        raise _fail(path, "is empty (no bytes to read)", "copy or export the image again")
    header_classes: tuple[type[nib.Nifti1Header], ...] = (nib.Nifti1Header, nib.Nifti2Header)
    for klass in header_classes:
        size = klass.sizeof_hdr
        if len(block) >= size and klass.may_contain_header(block[:size]):
            try:
                return klass(block[:size], check=False)
            except Exception as exc:
                raise _fail(path, f"has a malformed NIfTI header ({_one_line(exc)})", "re-export the image") from exc
    if block[:2] == b"\x1f\x8b":
        raise _fail(path, "is gzip-compressed but not named .gz", "rename it to .nii.gz")
    raise _fail(
        path,
        "is not a NIfTI-1/2 image (no NIfTI header at the start of the file)",
        "convert it to .nii.gz (e.g. with dcm2niix or sct_image)",
    )


def _open(path: Path) -> Any:
    """A binary reader of the file, decompressing ``.gz``; Python's gzip checks the CRC when it reaches the end."""
    import gzip

    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def check_image(img: nibabel.Nifti1Image, name: str = "image") -> nibabel.Nifti1Image:
    """An in-memory image (given to the Python API instead of a path), checked as :func:`load_image` checks a
    file's header: 3D (a 4D or 5D image whose extra sizes are 1 is squeezed), a sane size, a real-valued data type,
    finite positive voxel sizes and a finite, non-singular affine. ``image_data`` then checks the voxels.

    Args:
        img: the image.
        name: how messages name it.

    Returns:
        The image, 3D.

    Raises:
        InputImageError: not a NIfTI image, or any of the checks above fails.
    """
    import nibabel as nib

    path = Path(name)
    if not isinstance(img, nib.Nifti1Image):
        raise _fail(
            path, f"is a {type(img).__name__}, not a nibabel Nifti1Image", "pass a path or a nibabel.Nifti1Image"
        )
    header = img.header.copy()
    header.set_data_shape(img.shape)
    header.set_data_dtype(img.get_data_dtype())
    _check_header(path, header, in_file=False)
    _check_affine(path, img.affine)
    if len(img.shape) > 3:
        img = nib.funcs.squeeze_image(img)
    return img


def _check_header(path: Path, header: nibabel.Nifti1Header, *, in_file: bool = True) -> None:
    """Shape, size, voxel size and affine checks that need no voxel data (and, ``in_file``, the data offset)."""
    shape = tuple(int(n) for n in header.get_data_shape())
    shown = "x".join(str(n) for n in shape) or "empty"
    if len(shape) < 3:
        raise _fail(
            path,
            f"is a {len(shape)}D image (shape {shown})",
            "the model needs a 3D volume; store a single slice as X x Y x 1 with its slice thickness in pixdim[3]",
        )
    if any(n < 1 for n in shape):
        raise _fail(path, f"has an empty dimension (shape {shown})", "the header is corrupt; re-export the image")
    if len(shape) == 4 and shape[3] > 1:
        raise _fail(
            path,
            f"is a time series of {shape[3]} volumes (shape {shown})",
            "extract one volume first, e.g. sct_image -i IMAGE -split t, or average them",
        )
    if len(shape) > 4 and any(n > 1 for n in shape[3:]):
        raise _fail(
            path,
            f"has {len(shape)} dimensions with extra sizes {shape[3:]} (shape {shown})",
            "only 3D volumes are supported; extract one 3D component first",
        )
    spatial = shape[:3]
    if max(spatial) > MAX_AXIS_VOXELS or 4 * int(np.prod(spatial, dtype=np.int64)) > MAX_FLOAT32_BYTES:
        size_gb = 4 * float(np.prod(spatial, dtype=np.float64)) / 1e9
        raise _fail(
            path,
            f"header claims shape {shown} ({size_gb:.3g} GB as float32)",
            f"the limit is {MAX_AXIS_VOXELS} voxels per axis and {MAX_FLOAT32_BYTES / 1e9:g} GB; "
            "the header is probably corrupt, or crop the image first",
        )
    if sum(n < 2 for n in spatial) >= 2:
        raise _fail(
            path,
            f"is 2D or smaller (shape {shown}: fewer than 2 voxels along 2 or more axes)",
            "the model needs a 3D volume or at least a full 2D slice stored as X x Y x 1",
        )
    pixdim = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise _fail(
            path,
            f"has voxel sizes pixdim[1:4] = {pixdim.tolist()} (must be finite and > 0)",
            "fix the header, e.g. sct_image -copy-header from a good image or re-export from DICOM",
        )
    _check_data_type(path, header)
    offset = float(header["vox_offset"])
    # Below the end of the header nibabel would read the header itself as voxels (0) or guess (1..351).
    if in_file and (not np.isfinite(offset) or not header.sizeof_hdr + 4 <= offset <= MAX_VOX_OFFSET):
        raise _fail(
            path,
            f"has a data offset vox_offset = {offset:g} bytes (a single-file NIfTI needs "
            f"{header.sizeof_hdr + 4} to {MAX_VOX_OFFSET})",
            "the header is corrupt; re-export the image",
        )
    try:
        affine = header.get_best_affine()
    except Exception as exc:
        raise _fail(
            path, f"has a malformed qform/sform ({_one_line(exc)})", "fix the header, e.g. sct_image -copy-header"
        ) from None
    _check_affine(path, affine)


def _check_data_type(path: Path, header: nibabel.Nifti1Header) -> None:
    """Only real-valued voxels make an MRI intensity image; complex and RGB data are refused by name."""
    code = int(header["datatype"])
    try:
        dtype = np.dtype(header.get_data_dtype())
    except Exception:
        dtype = np.dtype("V0")
    if dtype.kind == "c":
        raise _fail(
            path,
            f"holds complex values ({dtype.name}, datatype {code})",
            "segment a magnitude image: take the absolute value first (e.g. fslcomplex -realabs)",
        )
    if dtype.fields is not None:
        raise _fail(
            path,
            f"is an RGB colour image ({len(dtype.fields)} channels, datatype {code})",
            "the model needs a greyscale MRI; give the original scan, not a colour rendering",
        )
    if dtype.kind not in "biuf" or dtype.itemsize == 0:
        raise _fail(
            path,
            f"has data type code {code}, which is not a supported numeric NIfTI type",
            "convert it to int16 or float32 (e.g. sct_image -type float32); the header may also be corrupt",
        )


def _check_affine(path: Path, affine: np.ndarray) -> None:
    """A voxel-to-world affine must be finite and map the voxel axes to independent directions."""
    if not np.all(np.isfinite(affine)):
        raise _fail(
            path, "has a non-finite affine (NaN or Inf in qform/sform)", "fix the header, e.g. sct_image -copy-header"
        )
    with np.errstate(all="ignore"):
        singular = np.linalg.svd(affine[:3, :3], compute_uv=False)
    if singular[-1] <= _SINGULAR_RTOL * max(singular[0], np.finfo(float).tiny):
        raise _fail(
            path,
            f"has a singular affine (voxel axes not independent: {np.round(affine[:3, :3], 4).tolist()})",
            "fix the qform/sform, e.g. sct_image -copy-header from a good image",
        )


def _check_extensions(path: Path, header: nibabel.Nifti1Header) -> None:
    """Walk the header extensions as nibabel will, so that none makes it read beyond ``vox_offset``.

    nibabel reads each extension's declared ``esize`` in one call: a size past the data offset, or below 8 (which
    becomes a negative read, i.e. "everything"), would load a whole gzip bomb into memory.
    """
    start = header.sizeof_hdr + 4
    end = int(header["vox_offset"])  # checked: start <= end <= MAX_VOX_OFFSET
    if end - start < 16:
        return
    try:
        with _open(path) as handle:
            handle.seek(header.sizeof_hdr)
            flag = handle.read(4)
            if len(flag) < 4 or flag[0] == 0:
                return
            position = start
            order = "<" if header.endianness == "<" else ">"
            while end - position >= 16:
                raw = handle.read(8)
                if len(raw) < 8:
                    raise EOFError("the file ends inside its header extensions")
                esize, ecode = struct.unpack(order + "ii", raw)
                if not 8 <= esize <= end - position:
                    raise _fail(
                        path,
                        f"has a header extension (code {ecode}) of {esize} bytes where {end - position} "
                        "remain before the voxel data",
                        "the header is corrupt; re-export the image",
                    )
                handle.seek(esize - 8, os.SEEK_CUR)
                position += esize
    except InputImageError:
        raise
    except Exception as exc:
        raise _fail(
            path,
            f"header extensions cannot be read ({type(exc).__name__}: {_one_line(exc)})",
            "the file is truncated or corrupt; copy or export it again",
        ) from exc


class _LoadedArray:
    """A file's raw voxel array, already read, presented to nibabel like its ``ArrayProxy``.

    nibabel treats a plain in-memory ndarray as already-scaled data; keeping the raw integer array with its
    scaling (instead of a float copy) halves memory for int16 images and keeps ``get_fdata`` honouring
    ``scl_slope``/``scl_inter``.
    """

    is_proxy = True

    def __init__(self, raw: np.ndarray, slope: float, inter: float) -> None:
        self._raw = raw
        self.slope = float(slope)
        self.inter = float(inter)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._raw.shape

    @property
    def ndim(self) -> int:
        return self._raw.ndim

    @property
    def dtype(self) -> np.dtype:
        return self._raw.dtype

    def get_unscaled(self) -> np.ndarray:
        return self._raw

    def _scaled(self, raw: np.ndarray, dtype: Any = None) -> np.ndarray:
        if self.slope == 1.0 and self.inter == 0.0:
            return raw if dtype is None else raw.astype(dtype, copy=False)
        out_dtype = np.float64 if dtype is None else np.promote_types(dtype, np.float32)
        out = raw.astype(out_dtype)
        out *= out.dtype.type(self.slope)
        out += out.dtype.type(self.inter)
        return out if dtype is None else out.astype(dtype, copy=False)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return self._scaled(self._raw, dtype)

    def __getitem__(self, slicer: Any) -> np.ndarray:
        return self._scaled(self._raw[slicer])

    def reshape(self, shape: Sequence[int]) -> _LoadedArray:
        return _LoadedArray(self._raw.reshape(shape, order="F"), self.slope, self.inter)


def _with_data_in_memory(path: Path, img: nibabel.Nifti1Image) -> nibabel.Nifti1Image:
    # nibabel's proxy knows where the data start (the image header's vox_offset is reset on load). An image
    # nib.load read from a file holds an ArrayProxy; nibabel types dataobj as any array-like.
    proxy = cast("ArrayProxy", img.dataobj)
    shape = img.shape[:3]
    dtype = np.dtype(proxy.dtype)
    offset = int(proxy.offset)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    compressed = path.name.endswith(".gz")
    try:
        if compressed:
            with _open(path) as handle:
                handle.seek(offset)
                buffer = _read_exactly(handle, size)
                _drain_to_end(path, handle)
        else:
            # Known before allocating anything: a header claiming a large image in a small file costs nothing.
            held = path.stat().st_size - offset
            if held < size:
                raise EOFError(f"expected {size} bytes of voxel data, the file holds {max(held, 0)}")
            buffer = bytearray(size)
            with _open(path) as handle:
                handle.seek(offset)
                got = handle.readinto(buffer)
            if got != size:
                raise EOFError(f"expected {size} bytes of voxel data, got {got}")
    except InputImageError:
        raise
    except Exception as exc:
        raise _fail(
            path,
            f"voxel data cannot be read ({type(exc).__name__}: {_one_line(exc)})",
            "the file is truncated or corrupt; copy or export it again",
        ) from exc
    # Extra dimensions are all 1 here (checked), so the 3D shape has the same voxel order.
    raw = np.frombuffer(buffer, dtype=dtype).reshape(shape, order="F")
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    if not (np.isfinite(slope) and np.isfinite(inter)) or slope == 0:
        slope, inter = 1.0, 0.0
    try:
        with _quiet_nibabel():
            loaded = type(img)(_LoadedArray(raw, slope, inter), img.affine, img.header, extra=img.extra)
    except Exception as exc:
        raise _fail(
            path,
            f"has a header nibabel cannot rebuild ({_one_line(exc)})",
            "fix the header, e.g. sct_image -copy-header",
        ) from exc
    loaded.set_filename(str(path))
    return loaded


def _read_exactly(handle: Any, size: int) -> bytearray:
    """``size`` bytes from a decompressing reader, in chunks, so that a header claiming far more than the file
    holds fails after allocating only what the file really inflates to."""
    buffer = bytearray()
    while len(buffer) < size:
        chunk = handle.read(min(_CHUNK, size - len(buffer)))
        if not chunk:
            raise EOFError(f"expected {size} bytes of voxel data, got {len(buffer)}")
        buffer += chunk
    return buffer


def _drain_to_end(path: Path, handle: Any) -> None:
    """Read a .gz file on to its end, which makes gzip check its CRC and length trailer, but refuse a file that
    inflates to more than :data:`MAX_TRAILING_BYTES` beyond its voxel data (a gzip bomb)."""
    extra = 0
    while chunk := handle.read(1 << 20):
        extra += len(chunk)
        if extra > MAX_TRAILING_BYTES:
            raise _fail(
                path,
                f"decompresses to more than {MAX_TRAILING_BYTES >> 20} MiB beyond the voxel data its header "
                "declares (a gzip bomb, or a wrong header)",
                "re-export the image; it was not decompressed further",
            )


def image_data(img: nibabel.Nifti1Image) -> np.ndarray:
    """Voxel values as a new float32 array, ``scl_slope``/``scl_inter`` applied.

    Returns:
        (X, Y, Z) float32 array; modifying it does not modify the image.

    Raises:
        InputImageError: the image is not 3D, holds NaN or Inf, or is constant.
    """
    name = img.get_filename() or "image"
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to Inf is reported below, in one line
        data = np.asarray(img.get_fdata(dtype=np.float32, caching="unchanged"))
    if data.ndim != 3:
        raise InputImageError(f"{name}: data has shape {data.shape}, expected 3D; load it with load_image() first")
    source = img.dataobj
    held = source.get_unscaled() if isinstance(source, _LoadedArray) else source
    if isinstance(held, np.ndarray) and np.shares_memory(data, held):
        data = data.copy()
    # A float64 sum of float32 values cannot overflow, so it is finite exactly when every voxel is.
    if not np.isfinite(data.sum(dtype=np.float64)):
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        scaling = (source.slope, source.inter) if isinstance(source, _LoadedArray) else (1.0, 0.0)
        if scaling != (1.0, 0.0) and np.all(np.isfinite(np.asarray(held, dtype=np.float64))):
            raise InputImageError(
                f"{name}: scaling by scl_slope={scaling[0]:g}, scl_inter={scaling[1]:g} makes {bad} voxel(s) "
                "overflow float32; fix scl_slope/scl_inter in the header"
            )
        raise InputImageError(f"{name}: {bad} voxel(s) are NaN or Inf; replace them (e.g. with 0) before segmenting")
    low, high = float(data.min()), float(data.max())
    if low == high:
        raise InputImageError(
            f"{name}: every voxel equals {low:g} (constant image); check that the right file was given"
        )
    return data
