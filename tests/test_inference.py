"""The network over a model grid: windows.py (Gaussian sliding window, window sizes, mirroring), normalization.py,
session.py (providers, the ONNX backbone + heads model) and prediction.py (the one run-on-grid path)."""

from __future__ import annotations

import logging
import math
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx_factory import HEADS, backbone_model, expected, head_model, write_tiny_release

from sct_sitehead.deploy import session as session
from sct_sitehead.deploy.normalization import normalize
from sct_sitehead.deploy.prediction import NativeImage, predict_on_grid
from sct_sitehead.deploy.session import SiteHeadModel, select_providers
from sct_sitehead.deploy.spatial import to_model_grid
from sct_sitehead.deploy.windows import (
    MIN_WEIGHT,
    WindowSettings,
    edge_beyond_for,
    fill_window,
    gaussian_weights,
    left_right_axis,
    mirrored,
    patch_starts,
    sliding_window,
)
from sct_sitehead.errors import (
    InferenceError,
    InputImageError,
    RegistryError,
    UsageError,
)
from sct_sitehead.registry.specs import LOCALISER_WINDOWS as LOCALISER_WINDOW_SPEC
from sct_sitehead.registry.specs import InputSpec, NormalizationSpec

shapes = st.tuples(*[st.integers(1, 40)] * 3)
patches = st.tuples(*[st.integers(1, 16)] * 3)
LOCALISER_WINDOWS = WindowSettings.from_spec(LOCALISER_WINDOW_SPEC)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    return write_tiny_release(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def model(release) -> SiteHeadModel:
    return SiteHeadModel(release["backbone"], release["heads"], device="cpu", threads=1)


# --- weights and patch grid ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(16, 16, 16), (8, 12, 5), (1, 4, 7)])
def test_gaussian_weights(size):
    weights = gaussian_weights(size)
    assert weights.shape == size and weights.dtype == np.float32
    assert weights.max() == pytest.approx(1.0) and weights.min() >= MIN_WEIGHT > 0
    for axis in range(3):
        np.testing.assert_allclose(weights, np.flip(weights, axis=axis), rtol=1e-6)
    centre = tuple((n - 1) // 2 for n in size)
    assert weights[centre] >= weights.max() * 0.9
    assert gaussian_weights(size, sigma_scale=0.5).min() > weights.min() or min(size) == 1


@settings(max_examples=50, deadline=None)
@given(extra=shapes, patch=patches, overlap=st.floats(0.0, 0.9))
def test_patch_starts_cover_the_volume_with_the_last_patch_flush(extra, patch, overlap):
    shape = tuple(p + e - 1 for p, e in zip(patch, extra))
    starts = patch_starts(shape, patch, overlap)
    assert len(set(starts)) == len(starts)
    covered = np.zeros(shape, bool)
    for start in starts:
        covered[tuple(slice(s, s + p) for s, p in zip(start, patch))] = True
    assert covered.all()
    for axis, (n, p) in enumerate(zip(shape, patch)):
        along = sorted({start[axis] for start in starts})
        assert along[0] == 0 and along[-1] == n - p
        # Steps never exceed the requested stride (rounded up), so the overlap asked for is kept.
        assert all(b - a <= math.ceil(max(p * (1 - overlap), 1)) for a, b in zip(along, along[1:]))


def test_patch_starts_rejects_bad_arguments():
    with pytest.raises(UsageError, match="overlap"):
        patch_starts((10, 10, 10), (4, 4, 4), 1.0)
    with pytest.raises(UsageError, match="smaller than the patch"):
        patch_starts((3, 10, 10), (4, 4, 4), 0.5)


# --- sliding window with numpy networks ----------------------------------------------------------------------------


def voxelwise(batch: np.ndarray) -> dict[str, np.ndarray]:
    """A known voxelwise 'network' with two outputs of different channel counts."""
    x = batch.astype(np.float64)
    return {
        "a": np.concatenate([1 / (1 + np.exp(-3 * (x - 0.5))), np.tanh(x) ** 2], axis=1).astype(np.float32),
        "b": np.cos(x).astype(np.float32),
    }


@settings(max_examples=40, deadline=None)
@given(
    shape=shapes,
    patch=patches,
    overlap=st.floats(0.0, 0.8),
    batch_size=st.integers(1, 5),
    divisor=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16),
)
def test_sliding_window_equals_whole_volume_for_a_voxelwise_network(shape, patch, overlap, batch_size, divisor, seed):
    volume = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    calls = []

    def predict(batch):
        calls.append(batch.shape)
        assert batch.dtype == np.float32 and batch.shape[1] == 1
        assert all(n % divisor == 0 for n in batch.shape[2:])
        return voxelwise(batch)

    result = sliding_window(volume, predict, patch, overlap=overlap, batch_size=batch_size, divisor=divisor)
    direct = voxelwise(volume[None, None])
    assert set(result) == {"a", "b"}
    for key in result:
        assert result[key].shape == (direct[key].shape[1], *shape) and result[key].dtype == np.float32
        np.testing.assert_allclose(result[key], direct[key][0], atol=1e-5)
    assert all(n <= batch_size for n, *_ in calls)
    padded = [max(n, -(-p // divisor) * divisor) for n, p in zip(shape, patch)]
    patch_up = [-(-p // divisor) * divisor for p in patch]
    assert sum(n for n, *_ in calls) == len(patch_starts(padded, patch_up, overlap))


def test_mirroring_averages_the_network_over_flipped_copies_of_each_patch():
    batch = np.random.default_rng(0).normal(size=(3, 1, 4, 5, 6)).astype(np.float32)
    ramp = np.arange(4, dtype=np.float32)[:, None, None]  # an output that depends on the position along axis 0
    calls = []

    def predict(patches):
        calls.append(patches.shape[0])
        return {"p": patches * ramp}

    result = mirrored(predict, [0])(batch)
    assert calls == [6]  # the patch and its mirror image in one call
    np.testing.assert_allclose(result["p"], batch * (ramp + ramp[::-1]) / 2, rtol=1e-6)
    both = mirrored(predict, [0, 2])(batch)["p"]
    assert calls[-1] == 12
    np.testing.assert_allclose(both, batch * (ramp + ramp[::-1]) / 2, rtol=1e-6)  # flips along 2 change nothing here


def test_mirroring_changes_nothing_for_a_network_that_commutes_with_flips():
    batch = np.random.default_rng(1).normal(size=(2, 1, 6, 4, 8)).astype(np.float32)
    result = mirrored(voxelwise, [0, 1, 2])(batch)
    for key, value in voxelwise(batch).items():
        np.testing.assert_allclose(result[key], value, atol=1e-6)
    assert mirrored(voxelwise, []) is voxelwise
    with pytest.raises(UsageError, match="spatial axes"):
        mirrored(voxelwise, [3])


def test_left_right_axis_of_any_orientation():
    assert [left_right_axis(code) for code in ("RAS", "LPI", "PIR", "SLA")] == [0, 0, 2, 1]
    with pytest.raises(UsageError, match="no left-right axis"):
        left_right_axis("SAI")


def recording_identity():
    """A network returning its input, and the list of every batch it was given."""
    seen = []

    def identity(batch):
        seen.append(batch.copy())
        return {"x": batch}

    return identity, seen


def test_small_volume_is_padded_with_its_minimum_and_cropped_back():
    volume = np.random.default_rng(0).normal(size=(5, 7, 3)).astype(np.float32)
    identity, seen = recording_identity()
    # The patch (6, 6, 6) is rounded up to the divisor: one (8, 8, 8) patch, the volume centred in it.
    result = sliding_window(volume, identity, (6, 6, 6), divisor=4)
    np.testing.assert_allclose(result["x"][0], volume, atol=1e-6)
    (batch,) = seen
    assert batch.shape == (1, 1, 8, 8, 8)
    np.testing.assert_array_equal(batch[0, 0, 1:6, 0:7, 2:5], volume)
    assert np.count_nonzero(batch == volume.min()) == batch.size - volume.size + 1
    padded = sliding_window(volume, identity, (8, 8, 8), pad_value=0.0)
    np.testing.assert_allclose(padded["x"][0], volume, atol=1e-6)
    assert np.count_nonzero(seen[-1] == 0.0) == seen[-1].size - volume.size


def test_wrong_output_shapes_are_inference_errors():
    volume = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(InferenceError, match="expected"):
        sliding_window(volume, lambda b: {"x": b[:, :, :-1]}, (8, 8, 8))
    with pytest.raises(InferenceError, match="no output"):
        sliding_window(volume, lambda b: {}, (8, 8, 8))
    with pytest.raises(UsageError):
        sliding_window(volume[0], lambda b: {"x": b}, (8, 8, 8))


# --- sliding window with the tiny ONNX release ---------------------------------------------------------------------


def test_onnx_model_computes_the_known_functions(model):
    batch = np.random.default_rng(0).normal(scale=2.0, size=(3, 1, 8, 6, 4)).astype(np.float32)
    out = model(batch)
    reference = expected(batch)
    assert set(out) == set(HEADS) and model.provider == "CPUExecutionProvider"
    for site in out:
        assert out[site].shape == (3, 2, 8, 6, 4) and out[site].dtype == np.float32
        np.testing.assert_allclose(out[site], reference[site], atol=1e-5)
    assert model.head_inputs == {"universal": ["skip0", "dec1"], "montreal": ["skip0"], "toronto": ["dec1"]}


def test_heads_side_by_side_compute_what_they_compute_one_after_the_other(release, model):
    """With 2 threads and several heads, heads run two at a time on a thread each: the same outputs."""
    side_by_side = SiteHeadModel(release["backbone"], release["heads"], device="cpu", threads=2)
    assert side_by_side._head_workers == 2 and model._head_workers == 1
    single = SiteHeadModel(release["backbone"], {"montreal": release["heads"]["montreal"]}, device="cpu", threads=2)
    assert single._head_workers == 1
    batch = np.random.default_rng(1).normal(scale=2.0, size=(2, 1, 8, 6, 4)).astype(np.float32)
    for _ in range(3):  # the thread pool is made once and reused
        got, want = side_by_side(batch), model(batch)
        assert list(got) == list(want)
        for site in want:  # 1 or 2 threads may sum in another order: equal to float rounding
            np.testing.assert_allclose(got[site], want[site], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(single(batch)["montreal"], want["montreal"], rtol=1e-6, atol=1e-7)


def test_a_window_past_a_long_axis_repeats_its_edge_and_pads_short_axes_with_the_minimum():
    # A crop's window (16, 16, 16) over a crop 5 x 14 x 12: axis 0 is shorter than the network's patch (8 here), so
    # it is padded with the minimum as in a whole-image run; axes 1 and 2 are longer, so their last voxels repeat.
    volume = np.random.default_rng(1).normal(size=(5, 14, 12)).astype(np.float32)
    identity, seen = recording_identity()
    result = sliding_window(volume, identity, (16, 16, 16), edge_beyond=(8, 8, 8))
    np.testing.assert_array_equal(result["x"][0], volume)
    window = seen[0][0, 0]
    inner = window[5:10]  # axis 0: 5 voxels at 5..9 of 16
    np.testing.assert_array_equal(inner[:, 1:15, 2:14], volume)
    np.testing.assert_array_equal(inner[:, 0, 2:14], volume[:, 0])  # axis 1: 1 voxel before, a copy of the first
    np.testing.assert_array_equal(inner[:, 15, 2:14], volume[:, -1])
    np.testing.assert_array_equal(inner[:, 1:15, :2], np.repeat(volume[:, :, :1], 2, axis=2))
    assert np.all(window[:5] == volume.min()) and np.all(window[10:] == volume.min())
    # Without edge_beyond (a whole image), every axis is padded with the minimum.
    sliding_window(volume, identity, (16, 16, 16))
    assert np.all(seen[1][0, 0, 5:10, 0, 2:14] == volume.min())


def test_edge_padding_runs_along_the_cord_axis_of_any_orientation():
    assert edge_beyond_for("RAS", (64, 48, 32)) == (64, 48, 0)
    assert edge_beyond_for("pir", (64, 48, 32)) == (64, 0, 32)
    assert edge_beyond_for("SLA", (16, 16, 16)) == (0, 16, 16)


def test_sliding_window_with_the_onnx_bright_voxel_detector_equals_whole_volume(model):
    rng = np.random.default_rng(1)
    volume = rng.normal(scale=0.3, size=(36, 28, 22)).astype(np.float32)
    volume[10:14, 5:9, 3:6] += 4.0  # a bright blob
    result = sliding_window(volume, model, (16, 16, 16), overlap=0.5, batch_size=3, divisor=2)
    direct = model(volume[None, None])
    np.testing.assert_allclose(result["montreal"][0], direct["montreal"][0, 0], atol=1e-5)
    np.testing.assert_allclose(result["universal"][1], direct["universal"][0, 1], atol=1e-5)
    lesion = result["universal"][1] >= 0.5
    assert lesion[10:14, 5:9, 3:6].all() and lesion.sum() == 4 * 4 * 3


def test_sliding_window_with_a_receptive_field_matches_away_from_patch_borders(tmp_path):
    paths = write_tiny_release(tmp_path, receptive_field=True)
    net = SiteHeadModel(paths["backbone"], {"montreal": paths["heads"]["montreal"]}, device="cpu")
    volume = np.random.default_rng(2).normal(size=(30, 24, 18)).astype(np.float32)
    patch = (12, 12, 12)
    result = sliding_window(volume, net, patch, overlap=0.5, divisor=2)["montreal"][0]
    direct = net(volume[None, None])["montreal"][0, 0]
    # A voxel is exact when every patch covering it sees its whole 3x3x3 neighbourhood (or the volume's edge,
    # where the whole-volume network zero-pads just like the patch).
    exact = np.ones(volume.shape, bool)
    for start in patch_starts(volume.shape, patch, 0.5):
        window = tuple(slice(s, s + p) for s, p in zip(start, patch))
        border = np.zeros(volume.shape, bool)
        border[window] = True
        for axis, (s, p, n) in enumerate(zip(start, patch, volume.shape)):
            face = [slice(None)] * 3
            if s > 0:
                face[axis] = slice(s, s + 1)
                exact[tuple(face)] &= ~border[tuple(face)]
            if s + p < n:
                face[axis] = slice(s + p - 1, s + p)
                exact[tuple(face)] &= ~border[tuple(face)]
    assert 0.2 < exact.mean() < 1.0
    np.testing.assert_allclose(result[exact], direct[exact], atol=1e-5)
    # Elsewhere the Gaussian weights keep the patch-border error small.
    assert np.abs(result - direct).max() < 0.2
    assert np.abs(result - direct)[~exact].mean() < 0.05


# --- normalisation -------------------------------------------------------------------------------------------------


def test_zscore_with_clipping():
    rng = np.random.default_rng(3)
    volume = rng.gamma(2.0, 100.0, size=(30, 20, 10)).astype(np.float32)
    before = volume.copy()
    out = normalize(volume, {"method": "zscore", "clip_percentiles": [0.5, 99.5]})
    np.testing.assert_array_equal(volume, before)
    low, high = np.percentile(volume.astype(np.float64), [0.5, 99.5])
    clipped = np.clip(volume.astype(np.float64), low, high)
    reference = (clipped - clipped.mean()) / clipped.std()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, reference, atol=1e-4)
    assert abs(float(out.mean())) < 1e-4 and abs(float(out.std()) - 1) < 1e-4

    np.testing.assert_array_equal(normalize(volume, NormalizationSpec("zscore", (0.5, 99.5))), out)
    unclipped = normalize(volume, {"method": "zscore"})
    np.testing.assert_allclose(unclipped, (volume - volume.mean()) / volume.astype(np.float64).std(), atol=1e-4)


def test_a_crop_is_normalised_with_the_statistics_of_its_whole_image():
    rng = np.random.default_rng(4)
    whole = rng.gamma(2.0, 100.0, size=(40, 30, 20)).astype(np.float32)
    whole[15:25, 10:20, :] += 600.0  # a bright structure: the crop's own statistics differ a lot
    spec = {"method": "zscore", "clip_percentiles": [0.5, 99.5]}
    crop = (slice(12, 28), slice(8, 22), slice(None))
    np.testing.assert_allclose(normalize(whole[crop], spec, reference=whole), normalize(whole, spec)[crop], atol=1e-5)
    assert abs(float(normalize(whole[crop], spec).mean())) < 1e-4  # on its own, the crop is centred on itself
    with pytest.raises(InputImageError, match="are all"):
        normalize(whole, spec, reference=np.ones((4, 4, 4), dtype=np.float32))


def test_normalize_errors():
    volume = np.random.default_rng(4).random((5, 5, 5)).astype(np.float32)
    with pytest.raises(RegistryError, match="not supported.*zscore"):
        normalize(volume, {"method": "minmax"})
    with pytest.raises(RegistryError, match="clip_percentiles"):
        normalize(volume, {"method": "zscore", "clip_percentiles": [99, 1]})
    with pytest.raises(RegistryError, match="clip_percentiles"):
        normalize(volume, {"method": "zscore", "clip_percentiles": "low"})
    almost_flat = np.zeros((10, 10, 10), np.float32)
    almost_flat[0, 0, 0] = 5.0
    with pytest.raises(InputImageError, match="nothing to segment"):
        normalize(almost_flat, {"method": "zscore", "clip_percentiles": [0.5, 99.5]})


# --- providers -----------------------------------------------------------------------------------------------------


def test_select_providers(monkeypatch):
    import onnxruntime

    assert select_providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert select_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(InferenceError, match="pip uninstall onnxruntime, then pip install onnxruntime-gpu"):
        select_providers("cuda")
    with pytest.raises(UsageError, match="cuda:N"):
        select_providers("gpu0")
    with pytest.raises(UsageError, match="cuda:N"):
        select_providers("cuda:x")
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert select_providers("auto") == [("CUDAExecutionProvider", {"device_id": "0"}), "CPUExecutionProvider"]
    assert select_providers("CUDA:1") == [("CUDAExecutionProvider", {"device_id": "1"}), "CPUExecutionProvider"]


# --- the ONNX model's contract checks ------------------------------------------------------------------------------


def test_head_reading_an_unknown_feature_is_a_registry_error(release, tmp_path):
    bad = tmp_path / "bad.onnx"
    onnx.save(head_model(["skip7"], [[1.0, 0.0]], [0.0], channels={"skip7": 2}), bad)
    with pytest.raises(RegistryError, match=r"reads \['skip7'\].*only outputs \['skip0', 'dec1'\]"):
        SiteHeadModel(release["backbone"], {"bad": bad}, device="cpu")


def test_backbone_with_wrong_input_name_or_head_without_probabilities(release, tmp_path):
    model_proto = backbone_model()
    model_proto.graph.input[0].name = "img"
    for node in model_proto.graph.node:
        node.input[:] = ["img" if name == "image" else name for name in node.input]
    renamed = tmp_path / "renamed.onnx"
    onnx.save(model_proto, renamed)
    with pytest.raises(RegistryError, match="one input named 'image'"):
        SiteHeadModel(renamed, release["heads"], device="cpu")
    head = head_model(["skip0"], [[1.0, 0.0]], [0.0])
    head.graph.output[0].name = "probs"
    head.graph.node[-1].output[0] = "probs"
    wrong = tmp_path / "wrong.onnx"
    onnx.save(head, wrong)
    with pytest.raises(RegistryError, match="'probabilities'"):
        SiteHeadModel(release["backbone"], {"x": wrong}, device="cpu")


def test_missing_or_corrupt_model_files(release, tmp_path):
    with pytest.raises(RegistryError, match="does not exist"):
        SiteHeadModel(tmp_path / "nope.onnx", release["heads"], device="cpu")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model" * 10)
    with pytest.raises(InferenceError, match="cannot load .*garbage.onnx"):
        SiteHeadModel(garbage, release["heads"], device="cpu")


def test_odd_patch_sizes_are_inference_errors(model):
    with pytest.raises(InferenceError, match="multiple of the release's divisor"):
        model(np.zeros((1, 1, 7, 8, 8), np.float32))
    with pytest.raises(InferenceError, match=r"\(N, 1, X, Y, Z\)"):
        model(np.zeros((1, 2, 8, 8, 8), np.float32))


def test_optimised_graphs_are_saved_once_and_reused(release, tmp_path, monkeypatch, caplog):
    batch = np.random.default_rng(5).normal(size=(2, 1, 8, 8, 8)).astype(np.float32)
    first = SiteHeadModel(release["backbone"], release["heads"], device="cpu", optimized_dir=tmp_path / "ort")
    saved = sorted((tmp_path / "ort").glob("*.onnx"))
    assert len(saved) == 4 and all(p.suffix == ".onnx" and "CPUExecutionProvider" in p.name for p in saved)
    assert all(p.with_name(p.name + ".json").is_file() for p in saved)  # each with its recorded sha256
    reference = first(batch)

    def no_save(self, *args):
        raise AssertionError("optimised graph rebuilt although it was saved")

    monkeypatch.setattr(SiteHeadModel, "_save_optimized", no_save)
    again = SiteHeadModel(release["backbone"], release["heads"], device="cpu", optimized_dir=tmp_path / "ort")
    for site, value in again(batch).items():
        np.testing.assert_allclose(value, reference[site], atol=1e-6)
    monkeypatch.undo()
    saved[0].write_bytes(b"damaged")
    with caplog.at_level(logging.WARNING, logger="sct_sitehead.deploy.session"):
        repaired = SiteHeadModel(release["backbone"], release["heads"], device="cpu", optimized_dir=tmp_path / "ort")
    assert "ignoring optimised graph" in caplog.text
    for site, value in repaired(batch).items():
        np.testing.assert_allclose(value, reference[site], atol=1e-6)


def test_unwritable_optimized_dir_is_not_fatal(release, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model = SiteHeadModel(release["backbone"], release["heads"], device="cpu", optimized_dir=blocker / "ort")
    assert model(np.zeros((1, 1, 4, 4, 4), np.float32))["universal"].shape == (1, 2, 4, 4, 4)


def test_deploy_modules_import_no_heavy_library():
    code = (
        "import sys\n"
        "import sct_sitehead.deploy.session, sct_sitehead.deploy.windows, sct_sitehead.deploy.normalization, "
        "sct_sitehead.deploy.prediction, sct_sitehead.deploy.localise, sct_sitehead.deploy.nifti, "
        "sct_sitehead.deploy.spatial, sct_sitehead.deploy.lesions, sct_sitehead.deploy.qc\n"
        "print(sorted(m for m in ('onnxruntime', 'scipy', 'PIL', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"
    assert "onnxruntime" not in vars(session)


# --- the normalisation spec ----------------------------------------------------------------------------------------


def test_normalization_spec_is_typed_from_the_index_and_back():
    spec = NormalizationSpec.from_mapping({"method": "zscore", "clip_percentiles": [0.5, 99.5], "future": 1})
    assert spec == NormalizationSpec("zscore", (0.5, 99.5)) and isinstance(spec.clip_percentiles, tuple)
    assert hash(spec) == hash(NormalizationSpec("zscore", [0.5, 99.5]))  # frozen: usable as a key
    assert spec.as_dict() == {"method": "zscore", "clip_percentiles": [0.5, 99.5]}
    assert NormalizationSpec.from_mapping({"method": "zscore"}).as_dict() == {"method": "zscore"}
    assert NormalizationSpec.from_mapping(spec.as_dict()) == spec
    # Malformed percentiles are refused when the index is parsed; an unknown method only when an image is
    # normalised, so an index may list releases that need a newer version.
    for bad in ([99, 1], "low", [1, 2, 3], [-1, 50]):
        with pytest.raises(RegistryError, match="clip_percentiles"):
            NormalizationSpec("zscore", bad)
    assert NormalizationSpec("minmax").method == "minmax"


# --- window settings -----------------------------------------------------------------------------------------------


def test_window_settings_plan_the_lesion_model_and_the_localiser():
    lesion = WindowSettings()
    assert (lesion.overlap, lesion.batch_size, lesion.max_patches) == (0.5, 4, 4)
    # A whole image: the release's patch, batched; a crop: its window, alone unless it is the patch.
    assert lesion.plan((200, 150, 20), (64, 64, 64), 16) == ((64, 64, 64), 4)
    assert lesion.plan((80, 96, 64), (64, 64, 64), 16, crop_window=(80, 96, 64)) == ((80, 96, 64), 1)
    assert lesion.plan((64, 64, 64), (64, 64, 64), 16, crop_window=(64, 64, 64)) == ((64, 64, 64), 4)
    assert lesion.edge_beyond("RAS", (64, 64, 64)) == (64, 64, 0)
    # The localiser: the whole coarse image in one window of at most 2 patches, a quarter overlap, 2 per call.
    assert (LOCALISER_WINDOWS.overlap, LOCALISER_WINDOWS.batch_size, LOCALISER_WINDOWS.max_patches) == (0.25, 2, 2)
    assert LOCALISER_WINDOWS.plan((73, 64, 300), (64, 64, 64), 8) == ((80, 64, 128), 2)
    assert LOCALISER_WINDOWS.edge_beyond("RAS", (64, 64, 64)) is None


# --- the run-on-grid path ------------------------------------------------------------------------------------------


def grid_spec(**changes) -> InputSpec:
    values = dict(
        orientation="RAS",
        spacing=(2.0, 2.0, 2.0),
        patch_size=(8, 8, 8),
        divisor=4,
        normalization=NormalizationSpec("zscore", (0.5, 99.5)),
    )
    return InputSpec(**{**values, **changes})


def test_predict_on_grid_is_to_grid_then_normalise_then_windows():
    rng = np.random.default_rng(6)
    data = rng.gamma(2.0, 50.0, size=(30, 20, 12)).astype(np.float32)
    affine = np.diag([-1.0, 1.5, 3.0, 1.0])  # LAS: reoriented and resampled on the way
    spec = grid_spec()
    native = NativeImage(data, affine)
    prediction = predict_on_grid(native, spec, voxelwise, WindowSettings(overlap=0.25, batch_size=3))
    sample, grid = to_model_grid(data, affine, spec.orientation, spec.spacing)
    volume = normalize(sample, spec.normalization)
    expected = sliding_window(
        volume, voxelwise, spec.patch_size, overlap=0.25, batch_size=3, divisor=4, edge_beyond=(8, 8, 0)
    )
    assert native.data is data  # not handed over: the caller keeps it
    assert prediction.grid.shape == grid.shape and prediction.crop is None and prediction.sample is None
    assert set(prediction.seconds) == {"to_grid", "normalize", "network"}
    assert all(value >= 0 for value in prediction.seconds.values())
    assert set(prediction.probabilities) == {"a", "b"}
    for key, value in prediction.probabilities.items():
        np.testing.assert_array_equal(value, expected[key])


def test_predict_on_grid_on_a_crop_grows_it_and_normalises_with_the_reference():
    rng = np.random.default_rng(7)
    data = rng.gamma(2.0, 50.0, size=(40, 40, 30)).astype(np.float32)
    data[15:25, 15:25, :] += 400.0
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    spec = grid_spec(spacing=(1.0, 1.0, 1.0), patch_size=(16, 16, 16))
    reference = to_model_grid(data, affine, "RAS", (2.0, 2.0, 2.0))[0]  # a coarse whole image, as the localiser's
    seen = []

    def network(batch):
        seen.append(batch.shape)
        return voxelwise(batch)

    native = NativeImage(data, affine, hand_over=True)
    box = ((16, 24), (14, 26), (10, 20))
    prediction = predict_on_grid(native, spec, network, WindowSettings(), crop=box, reference=reference)
    grown, window = fill_window(box, affine, data.shape, "RAS", (1.0, 1.0, 1.0), (16, 16, 16), 4)
    assert native.data is None  # handed over: dropped once on the model grid
    assert prediction.crop == grown == prediction.grid.bbox and prediction.grid.shape == window
    assert all(a <= c and d <= b for (c, d), (a, b) in zip(box, grown))
    assert seen == [(1, 1, *window)]  # one window, alone
    volume = normalize(data[tuple(slice(a, b) for a, b in grown)], spec.normalization, reference=reference)
    np.testing.assert_allclose(prediction.probabilities["b"][0], np.cos(volume), atol=1e-6)
    with pytest.raises(UsageError, match="handed over"):
        predict_on_grid(native, spec, network, WindowSettings())


def test_predict_on_grid_keeps_the_sample_when_asked():
    data = np.random.default_rng(8).normal(100, 10, size=(16, 16, 16)).astype(np.float32)
    prediction = predict_on_grid(
        NativeImage(data, np.eye(4)), grid_spec(), voxelwise, LOCALISER_WINDOWS, keep_sample=True
    )
    np.testing.assert_array_equal(prediction.sample, to_model_grid(data, np.eye(4), "RAS", (2.0, 2.0, 2.0))[0])
