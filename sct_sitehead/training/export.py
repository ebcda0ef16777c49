"""Export a backbone checkpoint and site-head checkpoints to the ONNX files of a release, and check them.

Files follow DESIGN.md, "Model contract": ``backbone.onnx`` (input ``image``, outputs named like
``Arch.outputs``) and ``heads/<site>.onnx`` (inputs named like those outputs, output ``probabilities``), with
dynamic N and spatial axes. Every file is run with ONNX Runtime on random input of another shape than the one it
was traced with and compared to PyTorch at ``atol``/``rtol``; a mismatch raises :class:`TrainingError`.

An existing file whose metadata names the same source weights (and opset and exporter) is kept byte for byte,
so adding a site rewrites nothing but that site's head.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sct_sitehead.atomic import write_file_atomic
from sct_sitehead.errors import TrainingError
from sct_sitehead.registry.cache import sha256_file as file_sha256
from sct_sitehead.training.arch import Arch
from sct_sitehead.training.checkpoint import load_checkpoint, weights_digest
from sct_sitehead.training.fuse import FusedHead, fuse_head
from sct_sitehead.training.heads import Head
from sct_sitehead.training.labels import UNIVERSAL, LabelSpace
from sct_sitehead.training.layers import count_parameters
from sct_sitehead.training.train import load_backbone, universal_meta
from sct_sitehead.training.unet import Backbone

logger = logging.getLogger(__name__)

IMAGE_INPUT = "image"
HEAD_OUTPUT = "probabilities"
EXPORTERS = ("dynamo", "torchscript")
_SOURCE_KEY = "sct_sitehead.source"


class BackboneGraph(nn.Module):
    """The backbone with a tuple output in ``output_names`` order (exporters need positional outputs)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        features = self.backbone(image)
        return tuple(features[name] for name in self.backbone.output_names)


class HeadGraph(nn.Module):
    """A head taking its named inputs positionally, in ``input_names`` order."""

    def __init__(self, head: Head | FusedHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, *features: Tensor) -> Tensor:
        return self.head(dict(zip(self.head.input_names, features)))


