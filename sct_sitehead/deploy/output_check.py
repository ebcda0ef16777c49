"""Before any work: no output may land on an input, on another output, or on a file this tool did not write.

An output path is compared with the inputs after resolving it (symbolic links, ``..``) and, where both exist, by
file identity (a hard link is the same file under another name). An existing output is replaced only when it is
one of this tool's own (the sidecar beside it, read as untrusted JSON, was written by sct_sitehead and lists it)
and ``overwrite`` is given; anything else that exists there is left alone. Each refusal is a
:class:`~sct_sitehead.errors.UsageError` (exit 2) naming the path and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from sct_sitehead.deploy.naming import label_path, sidecar_path, soft_path
from sct_sitehead.errors import RegistryError, UsageError
from sct_sitehead.registry import untrusted_json

#: The label written as the main mask (its path is the planned mask path itself).
LESION = "lesion"
#: ``GeneratedBy[0].Name`` in the sidecars this tool writes.
GENERATOR = "sct_sitehead"
#: Largest sidecar read back: a real one is a few kilobytes.
MAX_SIDECAR_BYTES = 1 << 20


def planned_files(mask: Path, labels: Sequence[str], *, soft: bool) -> list[Path]:
    """Every file one (input, site) run writes beside its mask: a mask per label, the soft map, the sidecar.

    Args:
        mask: the main (lesion) mask's path, from :func:`~sct_sitehead.deploy.naming.plan_outputs`.
        labels: the head's label names.
        soft: the soft map is written too.
    """
    files = [mask if label == LESION else label_path(mask, label) for label in labels]
    if soft:
        files.append(soft_path(mask))
    files.append(sidecar_path(mask))
    return files


def check_outputs(
    plan: Mapping[tuple[Path, str], Path],
    labels: Mapping[str, Sequence[str]],
    *,
    soft: bool = False,
    qc_dir: Path | None = None,
    overwrite: bool = False,
) -> None:
    """Refuse a plan that would overwrite an input, write one file twice, or replace a file not written by this
    tool (or one of its own without ``overwrite``).

    Args:
        plan: ``{(input, site): main mask path}``.
        labels: each site's label names.
        soft: soft maps are written too.
        qc_dir: the QC folder: a report that runs add to (its pictures and ``index.html`` are replaced by design),
            so it is only checked not to be an input.
        overwrite: replace the tool's own earlier outputs.

    Raises:
        UsageError: as above.
    """
    inputs = list(dict.fromkeys(image for image, _ in plan))
    claimed: dict[str, Path] = {}
    for (_, site), mask in plan.items():
        for path in planned_files(mask, labels[site], soft=soft):
            refuse_input(path, inputs)
            real = os.path.realpath(path)
            if real in claimed:
                raise UsageError(
                    f"two outputs of this run are the same file {path} (also {claimed[real]}); use distinct file "
                    "names or -ofolder"
                )
            claimed[real] = path
            refuse_existing(path, sidecar_path(mask), overwrite=overwrite)
    if qc_dir is not None:
        refuse_input(qc_dir, inputs)
        refuse_input(qc_dir / "index.html", inputs)


def refuse_input(path: Path, inputs: Iterable[Path]) -> None:
    """Raise UsageError when ``path`` is, resolves to, or is a hard link of one of ``inputs``."""
    real = os.path.realpath(path)
    for image in inputs:
        how = ""
        if real == os.path.realpath(image):
            how = "" if os.path.abspath(path) == os.path.abspath(image) else " (the same file by another path)"
        elif same_file(path, image):
            how = " (a hard link to it)"
        else:
            continue
        raise UsageError(
            f"output {path} is the input {image}{how}: writing it would destroy the scan. Nothing was done; choose "
            "another -o or -ofolder"
        )


def same_file(a: Path, b: Path) -> bool:
    """True when both exist and are one file (device and inode)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_existing(path: Path, sidecar: Path, *, overwrite: bool) -> None:
    """Raise UsageError when ``path`` exists and may not be replaced (module notes)."""
    if not os.path.lexists(path):
        return
    if not written_by_this_tool(path, sidecar):
        raise UsageError(
            f"output {path} exists and was not written by sct_deepseg_lesion (no sidecar {sidecar.name} of this tool "
            "lists it); it was left untouched and nothing was done. Move it away, or choose another -o or -ofolder"
        )
    if not overwrite:
        raise UsageError(
            f"output {path} exists (written by an earlier run, see {sidecar.name}); nothing was done. Add -overwrite "
            "to replace the earlier outputs, or choose another -o or -ofolder"
        )


def written_by_this_tool(path: Path, sidecar: Path) -> bool:
    """True when ``sidecar`` is a regular file written by this tool and names ``path`` (or is ``path``)."""
    try:
        if not sidecar.is_file() or sidecar.is_symlink() or sidecar.stat().st_size > MAX_SIDECAR_BYTES:
            return False
        facts = untrusted_json.loads(sidecar.read_bytes(), f"sidecar {sidecar}")
    except (OSError, RegistryError):
        return False
    if not isinstance(facts, dict):
        return False
    generated = facts.get("GeneratedBy")
    first = generated[0] if isinstance(generated, list) and generated else None
    if not isinstance(first, dict) or first.get("Name") != GENERATOR:
        return False
    files = facts.get("Files")
    named = isinstance(files, list) and path.name in files
    return named or os.path.abspath(path) == os.path.abspath(sidecar)
