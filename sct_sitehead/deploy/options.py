"""How to run the deploy path: one small settings object shared by the command line, the Python API and the
evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Options:
    """How to run.

    Attributes:
        threshold: probability threshold for every head; None: each head's own, from the release.
        min_lesion_mm3: drop lesions smaller than this (mm³); None: each head's own; 0 keeps every lesion.
        soft: also keep (and write) the lesion probabilities.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        threads: CPU threads for ONNX Runtime; None: all.
        overlap: sliding-window overlap of the lesion model, as a fraction of a patch.
        batch_size: patches per network call.
        qc_dir: write a QC picture per input and site here (command line only).
        crop: run the lesion model around the cord that the release's localiser finds, not the whole image.
        mirror: also run the lesion model on the left-right mirrored image and average (nnU-Net's test-time
            mirroring).
        max_memory: bytes one image's run may plan to use (:mod:`~sct_sitehead.deploy.budget`); None:
            ``$SCT_SITEHEAD_MAX_MEMORY``, else 2 GB.
        warn_contrast: log a warning when a head was not trained on the image's contrast (off where every head
            runs on every image by design: ``evaluate``, ``tune-thresholds``).
    """

    threshold: float | None = None
    min_lesion_mm3: float | None = None
    soft: bool = False
    device: str = "auto"
    threads: int | None = None
    overlap: float = 0.5
    batch_size: int = 4
    qc_dir: Path | None = None
    crop: bool = True
    mirror: bool = False
    max_memory: int | None = None
    warn_contrast: bool = True
