"""ONNX export of a release: the contract, the ONNX Runtime check (and that it catches broken files), the deploy
path running the exported files, and adding a site without touching anything else."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from conftest import make_dataset, tiny_config  # noqa: E402

from sct_sitehead.deploy.session import SiteHeadModel  # noqa: E402
from sct_sitehead.errors import TrainingError  # noqa: E402
from sct_sitehead.registry.cache import sha256_file as file_sha256  # noqa: E402
from sct_sitehead.training import export  # noqa: E402
from sct_sitehead.training.export import check_onnx, export_release  # noqa: E402
from sct_sitehead.training.train import load_backbone, train_backbone, train_head  # noqa: E402

pytestmark = [pytest.mark.train, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.set_num_threads(1)
    data = make_dataset(tmp_path_factory.mktemp("bids"))
    work = tmp_path_factory.mktemp("work")
    backbone = train_backbone(data, work, tiny_config(steps=6))
    heads = {
        "siteA": train_head(data, backbone, "siteA", "finetune", work, tiny_config()),
        "siteB": train_head(data, backbone, "siteB", "spatial", work, tiny_config()),
    }
    return {"data": data, "work": work, "backbone": backbone, "heads": heads}


def _run(path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)


def test_export_follows_the_model_contract(release: dict, tmp_path: Path) -> None:
    manifest = export_release(release["backbone"], release["heads"], tmp_path, exporter="torchscript")
    assert manifest["backbone"]["outputs"] == ["skip0", "dec1"]
    assert manifest["channels"] == 2 and manifest["opset"] == 17
    assert manifest["input"]["normalization"] == {"method": "zscore", "clip_percentiles": [0.5, 99.5]}
    assert set(manifest["heads"]) == {"universal", "siteA", "siteB"}
    assert manifest["heads"]["siteA"]["labels"] == [{"name": "lesion", "value": 1, "channel": 0}]
    assert manifest["heads"]["siteB"]["strategy"] == "spatial"
    assert manifest["heads"]["universal"]["strategy"] == "pooled"
    assert all(head["contrasts"] == ["T2w"] for head in manifest["heads"].values())  # the toy data are all T2w
    assert max(manifest["check"]["max_abs_diff"].values()) < manifest["check"]["atol"]
    assert json.loads((tmp_path / "export.json").read_text()) == manifest
    for entry in [manifest["backbone"], *manifest["heads"].values()]:
        path = tmp_path / entry["file"]
        assert entry["sha256"] == file_sha256(path) and entry["size"] == path.stat().st_size
    backbone = ort.InferenceSession(str(tmp_path / "backbone.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in backbone.get_inputs()] == ["image"]
    assert [o.name for o in backbone.get_outputs()] == ["skip0", "dec1"]
    image = np.random.default_rng(0).standard_normal((3, 1, 10, 6, 14)).astype(np.float32)  # dynamic N, X, Y, Z
    features = dict(zip(["skip0", "dec1"], backbone.run(None, {"image": image})))
    assert features["skip0"].shape == (3, 4, 10, 6, 14) and features["dec1"].shape == (3, 8, 5, 3, 7)
    model, _ = load_backbone(release["backbone"])
    for site in ("universal", "siteA", "siteB"):
        session = ort.InferenceSession(str(tmp_path / "heads" / f"{site}.onnx"), providers=["CPUExecutionProvider"])
        assert sorted(i.name for i in session.get_inputs()) == ["dec1", "skip0"]
        assert [o.name for o in session.get_outputs()] == ["probabilities"]
        (probabilities,) = session.run(None, features)
        assert probabilities.shape == (3, 2, 10, 6, 14) and 0 <= probabilities.min() <= probabilities.max() <= 1
    with torch.no_grad():
        expected = model.probabilities(torch.from_numpy(image)).numpy()
    (universal,) = _run(tmp_path / "heads" / "universal.onnx", features)
    assert np.allclose(universal, expected, atol=1e-4)


def test_the_deploy_path_runs_the_exported_release(release: dict, tmp_path: Path) -> None:
    export_release(release["backbone"], release["heads"], tmp_path, exporter="torchscript")
    model = SiteHeadModel(
        tmp_path / "backbone.onnx",
        {s: tmp_path / "heads" / f"{s}.onnx" for s in ("universal", "siteA", "siteB")},
        device="cpu",
    )
    batch = np.random.default_rng(1).standard_normal((2, 1, 16, 16, 16)).astype(np.float32)
    outputs = model(batch)
    unet, _ = load_backbone(release["backbone"])
    with torch.no_grad():
        assert np.allclose(outputs["universal"], unet.probabilities(torch.from_numpy(batch)).numpy(), atol=1e-4)
    assert {k: v.shape for k, v in outputs.items()} == {s: (2, 2, 16, 16, 16) for s in ("universal", "siteA", "siteB")}


def test_a_corrupted_onnx_file_fails_the_check(release: dict, tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    export_release(release["backbone"], release["heads"], tmp_path, exporter="torchscript")
    path = tmp_path / "heads" / "siteB.onnx"
    model = onnx.load(str(path))
    biggest = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    biggest.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(biggest) * 1.5, biggest.name))
    onnx.save(model, str(path))
    # Same source metadata, so the file is kept, but it no longer computes what PyTorch computes.
    with pytest.raises(TrainingError, match=r"siteB.onnx: output probabilities differs from PyTorch"):
        export_release(release["backbone"], release["heads"], tmp_path, exporter="torchscript")


def test_an_exporter_that_writes_wrong_weights_is_caught(
    release: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = export._export_graph

    def perturbed(module: torch.nn.Module, *args: object) -> None:
        module = copy.deepcopy(module)  # the file goes wrong, the PyTorch reference stays right
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.add_(1e-3)
        real(module, *args)

    monkeypatch.setattr(export, "_export_graph", perturbed)
    with pytest.raises(TrainingError, match="backbone.onnx: output .* differs from PyTorch"):
        export_release(release["backbone"], {}, tmp_path, exporter="torchscript")


def test_the_tolerance_is_what_decides(release: dict, tmp_path: Path) -> None:
    export_release(release["backbone"], {}, tmp_path, exporter="torchscript")
    image = {"image": np.ones((1, 1, 4, 4, 4), np.float32)}
    (skip0, dec1) = _run(tmp_path / "backbone.onnx", image)

    def reference(_: dict) -> dict:
        return {"skip0": skip0 + 1e-3, "dec1": dec1}

    assert check_onnx(tmp_path / "backbone.onnx", reference, image, atol=1e-2, rtol=0) == pytest.approx(1e-3, rel=1e-2)
    with pytest.raises(TrainingError, match="differs from PyTorch by up to 0.001"):
        check_onnx(tmp_path / "backbone.onnx", reference, image, atol=1e-4, rtol=0)


def test_a_head_of_another_backbone_is_refused(release: dict, tmp_path: Path) -> None:
    other = train_backbone(release["data"], tmp_path / "other", tiny_config(steps=2, seed=7))
    with pytest.raises(TrainingError, match="was trained on backbone .* re-train it"):
        export_release(other, {"siteA": release["heads"]["siteA"]}, tmp_path / "rel", exporter="torchscript")


def test_adding_a_site_changes_no_other_file(release: dict, tmp_path: Path) -> None:
    out = tmp_path / "release"
    export_release(release["backbone"], {"siteA": release["heads"]["siteA"]}, out, exporter="torchscript")
    backbone_sha = file_sha256(out / "backbone.onnx")
    checkpoint_sha = file_sha256(release["backbone"])
    image = np.random.default_rng(2).standard_normal((1, 1, 12, 12, 12)).astype(np.float32)
    features = dict(zip(["skip0", "dec1"], _run(out / "backbone.onnx", {"image": image})))
    before = {s: _run(out / "heads" / f"{s}.onnx", features)[0] for s in ("universal", "siteA")}

    new_site = make_dataset(tmp_path / "bids", {"siteC": ["lesion", "cord"]}, cases_per_site=1, seed=5)
    site_c = train_head(new_site, release["backbone"], "siteC", "wider", tmp_path / "work", tiny_config())
    manifest = export_release(
        release["backbone"], {"siteA": release["heads"]["siteA"], "siteC": site_c}, out, exporter="torchscript"
    )
    assert file_sha256(release["backbone"]) == checkpoint_sha
    assert file_sha256(out / "backbone.onnx") == backbone_sha == manifest["backbone"]["sha256"]
    after_features = dict(zip(["skip0", "dec1"], _run(out / "backbone.onnx", {"image": image})))
    for site, probabilities in before.items():
        assert np.array_equal(_run(out / "heads" / f"{site}.onnx", after_features)[0], probabilities)
    assert manifest["heads"]["siteC"]["labels"] == [
        {"name": "cord", "value": 1, "channel": 0},
        {"name": "lesion", "value": 1, "channel": 1},
    ]
    # A fresh export of the same checkpoints gives the same bytes: the files do not depend on when they were made.
    again = export_release(
        release["backbone"], {"siteA": release["heads"]["siteA"]}, tmp_path / "fresh", exporter="torchscript"
    )
    assert again["backbone"]["sha256"] == backbone_sha
    assert again["heads"]["siteA"]["sha256"] == manifest["heads"]["siteA"]["sha256"]


@pytest.mark.slow
def test_the_default_dynamo_exporter_passes_the_check(release: dict, tmp_path: Path) -> None:
    manifest = export_release(release["backbone"], release["heads"], tmp_path)
    assert max(manifest["check"]["max_abs_diff"].values()) < 1e-4
    session = ort.InferenceSession(str(tmp_path / "heads" / "siteB.onnx"), providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in session.get_inputs()) == ["dec1", "skip0"]


@pytest.mark.parametrize("strategy", ["finetune", "wider", "spatial"])
def test_release_heads_export_folded(tmp_path: Path, strategy: str) -> None:
    """A head of the release architecture goes to ONNX with its upsampling folded into its 1x1x1 convolution: one
    transposed convolution reads the backbone's coarse features, no concatenation, the same probabilities.
    (What this buys in time is measured by bin/benchmark, docs/PERFORMANCE.md.)"""
    import onnx

    from sct_sitehead.training.arch import Arch
    from sct_sitehead.training.config import load_config
    from sct_sitehead.training.export import HeadGraph, _export_graph
    from sct_sitehead.training.fuse import fuse_head
    from sct_sitehead.training.heads import build_head
    from sct_sitehead.training.unet import UNet

    config = load_config("release")
    model = UNet(Arch.from_config(config, channels=3)).eval()
    head = build_head(strategy, model.head, config).eval()
    trace = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        for parameter in head.parameters():  # zero-initialised added weights would hide a wrong layout
            parameter.add_(0.1 * torch.randn_like(parameter))
        features = model.backbone(trace)
        args = tuple(features[n] for n in model.arch.outputs)
        _export_graph(
            HeadGraph(fuse_head(head)),
            args,
            tmp_path / "h.onnx",
            model.arch.outputs,
            ["probabilities"],
            [2, 1],
            17,
            "torchscript",
        )
        want = head(features).numpy()
    ops = [node.op_type for node in onnx.load(str(tmp_path / "h.onnx")).graph.node]
    assert ops.count("ConvTranspose") == 1 and "Concat" not in ops
    session = ort.InferenceSession(str(tmp_path / "h.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {name: value.numpy() for name, value in zip(model.arch.outputs, args)})
    np.testing.assert_allclose(got, want, atol=1e-5)
