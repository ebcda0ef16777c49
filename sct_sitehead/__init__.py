"""Spinal cord lesion segmentation with a shared backbone and a small head per site.

The Python API (see the README): :func:`segment` one image, or :func:`open_segmenter` once and segment many;
:class:`Options` says how to run and :class:`ModelSource` where the models come from. Every error is a
:class:`SiteHeadError` (also a builtin: ``InputImageError`` is a ``ValueError``, and so on).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# The API's names are light, so `import sct_sitehead` (and `sct_deepseg_lesion -h`) stays fast; the classes of
# the deploy path, which bring numpy and nibabel, load on first use.
from sct_sitehead.api import open_segmenter, segment
from sct_sitehead.deploy.options import Options
from sct_sitehead.errors import SiteHeadError
from sct_sitehead.settings import ModelSource
from sct_sitehead.version import __version__

if TYPE_CHECKING:
    from sct_sitehead.deploy.pipeline import Segmenter
    from sct_sitehead.deploy.results import Segmentation, SiteSegmentation

_LAZY = {
    "Segmenter": "sct_sitehead.deploy.pipeline",
    "Segmentation": "sct_sitehead.deploy.results",
    "SiteSegmentation": "sct_sitehead.deploy.results",
}

__all__ = [
    "ModelSource",
    "Options",
    "Segmentation",
    "Segmenter",
    "SiteHeadError",
    "SiteSegmentation",
    "__version__",
    "open_segmenter",
    "segment",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sct_sitehead' has no attribute {name!r}")