def _spatial_inputs(arch: Arch, base: tuple[int, int, int], n: int, seed: int) -> np.ndarray:
    """(n, 1, X, Y, Z) random image with X = base[0] * divisor, etc."""
    shape = (n, 1, *(b * arch.divisor for b in base))
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _export_graph(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    scales: list[int],
    opset: int,
    exporter: str,
) -> None:
    """Write ``module`` to ``path``; input i has spatial sizes ``scales[i]`` times one shared dynamic size."""
    if exporter == "torchscript":
        axes = {name: {0: "N", 2: f"X{s}", 3: f"Y{s}", 4: f"Z{s}"} for name, s in zip(input_names, scales)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and instance-norm notices
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
                do_constant_folding=True,
            )
        return
    from torch.export import Dim

    batch = Dim("N", min=1, max=1024)
    base = [Dim(f"d{axis}", min=1, max=4096) for axis in "xyz"]
    shapes: tuple[Any, ...] = tuple({0: batch, **{axis + 2: s * base[axis] for axis in range(3)}} for s in scales)
    if isinstance(module, HeadGraph):
        shapes = (shapes,)  # torch.export sees ``*features`` as one argument
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opset conversion and pytree deprecation notices from the exporter
        program = torch.onnx.export(
            module,
            args,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=shapes,
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    assert program is not None  # only the legacy exporter (dynamo=False) returns None
    program.save(str(path))


def _with_source(path: Path, source: str) -> None:
    """Record which weights the file was made from, so an unchanged model is not exported again."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = _SOURCE_KEY, source
    onnx.save(model, str(path))


def _source_of(path: Path) -> str | None:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    return next((p.value for p in model.metadata_props if p.key == _SOURCE_KEY), None)


def check_onnx(
    path: Path,
    reference: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    inputs: dict[str, np.ndarray],
    *,
    atol: float,
    rtol: float,
) -> float:
    """Run ``path`` with ONNX Runtime and compare every output to ``reference(inputs)``.

    Returns:
        The largest absolute difference over all outputs.

    Raises:
        TrainingError: different input/output names or shapes, or a difference beyond ``atol + rtol * |ref|``.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = reference(inputs)
    names_in = [i.name for i in session.get_inputs()]
    names_out = [o.name for o in session.get_outputs()]
    if sorted(names_in) != sorted(inputs) or sorted(names_out) != sorted(expected):
        raise TrainingError(
            f"{path.name}: ONNX inputs {names_in} / outputs {names_out} differ from PyTorch's {sorted(inputs)} / "
            f"{sorted(expected)}; the export is broken"
        )
    got = dict(zip(names_out, session.run(names_out, inputs)))
    worst = 0.0
    for name, want in expected.items():
        if got[name].shape != want.shape:
            raise TrainingError(f"{path.name}: output {name} has shape {got[name].shape}, PyTorch gives {want.shape}")
        diff = np.abs(got[name].astype(np.float64) - want)
        worst = max(worst, float(diff.max()))
        if not np.all(diff <= atol + rtol * np.abs(want)):
            raise TrainingError(
                f"{path.name}: output {name} differs from PyTorch by up to {float(diff.max()):.3g} (tolerance atol "
                f"{atol:g} + rtol {rtol:g} x |value|); the export is wrong; re-export, or report the torch/onnx "
                "versions"
            )
    return worst


def _write_checked(
    path: Path,
    module: nn.Module,
    args: tuple[Tensor, ...],
    names: tuple[list[str], list[str]],
    scales: list[int],
    source: str,
    check: tuple[Callable, dict[str, np.ndarray]],
    options: Mapping[str, Any],
) -> float:
    """Export to ``path`` unless it already holds the same source, then check it against PyTorch."""
    if not (path.is_file() and _source_of(path) == source):

        def write(tmp: Path) -> None:
            _export_graph(module, args, tmp, *names, scales, options["opset"], options["exporter"])
            _with_source(tmp, source)

        try:
            write_file_atomic(path, write)
        except TrainingError:
            raise
        except Exception as exc:
            raise TrainingError(f"exporting {path.name} failed ({type(exc).__name__}: {exc}); see the log") from exc
        logger.info("exported %s", path)
    else:
        logger.info("%s is up to date (same weights); kept", path)
    return check_onnx(path, check[0], check[1], atol=options["atol"], rtol=options["rtol"])


def _load_head(path: Path, backbone_sha: str) -> tuple[Head, dict[str, Any]]:
    state, meta, _ = load_checkpoint(path, kind="head")
    if meta["backbone_sha256"] != backbone_sha:
        raise TrainingError(
            f"head {path} (site {meta['site']!r}) was trained on backbone {meta['backbone_sha256'][:12]}, not on "
            f"{backbone_sha[:12]}; re-train it with train-head on this backbone"
        )
    head = Head.from_description(meta["head"])
    head.load_state_dict(state)
    return head.eval(), meta


def export_release(
    backbone_ckpt: Path,
    head_ckpts: Mapping[str, Path],
    out_dir: Path,
    *,
    opset: int = 17,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    exporter: str = "dynamo",
) -> dict[str, Any]:
    """Write ``backbone.onnx`` and ``heads/<site>.onnx`` (the universal head always included) and check them.

    Args:
        backbone_ckpt: from :func:`train.train_backbone`.
        head_ckpts: ``{site: head checkpoint}`` from :func:`train.train_head`; the dict key names the ONNX file.
        out_dir: release folder; existing files from the same weights are kept unchanged.
        opset: ONNX opset (>= 17).
        atol, rtol: tolerance of the ONNX Runtime vs PyTorch check, on random input.
        exporter: ``"dynamo"`` (torch.export, the maintained path) or ``"torchscript"`` (legacy, faster).

    Returns:
        Manifest pieces: ``input``, ``channels``, ``backbone`` {file, sha256, size, outputs}, ``heads``
        {site: {file, sha256, size, strategy, labels, contrasts (the BIDS suffixes of its training cases; absent
        for a checkpoint that predates them)}}, ``opset``, ``check`` (tolerances, max differences),
        ``parameters``. Also written to ``out_dir/export.json``.

    Raises:
        TrainingError: a head from another backbone, an export failure, or a check beyond tolerance.
    """
    if opset < 17 or exporter not in EXPORTERS:
        raise TrainingError(f"opset must be >= 17 and exporter one of {EXPORTERS}; got {opset}, {exporter!r}")
    options = {"opset": int(opset), "atol": float(atol), "rtol": float(rtol), "exporter": exporter}
    out_dir = Path(out_dir)
    unet, meta = load_backbone(Path(backbone_ckpt))
    arch, backbone_sha = unet.arch, meta["backbone_sha256"]
    space = LabelSpace.from_json(meta["label_space"])
    tag = f"opset{opset}|{exporter}|{torch.__version__}"
    trace = torch.from_numpy(_spatial_inputs(arch, (2, 2, 2), 1, seed=0))
    image = _spatial_inputs(arch, (3, 2, 4), 2, seed=1)
    with torch.no_grad():
        features = {k: v.numpy() for k, v in unet.backbone(torch.from_numpy(image)).items()}
        trace_features = tuple(unet.backbone(trace)[name] for name in arch.outputs)

        def backbone_reference(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {k: v.numpy() for k, v in unet.backbone(torch.from_numpy(inputs[IMAGE_INPUT])).items()}

        diffs = {
            "backbone": _write_checked(
                out_dir / "backbone.onnx",
                BackboneGraph(unet.backbone).eval(),
                (trace,),
                ([IMAGE_INPUT], arch.outputs),
                [arch.divisor],
                f"backbone|{backbone_sha}|{tag}",
                (backbone_reference, {IMAGE_INPUT: image}),
                options,
            )
        }
        heads: dict[str, tuple[Head, dict[str, Any]]] = {UNIVERSAL: (unet.head, universal_meta(meta))}
        heads.update({site: _load_head(Path(p), backbone_sha) for site, p in head_ckpts.items()})
        scales = [2 ** (arch.head_stages - int(name.removeprefix("skip").removeprefix("dec"))) for name in arch.outputs]
        manifest_heads = {}
        for site, (head, head_meta) in heads.items():

            def head_reference(inputs: dict[str, np.ndarray], head: Head = head) -> dict[str, np.ndarray]:
                return {HEAD_OUTPUT: head({k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()}

            path = out_dir / "heads" / f"{site}.onnx"
            diffs[site] = _write_checked(
                path,
                HeadGraph(fuse_head(head)),
                trace_features,
                (arch.outputs, [HEAD_OUTPUT]),
                scales,
                f"head|{backbone_sha}|{weights_digest(head)}|{json.dumps(head.describe(), sort_keys=True)}|{tag}",
                (head_reference, features),
                options,
            )
            labels = sorted(head_meta["labels"].items(), key=lambda item: (item[1], item[0]))
            manifest_heads[site] = {
                **_asset(path, out_dir),
                "strategy": head_meta["strategy"],
                "labels": [{"name": name, "value": 1, "channel": channel} for name, channel in labels],
            }
            if head_meta.get("contrasts"):  # checkpoints trained before contrasts were recorded have none
                manifest_heads[site]["contrasts"] = list(head_meta["contrasts"])
    manifest = {
        "input": meta["input"],
        "channels": space.channels,
        "backbone": {**_asset(out_dir / "backbone.onnx", out_dir), "outputs": list(arch.outputs)},
        "heads": manifest_heads,
        "opset": opset,
        "check": {"atol": atol, "rtol": rtol, "max_abs_diff": diffs},
        "parameters": {
            "backbone": count_parameters(unet.backbone),
            **{site: count_parameters(head) for site, (head, _) in heads.items()},
        },
    }
    (out_dir / "export.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    logger.info(
        "release in %s: backbone + %d heads, largest ONNX/PyTorch difference %.2g",
        out_dir,
        len(heads),
        max(diffs.values()),
    )
    return manifest


def _asset(path: Path, root: Path) -> dict[str, Any]:
    return {"file": path.relative_to(root).as_posix(), "sha256": file_sha256(path), "size": path.stat().st_size}
