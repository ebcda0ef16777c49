"""Which MRI contrast an input image is, and whether a site's head was trained on it.

An image's contrast is its file name's BIDS suffix (``sub-01_acq-MTon_MTS.nii.gz`` -> ``MTS``), else the
``Contrast`` field of a JSON sidecar beside it (``<stem>.json``), else unknown. Only known BIDS suffixes count, in
any letter case, so ``t2.nii.gz`` or ``sub-01_T2w_crop.nii.gz`` (last part ``crop``) is unknown: nothing is
guessed from other parts of the name or other fields. A head's contrasts are those of the cases it was trained on
(the registry's optional ``contrasts``; None for a release published before they were recorded). An unknown
contrast, or a head without contrasts, is no mismatch: only a known contrast outside a known list warns.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sct_sitehead.deploy.naming import split_nifti_name
from sct_sitehead.registry import untrusted_json

logger = logging.getLogger(__name__)

#: BIDS anatomical suffixes (BIDS 1.9, "Anatomy imaging data", deprecated ones included) and the qMRI file
#: collections SCT's data use (``MTS``).
BIDS_SUFFIXES = (
    *("T1w", "T2w", "PDw", "T2starw", "FLAIR", "inplaneT1", "inplaneT2", "PDT2", "angio", "T2star", "FLASH", "PD"),
    *("T1map", "T2map", "T2starmap", "R1map", "R2map", "R2starmap", "PDmap", "MTRmap", "MTsat", "UNIT1", "T1rho"),
    *("MWFmap", "MTVmap", "Chimap", "S0map", "M0map"),
    *("MTS", "MTR", "MP2RAGE", "MPM", "MESE", "MEGRE", "VFA", "IRT1"),
)
#: Two names of one contrast: BIDS replaced the ambiguous ``T2star`` with ``T2starw``; SCT's data still use it.
ALIASES = {"T2starw": "T2star"}
#: The sidecar field read; its value must be one of :data:`BIDS_SUFFIXES`.
SIDECAR_FIELD = "Contrast"
#: A sidecar is a few kilobytes (dcm2niix: about 3 KB); anything larger is not read.
MAX_SIDECAR_BYTES = 1 << 20

_BY_LOWER = {name.lower(): name for name in BIDS_SUFFIXES}


@dataclass(frozen=True)
class ImageContrast:
    """An image's contrast and where it was read.

    Attributes:
        name: the BIDS suffix as BIDS spells it, e.g. ``"T2w"``.
        found_in: ``"file name"`` or ``"sidecar <path>"``.
    """

    name: str
    found_in: str


def canonical(name: object) -> str | None:
    """The BIDS spelling of a suffix in any letter case (``"t2w"`` -> ``"T2w"``); None for anything else."""
    if not isinstance(name, str):
        return None
    return _BY_LOWER.get(name.lower())


def same_contrast(a: str, b: str) -> bool:
    """Two suffixes name one contrast: equal once spelt as BIDS does and aliases resolved."""
    first = _resolved(a)
    return first is not None and first == _resolved(b)


def _resolved(name: str) -> str | None:
    spelt = canonical(name)
    return None if spelt is None else ALIASES.get(spelt, spelt)


def contrast_from_name(path: Path) -> str | None:
    """The file name's BIDS suffix (the part after the last ``_``, before ``.nii[.gz]``) if it is a known one."""
    stem, _ = split_nifti_name(Path(path))
    if "_" not in stem:
        return None
    return canonical(stem.rsplit("_", 1)[1])


def contrast_from_sidecar(sidecar: Path) -> str | None:
    """The sidecar's ``Contrast`` field if the file is readable JSON and the value a known suffix; else None."""
    try:
        if not sidecar.is_file() or sidecar.stat().st_size > MAX_SIDECAR_BYTES:
            return None
        document = untrusted_json.loads(sidecar.read_bytes(), f"sidecar {sidecar}")
    except (OSError, ValueError) as exc:  # RegistryError is a ValueError
        logger.debug("contrast: %s not read (%s)", sidecar, exc)
        return None
    value = document.get(SIDECAR_FIELD) if isinstance(document, dict) else None
    if value is not None and canonical(value) is None:
        logger.debug("contrast: %s names %r, not a BIDS suffix; ignored", sidecar, value)
    return canonical(value)


def image_contrast(path: str | Path | None) -> ImageContrast | None:
    """An input's contrast: its file name's BIDS suffix, else its sidecar's ``Contrast``, else None (unknown).

    Args:
        path: the image file; None (an image in memory) gives None.
    """
    if path is None:
        return None
    path = Path(path)
    named = contrast_from_name(path)
    if named is not None:
        return ImageContrast(named, "file name")
    sidecar = path.with_name(split_nifti_name(path)[0] + ".json")
    read = contrast_from_sidecar(sidecar)
    return None if read is None else ImageContrast(read, f"sidecar {sidecar.name}")


def contrast_matches(contrast: ImageContrast | None, trained: Sequence[str] | None) -> bool | None:
    """Whether a head trained on ``trained`` knows ``contrast``; None when either is unknown."""
    if contrast is None or trained is None:
        return None
    return any(same_contrast(contrast.name, name) for name in trained)


def contrast_facts(contrast: ImageContrast | None, trained: Sequence[str] | None) -> dict[str, Any]:
    """The sidecar's fields: ``Contrast`` (None: unknown), ``HeadContrasts`` (None: not recorded), ``ContrastMatch``."""
    return {
        "Contrast": None if contrast is None else contrast.name,
        "HeadContrasts": None if trained is None else list(trained),
        "ContrastMatch": contrast_matches(contrast, trained),
    }


def mismatch_warning(
    source: str, contrast: ImageContrast | None, heads: Mapping[str, Sequence[str] | None]
) -> str | None:
    """One line naming the heads not trained on the image's contrast; None when there is none (or nothing is known).

    Args:
        source: how the image is named in messages.
        contrast: the image's contrast.
        heads: ``{site: its contrasts, or None when not recorded}``.
    """
    strangers = {site: trained for site, trained in heads.items() if contrast_matches(contrast, trained) is False}
    if contrast is None or not strangers:
        return None
    listed = ", ".join(f"{site} ({', '.join(trained or ())})" for site, trained in strangers.items())
    heads_were = f"the head {listed} was" if len(strangers) == 1 else f"the heads {listed} were"
    return (
        f"{source}: contrast {contrast.name} (from its {contrast.found_in}) is not one {heads_were} trained on; the "
        f"masks are still written: check them, or use a site trained on {contrast.name} (-list-sites)"
    )
