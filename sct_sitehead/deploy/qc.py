"""QC pictures: one PNG per input and site (axial and sagittal mosaics, lesions in red), and an HTML index.

Display conventions: the image is reoriented to RAS (exact axis flips and permutations), axial tiles are shown
radiologically (patient's right on the picture's left, anterior up), sagittal tiles with anterior on the left and
superior up; pixels are stretched to the voxel sizes so anatomy keeps its proportions.
"""

from __future__ import annotations

import html
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np

from sct_sitehead.atomic import write_atomic
from sct_sitehead.errors import UsageError

if TYPE_CHECKING:
    from PIL import Image as PILImage

logger = logging.getLogger(__name__)

AXIAL_TILES = 12
AXIAL_COLUMNS = 6
SAGITTAL_TILES = 5
#: Largest tile sizes (width, height) in pixels; sagittal tiles are taller because the cord runs along S-I.
TILE_PX = 180
AXIAL_BOX = (TILE_PX, TILE_PX)
SAGITTAL_BOX = (220, 400)
#: Intensity window, in percentiles of the whole image.
WINDOW_PERCENTILES = (1.0, 99.5)
#: Spacing of the sagittal slices around the centre when there is no lesion to show.
SAGITTAL_STEP_MM = 2.0
OVERLAY_RGB = (255, 0, 0)
OVERLAY_ALPHA = 0.5
MARGIN = 6
TITLE_PX = 22


