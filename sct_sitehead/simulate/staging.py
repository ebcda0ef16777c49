"""A dataset written whole: built in a hidden staging folder beside its destination, then renamed onto it
(:func:`sct_sitehead.atomic.move_into_place`), so an interrupted run never leaves half a dataset where a later
step would read it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sct_sitehead.errors import OutputError


def staging_folder(out: Path) -> Path:
    """An empty folder ``.<name>.partial`` beside ``out`` to build the dataset in (one left by an interrupted run
    with the same output is removed first).

    Raises:
        OutputError: ``out`` exists and is not an empty folder, or the staging folder cannot be created.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"output folder {out} exists and is not empty; choose a new or empty folder")
    staging = out.with_name(f".{out.name}.partial")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    except OSError as exc:
        raise OutputError(f"cannot create {staging}: {exc.strerror}; check the parent folder is writable") from exc
    return staging
