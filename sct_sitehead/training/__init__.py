"""Training path (torch): U-Net backbone and site heads, label sharing, training loops, ONNX export.

The names below are imported on first use, so ``import sct_sitehead.training`` (and label-space code) does not
import torch.

- :func:`train_backbone`, :func:`train_head` (:mod:`.train`)
- :func:`export_release` (:mod:`.export`)
- :func:`build_label_space`, :class:`LabelSpace` (:mod:`.labels`, numpy only)
- :func:`load_config` (:mod:`.config`)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "train_backbone": ".train",
    "train_head": ".train",
    "load_backbone": ".train",
    "export_release": ".export",
    "build_label_space": ".labels",
    "measure_label_sizes": ".labels",
    "LabelSpace": ".labels",
    "load_config": ".config",
    "STRATEGIES": ".heads",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
