"""Where `sct_deepseg_lesion` writes its outputs, following SCT's naming: ``<stem>_lesionseg.nii.gz`` next to
the input (``_<site>`` added for several sites), ``<stem>_<label>seg.nii.gz`` for a head's other labels,
``<stem>_lesionseg.json`` for the sidecar and ``<stem>_lesionseg_soft.nii.gz`` for the probability map.
"""

from __future__ import annotations

from pathlib import Path

from sct_sitehead.errors import OutputError, UsageError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def split_nifti_name(path: Path) -> tuple[str, str]:
    """``sub_T2w.nii.gz`` -> (``sub_T2w``, ``.nii.gz``)."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return path.stem, ".nii.gz"


def plan_outputs(
    inputs: list[Path], sites: list[str], output: Path | None, ofolder: Path | None
) -> dict[tuple[Path, str], Path]:
    """Main lesion-mask path for every (input, site) pair, following SCT naming.

    ``-o`` is only valid for one input and one site; ``-ofolder`` puts every output in one folder; by default
    outputs go next to their input as ``<stem>_lesionseg.nii.gz`` (``_<site>`` added for several sites).
    """
    if output is not None and ofolder is not None:
        raise UsageError("-o and -ofolder cannot be used together; pick one")
    if output is not None and (len(inputs) > 1 or len(sites) > 1):
        raise UsageError(
            f"-o names one file but {len(inputs)} input(s) and {len(sites)} site(s) were given; use -ofolder DIR"
        )
    plan: dict[tuple[Path, str], Path] = {}
    for image in inputs:
        stem, _ = split_nifti_name(image)
        for site in sites:
            if output is not None:
                path = output if output.name.endswith(NIFTI_SUFFIXES) else output.with_name(output.name + ".nii.gz")
            else:
                name = f"{stem}_lesionseg" + (f"_{site}" if len(sites) > 1 else "") + ".nii.gz"
                path = (ofolder if ofolder is not None else image.parent) / name
            if path in plan.values():
                raise UsageError(f"two inputs would both write {path}; use distinct file names or -ofolder per run")
            plan[(image, site)] = path
    return plan


def label_path(mask_path: Path, label: str) -> Path:
    """Where a head's non-lesion label goes: ``x_lesionseg.nii.gz`` -> ``x_cordseg.nii.gz``."""
    stem, suffix = split_nifti_name(mask_path)
    if "_lesionseg" in stem:
        return mask_path.with_name(stem.replace("_lesionseg", f"_{label}seg", 1) + suffix)
    return mask_path.with_name(f"{stem}_{label}{suffix}")


def sidecar_path(mask_path: Path) -> Path:
    stem, _ = split_nifti_name(mask_path)
    return mask_path.with_name(stem + ".json")


def soft_path(mask_path: Path) -> Path:
    stem, suffix = split_nifti_name(mask_path)
    return mask_path.with_name(stem + "_soft" + suffix)


def make_folder(folder: Path) -> None:
    """Create an output folder (and its parents) if needed.

    Raises:
        OutputError: it cannot be created: it or a parent is a regular file, no permission, read-only file system.
    """
    for ancestor in (folder, *folder.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise OutputError(
                    f"cannot create the output folder {folder}: {ancestor} is a file, not a folder; "
                    "pick another path with -o/-ofolder/-qc"
                )
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create the output folder {folder}: {exc.strerror or exc}; check that the path is a writable "
            "folder, or pick another with -o/-ofolder"
        ) from None
