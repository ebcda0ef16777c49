"""Checkpoints as safetensors files: tensors plus one JSON metadata string, nothing that unpickles code.

One file holds a module's ``state_dict`` under ``model.``, optionally the optimiser's tensors under ``optim.``
(its nested non-tensor parts go into the metadata), and ``meta``: what the file is (``kind``), the architecture,
label space, config and provenance. Files are written to a temp name and renamed, so a crash never leaves a
half-written checkpoint where a resume would find it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, nn

from sct_sitehead.atomic import write_bytes_atomic
from sct_sitehead.errors import TrainingError

logger = logging.getLogger(__name__)

FORMAT = 1
_META_KEY = "sct_sitehead"


def save_checkpoint(
    path: Path, model: Mapping[str, Tensor], meta: Mapping[str, Any], optimizer: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model`` (a state dict), ``meta`` and optionally an optimiser state dict to ``path`` atomically.

    Raises:
        TrainingError: the file cannot be written.
    """
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.items()}
    meta = {**meta, "format": FORMAT}
    if optimizer is not None:
        optim_tensors, optim_meta = _flatten_optimizer(optimizer)
        tensors.update(optim_tensors)
        meta["optim"] = optim_meta
    path = Path(path)
    try:
        # Serialised in memory and written with the umask's mode (mode=None): safetensors' own writer creates
        # files mode 0600.
        data = save(tensors, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
        write_bytes_atomic(path, data, mode=None)
    except OSError as exc:
        raise TrainingError(f"cannot write checkpoint {path}: {exc}; check free space and permissions") from exc
    return path


def load_checkpoint(path: Path, kind: str | None = None) -> tuple[dict[str, Tensor], dict[str, Any], dict | None]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the ``.safetensors`` file.
        kind: if given, the ``meta["kind"]`` the file must have (``"backbone"``, ``"head"``, ``"state"``).

    Returns:
        The model state dict (CPU tensors), the metadata, and the optimiser state dict (None if not saved).

    Raises:
        TrainingError: missing, not a checkpoint of this package, or of another kind.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"checkpoint {path} does not exist; train it first or check the path")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw_meta = (handle.metadata() or {}).get(_META_KEY)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise TrainingError(f"{path} is not a readable safetensors checkpoint ({exc}); re-train or re-copy it") from exc
    if raw_meta is None:
        raise TrainingError(f"{path} has no {_META_KEY} metadata; it was not written by sct_sitehead training")
    meta = json.loads(raw_meta)
    if meta.get("format") != FORMAT:
        raise TrainingError(f"{path} has checkpoint format {meta.get('format')!r}, this version reads {FORMAT}")
    if kind is not None and meta.get("kind") != kind:
        raise TrainingError(f"{path} is a {meta.get('kind')!r} checkpoint, expected a {kind!r} one; check the path")
    model = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    optim = None
    if "optim" in meta:
        optim = _unflatten_optimizer({k: v for k, v in tensors.items() if k.startswith("optim.")}, meta.pop("optim"))
    return model, meta, optim


def weights_digest(state: Mapping[str, Tensor] | nn.Module) -> str:
    """sha256 over parameter names, dtypes, shapes and bytes, in name order: equal exactly when bit-identical."""
    if isinstance(state, nn.Module):
        state = state.state_dict()
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _flatten_optimizer(state_dict: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}
