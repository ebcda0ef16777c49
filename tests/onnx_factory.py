"""Tiny ONNX backbone/head pairs that follow DESIGN.md's model contract, built with onnx.helper (no torch).

The backbone outputs ``skip0`` = (x, -x) at full resolution and ``dec1`` = (x, 2x) averaged over 2x2x2 blocks
(AveragePool), so the network's divisor is 2. A head concatenates the features it reads (``dec1`` upsampled with
nearest-neighbour Resize), applies a 1x1x1 convolution and a sigmoid. With the weights of
:func:`write_tiny_release` the heads are known functions: the "universal" head's lesion channel is
``sigmoid(4 * (x - 2))``, a bright-voxel detector that finds bright blobs in a z-scored image; :func:`expected`
computes every head in numpy.

Use ``receptive_field=True`` for a backbone whose ``skip0`` is a 3x3x3 mean filter (zero padded): a network with
a real receptive field, for sliding-window tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
#: IR version 8 is what opset 17 shipped with; older onnxruntime builds refuse newer IR versions.
IR_VERSION = 8
FEATURE_CHANNELS = {"skip0": 2, "dec1": 2}
SLOPE = 4.0
LESION_LEVEL = 2.0
CORD_LEVEL = 0.5
MONTREAL_LEVEL = 1.5

#: Per head: the backbone features it reads, its (K, C_in) 1x1x1 weights and (K,) bias. C_in follows ``inputs``.
HEADS: dict[str, dict] = {
    "universal": {
        "inputs": ("skip0", "dec1"),
        # channel 0 "cord": sigmoid(SLOPE * (mean2(x) - CORD_LEVEL)); channel 1 "lesion": sigmoid(SLOPE * (x - 2))
        "weight": [[0.0, 0.0, SLOPE, 0.0], [SLOPE, 0.0, 0.0, 0.0]],
        "bias": [-SLOPE * CORD_LEVEL, -SLOPE * LESION_LEVEL],
        "labels": [{"name": "lesion", "value": 1, "channel": 1}, {"name": "cord", "value": 1, "channel": 0}],
    },
    "montreal": {
        "inputs": ("skip0",),
        # channel 0 "lesion": sigmoid(SLOPE * (x - 1.5)); channel 1 its complement, unused by the labels
        "weight": [[SLOPE, 0.0], [0.0, SLOPE]],
        "bias": [-SLOPE * MONTREAL_LEVEL, SLOPE * MONTREAL_LEVEL],
        "labels": [{"name": "lesion", "value": 1, "channel": 0}],
    },
    "toronto": {
        "inputs": ("dec1",),
        # channel 0 "lesion": sigmoid(SLOPE * (mean2(x) - 2)); channel 1 a constant 0.5
        "weight": [[SLOPE, 0.0], [0.0, 0.0]],
        "bias": [-SLOPE * LESION_LEVEL, 0.0],
        "labels": [{"name": "lesion", "value": 2, "channel": 0}],
    },
}


def _tensor(name: str, values: Sequence | np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnx_factory")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _features(name: str, channels: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", channels, None, None, None])


def backbone_model(*, receptive_field: bool = False) -> onnx.ModelProto:
    """``image`` (N, 1, X, Y, Z) -> ``skip0`` (N, 2, X, Y, Z), ``dec1`` (N, 2, X/2, Y/2, Z/2)."""
    if receptive_field:
        skip_weight = np.stack([np.full((1, 3, 3, 3), 1 / 27), np.full((1, 3, 3, 3), -1 / 27)])
        skip = helper.make_node("Conv", ["image", "w_skip"], ["skip0"], kernel_shape=[3, 3, 3], pads=[1] * 6)
    else:
        skip_weight = np.array([1.0, -1.0]).reshape(2, 1, 1, 1, 1)
        skip = helper.make_node("Conv", ["image", "w_skip"], ["skip0"], kernel_shape=[1, 1, 1])
    nodes = [
        skip,
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[2, 2, 2], strides=[2, 2, 2]),
        helper.make_node("Conv", ["pooled", "w_dec"], ["dec1"], kernel_shape=[1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_backbone",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "X", "Y", "Z"])],
        [_features("skip0", 2), _features("dec1", 2)],
        initializer=[_tensor("w_skip", skip_weight), _tensor("w_dec", np.array([1.0, 2.0]).reshape(2, 1, 1, 1, 1))],
    )
    return _model(graph)


def head_model(
    inputs: Sequence[str],
    weight: Sequence[Sequence[float]] | np.ndarray,
    bias: Sequence[float] | np.ndarray,
    channels: Mapping[str, int] = FEATURE_CHANNELS,
) -> onnx.ModelProto:
    """Head reading ``inputs`` (``dec1``-like names, i.e. any name but ``skip0``, are upsampled x2 first).

    Args:
        inputs: feature names, in the order their channels appear in ``weight``'s columns.
        weight: (K, sum of input channels) 1x1x1 convolution weights.
        bias: (K,) biases.
        channels: channel count of each input.
    """
    weight = np.asarray(weight, dtype=np.float32)
    nodes, parts = [], []
    initializers = [_tensor("w_head", weight.reshape(*weight.shape, 1, 1, 1)), _tensor("b_head", bias)]
    for name in inputs:
        if name == "skip0":
            parts.append(name)
            continue
        initializers.append(_tensor(f"scales_{name}", [1.0, 1.0, 2.0, 2.0, 2.0]))
        nodes.append(
            helper.make_node(
                "Resize",
                [name, "", f"scales_{name}"],
                [f"{name}_up"],
                mode="nearest",
                coordinate_transformation_mode="asymmetric",
                nearest_mode="floor",
            )
        )
        parts.append(f"{name}_up")
    if len(parts) > 1:
        nodes.append(helper.make_node("Concat", parts, ["features"], axis=1))
        features = "features"
    else:
        features = parts[0]
    nodes += [
        helper.make_node("Conv", [features, "w_head", "b_head"], ["logits"], kernel_shape=[1, 1, 1]),
        helper.make_node("Sigmoid", ["logits"], ["probabilities"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_head",
        [_features(name, channels[name]) for name in inputs],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", weight.shape[0], None, None, None])],
        initializer=initializers,
    )
    return _model(graph)


def write_tiny_release(directory: Path, *, receptive_field: bool = False) -> dict:
    """Write ``backbone.onnx`` and ``heads/{universal,montreal,toronto}.onnx`` under ``directory``.

    Returns:
        ``{"backbone": Path, "heads": {site: Path}, "backbone_outputs": [...], "channels": 2, "divisor": 2,
        "labels": {site: [label dicts as in the registry]}, "thresholds": {site: float}}``.
    """
    directory = Path(directory)
    (directory / "heads").mkdir(parents=True, exist_ok=True)
    backbone = directory / "backbone.onnx"
    onnx.save(backbone_model(receptive_field=receptive_field), backbone)
    heads = {}
    for site, spec in HEADS.items():
        heads[site] = directory / "heads" / f"{site}.onnx"
        onnx.save(head_model(spec["inputs"], spec["weight"], spec["bias"]), heads[site])
    return {
        "backbone": backbone,
        "heads": heads,
        "backbone_outputs": ["skip0", "dec1"],
        "channels": 2,
        "divisor": 2,
        "labels": {site: [dict(label) for label in spec["labels"]] for site, spec in HEADS.items()},
        "thresholds": {"universal": 0.5, "montreal": 0.4, "toronto": 0.5},
    }


def _mean2(x: np.ndarray) -> np.ndarray:
    """AveragePool 2x2x2 then nearest upsampling x2, on (N, 1, X, Y, Z) with even X, Y, Z."""
    n, c, sx, sy, sz = x.shape
    blocks = x.reshape(n, c, sx // 2, 2, sy // 2, 2, sz // 2, 2).mean(axis=(3, 5, 7))
    return blocks.repeat(2, axis=2).repeat(2, axis=3).repeat(2, axis=4)


def _box3(x: np.ndarray) -> np.ndarray:
    """3x3x3 mean with zero padding, as the receptive-field backbone's ``skip0`` channel 0."""
    from scipy import ndimage

    return ndimage.uniform_filter(x.astype(np.float64), size=(1, 1, 3, 3, 3), mode="constant", cval=0.0)


def expected(batch: np.ndarray, *, receptive_field: bool = False) -> dict[str, np.ndarray]:
    """What the tiny release's heads compute, in numpy (float64): ``{site: (N, 2, X, Y, Z)}``.

    Args:
        batch: (N, 1, X, Y, Z) with even spatial sizes.
    """
    x = np.asarray(batch, dtype=np.float64)
    skip = _box3(x) if receptive_field else x
    features = {"skip0": [skip, -skip], "dec1": [_mean2(x), 2 * _mean2(x)]}
    out = {}
    for site, spec in HEADS.items():
        stack = [channel for name in spec["inputs"] for channel in features[name]]
        logits = [sum(w * f for w, f in zip(row, stack)) + b for row, b in zip(spec["weight"], spec["bias"])]
        out[site] = 1.0 / (1.0 + np.exp(-np.concatenate(logits, axis=1)))
    return out
