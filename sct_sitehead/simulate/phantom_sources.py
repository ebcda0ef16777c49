"""Procedural phantoms written as a source dataset for :func:`simulate`: more cord anatomies than real scans give.

A handful of real scans with cord masks is little anatomy to learn from: a lesion model trained on two or three
cords learns those cords. Phantoms add cords of other sizes and shapes (cervical to thoracic level, tilted, any
contrast the phantom knows), which :func:`simulate` then deforms, fills with lesions and acquires like any source.
They never carry lesions of their own.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sct_sitehead.atomic import move_into_place, write_json_atomic
from sct_sitehead.errors import OutputError, UsageError
from sct_sitehead.simulate.phantom import INTENSITIES, make_phantom
from sct_sitehead.simulate.staging import staging_folder

logger = logging.getLogger(__name__)

#: Field of view (mm) of each phantom source: larger than any site's, so the simulator can place its own.
FOV_MM = (80.0, 80.0, 128.0)
SPACING_MM = 0.8
ORIENTATIONS = ("RAS", "LAS", "RPI", "PSR")
#: Contrasts the phantoms cycle through by default (the release's training data); MTS on request.
DEFAULT_CONTRASTS = ("T1w", "T2star", "T2w")
#: Cord levels (world z, mm; 0 = cervical enlargement) the phantoms are centred on.
Z_RANGE_MM = (-300.0, 120.0)


def write_phantom_sources(out: Path, n: int, *, seed: int = 0, contrasts: Sequence[str] | None = None) -> Path:
    """Write ``n`` phantom anatomies as a BIDS dataset with cord masks in ``derivatives/labels``.

    Subjects are ``sub-phantom01``... with site ``phantom``; contrasts cycle through ``contrasts`` (default: every
    ``DEFAULT_CONTRASTS``). Deterministic by ``seed``.

    Raises:
        UsageError: ``n`` < 1 or an unknown contrast.
        OutputError: ``out`` is not empty or cannot be written.
    """
    import nibabel as nib

    out = Path(out)
    contrasts = tuple(contrasts or DEFAULT_CONTRASTS)
    if n < 1:
        raise UsageError(f"phantom sources: n is {n}; use 1 or more")
    unknown = [c for c in contrasts if c not in INTENSITIES]
    if unknown:
        raise UsageError(f"phantom sources: contrasts {unknown} unknown; pick among {sorted(INTENSITIES)}")
    staging = staging_folder(out)
    rng = np.random.default_rng([int(seed), 7])
    shape = tuple(int(round(f / SPACING_MM)) for f in FOV_MM)
    rows = ["participant_id\tsite\tsource"]
    try:
        for number in range(1, n + 1):
            contrast = contrasts[(number - 1) % len(contrasts)]
            subject = f"sub-phantom{number:02d}"
            center = (float(rng.uniform(-4, 4)), float(rng.uniform(-4, 4)), float(rng.uniform(*Z_RANGE_MM)))
            orientation = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
            axis_shape = shape if orientation != "PSR" else (shape[1], shape[2], shape[0])
            phantom = make_phantom(
                axis_shape,
                (SPACING_MM,) * 3,
                orientation=orientation,
                contrast=contrast,
                n_lesions=0,
                seed=int(rng.integers(1 << 30)),
                oblique_deg=float(rng.uniform(-15, 15)),
                center=center,
            )
            stem = f"{subject}_{contrast}"
            anat = staging / subject / "anat"
            labels = staging / "derivatives" / "labels" / subject / "anat"
            anat.mkdir(parents=True)
            labels.mkdir(parents=True)
            nib.save(phantom.image, anat / f"{stem}.nii.gz")
            nib.save(phantom.cord, labels / f"{stem}_seg-manual.nii.gz")
            rows.append(f"{subject}\tphantom\tsct_sitehead phantom (z {center[2]:.0f} mm, {orientation})")
            logger.info("%s: %s at z %.0f mm, %s", subject, contrast, center[2], orientation)
        (staging / "participants.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        write_json_atomic(
            {"Name": "sct_sitehead phantom anatomy", "BIDSVersion": "1.8.0", "DatasetType": "raw"},
            staging / "dataset_description.json",
            sort_keys=True,
        )
        move_into_place(staging, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(f"cannot write phantom sources into {out}: {exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