def write_qc(image: np.ndarray, mask: np.ndarray, affine: np.ndarray, out_png: Path, title: str) -> Path:
    """Write the QC picture of one segmentation.

    Axial slices are those holding lesions (evenly sampled when there are more than :data:`AXIAL_TILES`), or
    slices spread over the middle of the cord's extent when there is none; sagittal slices go through the lesions
    or, without lesions, around the centre of the field of view.

    Args:
        image: (X, Y, Z) image on its native grid.
        mask: (X, Y, Z) bool lesion mask on the same grid.
        affine: (4, 4) native voxel-to-world affine.
        out_png: output path (written atomically).
        title: text written above the mosaics.

    Returns:
        ``out_png``.

    Raises:
        UsageError: shapes differ or are not 3D.
        OutputError: the picture cannot be written.
    """
    from PIL import Image

    image = np.asarray(image)
    mask = np.asarray(mask).astype(bool, copy=False)
    if image.ndim != 3 or image.shape != mask.shape:
        raise UsageError(f"QC needs a 3D image and a mask of the same shape, got {image.shape} and {mask.shape}")
    volume, lesions, zooms = _to_ras(image, mask, np.asarray(affine, dtype=np.float64))
    low, high = (float(v) for v in np.percentile(volume, WINDOW_PERCENTILES))
    window = (low, high if high > low else low + 1.0)

    axial = [
        _tile(
            volume[:, :, z].T[::-1, ::-1],
            lesions[:, :, z].T[::-1, ::-1],
            (zooms[1], zooms[0]),
            window,
            f"z={z}",
            AXIAL_BOX,
        )
        for z in _pick_slices(lesions, 2, AXIAL_TILES, spread=0.8, zoom=zooms[2])
    ]
    sagittal = [
        _tile(volume[x].T[::-1, ::-1], lesions[x].T[::-1, ::-1], (zooms[2], zooms[1]), window, f"x={x}", SAGITTAL_BOX)
        for x in _pick_slices(lesions, 0, SAGITTAL_TILES, spread=None, zoom=zooms[0])
    ]
    _letters(axial[0], left="R", top="A")
    _letters(sagittal[0], left="A", top="S")
    rows = [_grid(axial, AXIAL_COLUMNS), _grid(sagittal, SAGITTAL_TILES)]
    width = max(row.width for row in rows) + 2 * MARGIN
    height = TITLE_PX + sum(row.height + MARGIN for row in rows) + MARGIN
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    _text(canvas, (MARGIN, 4), title)
    top = TITLE_PX
    for row in rows:
        canvas.paste(row, (MARGIN, top))
        top += row.height + MARGIN
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=False)
    out_png = Path(out_png)
    write_atomic(out_png, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    logger.debug("QC picture %s (%dx%d)", out_png, width, height)
    return out_png


def _to_ras(image: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import nibabel.orientations as nio

    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(("R", "A", "S")))
    ras_affine = affine @ nio.inv_ornt_aff(transform, image.shape)
    zooms = np.sqrt(np.sum(ras_affine[:3, :3] ** 2, axis=0))
    return nio.apply_orientation(image, transform), nio.apply_orientation(mask, transform), zooms


def _pick_slices(mask: np.ndarray, axis: int, count: int, *, spread: float | None, zoom: float) -> list[int]:
    """Slice indices along ``axis``: through the lesions if any, else around the centre.

    Args:
        spread: without lesions, the central fraction of the axis to sample evenly; None to take slices
            :data:`SAGITTAL_STEP_MM` apart around the centre instead.
    """
    size = mask.shape[axis]
    others = tuple(a for a in range(3) if a != axis)
    with_lesion = np.flatnonzero(mask.any(axis=others))
    if with_lesion.size:
        if with_lesion.size <= count:
            return [int(i) for i in with_lesion]
        picks = np.linspace(0, with_lesion.size - 1, count).round().astype(int)
        return sorted({int(with_lesion[i]) for i in picks})
    if size <= count:
        return list(range(size))
    if spread is not None:
        margin = (1.0 - spread) / 2.0 * (size - 1)
        return sorted({int(round(v)) for v in np.linspace(margin, size - 1 - margin, count)})
    step = max(1, int(round(SAGITTAL_STEP_MM / zoom)))
    centre = (size - 1) // 2
    indices = centre + step * (np.arange(count) - count // 2)
    return sorted({int(i) for i in np.clip(indices, 0, size - 1)})


def _tile(
    grey: np.ndarray,
    lesion: np.ndarray,
    pixel_mm: Sequence[float],
    window: tuple[float, float],
    label: str,
    box: tuple[int, int],
) -> PILImage.Image:
    """One slice as RGB, lesions blended in red, resized to fit ``box`` (width, height) with square pixels in mm."""
    from PIL import Image

    low, high = window
    scaled = np.clip((np.asarray(grey, dtype=np.float32) - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
    rows_mm, cols_mm = grey.shape[0] * pixel_mm[0], grey.shape[1] * pixel_mm[1]
    mm_per_px = max(cols_mm / box[0], rows_mm / box[1])
    size = (max(1, round(cols_mm / mm_per_px)), max(1, round(rows_mm / mm_per_px)))
    grey_px = np.asarray(Image.fromarray(scaled, mode="L").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    lesion_px = (
        np.asarray(
            Image.fromarray(np.ascontiguousarray(lesion, dtype=np.uint8) * 255, mode="L").resize(
                size, Image.Resampling.NEAREST
            )
        )
        > 0
    )
    rgb = np.repeat(grey_px[:, :, None], 3, axis=2)
    rgb[lesion_px] = (1 - OVERLAY_ALPHA) * rgb[lesion_px] + OVERLAY_ALPHA * np.asarray(OVERLAY_RGB, np.float32)
    tile = Image.fromarray(rgb.round().astype(np.uint8), mode="RGB")
    _text(tile, (3, tile.height - 13), label)
    return tile


def _grid(tiles: list[PILImage.Image], columns: int) -> PILImage.Image:
    from PIL import Image

    cell_w = max(tile.width for tile in tiles)
    cell_h = max(tile.height for tile in tiles)
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    grid = Image.new("RGB", (columns * cell_w + (columns - 1) * 2, rows * cell_h + (rows - 1) * 2), (0, 0, 0))
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        x = column * (cell_w + 2) + (cell_w - tile.width) // 2
        y = row * (cell_h + 2) + (cell_h - tile.height) // 2
        grid.paste(tile, (x, y))
    return grid


def _letters(tile: PILImage.Image, *, left: str, top: str) -> None:
    _text(tile, (2, tile.height // 2 - 6), left)
    _text(tile, (tile.width // 2 - 3, 1), top)


def _text(picture: PILImage.Image, xy: tuple[int, int], text: str) -> None:
    from PIL import ImageDraw

    # Shadowed yellow text stays readable on both dark and bright anatomy.
    draw = ImageDraw.Draw(picture)
    draw.text((xy[0] + 1, xy[1] + 1), text, fill=(0, 0, 0))
    draw.text(xy, text, fill=(255, 230, 0))


def write_qc_index(qc_dir: Path, entries: list[dict[str, Any]]) -> Path:
    """Write ``index.html`` in ``qc_dir``: one row per segmentation with its picture, lesion count and volume.

    Args:
        qc_dir: folder holding the pictures.
        entries: dicts with ``image`` (input path), ``png`` (picture, relative to ``qc_dir`` or absolute),
            ``lesions`` (count), ``volume_mm3`` and optionally ``site``.

    Returns:
        The path of ``index.html``.

    Raises:
        OutputError: the page cannot be written.
    """
    qc_dir = Path(qc_dir)
    rows = []
    for entry in entries:
        png = Path(str(entry.get("png", "")))
        if png.is_absolute():
            try:
                png = png.resolve().relative_to(qc_dir.resolve())
            except ValueError:
                pass  # outside qc_dir: linked by absolute file:// URI below
        source = png.as_uri() if png.is_absolute() else quote(png.as_posix())
        volume = entry.get("volume_mm3")
        rows.append(
            "<tr>"
            f"<td>{html.escape(str(entry.get('image', '')))}</td>"
            f"<td>{html.escape(str(entry.get('site', '')))}</td>"
            f"<td class=num>{html.escape(str(entry.get('lesions', '')))}</td>"
            f"<td class=num>{'' if volume is None else f'{float(volume):.1f}'}</td>"
            f'<td><a href="{html.escape(source)}"><img src="{html.escape(source)}" '
            f'alt="{html.escape(png.name)}" loading="lazy"></a></td>'
            "</tr>"
        )
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8"><title>sct_deepseg_lesion QC</title>',
            "<style>body{font-family:sans-serif;background:#111;color:#eee}table{border-collapse:collapse}"
            "td,th{border:1px solid #444;padding:4px;vertical-align:top}.num{text-align:right}"
            "img{max-width:1100px}</style></head><body>",
            f"<h1>sct_deepseg_lesion QC ({len(entries)} segmentation{'s' if len(entries) != 1 else ''})</h1>",
            "<table><tr><th>input</th><th>site</th><th>lesions</th><th>volume (mm&sup3;)</th><th>picture</th></tr>",
            *rows,
            "</table></body></html>",
            "",
        ]
    )
    index = qc_dir / "index.html"
    write_atomic(index, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return index
