"""Atomic writes: a file or folder appears at its final path complete, or not at all.

Everything is written under a hidden temporary name in the destination's folder (same file system, so the rename
is atomic), flushed to disk, then renamed onto the destination. A reader sees the old file or the new one, never
half of one, and a crash or an error leaves no temporary file behind.

Two families, by who reports the failure:

- :func:`write_atomic` and :func:`write_text_atomic` / :func:`write_json_atomic` write outputs: an error is an
  :class:`~sct_sitehead.errors.OutputError` that says what to check, and inside :func:`staged_outputs` the renames
  wait for the end of the block, so the files of one input appear together.
- :func:`write_file_atomic`, :func:`write_bytes_atomic` and :func:`move_into_place` raise the plain
  :class:`OSError` (``FileExistsError`` for a refused replace), for callers that word the message themselves or
  only log it (the cache, keys, signatures, checkpoints).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sct_sitehead.errors import OutputError

#: The temp files written inside :func:`staged_outputs`, with their destinations (None: outside any stage).
_STAGE: contextvars.ContextVar[list[tuple[Path, Path]] | None] = contextvars.ContextVar("stage", default=None)
#: Every temp name handed out inside :func:`staged_outputs`, recorded before the file is created: a signal raising
#: between its creation and the code that would remove it (SIGTERM, Ctrl-C) cannot leave it behind.
_RESERVED: contextvars.ContextVar[list[Path] | None] = contextvars.ContextVar("reserved", default=None)
#: Permission bits asked for when a file is created by a plain ``open()``; the umask then applies.
_PLAIN = 0o666
#: A file whose mode is set explicitly stays private until then (a private key is never readable by others).
_PRIVATE = 0o600


# --- outputs: OutputError, staged ---------------------------------------------------------------------------------
def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Have ``write`` fill a hidden temp file beside ``path``, then rename it onto ``path``.

    The temp file keeps ``path``'s suffix (``.nii.gz``, ``.png``...) because writers such as nibabel pick the
    format from it; it has the mode a plain ``open()`` would give. Inside :func:`staged_outputs` the rename waits
    for the end of the block.

    Raises:
        OutputError: the folder is missing or not writable, or the disk is full.
    """
    path = Path(path)
    try:
        tmp = _reserve_temp(path, _PLAIN)
    except OSError as exc:
        raise OutputError(
            f"cannot write {path}: {exc.strerror or exc}; check that the folder {path.parent} exists and is writable"
        ) from exc
    try:
        _fill(tmp, write)
        staged = _STAGE.get()
        if staged is None:
            os.replace(tmp, path)
        else:
            staged.append((tmp, path))
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(
            f"cannot write {path}: {exc.strerror or exc}; check free disk space and write permission on {path.parent}"
        ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: Path) -> None:
    """Write UTF-8 text through :func:`write_atomic`.

    Raises:
        OutputError: as :func:`write_atomic`.
    """
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(data: Any, path: Path, *, sort_keys: bool = False) -> None:
    """Write ``data`` as indented JSON with a final newline through :func:`write_atomic`.

    Raises:
        OutputError: as :func:`write_atomic`.
    """
    write_text_atomic(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n", path)


@contextlib.contextmanager
def staged_outputs() -> Iterator[None]:
    """Make the :func:`write_atomic` calls in this block one unit: each file is written and flushed under its temp
    name, and all are renamed into place when the block ends without error, or all removed if it fails.

    A full disk at the third file of an input (mask, cord mask, soft map, sidecar...) then leaves the previous run's
    files as they were, not a new mask beside an old sidecar. The stage is a context variable: code running in
    other threads joins it only when run in a copy of this context (``contextvars.copy_context().run``).

    Raises:
        OutputError: a rename at the end failed (the renames already done stay; the other temp files are removed).
    """
    staged: list[tuple[Path, Path]] = []
    reserved: list[Path] = []
    token, reserved_token = _STAGE.set(staged), _RESERVED.set(reserved)
    try:
        yield
    except BaseException:
        for tmp in [*reserved, *(tmp for tmp, _ in staged)]:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _STAGE.reset(token)
        _RESERVED.reset(reserved_token)
    for done, (tmp, path) in enumerate(staged):
        try:
            os.replace(tmp, path)
        except BaseException as exc:  # a signal here too: no temp file may stay
            for left, _ in staged[done:]:
                left.unlink(missing_ok=True)
            if not isinstance(exc, OSError):
                raise
            raise OutputError(
                f"cannot write {path}: {exc.strerror or exc}; check write permission on {path.parent}"
            ) from exc


# --- files and folders: plain OSError -----------------------------------------------------------------------------
def write_file_atomic(
    path: Path, write: Callable[[Path], object], *, mode: int | None = None, replace: bool = True
) -> None:
    """Have ``write`` fill a hidden temp file beside ``path`` (its folders created), then move it onto ``path``.

    Args:
        path: the destination; its suffix is kept on the temp file.
        write: called with the temp file's path (the file exists, empty); anything it raises propagates.
        mode: permission bits set before the rename (the temp file is private until then); None: what a plain
            ``open()`` gives under the umask.
        replace: False keeps an existing ``path`` (FileExistsError), with no window in which it could be
            clobbered: the file is hard-linked into place rather than renamed.

    Raises:
        OSError: the folder or file cannot be written; FileExistsError as above.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _reserve_temp(path, _PLAIN if mode is None else _PRIVATE)
    try:
        _fill(tmp, write)
        if mode is not None:
            os.chmod(tmp, mode)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes, *, mode: int | None = 0o644, replace: bool = True) -> None:
    """Write ``data`` to ``path`` through :func:`write_file_atomic` (default mode 0644, whatever the umask).

    Raises:
        OSError: as :func:`write_file_atomic`.
    """
    write_file_atomic(path, lambda tmp: tmp.write_bytes(data), mode=mode, replace=replace)


def move_into_place(finished: Path, path: Path, *, mode: int | None = None) -> None:
    """Rename a finished temp file or folder onto ``path`` (its parent folder created).

    A file is flushed to disk first; ``mode`` (e.g. read-only) is set before the rename. An empty folder at
    ``path`` is replaced; a non-empty one raises OSError (ENOTEMPTY), leaving both as they were. ``finished`` is
    left where it is on failure: the caller decides whether to keep or remove it.

    Raises:
        OSError: the rename or the flush failed.
    """
    finished, path = Path(finished), Path(path)
    if finished.is_file():
        _flush(finished)
    if mode is not None:
        os.chmod(finished, mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(finished, path)


# --- helpers ------------------------------------------------------------------------------------------------------
def _reserve_temp(path: Path, permissions: int) -> Path:
    """Create an empty, hidden, unique temp file beside ``path`` that keeps its suffix, e.g.
    ``.mask.3f9a0c1d2e4b.tmp.nii.gz`` for ``mask.nii.gz``."""
    suffix = _suffix(path)
    stem = path.name[: len(path.name) - len(suffix)]
    tmp = path.with_name(f".{stem}.{secrets.token_hex(6)}.tmp{suffix}")
    reserved = _RESERVED.get()
    if reserved is not None:
        reserved.append(tmp)
    # O_EXCL reserves the name: no other writer, and no symlink planted there, is followed.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, permissions))
    return tmp


def _fill(tmp: Path, write: Callable[[Path], object]) -> None:
    """Run ``write`` on ``tmp`` and flush the result to disk; ``tmp`` is removed if either fails."""
    try:
        write(tmp)
        _flush(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _flush(path: Path) -> None:
    """fsync a file the writer may have closed already (nibabel, PIL and ONNX Runtime write by path)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _suffix(path: Path) -> str:
    name = path.name
    return ".nii.gz" if name.endswith(".nii.gz") else (".nii" if name.endswith(".nii") else path.suffix)
