"""qc.py: QC mosaics (orientation, aspect, overlay) and the HTML index."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_nifti import AXIS_CODES, oriented_affine

from sct_sitehead.deploy import qc as qc
from sct_sitehead.deploy.qc import write_qc, write_qc_index
from sct_sitehead.errors import OutputError, UsageError


def first_axial_tile(png) -> np.ndarray:
    """The first axial tile's pixels (it sits at the top-left of the mosaic, below the title)."""
    picture = np.asarray(Image.open(png).convert("RGB"))
    return picture[qc.TITLE_PX : qc.TITLE_PX + qc.TILE_PX, qc.MARGIN : qc.MARGIN + qc.TILE_PX]


def red(pixels: np.ndarray) -> np.ndarray:
    pixels = pixels.astype(np.int16)
    return (pixels[..., 0] > pixels[..., 1] + 60) & (pixels[..., 0] > pixels[..., 2] + 60)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(codes=st.sampled_from(AXIS_CODES))
def test_axial_tiles_are_radiological_with_anterior_up(tmp_path, codes):
    """Patient's right-anterior quadrant, bright in world space, shows at the tile's top-left whatever the file's
    orientation."""
    shape = (20, 20, 20)
    affine = oriented_affine(codes, (1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    index = np.indices(shape).reshape(3, -1)
    world = (affine[:3, :3] @ index).T - centre
    # World x grows towards the patient's right (RAS+), y towards anterior.
    image = ((world[:, 0] > 0) & (world[:, 1] > 0)).reshape(shape).astype(np.float32) * 100 + 1
    png = write_qc(image, np.zeros(shape, bool), affine, tmp_path / f"{codes}.png", codes)
    tile = first_axial_tile(png).mean(axis=2)
    half = qc.TILE_PX // 2
    quadrants = {
        "top-left": tile[: half - 4, : half - 4].mean(),
        "top-right": tile[: half - 4, half + 4 :].mean(),
        "bottom-left": tile[half + 4 :, : half - 4].mean(),
        "bottom-right": tile[half + 4 :, half + 4 :].mean(),
    }
    assert max(quadrants, key=quadrants.get) == "top-left", quadrants
    assert quadrants["top-left"] > 150 and quadrants["bottom-right"] < 60


def test_lesions_are_red_and_their_slices_are_shown(tmp_path):
    shape = (30, 30, 40)
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, shape).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[10:14, 12:16, 33] = True
    png = write_qc(image, mask, np.diag([0.8, 0.8, 2.0, 1.0]), tmp_path / "qc.png", "sub-01 | lesion@1.0.0")
    picture = np.asarray(Image.open(png).convert("RGB"))
    assert red(picture).sum() > 50
    assert red(first_axial_tile(png)).any()  # the only lesion slice is the first axial tile
    assert qc._pick_slices(mask, 2, qc.AXIAL_TILES, spread=0.8, zoom=2.0) == [33]
    clean = write_qc(image, np.zeros(shape, bool), np.eye(4), tmp_path / "clean.png", "no lesion")
    assert not red(np.asarray(Image.open(clean).convert("RGB"))).any()


def test_tiles_keep_the_anatomy_proportions(tmp_path):
    """Voxels of 0.5 x 2 mm in-plane: a 20 x 5 voxel slice is a 10 x 10 mm square, so its tile is square."""
    shape = (20, 5, 6)
    image = np.full(shape, 200.0, np.float32)
    image[0] = 0.0  # one dark column of voxels (1/20 of the width), on the tile's right (radiological)
    png = write_qc(image, np.zeros(shape, bool), np.diag([0.5, 2.0, 1.0, 1.0]), tmp_path / "a.png", "")
    bright = first_axial_tile(png).mean(axis=2) > 128
    rows, cols = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert height == qc.TILE_PX
    assert abs(width - 0.95 * qc.TILE_PX) <= 2
    assert cols[0] == 0


def test_picture_size_is_bounded_and_real_like_volumes_work(tmp_path):
    shape = (320, 256, 19)
    image = np.random.default_rng(1).random(shape).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[100:110, 100:110, 2:17] = True
    png = write_qc(image, mask, np.diag([0.69, 0.69, 7.5, 1.0]), tmp_path / "big.png", "t")
    width, height = Image.open(png).size
    assert width < 1400 and height < 900


def test_axial_tiles_centre_on_the_cord_of_their_slice_and_hold_its_lesions(tmp_path):
    """A wide field of view (80 x 80 mm at 0.5 mm) whose cord moves across the slices: each axial tile shows
    AXIAL_FOV_MM around the cord of its own slice, so the cord sits in the tile's middle; a lesion far from the
    cord (30 mm) widens its tile instead of falling outside it."""
    shape = (160, 160, 4)
    image = np.full(shape, 10.0, np.float32)
    cord = np.zeros(shape, bool)
    xs, ys = np.indices(shape[:2])
    for z, (cx, cy) in enumerate([(40, 50), (80, 80), (120, 110), (80, 80)]):
        disc = (xs - cx) ** 2 + (ys - cy) ** 2 <= 8**2
        cord[:, :, z] = disc
        image[:, :, z][disc] = 200.0
    mask = np.zeros(shape, bool)
    mask[38:42, 48:52, 0] = True  # in the cord of slice 0
    mask[38:42, 48:52, 2] = True  # slice 2's cord is at (120, 110): 50 mm away
    png = write_qc(image, mask, np.diag([0.5, 0.5, 3.0, 1.0]), tmp_path / "qc.png", "", cord=cord)
    tile = first_axial_tile(png).mean(axis=2)
    bright = np.argwhere(tile > 150)
    assert bright.size and np.abs(bright.mean(axis=0) - (qc.TILE_PX - 1) / 2).max() < 8
    # Without a cord the tile is the whole slice, where the cord of slice 0 is far from the middle.
    plain = first_axial_tile(write_qc(image, mask, np.diag([0.5, 0.5, 3.0, 1.0]), tmp_path / "p.png", ""))
    assert np.abs(np.argwhere(plain.mean(axis=2) > 150).mean(axis=0) - (qc.TILE_PX - 1) / 2).max() > 30
    picture = np.asarray(Image.open(png).convert("RGB"))
    second = picture[
        qc.TITLE_PX : qc.TITLE_PX + qc.TILE_PX, qc.MARGIN + qc.TILE_PX + 2 : qc.MARGIN + 2 * qc.TILE_PX + 2
    ]
    assert red(second).any()  # the far lesion of slice 2 is inside its tile


def test_qc_box_holds_masks_and_boxes_with_a_margin():
    """Union of the masks' voxels and the boxes, CORD_MARGIN_MM (8 mm = 16 voxels at 0.5 mm, 2 at 4 mm) more on
    each side, clipped to the image; the fallback when nothing is found."""
    lesion = np.zeros((100, 100, 10), bool)
    lesion[40:45, 50:52, 5] = True
    box = qc.qc_box([lesion], [((30, 42), (60, 70), (0, 3))], (0.5, 0.5, 4.0), None)
    assert box == [(14, 61), (34, 86), (0, 8)]
    assert qc.qc_box([np.zeros((4, 4, 4), bool)], [None], (1.0, 1.0, 1.0), ((0, 2), (0, 2), (0, 2))) == (
        (0, 2),
        (0, 2),
        (0, 2),
    )


def test_tiles_are_named_by_native_voxel_index():
    """A left-to-right image (LAS) cropped from native x = 10: the first RAS column is native x = 10 + 19."""
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    arrays, _, name = qc._to_ras([np.zeros((20, 6, 5))], affine, [10, 3, 0])
    assert arrays[0].shape == (20, 6, 5)
    assert name(0, 0) == "x=29" and name(0, 19) == "x=10" and name(2, 4) == "z=4"
    permuted = np.array([[0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])  # native (A, S, R)
    arrays, _, name = qc._to_ras([np.zeros((6, 5, 20))], permuted, [0, 0, 0])
    assert arrays[0].shape == (20, 6, 5) and name(0, 3) == "z=3" and name(2, 1) == "y=1"


def test_write_qc_errors_leave_no_file(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="same shape"):
        write_qc(np.zeros((4, 4, 4)), np.zeros((4, 4, 3), bool), np.eye(4), tmp_path / "x.png", "")
    with pytest.raises(OutputError, match="exists and is writable"):
        write_qc(np.random.random((4, 4, 4)), np.zeros((4, 4, 4), bool), np.eye(4), tmp_path / "no" / "x.png", "")

    def fail(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(tmp_path), "write_bytes", fail)
    with pytest.raises(OutputError, match="No space left"):
        write_qc(np.random.random((4, 4, 4)), np.zeros((4, 4, 4), bool), np.eye(4), tmp_path / "x.png", "")
    assert list(tmp_path.iterdir()) == []


def test_index_lists_every_entry_escaped(tmp_path):
    (tmp_path / "a b.png").write_bytes(b"png")
    entries = [
        {"image": "/data/sub-01_T2w.nii.gz", "site": "montreal", "png": "a b.png", "lesions": 3, "volume_mm3": 12.345},
        {
            "image": "<script>alert(1)</script>.nii",
            "site": "x",
            "png": str(tmp_path / "a b.png"),
            "lesions": 0,
            "volume_mm3": 0.0,
        },
    ]
    index = write_qc_index(tmp_path, entries)
    assert index == tmp_path / "index.html"
    page = index.read_text()
    assert "sub-01_T2w.nii.gz" in page and "montreal" in page and "12.3" in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert page.count('src="a%20b.png"') == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a b.png", "index.html"]
