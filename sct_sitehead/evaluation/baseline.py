"""The benchmark's baseline: what a user of MONAI would write for a release, to compare the deploy path with.

Backbone and head composed into one ONNX model (``onnx.compose.merge_models``), run by MONAI's Gaussian
``sliding_window_inference`` over the whole image on the model grid, padded as the deploy path pads. Used by
``bin/benchmark`` and ``bin/baseline_agreement``; needs the ``test`` extra (torch, MONAI, onnx), imported on use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sct_sitehead.deploy.options import Options
from sct_sitehead.deploy.windows import edge_beyond_for

#: A torch batch (N, 1, X, Y, Z) -> probabilities (N, K, X, Y, Z), as MONAI calls the network.
Predictor = Callable[[Any], Any]
#: The deploy path's patches per call and overlap: the baseline runs the same windows.
DEFAULTS = Options()


def baseline_channel(
    volume: np.ndarray, predictor: Predictor, orientation: str, patch_size: Sequence[int], channel: int
) -> np.ndarray:
    """One output channel of MONAI's Gaussian sliding window over a whole normalised volume (model grid).

    Padded as the pipeline pads (DESIGN.md, "Sliding window"): along the cord (S-I) a volume thinner than a patch
    repeats its first and last slices; across it, the background (the volume's minimum; MONAI's default, 0, is the
    mean intensity after z-scoring). Both change the masks of inputs thinner than a patch.

    Args:
        volume: (X, Y, Z) float32 normalised image on the model grid.
        predictor: a batch (torch tensor) -> probabilities (torch tensor), as MONAI calls it.
        orientation: the model grid's axis codes.
        patch_size: the release's patch.
        channel: the output channel to keep.

    Returns:
        (X, Y, Z) float32 probabilities.
    """
    import torch
    from monai.inferers import sliding_window_inference

    widths = [(0, 0)] * 3
    for axis, (n, size, limit) in enumerate(zip(volume.shape, patch_size, edge_beyond_for(orientation, patch_size))):
        missing = max(0, int(size) - n)
        if n > limit:  # the pipeline's rule; MONAI pads the rest with cval
            widths[axis] = (missing // 2, missing - missing // 2)
    padded = np.pad(volume, widths, mode="edge") if any(map(any, widths)) else volume
    with torch.no_grad():
        probabilities = sliding_window_inference(
            torch.from_numpy(np.ascontiguousarray(padded))[None, None],
            list(patch_size),
            DEFAULTS.batch_size,
            predictor,
            overlap=DEFAULTS.overlap,
            mode="gaussian",
            cval=float(volume.min()),
        )
    # MONAI returns what the predictor returns: here one tensor (its types allow a tuple or a dict too).
    assert isinstance(probabilities, torch.Tensor)
    inner = tuple(slice(low, low + n) for (low, _), n in zip(widths, volume.shape))
    return np.ascontiguousarray(probabilities[0, channel].numpy()[inner])


def merged_models(
    backbone_path: str, head_paths: dict[str, str], options: Any, providers: list[Any]
) -> tuple[dict[str, Predictor], str]:
    """``{site: predictor}``: backbone and head composed into one ONNX model each (two sessions if they cannot
    be), and how they were composed.

    Args:
        backbone_path: the release's backbone ONNX file.
        head_paths: ``{site: head ONNX file}``.
        options: ``onnxruntime.SessionOptions``.
        providers: ONNX Runtime execution providers.
    """
    import onnx
    import onnxruntime as ort

    backbone = onnx.load(backbone_path)
    predictors, composition = {}, "merged"
    for site, head_path in head_paths.items():
        head = onnx.load(head_path)
        # Both files carry an `sct_sitehead.source` metadata entry; merge_models refuses differing values.
        del head.metadata_props[:]
        initializers = {tensor.name for tensor in head.graph.initializer}
        inputs = [node.name for node in head.graph.input if node.name not in initializers]
        try:
            merged = onnx.compose.merge_models(
                backbone,
                head,
                io_map=[(name, name) for name in inputs],
                prefix2="head_",
                outputs=["head_probabilities"],
            )
            session = ort.InferenceSession(merged.SerializeToString(), options, providers=providers)
            predictors[site] = _merged_predictor(session)
        except Exception as exc:
            composition = f"two sessions ({type(exc).__name__})"
            first = ort.InferenceSession(backbone_path, options, providers=providers)
            second = ort.InferenceSession(head_path, options, providers=providers)
            predictors[site] = _chained_predictor(first, second, inputs)
    return predictors, composition


def _merged_predictor(session: Any) -> Predictor:
    import torch

    def predict(batch: Any) -> Any:
        array = np.ascontiguousarray(batch.numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(["head_probabilities"], {"image": array})[0])

    return predict


def _chained_predictor(backbone: Any, head: Any, inputs: list[str]) -> Predictor:
    import torch

    def predict(batch: Any) -> Any:
        array = np.ascontiguousarray(batch.numpy(), dtype=np.float32)
        features = backbone.run(inputs, {"image": array})
        return torch.from_numpy(head.run(["probabilities"], dict(zip(inputs, features)))[0])

    return predict
